"""One backup run, from the version check to the renamed, verified file.

Order of the steps, and why:
1. check that pg_dump is not older than the server;
2. export a snapshot and list the tables in it;
3. run pg_dump on that snapshot into a partial file while counting the largest
   tables' rows in the same snapshot;
4. fsync the partial file, then hash it and run `pg_restore --list` on it;
5. write the manifest, then rename the partial file to its final name and fsync the
   directory. The manifest comes first so that a crash never leaves a dump without
   one; a manifest whose file is missing is reported by `list`.
The caller holds the advisory lock and deletes the paths in `cleanup` on failure.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import psycopg

from walacord.backup.dump import (
    DumpRequest,
    ProgressCallback,
    SnapshotSession,
    TableStats,
    list_user_tables,
    run_pg_dump,
)
from walacord.backup.manifest import (
    CheckResult,
    Manifest,
    backup_id,
    display_path,
    dump_path,
    format_time,
    fsync_directory,
    fsync_file,
    manifest_path,
    partial_path,
    sha256_file,
    utc_now,
    write_manifest,
)
from walacord.backup.pgclient import (
    check_client_version,
    client_environment,
    client_version,
    unwrap_single_error,
)
from walacord.backup.space import FREE_SPACE_ADVICE
from walacord.backup.verify import checksum_check, hash_and_check_plain, list_archive
from walacord.errors import BackupError

if TYPE_CHECKING:
    from walacord.backup.manager import BackupManager

log = logging.getLogger(__name__)


async def server_version(conn: psycopg.AsyncConnection[Any]) -> tuple[int, str]:
    """Return (server_version_num, server_version) of the connected server."""
    cursor = await conn.execute(
        "SELECT current_setting('server_version_num')::int, current_setting('server_version')")
    row = await cursor.fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


async def take_backup(manager: BackupManager, *, progress: ProgressCallback | None,
                      cleanup: list[Path]) -> Manifest:
    """Run the steps above and return the manifest of the new backup."""
    config = manager.config
    started = utc_now()
    started_clock = time.monotonic()
    with anyio.fail_after(config.query_timeout):
        await anyio.to_thread.run_sync(_make_directory, manager.directory,
                                       abandon_on_cancel=True)

    # 1. Find pg_dump; its version is checked against the server's below.
    bindir = manager.bindir
    dump_major, dump_version = await client_version(bindir, "pg_dump", config.query_timeout)

    # 2. Name the files, export the snapshot and list the tables in it.
    backup = manager.unique_id(backup_id(manager.database, manager.server_host, started))
    partial = partial_path(manager.directory, backup, config.format)
    log.info("backup.started", extra={"fields": {
        "id": backup, "database": manager.database, "server": manager.server_host,
        "format": config.format, "lock_wait_timeout_seconds": config.lock_wait_timeout,
        "note": "pg_dump gives up when a table lock is not granted within "
                "lock_wait_timeout instead of queueing behind DDL"}})

    async with SnapshotSession(manager.conninfo, config.query_timeout,
                               config.lock_wait_timeout) as snapshot:
        assert snapshot.conn is not None
        with anyio.fail_after(config.query_timeout):
            version_num, version = await server_version(snapshot.conn)
            check_client_version("pg_dump", dump_major, version_num // 10000)
            tables = await list_user_tables(snapshot.conn)
        cleanup.append(partial)

        # 3. Dump and count in the same snapshot.
        stats: TableStats | None = None
        count_error: Exception | None = None

        async def count_in_snapshot() -> None:
            nonlocal stats, count_error
            try:
                with anyio.fail_after(config.dump_timeout):
                    stats = await snapshot.table_stats(tables, config.drill_tables)
            except (psycopg.Error, TimeoutError) as exc:
                count_error = exc

        with client_environment(manager.password) as env:
            request = DumpRequest(
                bindir=bindir, conninfo=manager.client_conninfo, env=env, fmt=config.format,
                compression_level=config.compression_level,
                lock_wait_timeout=config.lock_wait_timeout, timeout=config.dump_timeout,
                target=partial, snapshot=snapshot.snapshot, table_total=len(tables),
                progress=progress)
            with unwrap_single_error():
                async with anyio.create_task_group() as group:
                    group.start_soon(count_in_snapshot)
                    await run_pg_dump(request)

    if stats is None:
        raise BackupError(f"counting rows in the dump's snapshot failed: {count_error}")

    # 4. Make the bytes durable, then read them back: hash and archive check.
    with anyio.fail_after(config.verify_timeout):
        await anyio.to_thread.run_sync(fsync_file, partial, abandon_on_cancel=True)
        sha256, list_result = await _hash_and_list(manager, partial, bindir)
    if not list_result.ok:
        raise BackupError(f"pg_dump exited 0 but its output is not a valid archive: "
                          f"{list_result.error}{_full_disk_hint(partial.parent)}")
    size = partial.stat().st_size

    # 5. Manifest first, then the rename.
    final = dump_path(manager.directory, backup, config.format)
    finished = utc_now()
    manifest = Manifest(
        id=backup, file=final.name, format=config.format, database=manager.database,
        server_host=manager.server_host, server_version=version,
        pg_dump_version=dump_version, started_at=format_time(started),
        finished_at=format_time(finished),
        duration_seconds=round(time.monotonic() - started_clock, 3), size_bytes=size,
        sha256=sha256, table_count=stats.table_count, row_counts=stats.row_counts,
        lock_wait_timeout_seconds=config.lock_wait_timeout, list_check=list_result,
        checksum_check=checksum_check(sha256, sha256))
    cleanup += [manifest_path(manager.directory, backup), final]
    with anyio.fail_after(config.query_timeout):
        await anyio.to_thread.run_sync(_publish, manager.directory, manifest, partial, final,
                                       abandon_on_cancel=True)
    cleanup.clear()

    log.info("backup.finished", extra={"fields": {
        "id": backup, "path": display_path(final), "size_bytes": size, "sha256": sha256,
        "duration_seconds": manifest.duration_seconds, "tables": stats.table_count}})
    return manifest


async def _hash_and_list(manager: BackupManager, path: Path,
                         bindir: Path) -> tuple[str, CheckResult]:
    """Hash the file and check it with pg_restore --list, both at once."""
    if manager.config.format == "plain-gzip":
        return await anyio.to_thread.run_sync(hash_and_check_plain, path,
                                              abandon_on_cancel=True)

    digest = ""
    result: CheckResult | None = None

    async def hash_file() -> None:
        nonlocal digest
        digest = await anyio.to_thread.run_sync(sha256_file, path, abandon_on_cancel=True)

    async def list_file() -> None:
        nonlocal result
        with client_environment("") as env:
            result, _ = await list_archive(bindir, path, env, manager.config.verify_timeout)

    with unwrap_single_error():
        async with anyio.create_task_group() as group:
            group.start_soon(hash_file)
            group.start_soon(list_file)
    assert result is not None
    return digest, result


def _make_directory(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)


def _publish(directory: Path, manifest: Manifest, partial: Path, final: Path) -> None:
    write_manifest(directory, manifest)
    os.replace(partial, final)
    fsync_directory(directory)


# Free bytes below which a cut-short dump is blamed on the file system.
NEARLY_FULL = 1024 * 1024


def _full_disk_hint(directory: Path) -> str:
    """Return a hint when `directory`'s file system is nearly full, else ""."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return ""
    if free >= NEARLY_FULL:
        return ""
    return (f"; the file system of [backup] dir {directory} has only {free} bytes free, so "
            f"the dump was probably cut short there. {FREE_SPACE_ADVICE}")
