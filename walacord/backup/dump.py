"""Running pg_dump: the exported snapshot, row counts taken in it, and the dump itself.

The dump and the row counts read the same snapshot: a REPEATABLE READ transaction
exports it with `pg_export_snapshot()`, pg_dump imports it with `--snapshot`, and the
counts run inside that transaction. A drill can then compare exact numbers.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import psycopg
from psycopg import sql

from walacord.backup.pgclient import Command, run_pipeline
from walacord.backup.space import disk_full_advice, mentions_disk_full
from walacord.errors import BackupError

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str], Any]
"""Called as progress(done, total, message); `total` is 0 when unknown."""

# Tables pg_dump dumps by default: ordinary and partitioned tables outside the system
# schemas and outside any extension. Size order uses relpages, the page count stored
# by the last VACUUM or ANALYZE: reading it takes no table lock, unlike
# pg_relation_size(), so listing never queues behind DDL. NOTE: a large table that
# was never vacuumed or analyzed has relpages 0 and may miss the largest-tables set.
USER_TABLES_SQL = """
SELECT n.nspname, c.relname, c.relpages AS pages
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                    AND d.deptype = 'e')
ORDER BY pages DESC, n.nspname, c.relname
"""
DUMP_ERROR_PREFIXES = ("pg_dump: error:", "pg_dump: detail:", "pg_dump: hint:")
# pg_dump 15 enforces --lock-wait-timeout with statement_timeout around LOCK TABLE.
LOCK_TIMEOUT_MARKERS = ("could not obtain lock", "canceling statement due to lock timeout",
                        "canceling statement due to statement timeout")


@dataclass
class TableStats:
    """Table count and exact row counts of the largest tables, keyed "schema.table"."""

    table_count: int
    row_counts: dict[str, int]


def qualified_name(schema: str, table: str) -> str:
    return f"{schema}.{table}"


async def list_user_tables(conn: psycopg.AsyncConnection[Any]) -> list[tuple[str, str]]:
    """Return (schema, table) of every dumped table, largest heap first."""
    cursor = await conn.execute(USER_TABLES_SQL)
    return [(schema, table) for schema, table, _ in await cursor.fetchall()]


async def count_rows(conn: psycopg.AsyncConnection[Any],
                     tables: list[tuple[str, str]]) -> dict[str, int]:
    """Return exact `count(*)` of each table, keyed "schema.table"."""
    counts = {}
    for schema, table in tables:
        query = sql.SQL("SELECT count(*) FROM {}.{}").format(
            sql.Identifier(schema), sql.Identifier(table))
        cursor = await conn.execute(query)
        row = await cursor.fetchone()
        counts[qualified_name(schema, table)] = int(row[0]) if row else 0
    return counts


class SnapshotSession:
    """A read-only REPEATABLE READ transaction whose snapshot pg_dump imports.

    The transaction turns off statement and idle-in-transaction timeouts for itself
    because it must stay open while pg_dump starts; the caller's deadline bounds it.
    Its lock_timeout is pg_dump's lock wait timeout.
    """

    def __init__(self, conninfo: str, connect_timeout: float, lock_wait_timeout: float) -> None:
        self.conninfo = conninfo
        self.connect_timeout = connect_timeout
        self.lock_wait_timeout = lock_wait_timeout
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.snapshot = ""

    async def __aenter__(self) -> SnapshotSession:
        try:
            await self._begin()
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def _begin(self) -> None:
        with anyio.fail_after(self.connect_timeout):
            self.conn = await psycopg.AsyncConnection.connect(self.conninfo)
            await self.conn.execute(
                "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            await self.conn.execute("SET LOCAL statement_timeout = 0")
            await self.conn.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
            # Counting runs next to pg_dump; parallel workers would take the cores
            # pg_dump and its server backend need.
            await self.conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
            # The row counts must not queue behind DDL either.
            await self.conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(
                sql.Literal(f"{int(self.lock_wait_timeout * 1000)}ms")))
            cursor = await self.conn.execute("SELECT pg_export_snapshot()")
            row = await cursor.fetchone()
        assert row is not None
        self.snapshot = str(row[0])

    async def __aexit__(self, *exc_info: object) -> None:
        if self.conn is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.connect_timeout):
                await self.conn.close()

    async def table_stats(self, tables: list[tuple[str, str]], limit: int) -> TableStats:
        """Count rows of the `limit` largest tables inside a savepoint.

        An error, such as a table the role may not read, rolls back to the savepoint
        only: aborting the whole transaction would withdraw the exported snapshot
        before pg_dump has imported it, hiding pg_dump's own, clearer error.
        """
        assert self.conn is not None
        await self.conn.execute("SAVEPOINT walacord_count")
        try:
            counts = await count_rows(self.conn, tables[:limit])
        except psycopg.Error:
            await self.conn.execute("ROLLBACK TO SAVEPOINT walacord_count")
            raise
        return TableStats(table_count=len(tables), row_counts=counts)


@dataclass
class DumpRequest:
    """Everything one pg_dump run needs."""

    bindir: Path
    conninfo: str  # without password; the environment carries it
    env: dict[str, str]
    fmt: str
    compression_level: int
    lock_wait_timeout: float
    timeout: float
    target: Path
    snapshot: str
    table_total: int
    progress: ProgressCallback | None = None


def pg_dump_argv(request: DumpRequest) -> list[str]:
    """Return pg_dump's command line; it never contains the password."""
    argv = [
        str(request.bindir / "pg_dump"),
        "--verbose",
        f"--lock-wait-timeout={int(request.lock_wait_timeout * 1000)}",
        f"--snapshot={request.snapshot}",
    ]
    if request.fmt == "custom":
        argv += ["--format=custom", f"--compress={request.compression_level}",
                 f"--file={request.target}"]
    else:
        argv += ["--format=plain"]
    argv.append(f"--dbname={request.conninfo}")
    return argv


