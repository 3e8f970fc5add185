"""walacorctl edge cases: a reader that closed the pipe, and a bad line in --from-file."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from psycopg_pool import AsyncConnectionPool

from tests.outbox.test_control import serving_outbox
from walacord.config import Config, OutboxConfig, OutboxStatement
from walacord.control.cli import main as walacorctl
from walacord.outbox.service import build_sinks

pytestmark = pytest.mark.anyio


class ClosedAfter(io.StringIO):
    """Text stream that raises BrokenPipeError once `limit` characters were written."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def write(self, text: str) -> int:
        if self.tell() + len(text) > self.limit:
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


async def test_export_into_closed_pipe_exits_quietly(
        tmp_path: Path, outbox_config: OutboxConfig,
        ledger_pool: AsyncConnectionPool[Any]) -> None:
    config = dataclasses.replace(outbox_config, sync_interval=3600.0)
    sinks = build_sinks(Config(outbox=config), pool=ledger_pool)
    out, err = ClosedAfter(200), io.StringIO()
    async with serving_outbox(tmp_path, config, sinks) as (path, _):
        for index in range(20):
            code = await anyio.to_thread.run_sync(lambda i=index: walacorctl(
                ["--socket", path, "enqueue", "--sink", "postgres", "--statement",
                 "insert_row", "--key", f"p{i}", "--data", f'{{"key": "p{i}", "amount": 1}}'],
                stdout=io.StringIO(), stderr=io.StringIO()))
            assert code == 0
        exported = await anyio.to_thread.run_sync(lambda: walacorctl(
            ["--socket", path, "outbox", "export"], stdout=out, stderr=err))

    assert exported == 141
    assert err.getvalue() == ""
    assert len(out.getvalue()) <= 200


async def test_from_file_error_names_file_and_line(
        tmp_path: Path, outbox_config: OutboxConfig,
        ledger_pool: AsyncConnectionPool[Any]) -> None:
    config = dataclasses.replace(outbox_config, sync_interval=3600.0)
    sinks = build_sinks(Config(outbox=config), pool=ledger_pool)
    jsonl = tmp_path / "ops.jsonl"
    jsonl.write_text(
        '{"sink": "postgres", "statement": "insert_row", "key": "l1", '
        '"params": {"amount": 1}}\n'
        "\n"
        '{"sink": "postgres", "statement": "insert_row", "key": "l3", '
        '"params": {"amount": 3}}\n'
        '{"sink": "nowhere", "key": "l4", "data": {}}\n')
    err = io.StringIO()
    async with serving_outbox(tmp_path, config, sinks) as (path, outbox):
        code = await anyio.to_thread.run_sync(lambda: walacorctl(
            ["--socket", path, "enqueue", "--from-file", str(jsonl)],
            stdout=io.StringIO(), stderr=err))
        stats = await outbox.store.stats()

    assert code == 1
    assert f"{jsonl}:4: sink: " in err.getvalue()
    assert "Nothing was enqueued" in err.getvalue()
    assert stats.accepted == 0


async def test_sync_explains_operations_in_backoff(
        tmp_path: Path, outbox_config: OutboxConfig,
        ledger_pool: AsyncConnectionPool[Any]) -> None:
    broken = OutboxStatement(sql="INSERT INTO no_such_table (key) VALUES (%(key)s) "
                                 "ON CONFLICT (key) DO NOTHING")
    config = dataclasses.replace(outbox_config, sync_interval=3600.0, retry_initial=600.0,
                                 retry_max=600.0, statements={"broken": broken})
    sinks = build_sinks(Config(outbox=config), pool=ledger_pool)
    async with serving_outbox(tmp_path, config, sinks) as (path, outbox):
        # A healthy sink would start a pass at the enqueue; here only `sync` applies.
        outbox.engine.sink_unhealthy("postgres")

        def run(*args: str) -> tuple[int, str]:
            out = io.StringIO()
            code = walacorctl(["--socket", path, *args], stdout=out, stderr=io.StringIO())
            return code, out.getvalue()

        await anyio.to_thread.run_sync(lambda: run(
            "enqueue", "--sink", "postgres", "--statement", "broken", "--key", "b1",
            "--data", "{}"))
        first = await anyio.to_thread.run_sync(lambda: run("sync"))
        second = await anyio.to_thread.run_sync(lambda: run("sync"))

    assert "none was due" not in first[1]
    assert second[0] == 0
    assert "applied 0, retrying 0, dead 0; 1 pending" in second[1]
    assert "none was due" in second[1]


