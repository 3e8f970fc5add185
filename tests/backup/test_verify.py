"""Verification and restore drills of stored backups."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import anyio
import orjson
import psycopg
import pytest

from tests.backup.conftest import fifo_in_place_of, journal_names, overwrite_two_bytes
from tests.conftest import mounted_tmpfs
from walacord.backup import BackupAlert, BackupManager
from walacord.backup.alerts import BACKUP_FAILED
from walacord.backup.manifest import (
    MAX_ID_BYTES,
    backup_id,
    manifest_path,
    safe_name_part,
    sha256_file,
    unreadable_manifests,
    write_manifest,
)
from walacord.backup.verify import hash_and_check_plain
from walacord.errors import BackupError
from walacord.pgcluster import PgCluster

pytestmark = pytest.mark.anyio

ManagerFactory = Callable[..., BackupManager]


def drill_databases(cluster: PgCluster, database: str) -> list[str]:
    """Return the scratch databases left by drills of `database` (other tests share the
    cluster, so their leftovers are not this test's)."""
    # scratch_name keeps 54 characters of the prefix, then "_" and 8 hex digits.
    prefix = f"walacord_drill_{safe_name_part(database)}"[:54]
    output = cluster.psql("SELECT datname FROM pg_database WHERE datname LIKE 'walacord_drill%'")
    return [line for line in output.splitlines() if line.startswith(prefix)]


async def test_verify_accepts_intact_backup(make_manager: ManagerFactory) -> None:
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None

    checked = await manager.verify(backup.id)

    assert checked.verified
    assert checked.checksum_check is not None and checked.checksum_check.ok
    assert checked.list_check is not None and checked.list_check.detail["entries"] > 4
    stored = await manager.read(backup.id)
    assert stored.checksum_check == checked.checksum_check


@pytest.mark.parametrize("fmt", ["custom", "plain-gzip"])
async def test_verify_detects_changed_file(make_manager: ManagerFactory,
                                           alerts: list[BackupAlert], fmt: str) -> None:
    manager = make_manager(format=fmt)
    backup = await manager.take()
    assert backup is not None
    path = manager.path_of(backup)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    checked = await manager.verify()

    assert not checked.verified
    assert checked.checksum_check is not None
    assert not checked.checksum_check.ok
    assert "changed after it was written" in (checked.checksum_check.error or "")
    assert manager.metrics.backup_failures.labels(operation="verify")._value.get() == 1
    assert [a.name for a in alerts] == [BACKUP_FAILED]
    assert not (await manager.read(backup.id)).verified


async def test_verify_detects_truncated_plain_dump(make_manager: ManagerFactory) -> None:
    manager = make_manager(format="plain-gzip")
    backup = await manager.take()
    assert backup is not None
    path = manager.path_of(backup)
    half = backup.size_bytes // 2
    path.write_bytes(path.read_bytes()[:half])

    checked = await manager.verify()
    # The size differs from the manifest's, so verify reads nothing. The readability
    # check of a truncated file is tested on its own.
    _, readable = hash_and_check_plain(path)

    assert checked.checksum_check is not None
    assert checked.checksum_check.error == (
        f"size is {half} bytes, the manifest records {backup.size_bytes} bytes; the file "
        "changed after it was written, so its sha256 was not computed")
    assert not readable.ok
    assert readable.error == "gzip stream is truncated"


# A sparse file of this size reads as 64 GiB of zeros, far more than a verify can hash
# within the 10 s verify_timeout of these tests.
SPARSE_BYTES = 64 * 2**30


@pytest.mark.parametrize("fmt", ["custom", "plain-gzip"])
@pytest.mark.parametrize("grow", [True, False])
async def test_verify_size_mismatch_skips_hashing(make_manager: ManagerFactory,
                                                  alerts: list[BackupAlert], fmt: str,
                                                  grow: bool) -> None:
    manager = make_manager(format=fmt, verify_timeout=10.0)
    backup = await manager.take()
    assert backup is not None
    taken_list_check = backup.list_check
    path = manager.path_of(backup)
    size = SPARSE_BYTES if grow else backup.size_bytes - 1
    os.truncate(path, size)

    started = time.process_time()
    checked = await manager.verify(backup.id)
    cpu_seconds = time.process_time() - started

    assert cpu_seconds < 2.0
    assert checked.checksum_check is not None
    assert not checked.checksum_check.ok
    assert checked.checksum_check.error == (
        f"size is {size} bytes, the manifest records {backup.size_bytes} bytes; the file "
        "changed after it was written, so its sha256 was not computed")
    assert checked.checksum_check.detail == {"size_bytes": size,
                                             "manifest_size_bytes": backup.size_bytes}
    # The readability check did not run, so the result of the last one stays.
    assert checked.list_check == taken_list_check
    assert not checked.verified
    assert (await manager.read(backup.id)).checksum_check == checked.checksum_check
    assert manager.metrics.backup_failures.labels(operation="verify")._value.get() == 1
    assert [a.name for a in alerts] == [BACKUP_FAILED]


async def test_drill_size_mismatch_skips_hashing(make_manager: ManagerFactory,
                                                 pg_cluster: PgCluster) -> None:
    manager = make_manager(verify_timeout=10.0)
    backup = await manager.take()
    assert backup is not None
    os.truncate(manager.path_of(backup), SPARSE_BYTES)

    started = time.process_time()
    drilled = await manager.drill(backup.id)
    cpu_seconds = time.process_time() - started

    assert cpu_seconds < 2.0
    assert drilled.drill is not None
    assert not drilled.drill.ok
    assert drilled.drill.error == (
        f"size is {SPARSE_BYTES} bytes, the manifest records {backup.size_bytes} bytes; the "
        "file changed after it was written, so its sha256 was not computed; the drill did "
        "not restore it")
    assert drilled.drill.detail["sha256"] is None
    assert drilled.checksum_check is not None
    assert not drilled.checksum_check.ok
    assert drill_databases(pg_cluster, manager.database) == []


async def test_verify_on_full_disk_names_dir(make_manager: ManagerFactory,
                                             tmp_path: Path) -> None:
    """A verify whose manifest cannot be written names [backup] dir and what to do."""
    with mounted_tmpfs(tmp_path / "small") as directory:
        manager = make_manager(directory=directory)
        backup = await manager.take()
        assert backup is not None
        before = manifest_path(directory, backup.id).read_bytes()
        with (directory / "filler").open("wb", buffering=0) as filler, \
                pytest.raises(OSError) as full:
            while True:
                filler.write(b"\0" * 4096)
        assert full.value.errno == errno.ENOSPC

        with pytest.raises(BackupError) as raised:
            await manager.verify(backup.id)
        files = sorted(path.name for path in directory.iterdir())

        message = str(raised.value)
        assert f"cannot write the manifest of backup {backup.id}" in message
        assert "No space left on device" in message
        assert f"The file system of [backup] dir {directory} has no space left" in message
        assert "delete older backups" in message
        assert manifest_path(directory, backup.id).read_bytes() == before
        # The manifest's temporary file is removed.
        assert files == sorted([backup.file, f"{backup.id}.json", "filler"])


async def test_verify_missing_file_raises(make_manager: ManagerFactory) -> None:
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None
    manager.path_of(backup).unlink()

    with pytest.raises(BackupError, match="missing"):
        await manager.verify(backup.id)


@pytest.mark.parametrize("fmt", ["custom", "plain-gzip"])
async def test_verify_fifo_fails_at_once(make_manager: ManagerFactory,
                                         alerts: list[BackupAlert], fmt: str) -> None:
    manager = make_manager(format=fmt)
    backup = await manager.take()
    assert backup is not None
    path = manager.path_of(backup)

    with fifo_in_place_of(path), anyio.fail_after(5), pytest.raises(BackupError) as raised:
        await manager.verify(backup.id)

    assert str(raised.value) == (f"backup file {path} is a FIFO, not a regular file; "
                                 "its manifest remains")
    assert manager.metrics.backup_failures.labels(operation="verify")._value.get() == 1
    assert manager.metrics.backup_damaged._value.get() == 1
    assert [a.name for a in alerts] == [BACKUP_FAILED]


async def test_sha256_file_rejects_fifo(tmp_path: Path) -> None:
    # A FIFO swapped in after the caller's check must not block the reading thread.
    path = tmp_path / "backup.dump"
    path.write_bytes(b"x")

    with fifo_in_place_of(path), anyio.fail_after(5), pytest.raises(BackupError) as raised:
        await anyio.to_thread.run_sync(sha256_file, path, abandon_on_cancel=True)

    assert str(raised.value) == f"backup file {path} is a FIFO, not a regular file"


async def test_drill_fifo_fails_at_once(make_manager: ManagerFactory) -> None:
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None
    path = manager.path_of(backup)

    with fifo_in_place_of(path), anyio.fail_after(5), pytest.raises(BackupError) as raised:
        await manager.drill(backup.id)

    assert f"backup file {path} is a FIFO, not a regular file" in str(raised.value)
    assert manager.metrics.backup_failures.labels(operation="drill")._value.get() == 1


async def test_verify_unknown_id_raises(make_manager: ManagerFactory) -> None:
    manager = make_manager()

    with pytest.raises(BackupError, match="not found"):
        await manager.verify("nope__host__20260101T000000Z")
    with pytest.raises(BackupError, match="invalid backup id"):
        await manager.verify("../etc/passwd")
    with pytest.raises(BackupError, match="invalid backup id") as too_long:
        await manager.verify("a" * 300)
    assert len(str(too_long.value)) < 200


def test_backup_id_fits_a_file_name() -> None:
    started = datetime(2026, 12, 5, 2, 30, tzinfo=UTC)
    backup = backup_id("d" * 63, "h" * 253, started)

    assert len(backup.encode()) + len("-99.sql.gz") <= 255
    assert len(backup.encode()) <= MAX_ID_BYTES
    assert backup.endswith("__20261205T023000Z")


@pytest.mark.parametrize("fmt", ["custom", "plain-gzip"])
async def test_drill_restores_and_counts_match(make_manager: ManagerFactory,
                                               pg_cluster: PgCluster,
                                               seed_rows: dict[str, int], fmt: str) -> None:
    manager = make_manager(format=fmt)
    backup = await manager.take()
    assert backup is not None

    drilled = await manager.drill(backup.id)

    assert drilled.drill is not None
    assert drilled.drill.ok, drilled.drill.error
    assert drilled.drill.detail["row_counts"] == seed_rows
    assert drilled.drill.detail["table_count"] == 4
    assert drilled.verified
    assert (await manager.read(backup.id)).drill == drilled.drill
    assert drill_databases(pg_cluster, manager.database) == []
    assert manager.metrics.backup_last_drill._value.get() > 0


async def test_drill_clears_its_journal_entry(make_manager: ManagerFactory,
                                             pg_cluster: PgCluster) -> None:
    """The journal file exists once the drill journaled its scratch name, and is empty
    again after the drop."""
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None

    drilled = await manager.drill(backup.id)

    assert drilled.drill is not None
    assert drilled.drill.ok, drilled.drill.error
    assert journal_names(manager) == []
    assert drill_databases(pg_cluster, manager.database) == []


async def test_drill_runs_when_journal_fails(make_manager: ManagerFactory,
                                            caplog: pytest.LogCaptureFixture) -> None:
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None
    manager.scratch_journal.path = manager.directory / "missing" / "journal"

    drilled = await manager.drill(backup.id)

    assert drilled.drill is not None
    assert drilled.drill.ok, drilled.drill.error
    failures = [r for r in caplog.records if r.getMessage() == "backup.scratch_journal_failed"]
    assert [r.fields["operation"] for r in failures] == ["add"]  # type: ignore[attr-defined]


async def test_drill_reports_count_mismatch(make_manager: ManagerFactory,
                                            pg_cluster: PgCluster,
                                            alerts: list[BackupAlert]) -> None:
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None
    backup.row_counts["public.ledger"] += 1
    write_manifest(manager.directory, backup)

    drilled = await manager.drill(backup.id)

    assert drilled.drill is not None
    assert not drilled.drill.ok
    assert drilled.drill.error == "table public.ledger has 3000 rows, the dump had 3001"
    assert not drilled.verified
    assert manager.metrics.backup_failures.labels(operation="drill")._value.get() == 1
    assert alerts == [], "a failed drill must not raise the backup-failed alert"
    assert drill_databases(pg_cluster, manager.database) == []


async def test_drill_rejects_changed_file(make_manager: ManagerFactory,
                                          pg_cluster: PgCluster) -> None:
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None
    actual = overwrite_two_bytes(manager.path_of(backup), backup.size_bytes // 2)

    drilled = await manager.drill(backup.id)

    assert drilled.drill is not None
    assert not drilled.drill.ok
    assert drilled.drill.error == (
        f"sha256 is {actual}, the manifest records {backup.sha256}; the file changed "
        "after it was written; the drill did not restore it")
    assert drilled.drill.detail["scratch"] is None
    assert drilled.checksum_check is not None
    assert not drilled.checksum_check.ok
    assert (await manager.read(backup.id)).drill == drilled.drill
    assert not drilled.verified
    assert manager.metrics.backup_failures.labels(operation="drill")._value.get() == 1
    assert drill_databases(pg_cluster, manager.database) == []


async def test_drill_uses_dump_time_snapshot(make_manager: ManagerFactory, seeded_db: str,
                                             seed_rows: dict[str, int]) -> None:
    """Rows written after the backup change neither the manifest nor the drill."""
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None
    with psycopg.connect(seeded_db, autocommit=True) as conn:
        conn.execute("INSERT INTO accounts VALUES (1000, 'late')")

    drilled = await manager.drill()

    assert drilled.drill is not None and drilled.drill.ok
    assert drilled.row_counts == seed_rows


@pytest.mark.parametrize(("field", "value"), [
    ("file", "../../../../../etc/hostname"),
    ("file", "/etc/hostname"),
    ("file", "other__host__20260101T000000Z.dump"),
    ("file", "{id}.sql.gz"),
    ("format", "zip"),
    ("id", "other__host__20260101T000000Z"),
])
async def test_manifest_names_are_checked(make_manager: ManagerFactory,
                                          field: str, value: str) -> None:
    """A manifest can name only its own dump in the backups directory."""
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None
    value = value.format(id=backup.id)
    stored = manifest_path(manager.directory, backup.id)
    stored.write_bytes(orjson.dumps({**orjson.loads(stored.read_bytes()), field: value}))

    with pytest.raises(BackupError) as rejected:
        await manager.verify(backup.id)
    listed = await manager.list()
    [unreadable] = unreadable_manifests(manager.directory)

    assert f"manifest {stored} is invalid: field {field!r} is \"{value}\", expected " in (
        str(rejected.value))
    assert listed == []
    assert unreadable["error"].startswith(f"field {field!r} is \"{value}\", expected ")
    assert unreadable["dump"] == str(manager.path_of(backup))
    assert manager.metrics.backup_failures.labels(operation="verify")._value.get() == 0
    assert manager.metrics.backup_damaged._value.get() == 1
