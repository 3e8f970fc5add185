"""Taking backups against the real cluster: files, manifests, failures and locking."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import psycopg
import pytest

from tests.conftest import mounted_tmpfs
from walacord.backup import BackupAlert, BackupManager
from walacord.backup.alerts import BACKUP_FAILED
from walacord.backup.manager import BACKUP_LOCK_KEY
from walacord.backup.manifest import unreadable_manifests
from walacord.backup.pgclient import client_environment, find_client_bindir
from walacord.backup.take import _full_disk_hint
from walacord.backup.verify import list_archive
from walacord.errors import BackupError
from walacord.pgcluster import PgCluster

pytestmark = pytest.mark.anyio

ManagerFactory = Callable[..., BackupManager]


def backup_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def failures(manager_metrics: object, operation: str) -> float:
    counter = manager_metrics.backup_failures.labels(operation=operation)  # type: ignore[attr-defined]
    return float(counter._value.get())


async def test_take_writes_dump_and_manifest(make_manager: ManagerFactory,
                                             seed_rows: dict[str, int]) -> None:
    manager = make_manager()

    manifest = await manager.take()

    assert manifest is not None
    path = manager.path_of(manifest)
    assert path.exists()
    assert (manager.directory / f"{manifest.id}.json").exists()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest.sha256
    assert manifest.size_bytes == path.stat().st_size
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert manifest.database in path.name
    assert "127.0.0.1" in path.name
    assert manifest.started_at[:10].replace("-", "") in path.name
    assert manifest.row_counts == seed_rows
    assert manifest.table_count == 4
    assert manifest.server_version.startswith("15")
    assert manifest.pg_dump_version.startswith("15")
    assert manifest.verified

    listing = await anyio.run_process(
        [str(find_client_bindir() / "pg_restore"), "--list", str(path)], check=False)
    assert listing.returncode == 0, listing.stderr
    assert b"TABLE DATA public ledger" in listing.stdout
    assert not [name for name in backup_files(manager.directory) if name.startswith(".")]


async def test_take_updates_metrics(make_manager: ManagerFactory) -> None:
    manager = make_manager()

    manifest = await manager.take()

    assert manifest is not None
    metrics = manager.metrics
    assert metrics.backup_last_success._value.get() == pytest.approx(
        manifest.created.timestamp())
    assert metrics.backup_size._value.get() == manifest.size_bytes
    assert metrics.backup_duration._value.get() > 0


async def test_take_plain_gzip_is_complete(make_manager: ManagerFactory) -> None:
    manager = make_manager(format="plain-gzip")

    manifest = await manager.take()

    assert manifest is not None
    path = manager.path_of(manifest)
    assert path.name.endswith(".sql.gz")
    text = gzip.decompress(path.read_bytes()).decode()
    assert "COPY public.ledger" in text
    # pg_dump 15.14 and newer add a closing `\unrestrict` line after this one.
    assert "-- PostgreSQL database dump complete" in text[-500:]
    assert manifest.verified


async def test_take_twice_gives_distinct_ids(make_manager: ManagerFactory) -> None:
    manager = make_manager()

    first = await manager.take()
    second = await manager.take()

    assert first is not None and second is not None
    assert first.id != second.id
    assert len(await manager.list()) == 2


@pytest.fixture
def dump_role(pg_cluster: PgCluster, seeded_db: str) -> Iterator[str]:
    """A login role that may read every table except public.ledger; yields its URL."""
    dbname = seeded_db.rsplit("/", 1)[1]
    role = f"dumper_{dbname}"[:60]
    password = "dump:pass\\word"
    with psycopg.connect(seeded_db, autocommit=True) as conn:
        conn.execute(f'DROP ROLE IF EXISTS "{role}"')
        conn.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'")
        conn.execute(f'GRANT USAGE ON SCHEMA audit TO "{role}"')
        conn.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA public, audit TO "{role}"')
        conn.execute(f'GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO "{role}"')
        conn.execute(f'REVOKE SELECT ON public.ledger FROM "{role}"')
    quoted = password.replace("\\", "\\\\")  # libpq key=value strings escape backslashes
    yield f"host=127.0.0.1 port={pg_cluster.port} dbname={dbname} user={role} password='{quoted}'"
    pg_cluster.psql(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    pg_cluster.psql(f'DROP ROLE IF EXISTS "{role}"')


@pytest.mark.chaos
@pytest.mark.parametrize("fmt", ["custom", "plain-gzip"])
async def test_take_revoked_table_fails_cleanly(make_manager: ManagerFactory, dump_role: str,
                                                alerts: list[BackupAlert], fmt: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    manager = make_manager(url=dump_role, format=fmt, drill_tables=1)
    caplog.set_level(logging.INFO)

    with pytest.raises(BackupError) as raised:
        await manager.take()

    assert "permission denied for table ledger" in str(raised.value)
    assert backup_files(manager.directory) == []
    assert failures(manager.metrics, "dump") == 1
    assert [a.name for a in alerts] == [BACKUP_FAILED]
    assert alerts[0].firing
    failed = [r for r in caplog.records if r.getMessage() == "backup.dump_failed"]
    assert len(failed) == 1
    assert "permission denied" in failed[0].fields["stderr"]  # type: ignore[attr-defined]
    assert "pass\\word" not in caplog.text


async def test_take_with_dump_role_and_password(make_manager: ManagerFactory, dump_role: str,
                                                pg_cluster: PgCluster, seeded_db: str) -> None:
    """The password, which contains ':' and '\\', reaches pg_dump through the passfile."""
    with psycopg.connect(seeded_db, autocommit=True) as conn:
        conn.execute("DROP TABLE ledger")
    manager = make_manager(url=dump_role)

    manifest = await manager.take()

    assert manifest is not None
    assert "public.ledger" not in manifest.row_counts


@pytest.mark.chaos
async def test_take_gives_up_behind_ddl_lock(make_manager: ManagerFactory, seeded_db: str,
                                             alerts: list[BackupAlert],
                                             caplog: pytest.LogCaptureFixture) -> None:
    manager = make_manager(lock_wait_timeout=0.5)
    caplog.set_level(logging.INFO)

    with psycopg.connect(seeded_db) as holder:
        holder.execute("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
        with anyio.fail_after(20), pytest.raises(BackupError) as raised:
            await manager.take()

    assert backup_files(manager.directory) == []
    messages = [r.getMessage() for r in caplog.records]
    assert "backup.lock_wait_timed_out" in messages
    assert "gave up after waiting 0.5 s ([backup] lock_wait_timeout)" in str(raised.value)
    started = next(r for r in caplog.records if r.getMessage() == "backup.started")
    assert started.fields["lock_wait_timeout_seconds"] == 0.5  # type: ignore[attr-defined]
    assert alerts and alerts[0].name == BACKUP_FAILED


@pytest.mark.chaos
async def test_take_kills_pg_dump_past_deadline(make_manager: ManagerFactory, seeded_db: str,
                                                alerts: list[BackupAlert]) -> None:
    import psutil

    manager = make_manager(lock_wait_timeout=600.0, dump_timeout=1.0)

    with psycopg.connect(seeded_db) as holder:
        holder.execute("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
        with anyio.fail_after(20), pytest.raises(BackupError) as raised:
            await manager.take()

    assert "was killed" in str(raised.value)
    children = [p.name() for p in psutil.Process().children(recursive=True)]
    assert "pg_dump" not in children
    assert backup_files(manager.directory) == []
    assert failures(manager.metrics, "dump") == 1
    assert alerts and alerts[0].firing


@pytest.mark.slow
@pytest.mark.chaos
async def test_take_killed_pg_dump_leaves_nothing(make_manager: ManagerFactory,
                                                  seeded_db: str,
                                                  alerts: list[BackupAlert]) -> None:
    import psutil

    with psycopg.connect(seeded_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE big AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) "
                     "|| md5((g * 13)::text) AS payload FROM generate_series(1, 600000) g")
    manager = make_manager(compression_level=9)
    seen_cmdlines: list[list[str]] = []

    async def kill_pg_dump_mid_write() -> None:
        while True:
            for child in psutil.Process().children(recursive=True):
                if child.name() != "pg_dump":
                    continue
                partial = list(manager.directory.glob(".*.partial"))
                if partial and partial[0].stat().st_size > 64 * 1024:
                    seen_cmdlines.append(child.cmdline())
                    os.kill(child.pid, 9)
                    return
            await anyio.sleep(0.01)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            group.start_soon(kill_pg_dump_mid_write)
            with pytest.raises(BackupError) as raised:
                await manager.take()

    assert "pg_dump was killed by signal 9" in str(raised.value)
    assert backup_files(manager.directory) == []
    assert failures(manager.metrics, "dump") == 1
    assert [a.name for a in alerts] == [BACKUP_FAILED]
    assert seen_cmdlines
    assert not any("postgres-test-pw" in arg for arg in seen_cmdlines[0])


async def test_take_skips_while_lock_held(make_manager: ManagerFactory, seeded_db: str,
                                          caplog: pytest.LogCaptureFixture) -> None:
    manager = make_manager()
    caplog.set_level(logging.INFO)

    with psycopg.connect(seeded_db, autocommit=True) as peer:
        peer.execute("SELECT pg_advisory_lock(%s)", (BACKUP_LOCK_KEY,))
        result = await manager.take()

    assert result is None
    assert backup_files(manager.directory) == []
    assert manager.metrics.backup_skipped._value.get() == 1
    assert "backup.skipped" in [r.getMessage() for r in caplog.records]


async def test_two_managers_take_one_backup(make_manager: ManagerFactory, tmp_path: Path,
                                            seeded_db: str) -> None:
    with psycopg.connect(seeded_db, autocommit=True) as conn:
        conn.execute("INSERT INTO ledger (account, amount) "
                     "SELECT 1, g FROM generate_series(1, 200000) g")
    first = make_manager(directory=tmp_path / "host-a")
    second = make_manager(directory=tmp_path / "host-b")
    results = []

    async def take(manager: object) -> None:
        results.append(await manager.take())  # type: ignore[attr-defined]

    async with anyio.create_task_group() as group:
        group.start_soon(take, first)
        group.start_soon(take, second)

    backup = [r for r in results if r is not None]
    assert len(results) == 2
    assert len(backup) == 1
    files = backup_files(tmp_path / "host-a") + backup_files(tmp_path / "host-b")
    assert len([f for f in files if f.endswith(".dump")]) == 1


async def test_take_unreachable_server_fails_cleanly(make_manager: ManagerFactory,
                                                     alerts: list[BackupAlert]) -> None:
    from walacord.pgcluster import free_port

    manager = make_manager(url=f"postgresql://postgres:pw@127.0.0.1:{free_port()}/nowhere")

    with pytest.raises(BackupError, match="cannot take the backup lock in database nowhere"):
        await manager.take()

    assert failures(manager.metrics, "dump") == 1
    assert [a.name for a in alerts] == [BACKUP_FAILED]
    assert backup_files(manager.directory) == []


@pytest.fixture
def full_backup_dir(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, filled but for 8 KiB, as the backup directory."""
    with mounted_tmpfs(tmp_path / "full") as directory:
        with (directory / "filler").open("wb") as out:
            out.write(b"\0" * (1024 * 1024 - 8192))
        yield directory


