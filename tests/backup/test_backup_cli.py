"""`walacorctl backup` against a real `walacord run` daemon and a real database."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import psycopg
import pytest

from tests.backup.conftest import FifoReleaser, overwrite_two_bytes
from tests.conftest import walacord_run
from walacord.pgcluster import PgCluster

WALACORCTL = str(Path(sys.executable).parent / "walacorctl")


@pytest.fixture
def daemon(tmp_path: Path, pg_db: str) -> Iterator[Path]:
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE ledger (id int PRIMARY KEY, amount numeric)")
        conn.execute("INSERT INTO ledger SELECT g, g * 1.5 FROM generate_series(1, 500) g")
    with walacord_run(tmp_path, f'[database]\nurl = "{pg_db}"\n[backup]\nenabled = false\n'
                      ) as socket:
        yield socket


def ctl(socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([WALACORCTL, "--socket", str(socket), *args], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ), check=False)


def test_backup_now_list_verify_restore(daemon: Path, pg_cluster: PgCluster) -> None:
    taken = ctl(daemon, "--json", "backup", "now")
    assert taken.returncode == 0, taken.stderr
    result = orjson.loads(taken.stdout)
    assert result["status"] == "completed"
    path = Path(result["path"])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == result["sha256"]
    manifest = orjson.loads(path.with_name(path.name + ".json").read_bytes()) \
        if path.with_name(path.name + ".json").exists() else None
    assert manifest is None or manifest["sha256"] == result["sha256"]

    listing = ctl(daemon, "--json", "backup", "list")
    assert listing.returncode == 0, listing.stderr
    [entry] = orjson.loads(listing.stdout)["backups"]
    for key in ("id", "path", "size_bytes", "sha256", "verified"):
        assert key in entry
    assert entry["verified"] is True

    drilled = ctl(daemon, "backup", "verify", entry["id"], "--drill")
    assert drilled.returncode == 0, drilled.stderr + drilled.stdout
    assert "drill passed" in drilled.stdout

    restored = ctl(daemon, "backup", "restore", entry["id"], "--target-db", "restored_copy")
    assert restored.returncode == 0, restored.stderr
    assert pg_cluster.psql("SELECT count(*) FROM ledger", dbname="restored_copy") == "500"

    again = ctl(daemon, "backup", "restore", entry["id"], "--target-db", "restored_copy")
    assert again.returncode == 1
    assert "restored_copy" in again.stderr
    pg_cluster.psql('DROP DATABASE "restored_copy" WITH (FORCE)')


def test_restore_over_supervised_database_is_safe(daemon: Path, pg_cluster: PgCluster,
                                                  pg_db: str) -> None:
    """The daemon's own connections keep the database it supervises in use. A forced
    restore over it either replaces it, or fails with the database unchanged and an
    error that names the next step. Which one happens depends on timing."""
    taken = orjson.loads(ctl(daemon, "--json", "backup", "now").stdout)
    database = pg_db.rsplit("/", 1)[1]
    pg_cluster.psql("INSERT INTO ledger VALUES (100000, 1)", dbname=database)

    restored = ctl(daemon, "backup", "restore", taken["id"], "--target-db", database,
                   "--force")
    rows = pg_cluster.psql("SELECT count(*) FROM ledger", dbname=database)

    if restored.returncode == 0:
        assert rows == "500"
    else:
        assert restored.returncode == 1
        assert rows == "501"
        assert f"Database {database} is unchanged" in restored.stderr
        assert "Restore into a new --target-db instead" in restored.stderr
    assert pg_cluster.psql("SELECT count(*) FROM pg_database WHERE datname LIKE "
                           f"'{database[:40]}%' AND datname <> '{database}'") == "0"


def test_changed_dump_rejected_and_explained(daemon: Path, pg_cluster: PgCluster,
                                             pg_db: str) -> None:
    """Two overwritten bytes: restore rejects the file, verify and list show why."""
    taken = orjson.loads(ctl(daemon, "--json", "backup", "now").stdout)
    backup, recorded = taken["id"], taken["sha256"]
    path = Path(taken["path"])
    actual = overwrite_two_bytes(path, path.stat().st_size // 2)
    target = pg_db.rsplit("/", 1)[1][:40] + "_corrupt"

    listed_before = ctl(daemon, "backup", "list")
    restored = ctl(daemon, "backup", "restore", backup, "--target-db", target)
    verified = ctl(daemon, "backup", "verify", backup)
    verified_json = ctl(daemon, "--json", "backup", "verify", backup)
    listed_after = ctl(daemon, "backup", "list")

    assert listed_before.returncode == 0, listed_before.stderr
    [header, row] = listed_before.stdout.splitlines()[:2]
    assert "CHECKED" in header
    assert row.split()[4:7] == ["no", "0m", "ago"]  # after the two words of SIZE
    assert f"{backup}: " in listed_before.stdout
    assert restored.returncode == 1
    assert f"backup file {path} does not match its manifest" in restored.stderr
    assert f"its sha256 is {actual}, the manifest records {recorded}" in restored.stderr
    assert "`walacorctl backup list`" in restored.stderr
    assert "--ignore-checksum" in restored.stderr
    assert "pg_restore" not in restored.stderr
    exists = pg_cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{target}'")
    assert exists == "0"
    assert verified.returncode == 1
    assert f"backup {backup}: verified NO" in verified.stdout
    assert f"sha256 is {actual}, the manifest records {recorded}" in verified.stdout
    assert "Do not restore this backup" in verified.stdout
    assert verified_json.returncode == 1
    result = orjson.loads(verified_json.stdout)
    assert result["verified"] is False
    assert any(f"sha256 is {actual}" in problem for problem in result["problems"])
    [after_row] = [line for line in listed_after.stdout.splitlines() if line.startswith(backup)
                   and ":" not in line]
    assert after_row.split()[4] == "no"
    assert f"{backup}: checksum check failed" in listed_after.stdout

    # Where the two bytes above land depends on the dump's layout, and a changed byte
    # in a TOC entry's tag restores without error. Changing the CREATE TABLE text,
    # which the custom format stores uncompressed, makes pg_restore fail with an SQL
    # error.
    overwrite_two_bytes(path, path.read_bytes().index(b"CREATE TABLE public.ledger"))
    forced = ctl(daemon, "backup", "restore", backup, "--target-db", target,
                 "--ignore-checksum")

    assert forced.returncode == 1
    assert "restore failed" in forced.stderr
    assert "pg_restore" in forced.stderr
    assert "does not match its manifest" not in forced.stderr
    assert pg_cluster.psql(
        f"SELECT count(*) FROM pg_database WHERE datname = '{target}'") == "0"


def test_damaged_manifest_is_named_in_list(daemon: Path, pg_cluster: PgCluster) -> None:
    new_backup = orjson.loads(ctl(daemon, "--json", "backup", "now").stdout)
    dump = Path(new_backup["path"])
    manifest = dump.with_suffix(".json")
    assert manifest.exists()
    manifest.write_text('{"trunc')

    listed = ctl(daemon, "backup", "list")

    assert listed.returncode == 0, listed.stderr
    assert new_backup["id"] not in listed.stdout
    assert f"manifest {manifest} cannot be read" in listed.stderr
    assert "its backup is not listed" in listed.stderr
    advice = f"pg_restore --exit-on-error --dbname=NEW_DB {dump}"
    assert f"its dump {dump} is still there" in listed.stderr
    assert advice in listed.stderr
    # The advice works as printed.
    pg_cluster.psql('CREATE DATABASE "from_damaged"')
    try:
        subprocess.run([str(pg_cluster.bindir / "pg_restore"), "--exit-on-error",
                        f"--dbname={pg_cluster.url('from_damaged')}", str(dump)],
                       check=True, capture_output=True, timeout=120)
        assert pg_cluster.psql("SELECT count(*) FROM ledger", dbname="from_damaged") == "500"
    finally:
        pg_cluster.psql('DROP DATABASE "from_damaged" WITH (FORCE)')


def test_dump_without_manifest_is_named(daemon: Path) -> None:
    taken = orjson.loads(ctl(daemon, "--json", "backup", "now").stdout)
    dump = Path(taken["path"])
    dump.with_suffix(".json").unlink()

    listed = ctl(daemon, "backup", "list")
    restored = ctl(daemon, "backup", "restore", taken["id"], "--target-db", "from_orphan")

    assert listed.returncode == 0, listed.stderr
    assert f"dump {dump} has no manifest, so its backup is not listed" in listed.stderr
    assert f"pg_restore --exit-on-error --dbname=NEW_DB {dump}" in listed.stderr
    assert restored.returncode == 1
    assert f"backup '{taken['id']}' has no manifest" in restored.stderr
    assert f"its dump {dump} is still there" in restored.stderr


def test_list_names_leftover_database(daemon: Path, pg_cluster: PgCluster) -> None:
    """A replaced database's copy left by a killed restore is named, never dropped."""
    name = "app_previous_0badc0de"
    pg_cluster.psql(f'CREATE DATABASE "{name}"')
    try:
        listed = ctl(daemon, "backup", "list")
        still_there = pg_cluster.psql(
            f"SELECT count(*) FROM pg_database WHERE datname = '{name}'")
    finally:
        pg_cluster.psql(f'DROP DATABASE IF EXISTS "{name}"')

    assert listed.returncode == 0, listed.stderr
    assert f"walacorctl: warning: database {name} (" in listed.stderr
    assert "drop it by hand, or rename it back" in listed.stderr
    assert still_there == "1"


