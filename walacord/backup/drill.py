"""Restore drills: prove a backup restores by loading it into a scratch database.

Steps: compare the file's sha256 with the manifest's, create the scratch database,
restore into it without owners or privileges, count its tables and the rows of the
tables the manifest recorded at dump time, compare, and drop the scratch database
whatever happened.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import psycopg

from walacord.backup.databases import SCRATCH_COMMENT, Admin, scratch_locks, scratch_name
from walacord.backup.dump import count_rows, list_user_tables
from walacord.backup.manifest import Manifest, dump_file_problem, safe_name_part, utc_now
from walacord.backup.pgclient import client_environment, with_dbname
from walacord.backup.restore import RestoreRequest, load_archive
from walacord.backup.verify import check_result, hash_backup_file
from walacord.errors import BackupError

if TYPE_CHECKING:
    from walacord.backup.manager import BackupManager

log = logging.getLogger(__name__)


@dataclass
class DrillFigures:
    """What the sanity queries found in the scratch database."""

    table_count: int
    row_counts: dict[str, int]


async def collect_figures(conninfo: str, tables: list[str], time_limit: float) -> DrillFigures:
    """Count the tables of a restored database and the rows of `tables` in it."""
    with anyio.fail_after(time_limit):
        conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
        try:
            await conn.execute("SET statement_timeout = 0")
            present = await list_user_tables(conn)
            names = set(tables)
            wanted = [pair for pair in present if f"{pair[0]}.{pair[1]}" in names]
            counts = await count_rows(conn, wanted)
        finally:
            await conn.close()
    return DrillFigures(table_count=len(present), row_counts=counts)


def compare_figures(expected_tables: int, expected_rows: dict[str, int],
                    found: DrillFigures) -> list[str]:
    """Return one sentence per difference between dump-time figures and the drill's."""
    problems = []
    if found.table_count != expected_tables:
        problems.append(f"table count is {found.table_count}, the dump had {expected_tables}")
    for name, expected in sorted(expected_rows.items()):
        actual = found.row_counts.get(name)
        if actual is None:
            problems.append(f"table {name} is missing")
        elif actual != expected:
            problems.append(f"table {name} has {actual} rows, the dump had {expected}")
    return problems


async def drill_backup(manager: BackupManager, manifest: Manifest) -> Manifest:
    """Run a restore drill of `manifest`'s backup and store the result in its manifest.

    A failed drill is counted, alerted on and recorded; it raises only when the file
    is missing or the scratch database cannot be created. A file whose sha256 differs
    from the manifest's fails the drill without being restored.
    """
    config = manager.config
    path = manager.path_of(manifest)
    problem = dump_file_problem(path)
    if problem is not None:
        error = BackupError(f"{problem}; its manifest remains")
        await manager.record_failure("drill", manifest.id, error)
        raise error

    started = time.monotonic()
    try:
        checksum = await hash_backup_file(manager, manifest)
    except BackupError as exc:
        return await _record_drill(manager, manifest, [str(exc)], started)
    # The sha256 lets a later checksum check tell whether this result still describes
    # the file (see Manifest.drill_stale).
    # None when the size differed from the manifest's, so the file was not hashed.
    tested = checksum.detail.get("sha256")
    if not checksum.ok:
        manifest.checksum_check = checksum
        return await _record_drill(
            manager, manifest, [f"{checksum.error}; the drill did not restore it"], started,
            sha256=tested)

    scratch = scratch_name(f"walacord_drill_{safe_name_part(manager.database)}")
    admin = Admin(manager.maintenance_conninfo(avoid=scratch), config.query_timeout,
                  manager.scratch_journal)
    log.info("backup.drill_started", extra={"fields": {"id": manifest.id, "scratch": scratch}})
    try:
        # The lock marks the scratch database as in use for start-up cleanup, on this
        # host and on others; see walacord.backup.databases.
        async with scratch_locks(admin.conninfo, [scratch], config.query_timeout):
            problems, figures = await _drill_in_scratch(manager, manifest, admin, scratch)
    except (psycopg.Error, TimeoutError) as exc:
        # _drill_in_scratch raises only BackupError, so this came from the lock session.
        error = BackupError(f"cannot take the scratch database lock for {scratch}: {exc}")
        await manager.record_failure("drill", manifest.id, error)
        raise error from exc

    return await _record_drill(manager, manifest, problems, started, sha256=tested,
                               scratch=scratch, figures=figures)