@pytest.mark.parametrize("fmt", ["custom", "plain-gzip"])
async def test_take_on_full_disk_names_dir(make_manager: ManagerFactory,
                                           full_backup_dir: Path, fmt: str) -> None:
    manager = make_manager(directory=full_backup_dir, format=fmt)

    with pytest.raises(BackupError) as raised:
        await manager.take()

    # pg_dump (or gzip) reports the full disk itself here. When it exits 0 with a
    # cut-short file instead, the archive check adds the hint tested below.
    message = str(raised.value)
    assert "No space left on device" in message
    assert f"The file system of [backup] dir {full_backup_dir} has no space left" in message
    assert "bytes of the dump were written" in message
    assert "delete older backups" in message
    assert "keep_days" in message
    assert backup_files(manager.directory) == ["filler"]


def test_full_disk_hint_names_free_bytes(full_backup_dir: Path, tmp_path: Path) -> None:
    hint = _full_disk_hint(full_backup_dir)

    assert f"the file system of [backup] dir {full_backup_dir} has only" in hint
    assert "[backup] dir" in hint
    assert _full_disk_hint(tmp_path) == ""


@pytest.mark.parametrize("fmt", ["custom", "plain-gzip"])
async def test_take_empty_database(make_manager: ManagerFactory,
                                   make_database: Callable[[str], str], fmt: str) -> None:
    """A database with no objects, as before walacord's migrations, can be backed up,
    verified and drilled."""
    manager = make_manager(url=make_database(f"empty_{fmt.replace('-', '_')}"), format=fmt)

    taken = await manager.take()
    assert taken is not None
    verified = await manager.verify(taken.id)
    drilled = await manager.drill(taken.id)

    assert taken.table_count == 0
    assert taken.row_counts == {}
    assert verified.verified
    assert verified.list_check is not None
    if fmt == "custom":
        assert verified.list_check.detail["entries"] == 0
    assert drilled.drill is not None
    assert drilled.drill.ok, drilled.drill.error
    assert drilled.drill.detail["table_count"] == 0


