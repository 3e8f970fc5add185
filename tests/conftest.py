"""Shared fixtures: a real PostgreSQL cluster started for the test session."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from walacord.pgcluster import PgCluster


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One PostgreSQL server shared by the whole session; tests make their own databases."""
    base = Path(tempfile.mkdtemp(prefix="walacord-pg-"))
    cluster = PgCluster(base)
    cluster.init()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_db(pg_cluster: PgCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database on the shared cluster; yields its superuser URL."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[:50].lower()
    pg_cluster.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    pg_cluster.psql(f'CREATE DATABASE "{name}"')
    try:
        yield pg_cluster.url(name)
    finally:
        pg_cluster.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def own_pg_cluster() -> Iterator[PgCluster]:
    """A cluster of the test's own, for tests that stop, kill or freeze the server."""
    # Not under pytest's tmp_path: that is mode 0700 for root, and the server runs as
    # nobody when the tests run as root.
    base = Path(tempfile.mkdtemp(prefix="walacord-pg-own-"))
    cluster = PgCluster(base)
    cluster.init()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


class NotifyRecorder:
    """Plays systemd's side of sd_notify: a datagram socket that records each message."""

    def __init__(self, path: Path) -> None:
        import socket

        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.received: list[tuple[float, str]] = []

    def poll(self) -> list[tuple[float, str]]:
        """Read every waiting datagram; return all messages so far with arrival times."""
        import time

        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return self.received
            self.received.append((time.monotonic(), data.decode()))

    def lines(self) -> list[str]:
        return [line for _, message in self.poll() for line in message.splitlines()]

    def wait_for(self, prefix: str, timeout: float, after: int = 0) -> float:
        """Wait until a message line starting with `prefix` arrives; return its time."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for index, (at, message) in enumerate(self.poll()):
                if index >= after and any(
                        line.startswith(prefix) for line in message.splitlines()):
                    return at
            time.sleep(0.02)
        raise AssertionError(f"no {prefix!r} within {timeout}s; got {self.lines()}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyRecorder]:
    """A fake systemd notify socket; NOTIFY_SOCKET and WATCHDOG_USEC point at it."""
    recorder = NotifyRecorder(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(recorder.path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield recorder
    finally:
        recorder.close()
