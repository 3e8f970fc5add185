"""Shared fixtures: a real PostgreSQL cluster started for the test session."""

from __future__ import annotations

import dataclasses
import os
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from walacord.config import (
    Config,
    ControlConfig,
    DatabaseConfig,
    HostProbeConfig,
    HttpConfig,
    LoggingConfig,
    ProbesConfig,
    StateConfig,
    WalacorConfig,
)
from walacord.emulator import Emulator, running_emulator
from walacord.pgcluster import PgCluster, free_port
from walacord.supervisor import Supervisor
from walacord.systemd import Notifier


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


# The daemon's default paths. Tests give every daemon, store and socket a temporary
# directory, so none of these may appear because of a test run.
SYSTEM_PATHS = (Path("/var/lib/walacord"), Path("/var/log/walacord"), Path("/run/walacord"))


@pytest.fixture(scope="session", autouse=True)
def system_paths_untouched() -> Iterator[None]:
    """Fail the session when a test created one of the daemon's default directories."""
    existed = {path for path in SYSTEM_PATHS if path.exists()}
    yield
    created = [str(path) for path in SYSTEM_PATHS if path.exists() and path not in existed]
    assert not created, (f"tests created {created}; give the daemon in the test a "
                         "temporary [state] dir, [logging] dir and [control] socket")


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


# --- the daemon against real PostgreSQL and the emulator ---------------------------


WALACOR_USER = ("walacord-test", "walacor-test-secret")


@pytest.fixture
async def walacor_emulator() -> AsyncIterator[Emulator]:
    """The project's Walacor emulator on a free loopback port, with WALACOR_USER."""
    async with running_emulator(seed=3, users=dict([WALACOR_USER])) as emulator:
        yield emulator


def daemon_config(tmp_path: Path, database_url: str, walacor_url: str = "", **sections: Any
                  ) -> Config:
    """Return a Config for a test daemon: loopback HTTP on a free port, no log files.

    The load threshold is lifted because the test machine's load is shared with
    other jobs; the other host thresholds keep their defaults.
    """
    probes = ProbesConfig(host=HostProbeConfig(load_warning_per_cpu=1000))
    base = Config(
        probes=probes,
        database=DatabaseConfig(url=database_url, pool_min_size=2, pool_max_size=10),
        walacor=WalacorConfig(url=walacor_url, username=WALACOR_USER[0],
                              password=WALACOR_USER[1]),
        http=HttpConfig(listen=f"127.0.0.1:{free_port()}"),
        state=StateConfig(dir=str(tmp_path)),
        logging=LoggingConfig(dir=""),
        control=ControlConfig(socket=str(tmp_path / "control.sock")),
    )
    return dataclasses.replace(base, **sections)


@asynccontextmanager
async def running_daemon(config: Config, notifier: Notifier | None = None
                         ) -> AsyncIterator[Supervisor]:
    """Run a Supervisor with the default components until the block ends."""
    supervisor = Supervisor(config, None, notifier=notifier)
    async with anyio.create_task_group() as tg:
        tg.start_soon(supervisor.run)
        with anyio.fail_after(30):
            await supervisor.runtime.ready.wait()
        try:
            yield supervisor
        finally:
            supervisor.runtime.request_stop()


async def wait_until(predicate: Callable[[], object], limit: float, step: float = 0.01) -> float:
    """Poll `predicate` until it is true; return the seconds it took, or raise TimeoutError."""
    began = time.monotonic()
    with anyio.fail_after(limit):
        # Polling: the tests watch state that changes without an event to wait on.
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(step)
    return time.monotonic() - began


def live_pids(pids: list[int]) -> list[int]:
    """Return the pids in `pids` whose process still runs (exists and is no zombie)."""
    running = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            continue
        if stat.rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X"):
            running.append(pid)
    return running


def kill_leftovers(pids: list[int]) -> None:
    """Send SIGKILL to every process in `pids` that still runs, so a failed test leaks none."""
    for pid in live_pids(pids):
        os.kill(pid, signal.SIGKILL)


@contextmanager
def walacord_run(tmp_path: Path, extra_toml: str = "") -> Iterator[Path]:
    """Run `walacord run` as a subprocess with its own socket and state; yield the socket."""
    import signal
    import subprocess
    import sys

    socket = tmp_path / "control.sock"
    config = tmp_path / "walacord.toml"
    config.write_text(
        f'[http]\nlisten = ""\n[logging]\ndir = ""\n'
        f'[state]\ndir = "{tmp_path / "state"}"\n'
        f'[control]\nsocket = "{socket}"\ngroup = ""\n' + extra_toml)
    process = subprocess.Popen([sys.executable, "-m", "walacord", "run", "--config", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not socket.exists():
            assert process.poll() is None, "walacord run exited during start-up"
            assert time.monotonic() < deadline, "control socket did not appear within 20 s"
            time.sleep(0.05)
        yield socket
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def mounted_tmpfs(directory: Path, options: str = "size=1m") -> Iterator[Path]:
    """Mount a tmpfs with `options` on `directory`, created here, until the block ends;
    skip the test where mounting is not allowed."""
    import subprocess

    directory.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)