def test_list_json_carries_warnings(daemon: Path, pg_cluster: PgCluster) -> None:
    """`--json backup list` returns everything the table warns about, and only JSON."""
    damaged = orjson.loads(ctl(daemon, "--json", "backup", "now").stdout)
    orphan = orjson.loads(ctl(daemon, "--json", "backup", "now").stdout)
    intact = orjson.loads(ctl(daemon, "--json", "backup", "now").stdout)
    damaged_manifest = Path(damaged["path"]).with_suffix(".json")
    damaged_manifest.write_text("[]")
    Path(orphan["path"]).with_suffix(".json").unlink()
    leftover = "app_previous_0badc0de"
    pg_cluster.psql(f'CREATE DATABASE "{leftover}"')
    try:
        listed = ctl(daemon, "--json", "backup", "list")
    finally:
        pg_cluster.psql(f'DROP DATABASE IF EXISTS "{leftover}"')

    assert listed.returncode == 0, listed.stderr
    assert listed.stderr == ""
    document = orjson.loads(listed.stdout)
    assert sorted(document) == ["backups", "leftover_databases", "leftover_databases_error",
                                "unreadable", "without_manifest"]
    assert [entry["id"] for entry in document["backups"]] == [intact["id"]]
    assert document["unreadable"] == [{
        "path": str(damaged_manifest), "dump": damaged["path"],
        "error": "the file contains a JSON array, expected an object"}]
    assert document["without_manifest"] == [orphan["path"]]
    [database] = document["leftover_databases"]
    assert database["name"] == leftover
    assert "drop it by hand" in database["description"]
    assert document["leftover_databases_error"] is None