async def run_pg_dump(request: DumpRequest) -> None:
    """Write the dump to `request.target`; raise BackupError with pg_dump's stderr.

    In plain-gzip format pg_dump's output goes through `gzip`, and both exit statuses
    are checked, so a pg_dump that dies behind the pipe still fails the run.
    """
    tables_done = 0

    def on_dump_line(line: str) -> None:
        nonlocal tables_done
        if request.progress is None or "dumping contents of table" not in line:
            return
        tables_done += 1
        request.progress(tables_done, request.table_total, line.removeprefix("pg_dump: "))

    dump = Command(pg_dump_argv(request), on_stderr_line=on_dump_line)
    commands = [dump]
    if request.fmt == "plain-gzip":
        commands.append(Command(["gzip", "-c", f"-{max(1, request.compression_level)}"]))

    # The partial file is created here, mode 0600, because a dump contains every row.
    fd = os.open(request.target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as output:
        stdout = output if request.fmt == "plain-gzip" else subprocess.DEVNULL
        await run_pipeline(commands, env=request.env, time_limit=request.timeout,
                           stdin=subprocess.DEVNULL, stdout=stdout)

    failed = [c for c in commands if c.returncode != 0]
    if failed:
        advice = ""
        if any(mentions_disk_full(c.stderr_text()) for c in failed):
            advice = disk_full_advice(request.target.parent, _size_or_none(request.target))
        raise DumpFailed(commands, advice)


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


class DumpFailed(BackupError):
    """pg_dump, or the compressor behind it, exited with an error."""

    def __init__(self, commands: list[Command], advice: str = "") -> None:
        self.commands = commands
        parts = []
        for command in commands:
            if command.returncode == 0:
                continue
            parts.append(f"{describe_exit(command)}: "
                         f"{summarize_stderr(command) or '(no error output)'}")
        message = "; ".join(parts)
        if advice:
            message += f". {advice}"
        super().__init__(message)

    @property
    def lock_timed_out(self) -> bool:
        text = "\n".join(c.stderr_text() for c in self.commands)
        return "LOCK TABLE" in text and any(marker in text for marker in LOCK_TIMEOUT_MARKERS)


def describe_exit(command: Command) -> str:
    """Return "NAME exited with N" or, for a negative status, "NAME was killed by signal N"."""
    if command.returncode is not None and command.returncode < 0:
        return f"{command.name} was killed by signal {-command.returncode}"
    return f"{command.name} exited with {command.returncode}"


def summarize_stderr(command: Command, max_lines: int = 20) -> str:
    """Return the error lines of a client program's stderr, without --verbose chatter."""
    lines = list(command.stderr_tail)
    errors = [line for line in lines if line.startswith(DUMP_ERROR_PREFIXES)
              or " error: " in line or line.startswith(("ERROR", "FATAL", "psql:"))]
    chosen = errors or lines[-max_lines:]
    return "\n".join(chosen[-max_lines:])