async def test_truncated_empty_archive_fails(make_manager: ManagerFactory,
                                             make_database: Callable[[str], str]) -> None:
    manager = make_manager(url=make_database("empty_truncated"))
    taken = await manager.take()
    assert taken is not None
    path = manager.path_of(taken)
    half = taken.size_bytes // 2
    path.write_bytes(path.read_bytes()[:half])

    checked = await manager.verify(taken.id)
    # The size differs from the manifest's, so verify reads nothing. The readability
    # check of the truncated archive runs on its own.
    with client_environment("") as env:
        listed, _ = await list_archive(manager.bindir, path, env, 30.0)

    assert checked.checksum_check is not None
    assert (checked.checksum_check.error or "").startswith(
        f"size is {half} bytes, the manifest records {taken.size_bytes} bytes")
    assert not checked.verified
    assert not listed.ok
    assert (listed.error or "").startswith("pg_restore --list exited with 1: ")


async def test_take_database_with_leading_dot(make_manager: ManagerFactory,
                                              make_database: Callable[[str], str],
                                              pg_cluster: PgCluster) -> None:
    """A database name that starts with "." gives an id that list and verify accept."""
    url = make_database(".dot")
    pg_cluster.psql("CREATE TABLE ledger AS SELECT g AS id FROM generate_series(1, 7) g",
                    dbname=".dot")
    manager = make_manager(url=url)

    taken = await manager.take()
    assert taken is not None
    listed = await manager.list()
    verified = await manager.verify(taken.id)
    drilled = await manager.drill(taken.id)

    assert taken.id.startswith("_.dot__127.0.0.1__")
    assert taken.database == ".dot"
    assert [manifest.id for manifest in listed] == [taken.id]
    assert unreadable_manifests(manager.directory) == []
    assert verified.verified
    assert drilled.drill is not None
    assert drilled.drill.ok, drilled.drill.error
    assert drilled.row_counts == {"public.ledger": 7}
