"""PostgreSQL client programs (pg_dump, pg_restore, psql): finding them, checking their
version, handing them credentials, and running them under a deadline.

The password never appears on a command line, where `ps` would show it: each run gets
a passfile of its own (mode 0600) named by `PGPASSFILE`. The passfile is an in-memory
file (memfd) that the children open through /proc, so it never reaches a disk and ends
with walacord, even when walacord is killed.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
from anyio.abc import Process
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from walacord.errors import BackupError
from walacord.pgcluster import ClusterError, find_pg_bindir
from walacord.processes import with_parent_death_signal

log = logging.getLogger(__name__)

CLIENT_PROGRAMS = ("pg_dump", "pg_restore", "psql")
# libpq parameters that only make sense inside walacord's own sessions; the client
# programs set their own timeouts (pg_dump sets statement_timeout to 0, for example).
SESSION_ONLY_PARAMS = ("password", "options")
STDERR_TAIL_LINES = 200


def find_client_bindir(configured: str = "") -> Path:
    """Return the directory holding pg_dump, pg_restore and psql, newest major first.

    A configured directory wins. Otherwise the newest /usr/lib/postgresql/N/bin that
    has the client programs, then the directory pgcluster uses, then PATH.
    """
    if configured:
        path = Path(configured)
        missing = [name for name in CLIENT_PROGRAMS if not (path / name).exists()]
        if missing:
            raise BackupError(f"backup.pg_bindir {configured!r} lacks {', '.join(missing)}; "
                              "point it at a PostgreSQL bin directory")
        return path

    def major_of(directory: str) -> int:
        name = Path(directory).parent.name
        return int(name) if name.isdigit() else 0

    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major_of, reverse=True):
        if all((Path(candidate) / name).exists() for name in CLIENT_PROGRAMS):
            return Path(candidate)

    try:
        server_bindir = find_pg_bindir()
        if all((server_bindir / name).exists() for name in CLIENT_PROGRAMS):
            return server_bindir
    except ClusterError:
        pass

    on_path = shutil.which("pg_dump")
    if on_path:
        return Path(on_path).resolve().parent
    raise BackupError("pg_dump not found: install the PostgreSQL client programs (Debian: "
                      "apt-get install postgresql-client) or set backup.pg_bindir")


def parse_client_version(output: str) -> tuple[int, str]:
    """Return (major, full version) from `pg_dump --version` output.

    Example input: "pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)".
    """
    match = re.search(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?\S*", output)
    if not match:
        raise BackupError(f"cannot read a version from {output.strip()!r}")
    return int(match.group(1)), match.group(0).split()[-1]


def check_client_version(program: str, client_major: int, server_major: int) -> None:
    """Raise BackupError when `program` is older than the server's major version.

    pg_dump refuses, or writes an incomplete dump, when the server is newer.
    """
    if client_major >= server_major:
        return
    raise BackupError(
        f"{program} {client_major} is older than the server's major version {server_major}; "
        f"install postgresql-client-{server_major} (Debian/Ubuntu, from apt.postgresql.org) "
        f"or postgresql{server_major} (RHEL, from the PGDG yum repository), "
        f"or set backup.pg_bindir to a {server_major} or newer bin directory")


async def client_version(bindir: Path, program: str, time_limit: float) -> tuple[int, str]:
    """Run `program --version` and return (major, full version)."""
    with anyio.fail_after(time_limit):
        result = await anyio.run_process([str(bindir / program), "--version"], check=False)
    if result.returncode != 0:
        raise BackupError(f"{bindir / program} --version failed with exit {result.returncode}: "
                          f"{result.stderr.decode(errors='replace').strip()}")
    return parse_client_version(result.stdout.decode(errors="replace"))


# --- connection parameters and credentials -------------------------------------------


def split_conninfo(conninfo: str) -> tuple[dict[str, str], str]:
    """Split a libpq string into (parameters without password or options, password)."""
    params = {key: str(value) for key, value in conninfo_to_dict(conninfo).items()
              if value is not None}
    password = params.get("password", "")
    for key in SESSION_ONLY_PARAMS:
        params.pop(key, None)
    return params, password


def with_dbname(conninfo: str, dbname: str) -> str:
    """Return `conninfo` pointing at database `dbname` instead."""
    params = conninfo_to_dict(conninfo)
    params["dbname"] = dbname
    return make_conninfo("", **params)


def passfile_line(password: str) -> str:
    r"""Return a ~/.pgpass line matching every host, port, database and user.

    In a passfile, `\` and `:` inside a field are escaped with a backslash.
    """
    escaped = password.replace("\\", "\\\\").replace(":", "\\:")
    return f"*:*:*:*:{escaped}\n"


@contextlib.contextmanager
def client_environment(password: str) -> Iterator[dict[str, str]]:
    """Yield the environment for a client program; the password sits in a passfile.

    Inherited PG* variables are dropped so that only the connection string given on
    the command line decides where the program connects.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C.UTF-8"
    if not password:
        env["PGPASSFILE"] = os.devnull
        yield env
        return

    line = passfile_line(password).encode()
    try:
        fd = os.memfd_create("walacord-pgpass", os.MFD_CLOEXEC)
    except (AttributeError, OSError) as exc:  # no memfd: not Linux, or a seccomp filter
        log.debug("backup.passfile_on_disk", extra={"fields": {"reason": str(exc)}})
    else:
        # The children run as walacord's user, which may open walacord's descriptors
        # through /proc/PID/fd; other users may not. libpq ignores a passfile that
        # group or others can read, so the mode is set before anything is written.
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, line)
            env["PGPASSFILE"] = f"/proc/{os.getpid()}/fd/{fd}"
            yield env
        finally:
            os.close(fd)
        return

    # NOTE: a SIGKILL of walacord leaves this directory behind until /tmp is cleaned.
    directory = tempfile.mkdtemp(prefix="walacord-pgpass-")
    path = Path(directory) / "pgpass"
    try:
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(line)
        env["PGPASSFILE"] = str(path)
        yield env
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- running programs ------------------------------------------------------------------


@contextlib.contextmanager
def unwrap_single_error() -> Iterator[None]:
    """Re-raise the only exception of an anyio task group's ExceptionGroup by itself.

    Callers then catch BackupError or TimeoutError directly; a group holding several
    exceptions passes through unchanged.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


@dataclass
class Command:
    """One program of a pipeline, with its stderr lines as they arrive."""

    argv: Sequence[str]
    on_stderr_line: Callable[[str], None] | None = None
    returncode: int | None = None
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_TAIL_LINES))

    @property
    def name(self) -> str:
        return Path(self.argv[0]).name

    def stderr_text(self) -> str:
        return "\n".join(self.stderr_tail)


class PipelineTimeout(BackupError):
    """A client program ran past its deadline and was killed."""


async def run_pipeline(commands: Sequence[Command], *, env: dict[str, str], time_limit: float,
                       stdin: IO[Any] | int | None = None,
                       stdout: IO[Any] | int | None = None) -> None:
    """Run `commands` as a shell-style pipeline and wait for every one to exit.

    `stdin` feeds the first program and `stdout` receives the last one's output. Each
    program's exit status is stored on its Command, so a failure in the middle of the
    pipeline is seen even when the last program succeeds. When `time_limit` seconds pass,
    or the caller is cancelled, every program is killed before this returns.
    """
    processes: list[Process] = []
    previous_read: int | None = None
    try:
        for index, command in enumerate(commands):
            last = index == len(commands) - 1
            read_end, write_end = (None, None) if last else os.pipe()
            child_stdin = previous_read if previous_read is not None else stdin
            try:
                process = await anyio.open_process(
                    await with_parent_death_signal(command.argv, env), stdin=child_stdin,
                    stdout=stdout if last else write_end,
                    stderr=subprocess.PIPE, env=env, start_new_session=True)
            except BaseException:
                if read_end is not None:
                    os.close(read_end)
                raise
            finally:
                # The children hold their own copies of the pipe ends; closing ours lets
                # a reader see end-of-file when its writer exits.
                if previous_read is not None:
                    os.close(previous_read)
                    previous_read = None
                if write_end is not None:
                    os.close(write_end)
            processes.append(process)
            previous_read = read_end

        with anyio.fail_after(time_limit), unwrap_single_error():
            async with anyio.create_task_group() as group:
                for command, process in zip(commands, processes, strict=True):
                    group.start_soon(_wait_with_stderr, command, process)
    except TimeoutError:
        _kill_all(processes)
        raise PipelineTimeout(
            f"{' | '.join(c.name for c in commands)} ran longer than {time_limit:g}s and was "
            "killed; raise the deadline in [backup] if the database has grown") from None
    finally:
        if previous_read is not None:
            os.close(previous_read)
        _kill_all(processes)
        with anyio.CancelScope(shield=True):
            for process in processes:
                await process.wait()
                await process.aclose()


async def _wait_with_stderr(command: Command, process: Process) -> None:
    assert process.stderr is not None
    pending = b""
    async for chunk in process.stderr:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            _record_line(command, raw)
    if pending:
        _record_line(command, pending)
    command.returncode = await process.wait()


def _record_line(command: Command, raw: bytes) -> None:
    line = raw.decode(errors="replace").rstrip()
    command.stderr_tail.append(line)
    if command.on_stderr_line is not None:
        command.on_stderr_line(line)


def _kill_all(processes: Sequence[Process]) -> None:
    for process in processes:
        if process.returncode is not None:
            continue
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
