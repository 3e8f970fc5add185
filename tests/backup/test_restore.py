"""Restoring backups into new and existing databases."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial

import anyio
import psycopg
import pytest

from tests.backup.conftest import fifo_in_place_of, journal_names, overwrite_two_bytes
from tests.conftest import wait_until
from walacord.backup import BackupManager
from walacord.backup.manifest import format_time, write_manifest
from walacord.backup.restore import DatabaseExists, RestoreRequest, load_archive
from walacord.backup.verify import ChecksumMismatch, list_archive
from walacord.errors import BackupError
from walacord.pgcluster import PgCluster

pytestmark = pytest.mark.anyio

ManagerFactory = Callable[..., BackupManager]


@pytest.fixture
def target_db(pg_cluster: PgCluster, seeded_db: str) -> Iterator[str]:
    name = seeded_db.rsplit("/", 1)[1][:40] + "_restored"
    yield name
    pg_cluster.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def ledger_rows(cluster: PgCluster, dbname: str) -> int:
    return int(cluster.psql("SELECT count(*) FROM ledger", dbname=dbname))


def database_exists(cluster: PgCluster, name: str) -> bool:
    return cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{name}'") == "1"


def restoring_databases(cluster: PgCluster) -> list[str]:
    output = cluster.psql("SELECT datname FROM pg_database WHERE datname LIKE '%_restoring_%'")
    return [line for line in output.splitlines() if line]


@pytest.mark.parametrize("fmt", ["custom", "plain-gzip"])
async def test_restore_into_new_database(make_manager: ManagerFactory, pg_cluster: PgCluster,
                                         target_db: str, fmt: str) -> None:
    manager = make_manager(format=fmt)
    backup = await manager.take()
    assert backup is not None
    steps: list[tuple[int, int, str]] = []

    result = await manager.restore(backup.id, target_db,
                                   progress=lambda done, total, text: steps.append(
                                       (done, total, text)))

    assert result.target_db == target_db
    assert not result.replaced
    assert ledger_rows(pg_cluster, target_db) == 3000
    assert pg_cluster.psql("SELECT count(*) FROM audit.events", dbname=target_db) == "50"
    assert steps
    assert steps[-1][0] == steps[-1][1]
    assert restoring_databases(pg_cluster) == []


async def test_restore_refuses_existing_without_force(make_manager: ManagerFactory,
                                                      pg_cluster: PgCluster,
                                                      target_db: str) -> None:
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None
    pg_cluster.psql(f'CREATE DATABASE "{target_db}"')
    pg_cluster.psql("CREATE TABLE keep_me (x int)", dbname=target_db)

    with pytest.raises(DatabaseExists) as raised:
        await manager.restore(backup.id, target_db)

    assert f"'{target_db}' already exists" in str(raised.value)
    assert "--force" in str(raised.value)
    assert raised.value.database == target_db
    assert pg_cluster.psql("SELECT count(*) FROM keep_me", dbname=target_db) == "0"


async def test_restore_force_replaces_existing(make_manager: ManagerFactory,
                                               pg_cluster: PgCluster, target_db: str) -> None:
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None
    pg_cluster.psql(f'CREATE DATABASE "{target_db}"')
    pg_cluster.psql("CREATE TABLE keep_me (x int)", dbname=target_db)

    result = await manager.restore(backup.id, target_db, force=True)

    assert result.replaced
    assert ledger_rows(pg_cluster, target_db) == 3000
    assert pg_cluster.psql("SELECT to_regclass('keep_me') IS NULL", dbname=target_db) == "t"


async def test_restore_journals_temporary_database(make_manager: ManagerFactory,
                                                   pg_cluster: PgCluster,
                                                   target_db: str) -> None:
    """The journal names the temporary copy while it loads, and no database after."""
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None
    pg_cluster.psql(f'CREATE DATABASE "{target_db}"')
    while_loading: list[list[str]] = []

    await manager.restore(backup.id, target_db, force=True,
                          progress=lambda done, total, text: while_loading.append(
                              journal_names(manager)))

    [temporary] = {name for names in while_loading for name in names}
    # The only name is the temporary copy's: the replaced copy is never journaled.
    assert "_restoring_" in temporary
    assert all(names == [temporary] for names in while_loading)
    assert journal_names(manager) == []
    assert ledger_rows(pg_cluster, target_db) == 3000


async def test_restore_failure_clears_journal(make_manager: ManagerFactory,
                                              pg_cluster: PgCluster, target_db: str) -> None:
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None
    path = manager.path_of(backup)
    path.write_bytes(path.read_bytes()[:600])

    with pytest.raises(BackupError, match="restore"):
        await manager.restore(backup.id, target_db, ignore_checksum=True)

    assert restoring_databases(pg_cluster) == []
    assert journal_names(manager) == []


async def test_restore_failure_keeps_existing_database(make_manager: ManagerFactory,
                                                       pg_cluster: PgCluster,
                                                       target_db: str) -> None:
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None
    path = manager.path_of(backup)
    path.write_bytes(path.read_bytes()[:600])
    pg_cluster.psql(f'CREATE DATABASE "{target_db}"')
    pg_cluster.psql("CREATE TABLE keep_me (x int)", dbname=target_db)

    with pytest.raises(BackupError, match="restore") as raised:
        await manager.restore(backup.id, target_db, force=True, ignore_checksum=True)

    assert not isinstance(raised.value, ChecksumMismatch)
    assert pg_cluster.psql("SELECT count(*) FROM keep_me", dbname=target_db) == "0"
    assert restoring_databases(pg_cluster) == []
    assert manager.metrics.backup_failures.labels(operation="restore")._value.get() == 1


async def test_restore_rejects_resized_file(make_manager: ManagerFactory,
                                            pg_cluster: PgCluster, target_db: str) -> None:
    """A file of another size is rejected at once, without hashing it."""
    manager = make_manager(verify_timeout=10.0)
    backup = await manager.take()
    assert backup is not None
    path = manager.path_of(backup)
    # A sparse file: hashing its 64 GiB of zeros would outlast the 10 s verify_timeout.
    size = 64 * 2**30
    os.truncate(path, size)

    started = time.process_time()
    with pytest.raises(ChecksumMismatch) as raised:
        await manager.restore(backup.id, target_db)
    cpu_seconds = time.process_time() - started

    message = str(raised.value)
    assert cpu_seconds < 2.0
    assert (f"backup file {path} does not match its manifest: its size is {size} bytes, "
            f"the manifest records {backup.size_bytes} bytes, so the file changed after it "
            "was written. Nothing was restored") in message
    assert raised.value.actual is None
    assert raised.value.size_bytes == size
    assert raised.value.manifest_size_bytes == backup.size_bytes
    stored = await manager.read(backup.id)
    assert stored.checksum_check is not None
    assert stored.checksum_check.error is not None
    assert stored.checksum_check.error.startswith(f"size is {size} bytes")
    assert not database_exists(pg_cluster, target_db)
    assert manager.metrics.backup_failures.labels(operation="restore")._value.get() == 1


@pytest.mark.parametrize("fmt", ["custom", "plain-gzip"])
async def test_restore_rejects_changed_file(make_manager: ManagerFactory,
                                            pg_cluster: PgCluster, target_db: str,
                                            fmt: str) -> None:
    manager = make_manager(format=fmt)
    backup = await manager.take()
    assert backup is not None
    actual = overwrite_two_bytes(manager.path_of(backup), backup.size_bytes // 2)

    with pytest.raises(ChecksumMismatch) as raised:
        await manager.restore(backup.id, target_db)

    message = str(raised.value)
    assert str(manager.path_of(backup)) in message
    assert f"its sha256 is {actual}" in message
    assert f"the manifest records {backup.sha256}" in message
    assert "Nothing was restored" in message
    assert "`walacorctl backup list`" in message
    assert "--ignore-checksum" in message
    assert (raised.value.expected, raised.value.actual) == (backup.sha256, actual)
    assert not database_exists(pg_cluster, target_db)
    assert restoring_databases(pg_cluster) == []
    assert manager.metrics.backup_failures.labels(operation="restore")._value.get() == 1
    stored = await manager.read(backup.id)
    assert stored.checksum_check is not None
    assert not stored.checksum_check.ok
    assert stored.checksum_check.detail["sha256"] == actual
    assert not stored.verified


async def test_restore_checks_checksum_before_target(make_manager: ManagerFactory,
                                                     pg_cluster: PgCluster,
                                                     target_db: str) -> None:
    """With --force, a changed file leaves the existing target database untouched."""
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None
    overwrite_two_bytes(manager.path_of(backup), backup.size_bytes // 2)
    pg_cluster.psql(f'CREATE DATABASE "{target_db}"')
    pg_cluster.psql("CREATE TABLE keep_me (x int)", dbname=target_db)

    with pytest.raises(ChecksumMismatch):
        await manager.restore(backup.id, target_db, force=True)

    assert pg_cluster.psql("SELECT count(*) FROM keep_me", dbname=target_db) == "0"
    assert restoring_databases(pg_cluster) == []


async def test_restore_fifo_fails_at_once(make_manager: ManagerFactory,
                                          pg_cluster: PgCluster, target_db: str) -> None:
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None
    path = manager.path_of(backup)

    with fifo_in_place_of(path), anyio.fail_after(5), pytest.raises(BackupError) as raised:
        await manager.restore(backup.id, target_db)

    assert str(raised.value) == (f"backup file {path} is a FIFO, not a regular file; "
                                 "choose another id from `walacorctl backup list`")
    assert not database_exists(pg_cluster, target_db)
    assert restoring_databases(pg_cluster) == []


@pytest.mark.parametrize("fmt", ["custom", "plain-gzip"])
async def test_programs_reject_swapped_in_fifo(
        make_manager: ManagerFactory, fmt: str) -> None:
    """A FIFO that replaces the dump after the checks never reaches pg_restore or gzip,
    which would wait on it until their deadline."""
    manager = make_manager(format=fmt)
    backup = await manager.take()
    assert backup is not None
    path = manager.path_of(backup)
    expected = f"backup file {path} is a FIFO, not a regular file"

    with fifo_in_place_of(path), anyio.fail_after(5):
        if fmt == "custom":
            with pytest.raises(BackupError, match=expected):
                await list_archive(manager.bindir, path, {}, 60)
        with pytest.raises(BackupError, match=expected):
            await load_archive(RestoreRequest(manager.bindir, "dbname=unused", {}, fmt, path,
                                              timeout=60))


async def test_restore_ignore_checksum_restores(make_manager: ManagerFactory,
                                                pg_cluster: PgCluster,
                                                target_db: str) -> None:
    """ignore_checksum restores an intact file whose manifest records another sha256."""
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None
    recorded = backup.sha256
    backup.sha256 = "0" * 64
    write_manifest(manager.directory, backup)

    with pytest.raises(ChecksumMismatch):
        await manager.restore(backup.id, target_db)
    result = await manager.restore(backup.id, target_db, ignore_checksum=True)

    assert not result.checksum_ok
    assert ledger_rows(pg_cluster, target_db) == 3000
    stored = await manager.read(backup.id)
    assert stored.checksum_check is not None
    assert stored.checksum_check.detail["sha256"] == recorded
    assert not stored.checksum_check.ok


async def test_restore_intact_file_checksum_ok(make_manager: ManagerFactory,
                                               target_db: str) -> None:
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None

    result = await manager.restore(backup.id, target_db)

    assert result.checksum_ok
    assert (await manager.read(backup.id)).checksum_check == backup.checksum_check


async def test_restore_over_source_database(make_manager: ManagerFactory,
                                            pg_cluster: PgCluster, seeded_db: str) -> None:
    """Replacing the backed-up database itself works from the maintenance database."""
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None
    with psycopg.connect(seeded_db, autocommit=True) as conn:
        conn.execute("DELETE FROM ledger")
    source = seeded_db.rsplit("/", 1)[1]

    result = await manager.restore(backup.id, source, force=True)

    assert result.replaced
    assert ledger_rows(pg_cluster, source) == 3000


async def test_restore_names_supervised_database(make_manager: ManagerFactory,
                                                 seeded_db: str) -> None:
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None
    source = seeded_db.rsplit("/", 1)[1]

    with pytest.raises(DatabaseExists) as raised:
        await manager.restore(backup.id, source)

    assert "the database walacord supervises" in str(raised.value)
    assert "every write since the backup would be lost" in str(raised.value)


@pytest.mark.parametrize("template", ["template0", "template1"])
async def test_restore_rejects_template_database(make_manager: ManagerFactory,
                                                 pg_cluster: PgCluster, template: str) -> None:
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None

    with pytest.raises(BackupError, match="template databases cannot be replaced"):
        await manager.restore(backup.id, template, force=True)

    assert restoring_databases(pg_cluster) == []


@pytest.mark.slow
async def test_restore_over_postgres_database(make_manager: ManagerFactory,
                                              own_pg_cluster: PgCluster) -> None:
    """Replacing the database named postgres runs its DROP from template1."""
    cluster = own_pg_cluster
    cluster.psql("CREATE TABLE ledger (id int); INSERT INTO ledger SELECT generate_series(1, 5)")
    manager = make_manager(url=cluster.url("postgres"))
    backup = await manager.take()
    assert backup is not None
    cluster.psql("DELETE FROM ledger")

    result = await manager.restore(backup.id, "postgres", force=True)

    assert result.replaced
    assert ledger_rows(cluster, "postgres") == 5
    assert restoring_databases(cluster) == []
    assert manager.metrics.backup_failures.labels(operation="restore")._value.get() == 0


async def test_retention_keeps_backup_a_restore_reads(make_manager: ManagerFactory,
                                                      pg_cluster: PgCluster,
                                                      target_db: str) -> None:
    manager = make_manager(keep_days=1)
    old = await manager.take()
    newer = await manager.take()
    assert old is not None and newer is not None
    # Age the first backup past the window, so retention wants it gone.
    aged = await manager.read(old.id)
    aged.finished_at = format_time(datetime.now(UTC) - timedelta(days=3))
    write_manifest(manager.directory, aged)
    restoring = anyio.Event()
    plans = []

    async def prune_during_restore() -> None:
        await restoring.wait()
        plans.append(await manager.apply_retention())

    async with anyio.create_task_group() as tg:
        tg.start_soon(prune_during_restore)
        await manager.restore(old.id, target_db,
                              progress=lambda done, total, text: restoring.set())

    assert plans[0].delete == []
    assert plans[0].keep[old.id] == "a restore is reading it"
    assert ledger_rows(pg_cluster, target_db) == 3000
    after = await manager.apply_retention()
    assert after.delete == [old.id]
    assert not manager.path_of(old).exists()


# --- replacing a database whose temporary copy has other sessions ------------------


def previous_databases(cluster: PgCluster) -> list[str]:
    output = cluster.psql("SELECT datname FROM pg_database WHERE datname LIKE '%_previous_%'")
    return [line for line in output.splitlines() if line]


def hold_session_on_restoring(cluster: PgCluster, target: str,
                              sessions: list[psycopg.Connection]) -> None:
    """Open one superuser session on the restore's temporary database, once it exists.

    The temporary database is the one whose name starts like `target`'s: a long
    target name can lose the "_restoring" label to PostgreSQL's 63-byte limit.
    """
    if sessions:
        return
    [temporary] = cluster.psql(
        f"SELECT datname FROM pg_database WHERE datname LIKE '{target[:44]}%' "
        f"AND datname <> '{target}'").split()
    sessions.append(psycopg.connect(cluster.url(temporary), autocommit=True))


@pytest.fixture
def restorer(pg_cluster: PgCluster) -> str:
    """A login role with CREATEDB but without SUPERUSER; yields its name."""
    pg_cluster.psql("DO $$ BEGIN CREATE ROLE walacord_restorer LOGIN CREATEDB "
                    "PASSWORD 'restorer-pw'; EXCEPTION WHEN duplicate_object THEN NULL; "
                    "END $$")
    return "walacord_restorer"


async def test_restore_force_ends_session_on_temporary(
        make_manager: ManagerFactory, pg_cluster: PgCluster, target_db: str) -> None:
    """A session on the temporary database is terminated, and the rename then works."""
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None
    pg_cluster.psql(f'CREATE DATABASE "{target_db}"')
    pg_cluster.psql("CREATE TABLE keep_me (x int); INSERT INTO keep_me VALUES (1), (2)",
                    dbname=target_db)
    sessions: list[psycopg.Connection] = []

    try:
        result = await manager.restore(
            backup.id, target_db, force=True,
            progress=lambda *_: hold_session_on_restoring(pg_cluster, target_db,
                                                               sessions))
    finally:
        for session in sessions:
            session.close()

    assert sessions
    assert result.replaced
    assert ledger_rows(pg_cluster, target_db) == 3000
    assert pg_cluster.psql("SELECT to_regclass('keep_me') IS NULL", dbname=target_db) == "t"
    assert restoring_databases(pg_cluster) == []
    assert previous_databases(pg_cluster) == []
    assert pg_cluster.psql("SELECT shobj_description(oid, 'pg_database') IS NULL "
                           f"FROM pg_database WHERE datname = '{target_db}'") == "t"


async def test_restore_failed_rename_keeps_target(
        make_manager: ManagerFactory, pg_cluster: PgCluster, seeded_db: str,
        target_db: str, restorer: str) -> None:
    """When the rename fails, the target keeps its rows and the error states it.

    walacord runs as a role that may not terminate the superuser's session held on the
    temporary database, so the rename into place fails.
    """
    taken = await make_manager().take()
    assert taken is not None
    pg_cluster.psql(f'CREATE DATABASE "{target_db}" OWNER {restorer}')
    pg_cluster.psql("CREATE TABLE keep_me (x int); INSERT INTO keep_me VALUES (1), (2)",
                    dbname=target_db)
    manager = make_manager(url=pg_cluster.url(seeded_db.rsplit("/", 1)[1], user=restorer,
                                              password="restorer-pw"))
    sessions: list[psycopg.Connection] = []

    try:
        with pytest.raises(BackupError) as raised:
            await manager.restore(
                taken.id, target_db, force=True, no_owner=True,
                progress=lambda *_: hold_session_on_restoring(pg_cluster, target_db,
                                                               sessions))
    finally:
        for session in sessions:
            session.close()
        for leftover in pg_cluster.psql(
                f"SELECT datname FROM pg_database WHERE datname LIKE '{target_db[:44]}%' "
                f"AND datname <> '{target_db}'").split():
            pg_cluster.psql(f'DROP DATABASE "{leftover}" WITH (FORCE)')

    message = str(raised.value)
    assert sessions
    assert database_exists(pg_cluster, target_db)
    assert pg_cluster.psql("SELECT count(*) FROM keep_me", dbname=target_db) == "2"
    assert "is being accessed by other users (There " in message
    # The server's detail is inlined, so the error is one line.
    assert "\n" not in message
    assert f"Database {target_db} is unchanged" in message
    assert "The temporary copy" in message
    assert "could not be dropped" in message
    assert previous_databases(pg_cluster) == []
    assert manager.metrics.backup_failures.labels(operation="restore")._value.get() == 1


def connection_settings(cluster: PgCluster, name: str) -> str:
    """Return "datallowconn|datconnlimit" of database `name`, as psql prints them."""
    return cluster.psql("SELECT datallowconn, datconnlimit FROM pg_database "
                        f"WHERE datname = '{name}'")


async def test_restore_force_failure_reopens_target(
        make_manager: ManagerFactory, pg_cluster: PgCluster, seeded_db: str,
        target_db: str, restorer: str) -> None:
    """A swap that fails after ending sessions names them in its error, and the target
    accepts connections again with its own connection limit.

    walacord's role may end its own session on the target but not the superuser's,
    so the rename fails.
    """
    taken = await make_manager().take()
    assert taken is not None
    pg_cluster.psql(f'CREATE DATABASE "{target_db}" OWNER {restorer} CONNECTION LIMIT 7')
    pg_cluster.psql("CREATE TABLE keep_me (x int); INSERT INTO keep_me VALUES (1), (2)",
                    dbname=target_db)
    manager = make_manager(url=pg_cluster.url(seeded_db.rsplit("/", 1)[1], user=restorer,
                                              password="restorer-pw"))
    own_session = psycopg.connect(pg_cluster.url(target_db, user=restorer,
                                                 password="restorer-pw"), autocommit=True)
    superuser_session = psycopg.connect(pg_cluster.url(target_db), autocommit=True)
    own_pid = own_session.info.backend_pid

    try:
        with pytest.raises(BackupError) as raised:
            await manager.restore(taken.id, target_db, force=True, no_owner=True)
    finally:
        own_session.close()
        superuser_session.close()

    message = str(raised.value)
    assert f"ended 1 session on {target_db} (pid {own_pid})" in message
    assert f"Database {target_db} is unchanged" in message
    assert connection_settings(pg_cluster, target_db) == "t|7"
    assert pg_cluster.psql("SELECT count(*) FROM keep_me", dbname=target_db) == "2"
    assert restoring_databases(pg_cluster) == []
    assert previous_databases(pg_cluster) == []


async def test_restore_force_cancelled_reopens_target(
        make_manager: ManagerFactory, pg_cluster: PgCluster, target_db: str) -> None:
    """The target does not allow connections during the swap, and a restore cancelled
    then leaves the target unchanged and accepting connections.

    A transaction in another database holds a lock on the target's pg_database entry
    (COMMENT ON DATABASE), so the rename waits until the cancellation.
    """
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None
    pg_cluster.psql(f'CREATE DATABASE "{target_db}" CONNECTION LIMIT 9')
    pg_cluster.psql("CREATE TABLE keep_me (x int); INSERT INTO keep_me VALUES (1), (2)",
                    dbname=target_db)
    holder = psycopg.connect(pg_cluster.url("postgres"))
    holder.execute(f"COMMENT ON DATABASE \"{target_db}\" IS 'held by the test'")

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(partial(manager.restore, backup.id, target_db, force=True))
            # New connections would queue behind the rename's lock request now, so
            # only the setting is checked.
            await wait_until(lambda: connection_settings(pg_cluster, target_db) == "f|9", 30,
                             step=0.05)
            group.cancel_scope.cancel()
    finally:
        holder.rollback()
        holder.close()

    assert connection_settings(pg_cluster, target_db) == "t|9"
    assert pg_cluster.psql("SELECT count(*) FROM keep_me", dbname=target_db) == "2"
    assert restoring_databases(pg_cluster) == []
    assert previous_databases(pg_cluster) == []
