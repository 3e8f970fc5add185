"""Client program plumbing: versions, credentials and pipelines under a deadline."""

from __future__ import annotations

import errno
import os
import re
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import psutil
import pytest

from walacord import processes
from walacord.backup.dump import DumpRequest, pg_dump_argv
from walacord.backup.pgclient import (
    Command,
    PipelineTimeout,
    check_client_version,
    client_environment,
    find_client_bindir,
    parse_client_version,
    passfile_line,
    run_pipeline,
    split_conninfo,
)
from walacord.errors import BackupError


def test_parse_client_version_debian_build() -> None:
    output = "pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"

    assert parse_client_version(output) == (15, "15.18")


def test_parse_client_version_rejects_garbage() -> None:
    with pytest.raises(BackupError, match="cannot read a version"):
        parse_client_version("command not found")


def test_check_client_version_names_package() -> None:
    check_client_version("pg_dump", 16, 15)
    check_client_version("pg_dump", 15, 15)

    with pytest.raises(BackupError) as raised:
        check_client_version("pg_dump", 15, 17)

    assert "postgresql-client-17" in str(raised.value)
    assert "backup.pg_bindir" in str(raised.value)


def test_find_client_bindir_has_programs() -> None:
    bindir = find_client_bindir()

    for name in ("pg_dump", "pg_restore", "psql"):
        assert (bindir / name).exists()


def test_find_client_bindir_rejects_bad_setting(tmp_path: Path) -> None:
    with pytest.raises(BackupError, match="lacks pg_dump"):
        find_client_bindir(str(tmp_path))


def test_passfile_line_escapes_separators() -> None:
    assert passfile_line("a:b\\c") == "*:*:*:*:a\\:b\\\\c\n"


def test_split_conninfo_drops_password_and_options() -> None:
    params, password = split_conninfo(
        "host=db port=5432 dbname=app user=w password=s3cret options='-c statement_timeout=5'")

    assert password == "s3cret"
    assert params == {"host": "db", "port": "5432", "dbname": "app", "user": "w"}


def test_client_environment_uses_private_passfile() -> None:
    os.environ["PGPASSWORD"] = "leaked"
    try:
        with client_environment("s3cret") as env:
            path = Path(env["PGPASSFILE"])
            assert path.read_text() == "*:*:*:*:s3cret\n"
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert "PGPASSWORD" not in env
    finally:
        del os.environ["PGPASSWORD"]

    assert not path.exists()


def test_passfile_stays_off_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with client_environment("s3:cret") as env:
        child = subprocess.run(["cat", env["PGPASSFILE"]], env=env, capture_output=True,
                               text=True, check=False)
        written = list(tmp_path.iterdir())

    assert child.returncode == 0, child.stderr
    assert child.stdout == "*:*:*:*:s3\\:cret\n"
    assert env["PGPASSFILE"].startswith(f"/proc/{os.getpid()}/fd/")
    assert written == []