def test_damaged_manifest_named_in_verify_and_restore(daemon: Path,
                                                      pg_cluster: PgCluster) -> None:
    """A manifest containing a JSON array: list and verify still work for the other backup,
    and verify and restore of its own id name the dump and the by-hand restore."""
    damaged = orjson.loads(ctl(daemon, "--json", "backup", "now").stdout)
    intact = orjson.loads(ctl(daemon, "--json", "backup", "now").stdout)
    dump = Path(damaged["path"])
    manifest = dump.with_suffix(".json")
    manifest.write_text("[]")
    advice = (f"its dump {dump} is still there, but walacord cannot check it without the "
              "manifest. To use it anyway, create an empty database NEW_DB and run: "
              f"pg_restore --exit-on-error --dbname=NEW_DB {dump}")

    listed = ctl(daemon, "backup", "list")
    newest = ctl(daemon, "backup", "verify")
    verified = ctl(daemon, "backup", "verify", damaged["id"])
    restored = ctl(daemon, "backup", "restore", damaged["id"], "--target-db", "from_array")

    assert listed.returncode == 0, listed.stderr
    # Both backups may start in the same second, so the second id can be the first
    # one with "-2" appended.
    assert [row.split()[0] for row in listed.stdout.splitlines()[1:]] == [intact["id"]]
    assert (f"manifest {manifest} cannot be read (the file contains a JSON array, expected "
            "an object)") in listed.stderr
    assert advice in listed.stderr
    assert newest.returncode == 0, newest.stderr
    assert f"backup {intact['id']}: verified yes" in newest.stdout
    assert verified.returncode == 1
    assert (f"manifest {manifest} is invalid: the file contains a JSON array, expected an "
            "object") in verified.stderr
    assert advice in verified.stderr
    assert restored.returncode == 1
    assert advice in restored.stderr
    assert pg_cluster.psql(
        "SELECT count(*) FROM pg_database WHERE datname = 'from_array'") == "0"


