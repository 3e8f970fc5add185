"""Scratch databases and replaced copies left by killed restores and drills."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import psycopg
import pytest

from tests.backup.conftest import journal_names
from tests.conftest import wait_until
from walacord.backup import BackupManager
from walacord.backup.control import backup_list
from walacord.backup.databases import SCRATCH_COMMENT, Admin, scratch_locks, scratch_name
from walacord.pgcluster import PgCluster

pytestmark = pytest.mark.anyio

ManagerFactory = Callable[..., BackupManager]


def database_exists(cluster: PgCluster, name: str) -> bool:
    return cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{name}'") == "1"


@pytest.fixture
def scratch_names(pg_cluster: PgCluster) -> Iterator[list[str]]:
    """Names of databases a test creates; each is dropped at the end."""
    names: list[str] = []
    yield names
    for name in names:
        # Copies made from a name, such as `<name>_restoring_<hex>`, go too, even when
        # the test failed before it learned their names.
        copies = pg_cluster.psql("SELECT datname FROM pg_database WHERE datname LIKE "
                                 f"'{name}\\_%'").split()
        for each in [name, *copies]:
            pg_cluster.psql(f'DROP DATABASE IF EXISTS "{each}" WITH (FORCE)')


async def create_scratch(manager: BackupManager, name: str, *, comment: bool = True,
                         journal: bool = False) -> None:
    """Create `name` as a drill or restore does, then release its lock as a kill would.

    Without a comment, this leaves what a kill between CREATE DATABASE and COMMENT
    leaves. With `journal`, the name goes to the manager's scratch journal first.
    """
    admin = Admin(manager.conninfo, 15, manager.scratch_journal if journal else None)
    async with scratch_locks(manager.conninfo, [name], 15):
        await admin.create(name, f"{SCRATCH_COMMENT}: test" if comment else None)


async def test_killed_scratch_is_dropped(make_manager: ManagerFactory, pg_cluster: PgCluster,
                                         scratch_names: list[str],
                                         caplog: pytest.LogCaptureFixture) -> None:
    manager = make_manager()
    name = scratch_name("walacord_drill_test")
    scratch_names.append(name)
    await create_scratch(manager, name)
    caplog.set_level(logging.WARNING)

    leftovers = await manager.drop_leftover_databases()

    assert [(lf.name, lf.kind, lf.dropped) for lf in leftovers] == [(name, "scratch", True)]
    assert not database_exists(pg_cluster, name)
    [logged] = [r for r in caplog.records if r.getMessage() == "backup.leftover_database"]
    assert logged.fields["database"] == name  # type: ignore[attr-defined]
    assert logged.fields["size_bytes"] > 0  # type: ignore[attr-defined]
    assert logged.fields["dropped"] is True  # type: ignore[attr-defined]


async def test_locked_scratch_is_kept(make_manager: ManagerFactory, pg_cluster: PgCluster,
                                      scratch_names: list[str]) -> None:
    """A scratch database whose lock a session holds belongs to a running drill."""
    manager = make_manager()
    name = scratch_name("walacord_drill_test")
    scratch_names.append(name)

    async with scratch_locks(manager.conninfo, [name], 15):
        await Admin(manager.conninfo, 15).create(name, f"{SCRATCH_COMMENT}: test")
        leftovers = await manager.drop_leftover_databases()

    assert leftovers == []
    assert database_exists(pg_cluster, name)


async def test_scratch_with_session_is_kept(make_manager: ManagerFactory,
                                            pg_cluster: PgCluster,
                                            scratch_names: list[str]) -> None:
    manager = make_manager()
    name = scratch_name("walacord_drill_test")
    scratch_names.append(name)
    await create_scratch(manager, name)

    with psycopg.connect(pg_cluster.url(name)):
        leftovers = await manager.drop_leftover_databases()

    assert [(lf.name, lf.sessions, lf.dropped) for lf in leftovers] == [(name, 1, False)]
    assert database_exists(pg_cluster, name)


async def test_unmarked_scratch_is_named(make_manager: ManagerFactory, pg_cluster: PgCluster,
                                         scratch_names: list[str]) -> None:
    """Without walacord's comment, a database named like a scratch one is only named."""
    manager = make_manager()
    name = scratch_name("app", "restoring")
    scratch_names.append(name)
    await create_scratch(manager, name, comment=False)

    leftovers = await manager.drop_leftover_databases()

    assert [(lf.name, lf.kind, lf.dropped) for lf in leftovers] == [(name, "unmarked", False)]
    assert database_exists(pg_cluster, name)


