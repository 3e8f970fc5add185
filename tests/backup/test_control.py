"""Control-channel methods for backups, called as the control server calls them."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import orjson
import psycopg
import pytest

from tests.backup.conftest import fifo_in_place_of, overwrite_two_bytes
from tests.conftest import wait_until
from walacord.backup import BackupManager
from walacord.backup.control import (
    BACKUP_FAILED,
    CHECKSUM_MISMATCH,
    INVALID_PARAMS,
    TARGET_EXISTS,
    backup_list,
    backup_now,
    backup_restore,
    backup_verify,
    handlers,
)
from walacord.backup.manager import BACKUP_LOCK_KEY
from walacord.backup.manifest import manifest_path, parse_time, sha256_file, write_manifest
from walacord.errors import ControlError
from walacord.pgcluster import PgCluster

pytestmark = pytest.mark.anyio

ManagerFactory = Callable[..., BackupManager]


def file_size(path: str) -> int:
    return Path(path).stat().st_size


@pytest.fixture
def target_db(pg_cluster: PgCluster, seeded_db: str) -> Iterator[str]:
    name = seeded_db.rsplit("/", 1)[1][:40] + "_ctl"
    yield name
    pg_cluster.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_handlers_bind_manager(make_manager: ManagerFactory) -> None:
    bound = handlers(make_manager())

    assert sorted(bound) == ["backup.list", "backup.now", "backup.restore", "backup.verify"]
    assert await bound["backup.list"]({}) == {"backups": [], "unreadable": [],
                                              "without_manifest": [],
                                              "restore_commands": {},
                                              "leftover_databases": [],
                                              "leftover_databases_error": None,
                                              "scratch_journal_error": None}


async def test_list_names_leftover_lookup_error(make_manager: ManagerFactory) -> None:
    """Backups are still listed when the server cannot be asked for leftover databases."""
    manager = make_manager()
    taken = await backup_now(manager, {})
    # Nothing listens on port 1 of the loopback interface.
    unreachable = make_manager(url="postgresql://walacord@127.0.0.1:1/app", query_timeout=2.0)

    result = await backup_list(unreachable, {})

    assert [entry["id"] for entry in result["backups"]] == [taken["id"]]
    assert result["leftover_databases"] == []
    assert result["leftover_databases_error"].startswith(
        "cannot look for leftover scratch databases: ")


async def test_now_returns_id_and_path(make_manager: ManagerFactory) -> None:
    manager = make_manager()

    result = await backup_now(manager, {})

    assert result["status"] == "completed"
    path = Path(result["path"])
    assert result["id"] in path.name
    assert sha256_file(path) == result["sha256"]
    assert result["verified"] is True


async def test_now_while_running_here(make_manager: ManagerFactory, seeded_db: str) -> None:
    manager = make_manager()
    results = []

    async def take() -> None:
        results.append(await manager.take())

    # A table lock held by another session keeps pg_dump, and so the first backup,
    # waiting until the second request has its reply.
    with psycopg.connect(seeded_db) as blocker:
        blocker.execute("LOCK TABLE ledger IN ACCESS EXCLUSIVE MODE")
        async with anyio.create_task_group() as group:
            group.start_soon(take)
            await wait_until(lambda: manager.backup_running, 10)
            second = await backup_now(manager, {})
            blocker.rollback()

    assert second["status"] == "skipped"
    assert second["reason"] == (
        f"a backup of database {manager.database} is already running in this daemon; "
        "no second backup was started")
    assert results[0] is not None
    assert not manager.backup_running


async def test_now_while_peer_holds_lock(make_manager: ManagerFactory, seeded_db: str) -> None:
    manager = make_manager()

    with psycopg.connect(seeded_db, autocommit=True) as peer:
        peer.execute("SELECT pg_advisory_lock(%s)", (BACKUP_LOCK_KEY,))
        result = await backup_now(manager, {})

    assert result["status"] == "skipped"
    assert "already running on another walacord host" in result["reason"]
    assert "another walacord instance" not in result["reason"]


async def test_list_entries_have_stable_keys(make_manager: ManagerFactory) -> None:
    manager = make_manager()
    first = await backup_now(manager, {})
    second = await backup_now(manager, None)

    result = await backup_list(manager, {})

    entries = result["backups"]
    assert [e["id"] for e in entries] == [second["id"], first["id"]]
    for entry in entries:
        for key in ("id", "path", "size_bytes", "sha256", "verified", "age_seconds",
                    "created_at"):
            assert key in entry
        assert entry["size_bytes"] == file_size(entry["path"])
        assert entry["age_seconds"] >= 0
        assert entry["verified"] is True
        assert entry["problems"] == []
        assert entry["checked_at"] == entry["checksum"]["at"]
        assert entry["modified_after_check"] is None


async def test_list_shows_changed_file(make_manager: ManagerFactory) -> None:
    """A file modified after its last check is unverified before and after `verify`."""
    manager = make_manager()
    backup = await backup_now(manager, {})
    path = Path(backup["path"])
    actual = overwrite_two_bytes(path, file_size(backup["path"]) // 2)
    # Linux stamps writes with a coarse clock, up to one timer tick behind the time
    # the checksum check recorded, so set an mtime that is surely later but not ahead.
    checked_at = parse_time(backup["checksum"]["at"]).timestamp()
    await anyio.sleep(max(0.0, checked_at + 0.01 - time.time()))
    modified = time.time()
    os.utime(path, (modified, modified))

    [before] = (await backup_list(manager, {}))["backups"]
    verified = await backup_verify(manager, {"id": backup["id"]})
    [after] = (await backup_list(manager, {}))["backups"]

    assert before["verified"] is False
    assert before["modified_after_check"] is not None
    assert len(before["problems"]) == 1
    assert before["problems"][0].startswith("the file was modified at ")
    assert f"run `walacorctl backup verify {backup['id']}`" in before["problems"][0]
    checksum_problem = (f"checksum check failed at {verified['checked_at']}: sha256 is "
                        f"{actual}, the manifest records {backup['sha256']}; the file "
                        "changed after it was written")
    assert verified["verified"] is False
    assert verified["problems"] == [checksum_problem]
    assert after["verified"] is False
    assert after["checked_at"] == verified["checked_at"]
    assert after["checked_at"] > before["checked_at"]
    assert after["modified_after_check"] is None
    assert after["problems"] == [checksum_problem]


async def test_verify_with_drill(make_manager: ManagerFactory) -> None:
    manager = make_manager()
    backup = await backup_now(manager, {})

    result = await backup_verify(manager, {"id": backup["id"], "drill": True})

    assert result["verified"] is True
    assert result["checksum"]["ok"] is True
    assert result["drill"]["ok"] is True
    assert result["drill"]["row_counts"]["public.ledger"] == 3000


async def test_verify_fifo_named_in_error(make_manager: ManagerFactory) -> None:
    manager = make_manager()
    backup = await backup_now(manager, {})
    path = backup["path"]

    with fifo_in_place_of(Path(path)), anyio.fail_after(5):
        with pytest.raises(ControlError) as rejected:
            await backup_verify(manager, {"id": backup["id"]})
        [entry] = (await backup_list(manager, {}))["backups"]

    assert rejected.value.code == BACKUP_FAILED
    assert rejected.value.message == (f"verification failed: backup file {path} is a FIFO, "
                                      "not a regular file; its manifest remains")
    assert entry["verified"] is False
    assert entry["problems"][0] == f"backup file {path} is a FIFO, not a regular file"


async def test_verify_rejects_bad_params(make_manager: ManagerFactory) -> None:
    manager = make_manager()

    with pytest.raises(ControlError) as unknown:
        await backup_verify(manager, {"idd": "x"})
    with pytest.raises(ControlError) as wrong_type:
        await backup_verify(manager, {"drill": "yes"})
    with pytest.raises(ControlError) as no_backups:
        await backup_verify(manager, {})

    assert unknown.value.code == INVALID_PARAMS
    assert "unknown parameter 'idd'" in unknown.value.message
    assert wrong_type.value.code == INVALID_PARAMS
    assert no_backups.value.code == BACKUP_FAILED
    assert "no backups" in no_backups.value.message


async def test_restore_names_database_to_replace(make_manager: ManagerFactory,
                                                 pg_cluster: PgCluster,
                                                 target_db: str) -> None:
    manager = make_manager()
    backup = await backup_now(manager, {})
    created = await backup_restore(manager, {"id": backup["id"], "target_db": target_db})

    with pytest.raises(ControlError) as refused:
        await backup_restore(manager, {"id": backup["id"], "target_db": target_db})
    replaced = await backup_restore(manager, {"id": backup["id"], "target_db": target_db,
                                              "force": True})

    assert created["replaced"] is False
    assert refused.value.code == TARGET_EXISTS
    assert target_db in refused.value.message
    assert refused.value.data == {"database": target_db}
    assert replaced["replaced"] is True
    assert pg_cluster.psql("SELECT count(*) FROM accounts", dbname=target_db) == "200"


async def test_restore_rejects_changed_file(make_manager: ManagerFactory,
                                            pg_cluster: PgCluster, target_db: str) -> None:
    manager = make_manager()
    backup = await backup_now(manager, {})
    path = Path(backup["path"])
    actual = overwrite_two_bytes(path, file_size(backup["path"]) // 2)

    with pytest.raises(ControlError) as rejected:
        await backup_restore(manager, {"id": backup["id"], "target_db": target_db})
    with pytest.raises(ControlError) as wrong_type:
        await backup_restore(manager, {"id": backup["id"], "target_db": target_db,
                                       "ignore_checksum": "yes"})

    assert wrong_type.value.code == INVALID_PARAMS
    assert rejected.value.code == CHECKSUM_MISMATCH
    assert rejected.value.message.startswith("restore rejected: backup file ")
    assert rejected.value.data == {"path": str(path), "sha256": actual,
                                   "manifest_sha256": backup["sha256"],
                                   "size_bytes": backup["size_bytes"],
                                   "manifest_size_bytes": backup["size_bytes"]}
    exists = pg_cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{target_db}'")
    assert exists == "0"


async def test_restore_requires_id_and_target(make_manager: ManagerFactory) -> None:
    manager = make_manager()

    with pytest.raises(ControlError) as raised:
        await backup_restore(manager, {"id": "x"})

    assert raised.value.code == INVALID_PARAMS
    assert "target_db" in raised.value.message


async def test_list_names_ill_typed_manifests(make_manager: ManagerFactory) -> None:
    """JSON that is not a manifest is reported per file and hides no other backup."""
    manager = make_manager()
    intact = await backup_now(manager, {})
    written = orjson.loads(manifest_path(manager.directory, intact["id"]).read_bytes())

    def like_intact(backup: str, **changes: object) -> bytes:
        return orjson.dumps({**written, "id": backup, "file": f"{backup}.dump", **changes})

    damaged = {
        "array": (b"[]", "the file contains a JSON array, expected an object"),
        "null": (b"null", "the file contains a JSON null, expected an object"),
        "string": (b'"x"', "the file contains a JSON string, expected an object"),
        "number": (b"5", "the file contains a JSON number, expected an object"),
        "size": (like_intact("size", size_bytes="big"),
                 "field 'size_bytes' is \"big\", expected an integer"),
        "drill": (like_intact("drill", drill=[]),
                  "field 'drill' is [], expected an object or null"),
        "checked": (like_intact("checked", checksum_check={"ok": "yes", "at": "x"}),
                    "field 'checksum_check.ok' is \"yes\", expected true or false"),
        "finished": (like_intact("finished", finished_at="yesterday"),
                     "field 'finished_at' is \"yesterday\", expected an ISO 8601 time "
                     "such as \"2026-01-05T02:30:12.345Z\""),
        "counts": (like_intact("counts", row_counts={"public.ledger": None}),
                   "field 'row_counts' has null for table 'public.ledger', expected an "
                   "integer"),
    }
    for backup, (text, _) in damaged.items():
        manifest_path(manager.directory, backup).write_bytes(text)

    listed = await backup_list(manager, {})
    newest = await backup_verify(manager, {})
    with pytest.raises(ControlError) as by_id:
        await backup_verify(manager, {"id": "array"})

    assert [entry["id"] for entry in listed["backups"]] == [intact["id"]]
    errors = {Path(entry["path"]).name: entry["error"] for entry in listed["unreadable"]}
    assert errors == {f"{backup}.json": error for backup, (_, error) in damaged.items()}
    assert newest["id"] == intact["id"]
    assert newest["verified"] is True
    assert manager.metrics.backup_damaged._value.get() == len(damaged)
    assert by_id.value.code == BACKUP_FAILED
    assert by_id.value.message.startswith(
        f"verification failed: manifest {manifest_path(manager.directory, 'array')} is "
        "invalid: the file contains a JSON array, expected an object; restore the manifest "
        "from a copy, or take a new backup")


async def test_damaged_manifest_errors_name_dump(make_manager: ManagerFactory,
                                                 pg_cluster: PgCluster,
                                                 target_db: str) -> None:
    manager = make_manager()
    backup = await backup_now(manager, {})
    dump = anyio.Path(backup["path"])
    manifest_path(manager.directory, backup["id"]).write_text('{"trunc')
    advice = (f"its dump {dump} is still there, but walacord cannot check it without the "
              "manifest. To use it anyway, create an empty database NEW_DB and run: "
              f"pg_restore --exit-on-error --dbname=NEW_DB {dump}")

    with pytest.raises(ControlError) as verify_error:
        await backup_verify(manager, {"id": backup["id"]})
    with pytest.raises(ControlError) as restore_error:
        await backup_restore(manager, {"id": backup["id"], "target_db": target_db})
    await dump.unlink()
    with pytest.raises(ControlError) as without_dump:
        await backup_verify(manager, {"id": backup["id"]})

    assert verify_error.value.code == BACKUP_FAILED
    assert verify_error.value.message.startswith("verification failed: manifest ")
    assert verify_error.value.message.endswith(f"or take a new backup; {advice}")
    assert restore_error.value.code == BACKUP_FAILED
    assert restore_error.value.message.startswith("restore failed: manifest ")
    assert restore_error.value.message.endswith(f"or take a new backup; {advice}")
    assert "its dump" not in without_dump.value.message
    assert without_dump.value.message.endswith(
        "restore the manifest from a copy, or take a new backup")
    exists = pg_cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{target_db}'")
    assert exists == "0"


async def test_verify_marks_drill_of_other_bytes_stale(make_manager: ManagerFactory) -> None:
    """A drill that failed on a damaged copy does not count once the original is back."""
    manager = make_manager()
    backup = await backup_now(manager, {})
    path = anyio.Path(backup["path"])
    original = await path.read_bytes()
    damaged_sha256 = overwrite_two_bytes(Path(path), len(original) // 2)
    drilled = await backup_verify(manager, {"id": backup["id"], "drill": True})
    await path.write_bytes(original)

    verified = await backup_verify(manager, {"id": backup["id"]})
    [listed] = (await backup_list(manager, {}))["backups"]

    assert drilled["drill"]["ok"] is False
    assert drilled["drill"]["sha256"] == damaged_sha256
    assert drilled["drill"]["stale"] is False
    assert verified["verified"] is True
    assert verified["problems"] == []
    assert verified["checksum"]["ok"] is True
    assert verified["checksum"]["sha256"] == backup["sha256"]
    assert verified["list"]["ok"] is True
    assert verified["drill"]["ok"] is False
    assert verified["drill"]["stale"] is True
    assert verified["notes"] == [
        f"the drill that failed at {drilled['drill']['at']} is stale and does not count: "
        f"it tested the file with sha256 {damaged_sha256}, but the checksum check at "
        f"{verified['checked_at']} found sha256 {backup['sha256']}. Run `walacorctl "
        f"backup verify --drill {backup['id']}` to drill the file as it is now"]
    assert listed["verified"] is True
    assert listed["notes"] == verified["notes"]
    assert manager.metrics.backup_damaged._value.get() == 0


async def test_verify_truncated_file_marks_results_stale(make_manager: ManagerFactory) -> None:
    """A verify that finds the file truncated makes the drill and the readability check
    of the old bytes stale, and list shows the file's real size."""
    manager = make_manager()
    backup = await backup_now(manager, {})
    drilled = await backup_verify(manager, {"id": backup["id"], "drill": True})
    os.truncate(backup["path"], 100)

    verified = await backup_verify(manager, {"id": backup["id"]})
    [listed] = (await backup_list(manager, {}))["backups"]

    size = backup["size_bytes"]
    checked_at = verified["checked_at"]
    assert drilled["drill"]["ok"] is True
    assert drilled["list"]["ok"] is True
    assert verified["verified"] is False
    assert verified["checksum"]["ok"] is False
    assert verified["list"]["ok"] is True
    assert verified["list"]["stale"] is True
    assert verified["drill"]["ok"] is True
    assert verified["drill"]["stale"] is True
    assert verified["problems"] == [
        f"checksum check failed at {checked_at}: size is 100 bytes, the manifest records "
        f"{size} bytes; the file changed after it was written, so its sha256 was not "
        "computed"]
    assert verified["notes"] == [
        f"the readability check that passed at {drilled['list']['at']} is stale and does "
        f"not count: the checksum check at {checked_at} found the file's size changed to "
        "100 bytes, so the readability check read other bytes and was not run again",
        f"the drill that passed at {drilled['drill']['at']} is stale and does not count: "
        f"it tested the file with sha256 {backup['sha256']}, but the checksum check at "
        f"{checked_at} found the file's size changed to 100 bytes. Run `walacorctl "
        f"backup verify --drill {backup['id']}` to drill the file as it is now"]
    assert listed["verified"] is False
    assert listed["drill"]["stale"] is True
    assert listed["list"]["stale"] is True
    assert listed["problems"] == verified["problems"]
    assert listed["size_bytes"] == size
    assert listed["file_size_bytes"] == 100