def test_verify_after_original_file_put_back(daemon: Path) -> None:
    """A failed drill of a damaged copy does not make the intact original unverified."""
    taken = orjson.loads(ctl(daemon, "--json", "backup", "now").stdout)
    backup, path = taken["id"], Path(taken["path"])
    original = path.read_bytes()
    overwrite_two_bytes(path, len(original) // 2)
    drilled = ctl(daemon, "backup", "verify", "--drill", backup)
    path.write_bytes(original)

    verified = ctl(daemon, "backup", "verify", backup)
    listed = ctl(daemon, "backup", "list")

    assert drilled.returncode == 1
    assert "drill FAILED" in drilled.stdout
    assert verified.returncode == 0, verified.stdout + verified.stderr
    lines = verified.stdout.splitlines()
    assert lines[0] == f"backup {backup}: verified yes"
    assert lines[1].startswith("  checksum check passed at ")
    assert lines[1].endswith(f": sha256 is {taken['sha256']}, as the manifest records")
    assert lines[2].startswith("  readability check passed at ")
    assert "pg_restore --list read " in lines[2]
    assert lines[3].startswith("  the drill that failed at ")
    assert "is stale and does not count" in lines[3]
    assert len(lines) == 4
    assert listed.returncode == 0, listed.stderr
    [row] = [line for line in listed.stdout.splitlines() if line.startswith(backup)
             and ":" not in line]
    assert row.split()[4:8] == ["yes", "0m", "ago", "stale"]


def test_list_names_fifo_and_undecodable(daemon: Path) -> None:
    """A FIFO manifest and a manifest name that is not UTF-8 are named by list and
    verify, which return at once and still list the intact backup."""
    taken = orjson.loads(ctl(daemon, "--json", "backup", "now").stdout)
    directory = Path(taken["path"]).parent
    fifo_id = "fifo__h__20261205T150000Z"
    fifo = directory / f"{fifo_id}.json"
    undecodable = os.path.join(os.fsencode(directory), b"zz\xff__h__20261205T150000Z.json")
    with open(undecodable, "wb") as handle:
        handle.write(b"{}")

    with FifoReleaser(fifo) as releaser:
        listed = ctl(daemon, "backup", "list")
        verified = ctl(daemon, "backup", "verify", fifo_id)

    assert releaser.released == 0, "a reader blocked on the FIFO"
    assert listed.returncode == 0, listed.stderr
    assert [row.split()[0] for row in listed.stdout.splitlines()[1:]] == [taken["id"]]
    assert (f"manifest {fifo} cannot be read (the file is a FIFO, not a regular file)"
            in listed.stderr)
    assert (f"manifest {directory}/zz\\xff__h__20261205T150000Z.json cannot be read (the "
            "file name is not valid UTF-8") in listed.stderr
    assert verified.returncode == 1
    assert (f"manifest {fifo} is invalid: the file is a FIFO, not a regular file"
            in verified.stderr)