async def test_from_file_splits_large_files(
        tmp_path: Path, outbox_config: OutboxConfig,
        ledger_pool: AsyncConnectionPool[Any]) -> None:
    config = dataclasses.replace(outbox_config, sync_interval=3600.0)
    sinks = build_sinks(Config(outbox=config), pool=ledger_pool)
    padding = "x" * 1500
    many = tmp_path / "many.jsonl"
    # 1,200 operations of about 1.6 kB: 1,000 of them would exceed the 1 MiB request limit.
    many.write_text("".join(
        f'{{"sink": "postgres", "statement": "insert_row", "key": "m{i}", '
        f'"params": {{"amount": {i}, "note": "{padding}"}}}}\n' for i in range(1200)))
    huge = tmp_path / "huge.jsonl"
    huge.write_text(
        '{"sink": "postgres", "statement": "insert_row", "key": "h1", '
        '"params": {"amount": 1}}\n'
        f'{{"sink": "postgres", "statement": "insert_row", "key": "h2", '
        f'"params": {{"amount": 2, "note": "{"y" * (2 * 1024 * 1024)}"}}}}\n')

    def run(path: str, file: Path) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = walacorctl(["--socket", path, "enqueue", "--from-file", str(file)],
                          stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    async with serving_outbox(tmp_path, config, sinks) as (path, outbox):
        split = await anyio.to_thread.run_sync(lambda: run(path, many))
        rejected = await anyio.to_thread.run_sync(lambda: run(path, huge))
        stats = await outbox.store.stats()

    assert split[0] == 0, split[2]
    assert "enqueued 1200" in split[1]
    assert rejected[0] == 1
    assert f"{huge}:2: the operation with key 'h2' is " in rejected[2]
    assert "the 1 operation was enqueued before line 2, and nothing from that line on" in \
        rejected[2].lower()
    assert stats.accepted == 1201


async def test_data_over_request_limit(
        tmp_path: Path, outbox_config: OutboxConfig,
        ledger_pool: AsyncConnectionPool[Any]) -> None:
    config = dataclasses.replace(outbox_config, sync_interval=3600.0)
    sinks = build_sinks(Config(outbox=config), pool=ledger_pool)
    data = f'{{"amount": 1, "note": "{"z" * (2 * 1024 * 1024)}"}}'
    err = io.StringIO()
    async with serving_outbox(tmp_path, config, sinks) as (path, outbox):
        code = await anyio.to_thread.run_sync(lambda: walacorctl(
            ["--socket", path, "enqueue", "--sink", "postgres", "--statement", "insert_row",
             "--key", "big", "--data", data], stdout=io.StringIO(), stderr=err))
        stats = await outbox.store.stats()

    assert code == 1
    assert "the operation with key 'big' is " in err.getvalue()
    assert "[control] max_request_bytes" in err.getvalue()
    assert "Nothing was enqueued" in err.getvalue()
    assert stats.accepted == 0


@pytest.mark.parametrize(("args", "expected"), [
    (["--sink", "walacor", "--etid", "1", "--key", "k", "--data", '"text"'],
     "--data must be a JSON object"),
    (["--sink", "walacor", "--etid", "1", "--key", "", "--data", "{}"], "--key is empty"),
    (["--sink", "walacor", "--etid", "1", "--data", "{}"],
     "enqueue is missing --key; write --sink walacor --etid N --key KEY --data JSON, or "
     "--from-file FILE for a file of operations"),
    (["--sink", "walacor"], "enqueue is missing --etid, --key and --data"),
    (["--sink", "postgres", "--key", "k", "--data", "{}"],
     "enqueue is missing --statement; write --sink postgres --statement NAME --key KEY "
     "--data JSON, or --from-file FILE"),
    (["--key", "k"], "enqueue is missing --sink and --data; write --sink walacor --etid N "
                     "--key KEY --data JSON or --sink postgres --statement NAME --key KEY "
                     "--data JSON, or --from-file FILE"),
    ([], "enqueue is missing --sink, --key and --data"),
    (["--from-file", "ops.jsonl", "--key", "k"], "--from-file takes every field from the "
                                                 "file; drop --key"),
    (["--sink", "postgres", "--etid", "10001", "--key", "k", "--data", "{}"],
     "--etid does not apply to --sink postgres: a PostgreSQL operation names its configured "
     "statement with --statement NAME"),
    (["--sink", "walacor", "--statement", "s", "--key", "k", "--data", "{}"],
     "--statement does not apply to --sink walacor"),
    (["--sink", "walacor", "--etid", "1", "--key", "k",
      "--data", "[" * 300 + "]" * 300], "--data must be a JSON object"),
    (["--sink", "walacor", "--etid", "1", "--key", "k",
      "--data", '{"a":' + "[" * 300 + "]" * 300 + "}"], "--data cannot be sent as JSON"),
    (["--sink", "walacor", "--etid", "1", "--key", "k",
      "--data", '{"a":' + "[" * 251 + "]" * 251 + "}"], "--data cannot be sent as JSON"),
    (["--sink", "walacor", "--etid", "1", "--key", "k",
      "--data", '{"amount": 1234567890123456.78}'],
     "--data: the number 1234567890123456.78 has more significant digits"),
    (["--sink", "walacor", "--etid", "1", "--key", "k",
      "--data", '{"amount": 1, "note": "a:b", "amount": 1000}'],
     "--data: the key 'amount' appears twice in one object"),
])
def test_enqueue_flag_errors(args: list[str], expected: str, tmp_path: Path) -> None:
    err = io.StringIO()
    code = walacorctl(["--socket", str(tmp_path / "none.sock"), "enqueue", *args],
                      stdout=io.StringIO(), stderr=err)

    assert code == 2
    assert expected in err.getvalue()


@pytest.mark.parametrize(("args", "expected"), [
    ([], "missing operation: pass an operation id or --key KEY"),
    (["7", "--key", "k"], "pass an operation id or --key KEY, not both"),
])
def test_outbox_show_needs_id_or_key(args: list[str], expected: str, tmp_path: Path) -> None:
    err = io.StringIO()
    code = walacorctl(["--socket", str(tmp_path / "none.sock"), "outbox", "show", *args],
                      stdout=io.StringIO(), stderr=err)
    assert code == 2
    assert expected in err.getvalue()


async def test_outbox_show_escapes_key(
        tmp_path: Path, outbox_config: OutboxConfig,
        ledger_pool: AsyncConnectionPool[Any]) -> None:
    config = dataclasses.replace(outbox_config, sync_interval=3600.0)
    sinks = build_sinks(Config(outbox=config), pool=ledger_pool)
    key = "t1-\x1b[2Jx\u202e"
    line = orjson.dumps({"sink": "postgres", "statement": "insert_row", "key": key,
                         "params": {"amount": 1}}) + b"\n"
    async with serving_outbox(tmp_path, config, sinks) as (path, _):
        enqueue_err = io.StringIO()
        enqueued = await anyio.to_thread.run_sync(lambda: walacorctl(
            ["--socket", path, "enqueue", "--from-file", "-"],
            stdout=io.StringIO(), stderr=enqueue_err, stdin=io.BytesIO(line)))
        out = io.StringIO()
        code = await anyio.to_thread.run_sync(lambda: walacorctl(
            ["--socket", path, "outbox", "show", "--key", key],
            stdout=out, stderr=io.StringIO()))

    assert enqueued == 0, enqueue_err.getvalue()
    assert code == 0
    assert "key:             t1-\\x1b[2Jx\\u202e" in out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue()
    assert "\u202e" not in out.getvalue()


@contextlib.contextmanager
def scripted_daemon(path: Path, answer: Callable[[dict[str, Any]], bytes | None]
                    ) -> Iterator[None]:
    """Serve the control socket at `path` from a thread: `answer` turns each request into
    its response line, or None to close the connection without a response."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        connection, _ = server.accept()
        with connection, connection.makefile("rb") as requests:
            for line in requests:
                response = answer(orjson.loads(line))
                if response is None:
                    return
                connection.sendall(response)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.close()
        thread.join(10)


def enqueue_answer(request: dict[str, Any]) -> bytes:
    """Return the response of a daemon that stores every operation of `request`."""
    results = [{"id": index, "key": op["key"], "state": "pending", "created": True}
               for index, op in enumerate(request["params"]["operations"])]
    return orjson.dumps({"id": request["id"], "result": {"results": results}}) + b"\n"


FILE_LINES = b"".join(b'{"sink": "walacor", "etid": 1, "key": "k%d", "data": {}}\n' % i
                      for i in range(3))


def test_from_file_lost_connection_says_rerun(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("walacord.outbox.commands.FILE_BATCH", 1)
    requests = 0

    def answer(request: dict[str, Any]) -> bytes | None:
        nonlocal requests
        requests += 1
        # The daemon dies while the second request is in flight.
        return enqueue_answer(request) if requests == 1 else None

    socket_path = tmp_path / "control.sock"
    err = io.StringIO()
    with scripted_daemon(socket_path, answer):
        code = walacorctl(["--socket", str(socket_path), "enqueue", "--from-file", "-"],
                          stdout=io.StringIO(), stderr=err, stdin=io.BytesIO(FILE_LINES))

    assert code == 3
    assert "-: Enqueued before line 2: 1 operation." in err.getvalue()
    assert "may or may not be stored" in err.getvalue()
    assert "Run the same file again" in err.getvalue()


def test_from_file_summary_survives_lost_stats(tmp_path: Path) -> None:
    def answer(request: dict[str, Any]) -> bytes | None:
        # The daemon dies after it acknowledged every operation.
        return enqueue_answer(request) if request["method"] == "outbox.enqueue" else None

    socket_path = tmp_path / "control.sock"
    out, err = io.StringIO(), io.StringIO()
    with scripted_daemon(socket_path, answer):
        code = walacorctl(["--socket", str(socket_path), "enqueue", "--from-file", "-"],
                          stdout=out, stderr=err, stdin=io.BytesIO(FILE_LINES))

    assert code == 0
    assert out.getvalue() == "enqueued 3, already known 0\n"
    assert "every operation was enqueued, but reading the outbox's pending count " \
        "failed" in err.getvalue()


async def test_from_file_conflict_names_lines_and_stored(
        tmp_path: Path, outbox_config: OutboxConfig, ledger_pool: AsyncConnectionPool[Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("walacord.outbox.commands.FILE_BATCH", 2)
    config = dataclasses.replace(outbox_config, sync_interval=3600.0)
    sinks = build_sinks(Config(outbox=config), pool=ledger_pool)
    lines = b"".join(
        b'{"sink": "postgres", "statement": "insert_row", "key": "%s", '
        b'"params": {"amount": %d}}\n' % (key, amount)
        for key, amount in ((b"c1", 1), (b"c2", 2), (b"c3", 3), (b"c1", 9)))
    async with serving_outbox(tmp_path, config, sinks) as (path, outbox):
        err = io.StringIO()
        code = await anyio.to_thread.run_sync(lambda: walacorctl(
            ["--socket", path, "enqueue", "--from-file", "-"],
            stdout=io.StringIO(), stderr=err, stdin=io.BytesIO(lines)))
        stats = await outbox.store.stats()

    assert code == 1
    assert "-:3-4: key 'c1' is already stored" in err.getvalue()
    assert "The 2 operations were enqueued before line 3, and nothing from that line on" \
        in err.getvalue()
    assert stats.accepted == 2


async def test_from_file_stdin_and_line_limit(
        tmp_path: Path, outbox_config: OutboxConfig,
        ledger_pool: AsyncConnectionPool[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    config = dataclasses.replace(outbox_config, sync_interval=3600.0)
    sinks = build_sinks(Config(outbox=config), pool=ledger_pool)
    lines = b"".join(b'{"sink": "postgres", "statement": "insert_row", "key": "s%d", '
                     b'"params": {"key": "s%d", "amount": 1}}\n' % (i, i) for i in range(3))
    # One line bigger than any request, with no newline in sight: rejected after the
    # limit is read, not after the whole line.
    monkeypatch.setattr("walacord.outbox.commands.MAX_LINE_BYTES", 1000)
    huge = b'{"sink": "walacor", "data": "' + b"x" * 5000 + b'"}\n'
    async with serving_outbox(tmp_path, config, sinks) as (path, outbox):
        out, err = io.StringIO(), io.StringIO()
        code = await anyio.to_thread.run_sync(lambda: walacorctl(
            ["--socket", path, "--json", "enqueue", "--from-file", "-"],
            stdout=out, stderr=err, stdin=io.BytesIO(lines)))
        show_out = io.StringIO()
        await anyio.to_thread.run_sync(lambda: walacorctl(
            ["--socket", path, "--json", "outbox", "show", "--key", "s1"],
            stdout=show_out, stderr=io.StringIO()))
        human_out = io.StringIO()
        await anyio.to_thread.run_sync(lambda: walacorctl(
            ["--socket", path, "outbox", "show", "--key", "s1"],
            stdout=human_out, stderr=io.StringIO()))
        huge_err = io.StringIO()
        huge_code = await anyio.to_thread.run_sync(lambda: walacorctl(
            ["--socket", path, "enqueue", "--from-file", "-"],
            stdout=io.StringIO(), stderr=huge_err, stdin=io.BytesIO(lines + huge)))
        stats = await outbox.store.stats()

    assert code == 0, err.getvalue()
    assert '"key":"s1"' in show_out.getvalue().replace(" ", "")
    human = human_out.getvalue().splitlines()
    assert "key:             s1" in human
    assert any(re.fullmatch(r"created_at:      \d{4}-\d\d-\d\dT[\d:.]+Z", line)
               for line in human)
    assert "payload:" in human
    assert huge_code == 2
    assert "-:4: line longer than 1000 bytes" in huge_err.getvalue()
    assert stats.accepted == 3


def test_huge_etid_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        walacorctl(["--socket", str(tmp_path / "none.sock"), "enqueue", "--sink", "walacor",
                    "--etid", "99999999999999999999999", "--key", "k", "--data", "{}"],
                   stdout=io.StringIO(), stderr=io.StringIO())
    assert caught.value.code == 2
    assert "99999999999999999999999 is out of range" in capsys.readouterr().err


def test_from_file_repeated_key_names_line(tmp_path: Path) -> None:
    operations = tmp_path / "ops.jsonl"
    operations.write_text(
        '{"sink": "walacor", "etid": 1, "key": "a", "data": {"amount": 1}}\n'
        '{"sink": "walacor", "etid": 1, "key": "b", "data": {"amount": 1, "amount": 9}}\n')
    err = io.StringIO()

    code = walacorctl(["--socket", str(tmp_path / "none.sock"), "enqueue", "--from-file",
                       str(operations)], stdout=io.StringIO(), stderr=err)

    assert code == 2
    assert f"{operations}:2: the key 'amount' appears twice in one object" in err.getvalue()


@pytest.mark.parametrize(("content", "expected"), [
    (b'{"sink": "walacor", "etid": 1, "key": "a", "data": {"note": "\xff\xfe"}}\n',
     ":1: not valid UTF-8: byte 0xff at byte 62 of the line; save the file as UTF-8"),
    (b'{"sink": "walacor", "etid": 1, "key": "a", "data": {"a": '
     + b"[" * 260 + b"]" * 260 + b"}}\n",
     ":1 cannot be sent as JSON: it nests arrays or objects too deeply; keep the payload "
     "within 250 levels"),
    (b'{"sink": "walacor", "etid": 1, "key": "a", "data": {"n": 1}}\n'
     b'\xef\xbb\xbf{"sink": "walacor", "etid": 1, "key": "b", "data": {"n": 1}}\n',
     ":2: invalid JSON"),
])
def test_from_file_encoding_errors_name_line(tmp_path: Path, content: bytes,
                                             expected: str) -> None:
    """A byte order mark is skipped only at the start of the file."""
    operations = tmp_path / "ops.jsonl"
    operations.write_bytes(content)
    err = io.StringIO()

    code = walacorctl(["--socket", str(tmp_path / "none.sock"), "enqueue", "--from-file",
                       str(operations)], stdout=io.StringIO(), stderr=err)

    assert code == 2
    assert f"{operations}{expected}" in err.getvalue()


async def test_from_file_skips_byte_order_mark(
        tmp_path: Path, outbox_config: OutboxConfig,
        ledger_pool: AsyncConnectionPool[Any]) -> None:
    """Files that Windows editors save as "UTF-8 with BOM" are read as UTF-8."""
    config = dataclasses.replace(outbox_config, sync_interval=3600.0)
    sinks = build_sinks(Config(outbox=config), pool=ledger_pool)
    operations = tmp_path / "ops.jsonl"
    operations.write_bytes(
        b'\xef\xbb\xbf{"sink": "postgres", "statement": "insert_row", "key": "bom", '
        b'"params": {"amount": 1}}\r\n')
    async with serving_outbox(tmp_path, config, sinks) as (path, outbox):
        code = await anyio.to_thread.run_sync(lambda: walacorctl(
            ["--socket", path, "enqueue", "--from-file", str(operations)],
            stdout=io.StringIO(), stderr=io.StringIO()))
        stored = await outbox.store.list()

    assert code == 0
    assert [op.key for op in stored] == ["bom"]


def test_etid_zero_is_usage_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "walacorctl"), "--socket",
         str(tmp_path / "none.sock"), "enqueue", "--sink", "walacor", "--etid", "0", "--key",
         "k", "--data", "{}"], capture_output=True, text=True, timeout=30, check=False)

    assert result.returncode == 2
    assert "0 is not an envelope type id" in result.stderr


@pytest.mark.parametrize("repeated", [["--data", '{"amount": 2}'], ["--key", "k2"],
                                      ["--etid", "10002"]])
def test_repeated_enqueue_option_rejected(tmp_path: Path, repeated: list[str]) -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "walacorctl"), "--socket",
         str(tmp_path / "none.sock"), "enqueue", "--sink", "walacor", "--etid", "10001",
         "--key", "k", "--data", '{"amount": 1}', *repeated],
        capture_output=True, text=True, timeout=30, check=False)

    assert result.returncode == 2
    assert f"{repeated[0]} is given twice; give it once" in result.stderr