def test_passfile_falls_back_to_tempdir(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memfd(name: str, flags: int = 0) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(os, "memfd_create", no_memfd)
    with client_environment("s3cret") as env:
        path = Path(env["PGPASSFILE"])
        content = path.read_text()
        mode = stat.S_IMODE(path.stat().st_mode)

    assert path.parent.parent == tmp_path
    assert content == "*:*:*:*:s3cret\n"
    assert mode == 0o600
    assert list(tmp_path.iterdir()) == []


def test_pg_dump_argv_has_no_password(tmp_path: Path) -> None:
    params, password = split_conninfo("postgresql://u:s3cret@127.0.0.1:5432/app")
    request = DumpRequest(
        bindir=Path("/usr/bin"), conninfo=" ".join(f"{k}={v}" for k, v in params.items()),
        env={}, fmt="custom", compression_level=6, lock_wait_timeout=30.0, timeout=60.0,
        target=tmp_path / "x", snapshot="00000003-00000002-1", table_total=1)

    argv = pg_dump_argv(request)

    assert password == "s3cret"
    assert not any("s3cret" in arg for arg in argv)
    assert "--lock-wait-timeout=30000" in argv
    assert "--snapshot=00000003-00000002-1" in argv


@pytest.mark.anyio
async def test_run_pipeline_sees_failure_before_pipe(tmp_path: Path) -> None:
    first = Command(["sh", "-c", "echo partial; echo 'boom' >&2; exit 3"])
    second = Command(["gzip", "-c"])
    output = os.open(tmp_path / "out.gz", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        await run_pipeline([first, second], env=dict(os.environ), time_limit=10,
                           stdin=subprocess.DEVNULL, stdout=output)
    finally:
        os.close(output)

    assert first.returncode == 3
    assert second.returncode == 0
    assert first.stderr_text() == "boom"


@pytest.mark.anyio
async def test_run_pipeline_kills_on_deadline() -> None:
    commands = [Command(["sleep", "30"]), Command(["cat"])]
    started = time.monotonic()

    with pytest.raises(PipelineTimeout, match=re.escape("sleep | cat ran longer than 0.5s")):
        await run_pipeline(commands, env=dict(os.environ), time_limit=0.5,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    assert time.monotonic() - started < 5
    names = [p.name() for p in psutil.Process().children(recursive=True)]
    assert "sleep" not in names


@pytest.mark.anyio
async def test_run_pipeline_kills_on_cancel() -> None:
    commands = [Command(["sleep", "30"])]

    with anyio.move_on_after(0.3):
        await run_pipeline(commands, env=dict(os.environ), time_limit=60,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    names = [p.name() for p in psutil.Process().children(recursive=True)]
    assert "sleep" not in names


@pytest.mark.anyio
async def test_run_pipeline_missing_program_closes_pipes() -> None:
    open_before = len(os.listdir("/proc/self/fd"))
    commands = [Command(["sleep", "30"]), Command(["/nonexistent/walacord-test"])]

    with pytest.raises(FileNotFoundError):
        await run_pipeline(commands, env=dict(os.environ), time_limit=10,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    assert len(os.listdir("/proc/self/fd")) == open_before
    names = [p.name() for p in psutil.Process().children(recursive=True)]
    assert "sleep" not in names


# Stands in for walacord: runs `sleep 300` through run_pipeline, or through run_in_group
# with argv[1] "group", and prints the sleep's pid once it runs.
PARENT = """
import os, subprocess, sys, anyio, psutil
from walacord.backup.pgclient import Command, run_pipeline
from walacord.processes import run_in_group

async def report():
    while not psutil.Process().children():
        await anyio.sleep(0.01)
    print(psutil.Process().children()[0].pid, flush=True)

async def main():
    async with anyio.create_task_group() as group:
        group.start_soon(report)
        if sys.argv[1] == "group":
            await run_in_group(["sleep", "300"], 600, dict(os.environ))
        else:
            await run_pipeline([Command(["sleep", "300"])], env=dict(os.environ),
                               time_limit=600, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL)
anyio.run(main)
"""


def ended_within(process: psutil.Process, seconds: float) -> bool:
    """Return whether `process` exits (a zombie counts) within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.anyio
@pytest.mark.parametrize("runner", ["pipeline", "group"])
async def test_commands_die_with_walacord(runner: str) -> None:
    """A command walacord started gets SIGKILL when walacord is killed with SIGKILL, where
    none of walacord's own clean-up can run."""
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    parent = await anyio.open_process([sys.executable, "-c", PARENT, runner],
                                      env=environment, stderr=None)
    try:
        assert parent.stdout is not None
        with anyio.fail_after(30):
            child = psutil.Process(int((await parent.stdout.receive()).split()[0]))
        assert child.name() == "sleep"
        parent.kill()
        await parent.wait()
        assert await anyio.to_thread.run_sync(ended_within, child, 10.0)
    finally:
        if parent.returncode is None:
            parent.kill()
        await parent.aclose()


@pytest.mark.anyio
async def test_without_setpriv_commands_run_plainly(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Where setpriv is missing, commands start as given and a warning names what is lost."""
    monkeypatch.setattr(processes._ParentDeathPrefix, "prefix", None)
    monkeypatch.setenv("PATH", str(tmp_path))

    argv = await processes.with_parent_death_signal(["/bin/true", "x"])

    assert argv == ["/bin/true", "x"]
    [record] = [r for r in caplog.records if r.getMessage() == "process.no_parent_death_signal"]
    assert record.fields["reason"] == "setpriv (util-linux) is not installed"  # type: ignore[attr-defined]
