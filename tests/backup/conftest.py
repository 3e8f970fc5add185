"""Fixtures for backup tests: a seeded database and a manager factory."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from walacord.backup import BackupAlert, BackupManager
from walacord.config import BackupConfig
from walacord.pgcluster import PgCluster

SEED_SQL = """
CREATE TABLE accounts (id int PRIMARY KEY, owner text NOT NULL);
CREATE TABLE ledger (id bigserial PRIMARY KEY, account int REFERENCES accounts, amount numeric);
CREATE TABLE empty_table (x int);
CREATE SCHEMA audit;
CREATE TABLE audit.events (id int, note text);
INSERT INTO accounts SELECT g, 'owner ' || g FROM generate_series(1, 200) g;
INSERT INTO ledger (account, amount) SELECT 1 + g % 200, g * 1.5 FROM generate_series(1, 3000) g;
INSERT INTO audit.events SELECT g, md5(g::text) FROM generate_series(1, 50) g;
"""
SEED_ROWS = {"public.accounts": 200, "public.ledger": 3000, "public.empty_table": 0,
             "audit.events": 50}


def overwrite_two_bytes(path: Path, offset: int) -> str:
    """Invert two bytes of `path` at `offset` in place, as disk corruption would, and
    return the file's new sha256."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        original = handle.read(2)
        handle.seek(offset)
        handle.write(bytes(b ^ 0xFF for b in original))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def journal_names(manager: BackupManager) -> list[str]:
    """Return the names in the manager's scratch journal file, read without walacord's
    parser; raise FileNotFoundError when nothing has written the file."""
    return list(json.loads(manager.scratch_journal.path.read_bytes())["databases"])


@contextlib.contextmanager
def fifo_in_place_of(path: Path) -> Iterator[None]:
    """Replace the file at `path` with a FIFO that nothing writes to.

    At the end, a writer opens and closes the FIFO once, so a reader that blocked in
    open() gets end-of-file and its thread ends.
    """
    path.unlink()
    os.mkfifo(path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # ENXIO: no reader is waiting
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


class FifoReleaser:
    """A thread that opens a FIFO for writing, and closes it, every `interval` seconds.

    Each time a reader is blocked in open() or read() on the FIFO, that reader gets
    end-of-file, so code that wrongly reads a FIFO fails the test instead of hanging
    it. `released` counts those times: it stays 0 while nothing reads the FIFO.
    """

    def __init__(self, path: Path, interval: float = 0.2) -> None:
        self.path = path
        self.interval = interval
        self.released = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no reader is waiting
                continue
            self.released += 1
            os.close(fd)

    def __enter__(self) -> FifoReleaser:
        os.mkfifo(self.path)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def seeded_db(pg_db: str) -> str:
    """A fresh database with four tables in two schemas; yields its superuser URL."""
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute(SEED_SQL)
    return pg_db


@pytest.fixture
def make_database(pg_cluster: PgCluster) -> Iterator[Callable[[str], str]]:
    """Create empty databases with the names given; yield each one's superuser URL.

    The databases are dropped at the end of the test.
    """
    created: list[str] = []

    def create(name: str) -> str:
        quoted = '"' + name.replace('"', '""') + '"'
        pg_cluster.psql(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
        pg_cluster.psql(f"CREATE DATABASE {quoted}")
        created.append(quoted)
        return pg_cluster.url(name)

    yield create
    for quoted in created:
        pg_cluster.psql(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")


@pytest.fixture
def seed_rows() -> dict[str, int]:
    """Row counts of every table in `seeded_db`, keyed "schema.table"."""
    return dict(SEED_ROWS)


@pytest.fixture
def alerts() -> list[BackupAlert]:
    return []


ManagerFactory = Callable[..., BackupManager]


@pytest.fixture
def make_manager(tmp_path: Path, seeded_db: str, alerts: list[BackupAlert]) -> ManagerFactory:
    """Build a manager on `seeded_db` with short deadlines; keywords override config."""

    def build(url: str = seeded_db, directory: Path | None = None,
              **settings: Any) -> BackupManager:
        base = BackupConfig(dir=str(directory or tmp_path / "backups"), query_timeout=15.0,
                            dump_timeout=60.0, verify_timeout=60.0, drill_timeout=60.0,
                            restore_timeout=60.0, lock_wait_timeout=10.0)
        config = dataclasses.replace(base, **settings)
        return BackupManager(config, conninfo=url, alert=alerts.append)

    return build
