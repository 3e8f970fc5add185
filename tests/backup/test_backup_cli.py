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
    [entry] = orjson.loads(listing.stdout)
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
