"""Manifest files as walacord finds them on disk: special files, file names that are
not UTF-8, out-of-range fields, ids and the by-hand restore advice."""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from tests.backup.conftest import FifoReleaser
from walacord.backup import BackupManager
from walacord.backup.control import backup_list, backup_verify
from walacord.backup.manifest import (
    MANIFEST_VERSION,
    CheckResult,
    Manifest,
    backup_id,
    is_valid_id,
    manifest_path,
    read_manifest,
    scan_manifests,
    write_manifest,
)
from walacord.errors import BackupError, ControlError
from walacord.pgcluster import PgCluster

pytestmark = pytest.mark.anyio

ManagerFactory = Callable[..., BackupManager]
STAMP = "20261205T150000Z"


def sample_manifest(backup: str = f"db__host__{STAMP}") -> Manifest:
    """Return a manifest as walacord writes it, for a dump that need not exist."""
    checked = CheckResult(ok=True, at="2026-12-05T15:00:01.000Z", detail={"entries": 9})
    return Manifest(
        id=backup, file=f"{backup}.dump", format="custom", database="db",
        server_host="host", server_version="15.18", pg_dump_version="15.18",
        started_at="2026-12-05T15:00:00.000Z", finished_at="2026-12-05T15:00:01.000Z",
        duration_seconds=1.0, size_bytes=100, sha256="0" * 64, table_count=1,
        row_counts={"public.a": 3}, lock_wait_timeout_seconds=10.0, list_check=checked,
        checksum_check=checked)


async def test_fifo_manifest_reported_as_damaged(make_manager: ManagerFactory) -> None:
    """A FIFO named like a manifest blocks no reader, and every reader names it."""
    manager = make_manager()
    intact = await manager.take()
    assert intact is not None
    fifo_id = f"fifo__host__{STAMP}"
    fifo = manifest_path(manager.directory, fifo_id)
    damage = "the file is a FIFO, not a regular file"

    with FifoReleaser(fifo) as releaser:
        listed = await backup_list(manager, {})
        scanned = scan_manifests(manager.directory)
        with pytest.raises(ControlError) as verify_error:
            await backup_verify(manager, {"id": fifo_id})
        plan = await manager.apply_retention()

    assert releaser.released == 0, "a reader blocked on the FIFO"
    assert [entry["id"] for entry in listed["backups"]] == [intact.id]
    assert listed["unreadable"] == [{"path": str(fifo), "error": damage, "dump": None}]
    assert [manifest.id for manifest in scanned] == [intact.id]
    assert verify_error.value.message == (
        f"verification failed: manifest {fifo} is invalid: {damage}; restore the "
        "manifest from a copy, or take a new backup")
    assert list(plan.keep) == [intact.id]
    assert plan.delete == []
    assert manager.metrics.backup_damaged._value.get() == 1


async def test_directory_manifest_names_its_kind(tmp_path: Path) -> None:
    manifest_path(tmp_path, f"dir__host__{STAMP}").mkdir()

    with pytest.raises(BackupError) as read_error:
        read_manifest(tmp_path, f"dir__host__{STAMP}")

    assert "is invalid: the file is a directory, not a regular file" in str(read_error.value)