async def test_previous_copy_is_named(make_manager: ManagerFactory, pg_cluster: PgCluster,
                                      scratch_names: list[str]) -> None:
    """A replaced target's copy contains a user's data: it is listed and never dropped."""
    manager = make_manager()
    name = scratch_name("app", "previous")
    scratch_names.append(name)
    pg_cluster.psql(f'CREATE DATABASE "{name}"')
    pg_cluster.psql("CREATE TABLE orders (id int); INSERT INTO orders VALUES (1)", dbname=name)

    dropped = await manager.drop_leftover_databases()
    listing = await backup_list(manager, {})

    assert [(lf.name, lf.kind, lf.dropped) for lf in dropped] == [(name, "previous", False)]
    assert pg_cluster.psql("SELECT count(*) FROM orders", dbname=name) == "1"
    [listed] = listing["leftover_databases"]
    assert listed["name"] == name
    assert listed["size_bytes"] > 0
    assert "drop it by hand" in listed["description"]


KILLED_RESTORE = """
import sys, time
import anyio
from walacord.backup import BackupManager
from walacord.config import BackupConfig

def stop_here(done, total, text):
    print("loading", flush=True)
    time.sleep(600)  # blocks the event loop until the test kills this process

async def main():
    manager = BackupManager(BackupConfig(dir=sys.argv[2]), conninfo=sys.argv[1])
    await manager.restore(sys.argv[3], sys.argv[4], force=True, progress=stop_here)

anyio.run(main)
"""


async def test_killed_restore_leaves_target_and_scratch(
        make_manager: ManagerFactory, pg_cluster: PgCluster, seeded_db: str,
        scratch_names: list[str]) -> None:
    """SIGKILL during a forced restore keeps the target; start-up drops the scratch copy."""
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None
    target = seeded_db.rsplit("/", 1)[1][:30] + "_kill"
    scratch_names.append(target)
    pg_cluster.psql(f'CREATE DATABASE "{target}"')
    pg_cluster.psql("CREATE TABLE keep_me (x int); INSERT INTO keep_me VALUES (1), (2)",
                    dbname=target)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    process = await anyio.open_process(
        [sys.executable, "-c", KILLED_RESTORE, seeded_db, str(manager.directory), backup.id,
         target], stdout=subprocess.PIPE, env=env, start_new_session=True)
    try:
        assert process.stdout is not None
        output = b""
        with anyio.fail_after(60):
            # print() may reach the pipe in more than one write.
            while not output.endswith(b"\n"):
                output += await process.stdout.receive()
        assert output == b"loading\n"
    finally:
        # The whole process group, pg_restore included, as systemd stops a service.
        os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
    [temporary] = pg_cluster.psql(
        f"SELECT datname FROM pg_database WHERE datname LIKE '{target}_restoring_%'").split()
    scratch_names.append(temporary)
    # The server ends the killed process's sessions, and so its locks, once it reads
    # end-of-file on their sockets.
    await wait_until(lambda: pg_cluster.psql(
        f"SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = '{temporary}') "
        "+ (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory')") == "0", 10)

    assert journal_names(manager) == [temporary]

    leftovers = await manager.drop_leftover_databases()

    assert pg_cluster.psql("SELECT count(*) FROM keep_me", dbname=target) == "2"
    assert [(lf.name, lf.kind, lf.dropped) for lf in leftovers] == [
        (temporary, "scratch", True)]
    assert not database_exists(pg_cluster, temporary)
    assert journal_names(manager) == []


# --- the scratch journal: scratch databases killed before their COMMENT ---------------


@pytest.fixture
def journaled_manager(make_manager: ManagerFactory) -> BackupManager:
    manager = make_manager()
    manager.directory.mkdir(parents=True)
    return manager


@pytest.mark.parametrize("base, label", [("walacord_drill_app", ""), ("app", "restoring")])
async def test_journaled_unmarked_scratch_is_dropped(
        journaled_manager: BackupManager, pg_cluster: PgCluster, scratch_names: list[str],
        caplog: pytest.LogCaptureFixture, base: str, label: str) -> None:
    manager = journaled_manager
    name = scratch_name(base, label)
    scratch_names.append(name)
    await create_scratch(manager, name, comment=False, journal=True)
    caplog.set_level(logging.WARNING)

    leftovers = await manager.drop_leftover_databases()

    assert [(lf.name, lf.kind, lf.journaled, lf.dropped) for lf in leftovers] == [
        (name, "scratch", True, True)]
    assert not database_exists(pg_cluster, name)
    assert journal_names(manager) == []
    [logged] = [r for r in caplog.records if r.getMessage() == "backup.leftover_database"]
    assert logged.fields["dropped"] is True  # type: ignore[attr-defined]


async def test_unjournaled_unmarked_scratch_is_kept(journaled_manager: BackupManager,
                                                    pg_cluster: PgCluster,
                                                    scratch_names: list[str]) -> None:
    """Only the journal's names count: another uncommented scratch name stays."""
    manager = journaled_manager
    own = scratch_name("app", "restoring")
    other = scratch_name("app", "restoring")
    scratch_names.extend([own, other])
    await create_scratch(manager, own, comment=False, journal=True)
    await create_scratch(manager, other, comment=False)

    leftovers = await manager.drop_leftover_databases()

    assert sorted((lf.name, lf.kind, lf.dropped) for lf in leftovers) == sorted([
        (own, "scratch", True), (other, "unmarked", False)])
    assert not database_exists(pg_cluster, own)
    assert database_exists(pg_cluster, other)