async def _drill_in_scratch(manager: BackupManager, manifest: Manifest, admin: Admin,
                            scratch: str) -> tuple[list[str], DrillFigures]:
    """Create `scratch`, restore the backup into it, compare figures and drop it.

    Returns the problems found and the figures. Raises BackupError only when the
    scratch database cannot be created.
    """
    config = manager.config
    path = manager.path_of(manifest)
    try:
        await admin.create(scratch, f"{SCRATCH_COMMENT}: restore drill of backup "
                                    f"{manifest.id} of database {manager.database}")
    except (psycopg.Error, TimeoutError) as exc:
        error = BackupError(f"cannot create the drill's scratch database {scratch}: {exc}; "
                            "walacord's database role needs CREATEDB")
        await manager.record_failure("drill", manifest.id, error)
        raise error from exc
    except BaseException:
        # Cancelled (a shutdown) while CREATE DATABASE ran: the server may have created
        # it anyway, and nothing else would ever drop it.
        with anyio.CancelScope(shield=True), contextlib.suppress(psycopg.Error,
                                                                    TimeoutError):
            await admin.drop(scratch)
        raise

    problems: list[str] = []
    figures = DrillFigures(table_count=0, row_counts={})
    try:
        with client_environment(manager.password) as env:
            await load_archive(RestoreRequest(
                bindir=manager.bindir, conninfo=with_dbname(manager.client_conninfo, scratch),
                env=env, fmt=manifest.format, path=path, timeout=config.drill_timeout,
                no_owner=True))
        figures = await collect_figures(with_dbname(manager.conninfo, scratch),
                                        list(manifest.row_counts), config.drill_timeout)
        problems = compare_figures(manifest.table_count, manifest.row_counts, figures)
    except (BackupError, psycopg.Error, TimeoutError) as exc:
        problems = [f"restore into {scratch} failed: {exc}"]
    finally:
        with anyio.CancelScope(shield=True):
            try:
                await admin.drop(scratch)
            except (psycopg.Error, TimeoutError) as exc:
                log.error("backup.drill_cleanup_failed", extra={"fields": {
                    "scratch": scratch, "error": str(exc),
                    "action": f"drop database {scratch} by hand"}})

    return problems, figures


async def _record_drill(manager: BackupManager, manifest: Manifest, problems: list[str],
                        started: float, *, sha256: str | None = None,
                        scratch: str | None = None,
                        figures: DrillFigures | None = None) -> Manifest:
    """Store the drill's result in the manifest; count, log and alert on a failure.

    `sha256` is the file's sha256 as the drill hashed it, None when it could not.
    """
    figures = figures or DrillFigures(table_count=0, row_counts={})
    duration = round(time.monotonic() - started, 3)
    manifest.drill = check_result(
        not problems, "; ".join(problems) or None, sha256=sha256, scratch=scratch,
        table_count=figures.table_count, row_counts=figures.row_counts,
        duration_seconds=duration)
    await manager.save(manifest)

    if problems:
        await manager.record_failure("drill", manifest.id, BackupError("; ".join(problems)))
    else:
        now = utc_now().timestamp()
        manager.metrics.backup_last_drill.set(now)
        manager.metrics.backup_last_verified.set(now)
        log.info("backup.drill_passed", extra={"fields": {
            "id": manifest.id, "tables": figures.table_count,
            "row_counts": figures.row_counts, "duration_seconds": duration}})
    return manifest