async def test_list_names_size_change_before_verify(make_manager: ManagerFactory) -> None:
    """A file whose size differs from the manifest's is not verified, even when its
    modification time was set back."""
    manager = make_manager()
    backup = await backup_now(manager, {})
    path = backup["path"]
    times = os.stat(path)
    os.truncate(path, 100)
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))

    [listed] = (await backup_list(manager, {}))["backups"]

    assert listed["verified"] is False
    assert listed["file_size_bytes"] == 100
    assert listed["problems"] == [
        f"the file is 100 bytes, the manifest records {backup['size_bytes']} bytes, so it "
        f"changed after its last verification; run `walacorctl backup verify "
        f"{backup['id']}`"]


async def test_verify_keeps_drill_failure_of_same_bytes(make_manager: ManagerFactory) -> None:
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None
    backup.row_counts["public.ledger"] += 1
    write_manifest(manager.directory, backup)
    drilled = await manager.drill(backup.id)
    assert drilled.drill is not None

    verified = await backup_verify(manager, {"id": backup.id})

    assert verified["verified"] is False
    assert verified["drill"]["stale"] is False
    assert verified["problems"] == [
        f"drill check failed at {drilled.drill.at}: table public.ledger has 3000 rows, "
        "the dump had 3001"]
    assert verified["notes"] == []
    assert manager.metrics.backup_damaged._value.get() == 1


async def test_verify_stale_drill_without_sha256(make_manager: ManagerFactory) -> None:
    """A failed drill stored before drills recorded a sha256 is stale after a good check."""
    manager = make_manager()
    backup = await backup_now(manager, {})
    path = anyio.Path(backup["path"])
    original = await path.read_bytes()
    overwrite_two_bytes(Path(path), len(original) // 2)
    await manager.drill(backup["id"])
    stored = manifest_path(manager.directory, backup["id"])
    raw = orjson.loads(stored.read_bytes())
    del raw["drill"]["detail"]["sha256"]
    stored.write_bytes(orjson.dumps(raw))
    await path.write_bytes(original)

    verified = await backup_verify(manager, {"id": backup["id"]})

    assert verified["verified"] is True
    assert verified["drill"]["stale"] is True
    assert verified["notes"] == [
        f"the drill that failed at {raw['drill']['at']} is stale and does not count: its "
        "record has no sha256 of the file it tested, and the checksum check at "
        f"{verified['checked_at']} passed. Run `walacorctl backup verify --drill "
        f"{backup['id']}` to drill the file as it is now"]