def write_bytes(path: bytes, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


async def test_undecodable_names_escaped(make_manager: ManagerFactory,
                                         caplog: pytest.LogCaptureFixture) -> None:
    """File names that are not UTF-8 reach responses and logs with \\xNN escapes."""
    manager = make_manager()
    intact = await manager.take()
    assert intact is not None
    directory = os.fsencode(manager.directory)
    # A copy of an intact manifest under a name that is not UTF-8, beside its dump.
    stem = b"zz\xff__h__" + STAMP.encode()
    write_bytes(os.path.join(directory, stem + b".json"),
                manifest_path(manager.directory, intact.id).read_bytes())
    write_bytes(os.path.join(directory, stem + b".dump"), b"PGDMP")
    # A dump without a manifest, and a partial file left by a crash.
    write_bytes(os.path.join(directory, b"yy\xfe__h__" + STAMP.encode() + b".dump"), b"")
    write_bytes(os.path.join(directory, b".xx\xfd.dump.partial"), b"")
    escaped = f"{manager.directory}/zz\\xff__h__{STAMP}"

    with caplog.at_level(logging.WARNING):
        listed = await backup_list(manager, {})
        removed = manager.remove_partials()

    # The control server encodes every response with orjson, which rejects the lone
    # surrogates that Python uses for undecodable bytes in file names.
    orjson.dumps(listed)
    assert [entry["id"] for entry in listed["backups"]] == [intact.id]
    assert listed["unreadable"] == [{
        "path": f"{escaped}.json",
        "error": "the file name is not valid UTF-8, but backup ids are ASCII; rename or "
                 "remove the file",
        "dump": f"{escaped}.dump"}]
    assert listed["without_manifest"] == [f"{manager.directory}/yy\\xfe__h__{STAMP}.dump"]
    # The printed commands name the real files: bash turns their quoting back into the
    # bytes of each name.
    commands = listed["restore_commands"]
    assert sorted(commands) == sorted([f"{escaped}.dump", *listed["without_manifest"]])
    for shown, command in commands.items():
        word = command.rsplit(" ", 1)[1]
        assert word.startswith("$'"), command
        named = (await anyio.run_process(["bash", "-c", f"printf %s {word}"])).stdout
        assert named == os.fsencode(manager.directory) + b"/" + os.fsencode(
            shown.rsplit("/", 1)[1].encode().decode("unicode_escape").encode("latin-1"))
    assert len(removed) == 1
    fields = [record.fields for record in caplog.records  # type: ignore[attr-defined]
              if hasattr(record, "fields")]
    assert {"path": f"{escaped}.json", "error": listed["unreadable"][0]["error"]} in fields
    assert {"path": f"{manager.directory}/.xx\\xfd.dump.partial"} in fields
    for logged in fields:
        orjson.dumps(logged)


def manifest_with(tmp_path: Path, **changes: Any) -> Path:
    """Write the sample manifest with `changes` applied to its JSON; return its path."""
    path = write_manifest(tmp_path, sample_manifest())
    path.write_bytes(orjson.dumps({**orjson.loads(path.read_bytes()), **changes}))
    return path


@pytest.mark.parametrize(("field", "value", "error"), [
    ("size_bytes", -5, "field 'size_bytes' is -5, expected an integer from 0 to "
                       "9223372036854775807"),
    ("size_bytes", 2**64 - 1, "field 'size_bytes' is 18446744073709551615, expected an "
                              "integer from 0 to 9223372036854775807"),
    ("table_count", -1, "field 'table_count' is -1, expected an integer from 0 to "
                        "9223372036854775807"),
    ("duration_seconds", -0.5, "field 'duration_seconds' is -0.5, expected a number of "
                               "at least 0"),
    ("lock_wait_timeout_seconds", -1, "field 'lock_wait_timeout_seconds' is -1, expected a "
                                      "number of at least 0"),
    ("row_counts", {"public.a": -3}, "field 'row_counts' has -3 for table 'public.a', "
                                     "expected an integer from 0 to 9223372036854775807"),
    ("manifest_version", 0, f"field 'manifest_version' is 0, expected an integer from 1 to "
                            f"{MANIFEST_VERSION}"),
    ("manifest_version", 999, f"field 'manifest_version' is 999: a newer walacord wrote "
                              f"this manifest, and this one reads versions up to "
                              f"{MANIFEST_VERSION}; upgrade walacord to use the backup"),
])
def test_manifest_fields_out_of_range(tmp_path: Path, field: str, value: object,
                                      error: str) -> None:
    path = manifest_with(tmp_path, **{field: value})

    with pytest.raises(BackupError) as read_error:
        read_manifest(tmp_path, sample_manifest().id)

    assert str(read_error.value) == (
        f"manifest {path} is invalid: {error}; restore the manifest from a copy, or take "
        "a new backup")


@pytest.mark.parametrize(("field", "value"), [
    ("size_bytes", 0), ("size_bytes", 2**63 - 1), ("table_count", 0),
    ("duration_seconds", 0), ("row_counts", {}), ("manifest_version", MANIFEST_VERSION),
    # A clock that was ahead when the backup ran leaves times in the future.
    ("finished_at", "2099-01-01T00:00:00.000Z"),
])
def test_manifest_fields_at_limits(tmp_path: Path, field: str, value: object) -> None:
    manifest_with(tmp_path, **{field: value})

    read = read_manifest(tmp_path, sample_manifest().id)

    assert getattr(read, field) == value


@pytest.mark.parametrize("database", [".dot", "..", ".", "-.x", "a b", "", "ü", "._"])
@pytest.mark.parametrize("host", ["127.0.0.1", ".h", "-", ""])
def test_backup_id_is_valid_id(database: str, host: str) -> None:
    backup = backup_id(database, host, datetime(2026, 12, 5, 15, tzinfo=UTC))

    assert is_valid_id(backup), backup
    assert not backup.startswith(".")


@pytest.mark.parametrize("backup", [
    f"db__host__{STAMP}", f"a.b__127.0.0.1__{STAMP}-2", f"_x__h__{STAMP}", "A-b_c.d",
])
def test_existing_ids_stay_valid(backup: str) -> None:
    assert is_valid_id(backup)


@pytest.mark.parametrize("backup", [".hidden", "..", "-x", "x-", "a/b", "a b", ""])
def test_invalid_ids_rejected(backup: str) -> None:
    assert not is_valid_id(backup)


@pytest.mark.parametrize(("fmt", "name"), [
    ("custom", b"back ups; $(touch pwned) 'q' \"x\" `y`"),
    ("plain-gzip", b"back ups; $(touch pwned) 'q' \"x\" `y`"),
    # Not UTF-8: the message shows \xff, and the command quotes the byte for bash.
    ("custom", b"back\xff ups; $(touch pwned) 'q' \\x41"),
], ids=["custom", "plain-gzip", "custom-not-utf8"])
async def test_restore_advice_runs_in_shell(make_manager: ManagerFactory, tmp_path: Path,
                                            pg_cluster: PgCluster,
                                            make_database: Callable[[str], str],
                                            fmt: str, name: bytes) -> None:
    """The by-hand restore command works as printed for a directory with shell syntax."""
    directory = tmp_path / os.fsdecode(name)
    manager = make_manager(directory=directory, format=fmt)
    taken = await manager.take()
    assert taken is not None
    manifest_path(directory, taken.id).write_text("[]")
    target_name = f"advice_{fmt.replace('-', '_')}_{len(name)}"
    target = make_database(target_name)

    with pytest.raises(BackupError) as read_error:
        read_manifest(directory, taken.id)
    command = str(read_error.value).split("create an empty database NEW_DB and run: ")[1]
    environment = {**os.environ, "PATH": f"{pg_cluster.bindir}:{os.environ['PATH']}"}
    with anyio.fail_after(120):
        ran = await anyio.run_process(
            ["bash", "-c", command.replace("NEW_DB", shlex.quote(target))], cwd=tmp_path,
            env=environment, check=False)

    assert ran.returncode == 0, ran.stderr.decode(errors="replace")
    assert not (tmp_path / "pwned").exists()
    assert pg_cluster.psql("SELECT count(*) FROM ledger", dbname=target_name) == "3000"


def test_partial_directory_is_skipped(make_manager: ManagerFactory,
                                      caplog: pytest.LogCaptureFixture) -> None:
    """Only regular partial files are removed. A directory with such a name is logged and
    left, and does not stop the removal of the others."""
    manager = make_manager()
    manager.directory.mkdir(parents=True, exist_ok=True)
    (manager.directory / ".a.partial").mkdir()
    (manager.directory / ".b.dump.partial").write_bytes(b"PGDMP")

    with caplog.at_level(logging.WARNING):
        removed = manager.remove_partials()

    assert removed == [manager.directory / ".b.dump.partial"]
    assert (manager.directory / ".a.partial").is_dir()
    assert "backup.partial_skipped" in [record.getMessage() for record in caplog.records]
