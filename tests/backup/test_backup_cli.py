"""`walacorctl backup` against a real `walacord run` daemon and a real database."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import psycopg
import pytest

from tests.backup.conftest import FifoReleaser, overwrite_two_bytes
from tests.conftest import walacord_run
from walacord.backup.manager import BACKUP_LOCK_KEY
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


def test_backup_now_skipped_exits_4(daemon: Path, pg_db: str) -> None:
    """A `backup now` that starts nothing, because a peer holds the backup lock, exits
    4, so `walacorctl backup now && ship-offsite` does not ship an old backup."""
    with psycopg.connect(pg_db, autocommit=True) as peer:
        peer.execute("SELECT pg_advisory_lock(%s)", (BACKUP_LOCK_KEY,))
        skipped = ctl(daemon, "backup", "now")
        skipped_json = ctl(daemon, "--json", "backup", "now")

    assert skipped.returncode == 4, skipped.stderr
    assert skipped.stdout.startswith("skipped: a backup of database ")
    assert "no second backup was started" in skipped.stdout
    assert skipped_json.returncode == 4, skipped_json.stderr
    assert orjson.loads(skipped_json.stdout)["status"] == "skipped"


@pytest.fixture
def daemon_with_sink(tmp_path: Path, pg_db: str) -> Iterator[Path]:
    """A daemon whose database probe, crash watch and outbox postgres sink all keep
    connections to the supervised database."""
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE ledger (id int PRIMARY KEY, amount numeric)")
        conn.execute("INSERT INTO ledger SELECT g, g * 1.5 FROM generate_series(1, 500) g")
    toml = (f'[database]\nurl = "{pg_db}"\n[backup]\nenabled = false\n'
            '[probes.database]\ninterval = 0.5\ntimeout = 0.4\ncrash_watch = true\n'
            '[outbox.statements.add_entry]\n'
            'sql = "INSERT INTO ledger (id, amount) VALUES (%(id)s, %(amount)s) '
            'ON CONFLICT DO NOTHING"\n')
    with walacord_run(tmp_path, toml) as socket:
        yield socket


def _database_report(socket: Path) -> dict[str, Any]:
    status = ctl(socket, "--json", "status")
    assert status.returncode == 0, status.stderr
    report: dict[str, Any] = orjson.loads(status.stdout)["probes"]["database"]
    return report


def _wait_for(predicate: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {limit:g} s"
        time.sleep(0.1)


def _sessions(pg_cluster: PgCluster, database: str) -> int:
    return int(pg_cluster.psql("SELECT count(*) FROM pg_stat_activity "
                               f"WHERE datname = '{database}'"))


def test_restore_over_supervised_database(daemon_with_sink: Path, pg_cluster: PgCluster,
                                          pg_db: str) -> None:
    """walacord pauses its own connections for the swap, so a forced restore over the
    database it supervises succeeds while walacord has sessions on it, and
    walacord's probe and outbox work against the restored database afterwards."""
    socket = daemon_with_sink
    database = pg_db.rsplit("/", 1)[1]
    taken = orjson.loads(ctl(socket, "--json", "backup", "now").stdout)
    pg_cluster.psql("INSERT INTO ledger VALUES (100000, 1)", dbname=database)
    # The pool, the crash watch and the sink's pool each hold a session.
    _wait_for(lambda: _sessions(pg_cluster, database) >= 3,
              "walacord's pool, crash watch and outbox sessions")
    assert _database_report(socket)["healthy"] is True

    for round_number in range(3):
        restored = ctl(socket, "backup", "restore", taken["id"], "--target-db", database,
                       "--force")
        assert restored.returncode == 0, restored.stderr
        assert pg_cluster.psql("SELECT count(*) FROM ledger", dbname=database) == "500"
        pg_cluster.psql(f"INSERT INTO ledger VALUES ({100000 + round_number}, 1)",
                        dbname=database)

    # No scratch or replaced copy is left.
    assert pg_cluster.psql("SELECT count(*) FROM pg_database WHERE datname LIKE "
                           f"'{database[:40]}%' AND datname <> '{database}'") == "0"
    # walacord reconnected: its sessions are back, and the probe runs and is up.
    _wait_for(lambda: _sessions(pg_cluster, database) >= 3, "walacord's sessions back")
    report = _database_report(socket)
    assert report["healthy"] is True, report
    assert report["paused"] is None, report
    # The outbox's postgres sink writes into the restored database.
    enqueued = ctl(socket, "enqueue", "--sink", "postgres", "--statement", "add_entry",
                   "--key", "after-restore", "--data", '{"id": 300000, "amount": 3}')
    assert enqueued.returncode == 0, enqueued.stderr
    _wait_for(lambda: pg_cluster.psql("SELECT count(*) FROM ledger WHERE id = 300000",
                                      dbname=database) == "1", "the operation applied")