async def test_journaled_scratch_with_session_is_kept(journaled_manager: BackupManager,
                                                      pg_cluster: PgCluster,
                                                      scratch_names: list[str]) -> None:
    manager = journaled_manager
    name = scratch_name("app", "restoring")
    scratch_names.append(name)
    await create_scratch(manager, name, comment=False, journal=True)

    with psycopg.connect(pg_cluster.url(name)):
        leftovers = await manager.drop_leftover_databases()

    assert [(lf.name, lf.kind, lf.sessions, lf.dropped) for lf in leftovers] == [
        (name, "scratch", 1, False)]
    assert database_exists(pg_cluster, name)
    assert journal_names(manager) == [name]


async def test_journaled_commented_database_is_kept(
        journaled_manager: BackupManager, pg_cluster: PgCluster,
        scratch_names: list[str]) -> None:
    """A comment walacord did not set means someone else has claimed the database."""
    manager = journaled_manager
    name = scratch_name("app", "restoring")
    scratch_names.append(name)
    await create_scratch(manager, name, comment=False, journal=True)
    pg_cluster.psql(f"COMMENT ON DATABASE \"{name}\" IS 'keep: audit copy'")

    leftovers = await manager.drop_leftover_databases()

    assert [(lf.name, lf.kind, lf.journaled, lf.dropped) for lf in leftovers] == [
        (name, "unmarked", True, False)]
    assert database_exists(pg_cluster, name)
    assert "comment walacord did not set" in leftovers[0].describe()


async def test_journaled_leftover_is_listed_as_scratch(journaled_manager: BackupManager,
                                                       pg_cluster: PgCluster,
                                                       scratch_names: list[str]) -> None:
    manager = journaled_manager
    name = scratch_name("app", "restoring")
    scratch_names.append(name)
    await create_scratch(manager, name, comment=False, journal=True)

    listing = await backup_list(manager, {})

    [listed] = listing["leftover_databases"]
    assert (listed["name"], listed["kind"], listed["journaled"]) == (name, "scratch", True)
    assert "scratch journal names it" in listed["description"]
    assert database_exists(pg_cluster, name)
    assert journal_names(manager) == [name]


async def test_journaled_previous_copy_is_kept(
        journaled_manager: BackupManager, pg_cluster: PgCluster, scratch_names: list[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """A replaced copy contains a user's data, even when the journal file names it."""
    manager = journaled_manager
    name = scratch_name("app", "previous")
    scratch_names.append(name)
    pg_cluster.psql(f'CREATE DATABASE "{name}"')
    content = json.dumps({"version": 1, "databases": [name]}).encode()
    manager.scratch_journal.path.write_bytes(content)

    leftovers = await manager.drop_leftover_databases()

    assert [(lf.name, lf.kind, lf.dropped) for lf in leftovers] == [(name, "previous", False)]
    assert database_exists(pg_cluster, name)
    assert manager.scratch_journal.path.read_bytes() == content
    assert "backup.scratch_journal_damaged" in [r.getMessage() for r in caplog.records]


async def test_damaged_journal_keeps_cleanup_working(
        journaled_manager: BackupManager, pg_cluster: PgCluster, scratch_names: list[str],
        caplog: pytest.LogCaptureFixture) -> None:
    manager = journaled_manager
    marked = scratch_name("walacord_drill_app")
    unmarked = scratch_name("app", "restoring")
    scratch_names.extend([marked, unmarked])
    await create_scratch(manager, marked)
    await create_scratch(manager, unmarked, comment=False)
    content = b'{"version": 1, "databases": ["' + unmarked.encode() + b'"'  # cut short
    manager.scratch_journal.path.write_bytes(content)

    leftovers = await manager.drop_leftover_databases()

    assert sorted((lf.name, lf.kind, lf.dropped) for lf in leftovers) == sorted([
        (marked, "scratch", True), (unmarked, "unmarked", False)])
    assert not database_exists(pg_cluster, marked)
    assert database_exists(pg_cluster, unmarked)
    assert manager.scratch_journal.path.read_bytes() == content
    [damaged] = [r for r in caplog.records
                 if r.getMessage() == "backup.scratch_journal_damaged"]
    assert "not valid JSON" in damaged.fields["error"]  # type: ignore[attr-defined]


async def test_journal_prunes_missing_databases(
        journaled_manager: BackupManager, pg_cluster: PgCluster) -> None:
    """A missing name is pruned unless its lock is held: its creator may create it next."""
    manager = journaled_manager
    gone = scratch_name("app", "restoring")
    pending = scratch_name("walacord_drill_app")
    assert await manager.scratch_journal.add(gone)
    assert await manager.scratch_journal.add(pending)

    async with scratch_locks(manager.conninfo, [pending], 15):
        leftovers = await manager.drop_leftover_databases()

    assert leftovers == []
    assert journal_names(manager) == [pending]
