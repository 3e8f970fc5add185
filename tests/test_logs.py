"""JSON log pipeline: format, sinks, redaction, repeat collapse and rotation."""

from __future__ import annotations

import io
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from walacord import logs

SECRET = "s3cr3t-pw"


@pytest.fixture
def log_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "log"
    logs.setup("debug", str(directory), repeat_window=60, secrets=["configured-secret-value"],
               stream=io.StringIO())
    try:
        yield directory
    finally:
        logs.shutdown()


def read_lines(path: Path) -> list[dict[str, object]]:
    logs.shutdown()  # flushes the writer thread
    return [orjson.loads(line) for line in path.read_text().splitlines() if line]


def test_line_has_required_fields(log_dir: Path) -> None:
    logging.getLogger("walacord.test").info("mode.changed", extra={"fields": {"to": "normal"}})
    [line] = read_lines(log_dir / logs.MAIN_FILE)
    assert line["event"] == "mode.changed"
    assert line["level"] == "info"
    assert line["logger"] == "walacord.test"
    assert line["to"] == "normal"
    assert str(line["ts"]).endswith("Z")


def test_non_utf8_file_name_is_escaped(log_dir: Path) -> None:
    name = os.fsdecode(b"zz\xff.json")
    logging.getLogger("walacord.test").warning(
        "backup.manifest_invalid", extra={"fields": {"path": name, "paths": [Path(name)]}})
    [line] = read_lines(log_dir / logs.MAIN_FILE)
    assert line["path"] == "zz\\xff.json"
    assert line["paths"] == ["zz\\xff.json"]


def test_library_prose_keeps_message(log_dir: Path) -> None:
    logging.getLogger("psycopg.pool").warning("connection lost: %s", "boom")
    [line] = read_lines(log_dir / logs.MAIN_FILE)
    assert line["event"] == "psycopg.pool.message"
    assert line["message"] == "connection lost: boom"


def test_errors_file_gets_only_errors(log_dir: Path) -> None:
    log = logging.getLogger("walacord.test")
    log.info("a.info")
    log.error("a.error")
    lines = read_lines(log_dir / logs.ERROR_FILE)
    assert [line["event"] for line in lines] == ["a.error"]


def test_alert_and_performance_files(log_dir: Path) -> None:
    logging.getLogger(logs.ALERT_LOGGER).info("alert.firing", extra={"fields": {"a": 1}})
    logging.getLogger(logs.PERFORMANCE_LOGGER).info("probe.timing")
    logging.getLogger("walacord.other").info("other.event")
    logs.shutdown()
    alerts = (log_dir / logs.ALERT_FILE).read_text()
    performance = (log_dir / logs.PERFORMANCE_FILE).read_text()
    assert "alert.firing" in alerts
    assert "other.event" not in alerts
    assert "probe.timing" in performance
    assert "other.event" not in performance


@pytest.mark.parametrize("text", [
    f"postgresql://walacord:{SECRET}@db:5432/app",
    f"postgres://walacord:{SECRET}@db1:5432,db2:5432/app?target_session_attrs=read-write",
    f"host=db user=walacord password={SECRET} dbname=app",
    f"host=db password='{SECRET}' dbname=app",
    f"host=db PASSWORD = {SECRET}",
    f"Authorization: Bearer {SECRET}",
    f'{{"api_token": "Bearer {SECRET}"}}',
    f'{{"password": "{SECRET}"}}',
    f"token Bearer {SECRET}",
])
def test_redactor_removes_secret(text: str) -> None:
    assert SECRET not in logs.redact(text)


def test_redactor_removes_configured_value(log_dir: Path) -> None:
    logging.getLogger("walacord.test").error("x.failed", extra={"fields": {
        "detail": "the value configured-secret-value leaked"}})
    [line] = read_lines(log_dir / logs.MAIN_FILE)
    assert "configured-secret-value" not in orjson.dumps(line).decode()


def test_redaction_applies_to_exceptions(log_dir: Path) -> None:
    try:
        raise RuntimeError(f"cannot connect to postgresql://u:{SECRET}@h/db")
    except RuntimeError:
        logging.getLogger("walacord.test").exception("db.failed")
    logs.shutdown()
    assert SECRET not in (log_dir / logs.MAIN_FILE).read_text()