def _connection_settings(pg_cluster: PgCluster, database: str) -> str:
    """Return "datallowconn|datconnlimit" of `database`, as psql prints them."""
    return pg_cluster.psql("SELECT datallowconn, datconnlimit FROM pg_database "
                           f"WHERE datname = '{database}'")


def test_restore_over_database_reconnecting_clients(daemon_with_sink: Path,
                                                    pg_cluster: PgCluster, pg_db: str,
                                                    tmp_path: Path) -> None:
    """Clients that keep reconnecting, a shell loop and a second walacord daemon on the
    same database, do not block a forced restore: new connections are rejected during
    the swap. The database's connection settings are back afterwards, and the second
    daemon's database probe is up again."""
    socket = daemon_with_sink
    database = pg_db.rsplit("/", 1)[1]
    taken = orjson.loads(ctl(socket, "--json", "backup", "now").stdout)
    pg_cluster.psql("INSERT INTO ledger VALUES (100000, 1)", dbname=database)
    pg_cluster.psql(f'ALTER DATABASE "{database}" WITH CONNECTION LIMIT 40')
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    # A "connect, sleep, reconnect at once" loop in a shell, like an application pool.
    loop = subprocess.Popen(
        ["sh", "-c", f"while true; do {pg_cluster.bindir / 'psql'} -X -q "
                     f"'{pg_db}' -c 'SELECT pg_sleep(30)' >/dev/null 2>&1; done"],
        start_new_session=True)
    try:
        with walacord_run(second_dir, f'[database]\nurl = "{pg_db}"\n[backup]\n'
                                      'enabled = false\n[probes.database]\ninterval = 0.5\n'
                                      'timeout = 0.4\n') as second:
            _wait_for(lambda: int(pg_cluster.psql(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%' "
                f"AND datname = '{database}'")) == 1, "the other client's session")
            _wait_for(lambda: _database_report(second)["healthy"] is True,
                      "the second daemon's probe up")

            restored = ctl(socket, "backup", "restore", taken["id"], "--target-db", database,
                           "--force")

            _wait_for(lambda: _database_report(second)["healthy"] is True,
                      "the second daemon's probe up after the restore")
    finally:
        os.killpg(loop.pid, signal.SIGKILL)
        loop.wait()
    assert restored.returncode == 0, restored.stderr
    assert pg_cluster.psql("SELECT count(*) FROM ledger", dbname=database) == "500"
    assert _connection_settings(pg_cluster, database) == "t|40"
    _wait_for(lambda: _database_report(socket)["paused"] is None
              and _database_report(socket)["healthy"] is True, "the probe resumed and up")