def test_repeats_are_collapsed(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    setup = logs.setup("info", str(directory), repeat_window=0.3, stream=io.StringIO())
    log = logging.getLogger("walacord.test")
    for _ in range(50):
        log.warning("probe.failed", extra={"fields": {"probe": "database", "latency_seconds": 1}})
    import time
    time.sleep(0.35)
    log.warning("probe.failed", extra={"fields": {"probe": "database"}})
    setup.stop()
    lines = [orjson.loads(x) for x in (directory / logs.MAIN_FILE).read_text().splitlines()]
    assert len(lines) == 2
    assert lines[1]["repeated"] == 49


def test_distinct_failures_not_collapsed(log_dir: Path) -> None:
    log = logging.getLogger("walacord.test")
    log.warning("probe.failed", extra={"fields": {"probe": "database"}})
    log.warning("probe.failed", extra={"fields": {"probe": "walacor"}})
    assert len(read_lines(log_dir / logs.MAIN_FILE)) == 2


def test_full_queue_drops_without_blocking(tmp_path: Path) -> None:
    setup = logs.LogSetup("info", None, queue_size=100, repeat_window=60, stream=io.StringIO())
    # The listener is not started, so nothing drains the queue.
    logging.getLogger().addHandler(setup.queue_handler)
    try:
        for index in range(150):
            logging.getLogger("walacord.test").info("x.y", extra={"fields": {"i": index}})
    finally:
        logging.getLogger().removeHandler(setup.queue_handler)
    assert setup.queue_handler.dropped == 50


def test_reopen_after_rotation(log_dir: Path) -> None:
    log = logging.getLogger("walacord.test")
    log.info("before.rotate")
    import time
    time.sleep(0.2)
    os.rename(log_dir / logs.MAIN_FILE, log_dir / (logs.MAIN_FILE + ".1"))
    assert logs._current is not None
    logs._current.reopen()
    log.info("after.rotate")
    logs.shutdown()
    assert "after.rotate" in (log_dir / logs.MAIN_FILE).read_text()
    assert "before.rotate" in (log_dir / (logs.MAIN_FILE + ".1")).read_text()


def test_reopen_after_directory_removed(log_dir: Path) -> None:
    import shutil

    log = logging.getLogger("walacord.test")
    log.info("before.remove")
    assert logs._current is not None
    import time
    time.sleep(0.2)  # let the writer thread write it before the directory goes
    shutil.rmtree(log_dir)
    assert logs._current.reopen() == []
    log.info("after.remove")
    logs.shutdown()
    assert "after.remove" in (log_dir / logs.MAIN_FILE).read_text()


def test_request_chatter_hidden_at_info(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    setup = logs.setup("info", str(directory), repeat_window=60, stream=io.StringIO())
    logging.getLogger("httpx").info("HTTP Request: GET http://127.0.0.1/ \"HTTP/1.1 200 OK\"")
    logging.getLogger("httpx").warning("connection pool is full")
    setup.set_level("debug")
    logging.getLogger("httpx").info("HTTP Request: GET http://127.0.0.1/debug")
    setup.stop()

    text = (directory / logs.MAIN_FILE).read_text()
    assert "HTTP/1.1 200 OK" not in text
    assert "connection pool is full" in text
    assert "127.0.0.1/debug" in text


def test_full_queue_counts_drops(tmp_path: Path) -> None:
    setup = logs.LogSetup("info", None, queue_size=10, repeat_window=60, stream=io.StringIO())
    drops: list[int] = []
    setup.count_into(lambda: drops.append(1), lambda name: None)
    logging.getLogger().addHandler(setup.queue_handler)
    try:
        for index in range(25):
            logging.getLogger("walacord.test").info("x.y", extra={"fields": {"i": index}})
    finally:
        logging.getLogger().removeHandler(setup.queue_handler)
    assert len(drops) == 15


def test_full_log_disk_reported_once(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    directory.mkdir()
    # Writes to /dev/full fail with ENOSPC, as on a full log file system.
    (directory / logs.MAIN_FILE).symlink_to("/dev/full")
    stderr = io.StringIO()
    setup = logs.setup("info", str(directory), repeat_window=60, stream=stderr)
    failed: list[str] = []
    setup.count_into(lambda: None, failed.append)
    for index in range(50):
        logging.getLogger("walacord.test").info("disk.test", extra={"fields": {"i": index}})
    logs.shutdown()

    lines = [orjson.loads(line) for line in stderr.getvalue().splitlines()]
    reports = [line for line in lines if line["event"] == "log.write_failed"]
    assert failed == [logs.MAIN_FILE] * 50
    assert len(reports) == 1
    assert reports[0]["file"] == str(directory / logs.MAIN_FILE)
    assert "No space left on device" in str(reports[0]["error"])
    assert sum(line["event"] == "disk.test" for line in lines) == 50
    assert "Logging error" not in stderr.getvalue()


def wait_written(path: Path, text: str) -> bool:
    """Return whether `text` appears in the file at `path` within 5 s."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if path.exists() and path.is_file() and text in path.read_text():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("breakage", ["file_is_directory", "directory_is_file"])
def test_unopenable_log_file_keeps_logging(tmp_path: Path, breakage: str) -> None:
    """A log file that cannot be reopened after a rotation counts as failed writes: the
    writer thread keeps going, stderr keeps every line, and the file is written again
    once it can be opened."""
    directory = tmp_path / "log"
    stderr = io.StringIO()
    setup = logs.setup("info", str(directory), repeat_window=60, stream=stderr)
    failed: list[str] = []
    setup.count_into(lambda: None, failed.append)
    log = logging.getLogger("walacord.test")
    main = directory / logs.MAIN_FILE
    try:
        log.info("before.break")
        assert wait_written(main, "before.break")
        if breakage == "file_is_directory":
            # As a rotation that leaves a file walacord may not open: open() fails.
            os.rename(main, tmp_path / "rotated.log")
            main.mkdir()
        else:
            shutil.rmtree(directory)
            directory.write_text("")
        setup.reopen()
        for index in range(3):
            log.info("while.broken", extra={"fields": {"i": index}})
        log.info("mode.changed")
        assert wait_written_stderr(stderr, "mode.changed")
        if breakage == "file_is_directory":
            main.rmdir()
        else:
            directory.unlink()
            directory.mkdir()
        log.info("after.fix")
        assert wait_written(main, "after.fix")
        thread_alive = setup.listener._thread is not None and setup.listener._thread.is_alive()
    finally:
        logs.shutdown()

    lines = [orjson.loads(line) for line in stderr.getvalue().splitlines()]
    events = [line["event"] for line in lines]
    assert thread_alive
    assert events.count("while.broken") == 3
    assert "after.fix" in events
    assert [line for line in lines if line["event"] == "log.write_failed"]
    assert logs.MAIN_FILE in failed
    assert "Logging error" not in stderr.getvalue()


def wait_written_stderr(stream: io.StringIO, text: str) -> bool:
    """Return whether `text` reaches `stream` within 5 s."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if text in stream.getvalue():
            return True
        time.sleep(0.01)
    return False