def test_stop_during_blocked_swap_is_prompt(daemon_with_sink: Path, pg_cluster: PgCluster,
                                            pg_db: str, tmp_path: Path) -> None:
    """SIGTERM while a swap is blocked, with a postgres-sink operation waiting for the
    pause to end: the daemon exits well within drain_timeout (10 s), the database is
    intact and accepts connections again.

    A transaction in another database holds a lock on the database's pg_database
    entry (COMMENT ON DATABASE), so the rename waits for it."""
    socket = daemon_with_sink
    database = pg_db.rsplit("/", 1)[1]
    taken = orjson.loads(ctl(socket, "--json", "backup", "now").stdout)
    config = str(tmp_path / "walacord.toml")
    [daemon] = [process for process in psutil.process_iter(["cmdline"])
                if config in (process.info["cmdline"] or [])]
    holder = psycopg.connect(pg_cluster.url("postgres"))
    holder.execute(f"COMMENT ON DATABASE \"{database}\" IS 'held by the test'")
    restore: subprocess.Popen[str] | None = None
    try:
        restore = subprocess.Popen(
            [WALACORCTL, "--socket", str(socket), "backup", "restore", taken["id"],
             "--target-db", database, "--force"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        _wait_for(lambda: _database_report(socket)["paused"] is not None, "the pause")
        enqueued = ctl(socket, "enqueue", "--sink", "postgres", "--statement", "add_entry",
                       "--key", "during-pause", "--data", '{"id": 400000, "amount": 4}')
        assert enqueued.returncode == 0, enqueued.stderr
        time.sleep(1.0)  # the sync round starts and waits for the pause to end
        assert _database_report(socket)["paused"] is not None
        blocked = _connection_settings(pg_cluster, database)

        began = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
        stopped_after = time.monotonic() - began
    finally:
        holder.rollback()
        holder.close()
        if restore is not None:
            restore.wait(timeout=30)
    assert stopped_after < 5.0
    assert blocked == "f|-1"
    assert _connection_settings(pg_cluster, database) == "t|-1"
    assert pg_cluster.psql("SELECT count(*) FROM ledger", dbname=database) in ("500", "501")


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


def test_truncated_dump_verify_and_list(daemon: Path) -> None:
    """After a drilled dump is truncated, verify prints no old pass as current, and
    list shows the drill as stale and the file's real size."""
    taken = orjson.loads(ctl(daemon, "--json", "backup", "now").stdout)
    backup = taken["id"]
    drilled = ctl(daemon, "backup", "verify", backup, "--drill")
    os.truncate(taken["path"], 100)

    verified = ctl(daemon, "backup", "verify", backup)
    listed = ctl(daemon, "backup", "list")

    assert drilled.returncode == 0, drilled.stdout + drilled.stderr
    assert verified.returncode == 1
    assert f"backup {backup}: verified NO" in verified.stdout
    assert "readability check passed" not in verified.stdout
    assert "the readability check that passed at " in verified.stdout
    assert "the drill that passed at " in verified.stdout
    assert "size is 100 bytes, the manifest records" in verified.stdout
    assert listed.returncode == 0, listed.stderr
    [row] = [line for line in listed.stdout.splitlines() if line.startswith(backup)
             and ": " not in line]
    assert "100 B (manifest " in row
    assert row.split()[-2] == "stale"


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
                                "restore_commands", "scratch_journal_error", "unreadable",
                                "without_manifest"]
    assert [entry["id"] for entry in document["backups"]] == [intact["id"]]
    assert document["unreadable"] == [{
        "path": str(damaged_manifest), "dump": damaged["path"],
        "error": "the file contains a JSON array, expected an object"}]
    assert document["without_manifest"] == [orphan["path"]]
    assert document["restore_commands"] == {
        path: f"pg_restore --exit-on-error --dbname=NEW_DB {path}"
        for path in (damaged["path"], orphan["path"])}
    [database] = document["leftover_databases"]
    assert database["name"] == leftover
    assert "drop it by hand" in database["description"]
    assert document["leftover_databases_error"] is None
    assert document["scratch_journal_error"] is None


def test_damaged_journal_is_named_in_list(daemon: Path) -> None:
    backups = daemon.parent / "state" / "backups"
    backups.mkdir(parents=True, exist_ok=True)
    (backups / ".scratch-databases").write_bytes(b"[" * 5000 + b"]" * 5000)

    listed = ctl(daemon, "backup", "list")
    as_json = ctl(daemon, "--json", "backup", "list")

    assert listed.returncode == 0, listed.stderr
    assert "scratch journal" in listed.stderr
    assert "is damaged" in listed.stderr
    assert "nests arrays or objects too deeply" in orjson.loads(
        as_json.stdout)["scratch_journal_error"]


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


def test_list_escapes_control_characters(daemon: Path) -> None:
    """A dump whose name contains a terminal escape is named with the escape written out,
    and its by-hand command gives back the real name in bash."""
    taken = orjson.loads(ctl(daemon, "--json", "backup", "now").stdout)
    directory = Path(taken["path"]).parent
    name = "x\x1b[31mred\nline__h__20261205T150000Z.dump"
    (directory / name).write_bytes(b"PGDMP")

    listed = ctl(daemon, "backup", "list")

    assert listed.returncode == 0, listed.stderr
    assert "\x1b" not in listed.stderr
    assert "x\\x1b[31mred\\nline__h__" in listed.stderr
    word = listed.stderr.split("--dbname=NEW_DB ")[1].splitlines()[0]
    named = subprocess.run(["bash", "-c", f"printf %s {word}"], capture_output=True,
                           check=True).stdout
    assert named == os.fsencode(directory / name)


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
    with open(undecodable.removesuffix(b".json") + b".dump", "wb") as handle:
        handle.write(b"PGDMP")

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
    # The by-hand command names the dump in bash quoting that gives back its bytes.
    assert (f"run: pg_restore --exit-on-error --dbname=NEW_DB $'{directory}/zz\\xff__h__"
            "20261205T150000Z.dump'") in listed.stderr
    assert verified.returncode == 1
    assert (f"manifest {fifo} is invalid: the file is a FIFO, not a regular file"
            in verified.stderr)
