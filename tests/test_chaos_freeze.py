"""Frozen PostgreSQL processes (SIGSTOP for 30 s) must not stall the daemon."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from tests.conftest import daemon_config, running_daemon, wait_until
from walacord.monitor import Monitor
from walacord.pgcluster import PgCluster
from walacord.systemd import Notifier

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.chaos]

FREEZE_SECONDS = 30.0
WATCHDOG_USEC = 2_000_000  # the supervisor pings every 1 s


@pytest.fixture
def watchdog_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's notify socket."""
    directory = tempfile.mkdtemp(prefix="wd-")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()
    os.unlink(path)
    os.rmdir(directory)


async def collect_watchdog(sock: socket.socket, pings: list[float]) -> None:
    while True:
        await anyio.wait_readable(sock)
        while True:
            try:
                message = sock.recv(4096)
            except BlockingIOError:
                break
            if b"WATCHDOG=1" in message:
                pings.append(time.monotonic())


async def scrape_metrics(url: str, latencies: list[tuple[float, float]]) -> None:
    """Scrape every 0.2 s, recording (start time, latency) of each scrape."""
    async with httpx.AsyncClient() as http:
        while True:
            began = time.monotonic()
            response = await http.get(url, timeout=5)
            latencies.append((began, time.monotonic() - began))
            assert response.status_code == 200
            await anyio.sleep(0.2)


def walacord_backend_pids(cluster: PgCluster) -> list[int]:
    output = cluster.psql("SELECT pid FROM pg_stat_activity WHERE application_name = 'walacord'")
    return [int(line) for line in output.split()]


async def freeze_scenario(cluster: PgCluster, tmp_path: Path, notify: socket.socket,
                          pick: Callable[[], list[int]]) -> dict[str, float]:
    """Freeze the processes `pick()` returns and measure what the daemon does."""
    config = daemon_config(tmp_path, cluster.url())
    settings = config.probes.database
    pings: list[float] = []
    latencies: list[tuple[float, float]] = []
    async with running_daemon(config, notifier=Notifier()) as supervisor:
        monitor = supervisor.runtime.components["monitor"]
        assert isinstance(monitor, Monitor)
        database = monitor.runners["database"]
        host = monitor.runners["host"]
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect_watchdog, notify, pings)
            tg.start_soon(scrape_metrics, f"http://{config.http.listen}/metrics", latencies)
            await wait_until(lambda: len(pings) >= 2, 5)

            # Step 1: freeze and time the database probe going down.
            # pick() may run psql, so it runs off the loop that serves the scrapes.
            targets = await anyio.to_thread.run_sync(pick)
            assert targets
            host_runs = host.stats.runs
            frozen_at = time.monotonic()
            for pid in targets:
                os.kill(pid, signal.SIGSTOP)
            try:
                try:
                    detection = await wait_until(lambda: database.state.down, 10)
                except TimeoutError:
                    raise AssertionError(f"database probe not down: {database.state}") from None
                await anyio.sleep(FREEZE_SECONDS - (time.monotonic() - frozen_at))
            finally:
                for pid in targets:
                    os.kill(pid, signal.SIGCONT)
            thawed_at = time.monotonic()
            host_runs_during = host.stats.runs - host_runs
            during = [t for t in pings if frozen_at <= t <= thawed_at]
            gaps = [b - a for a, b in itertools.pairwise(during)]
            scrapes = [latency for began, latency in latencies
                       if frozen_at <= began <= thawed_at]

            # Step 2: after SIGCONT the daemon recovers.
            recovery = await wait_until(lambda: monitor.modes.mode.value == "normal", 30)
            tg.cancel_scope.cancel()

    figures = {
        "detection_seconds": detection,
        # Deadline plus interval, the interval stretched by its jitter.
        "bound_seconds": settings.timeout + settings.interval * (1 + settings.jitter),
        "metrics_max_seconds": max(scrapes),
        "metrics_scrapes": len(scrapes),
        "host_runs": host_runs_during,
        "watchdog_pings": len(during),
        "watchdog_max_gap_seconds": max(gaps),
        "recovery_seconds": recovery,
    }
    print({k: round(v, 3) for k, v in figures.items()})
    return figures


def check(figures: dict[str, float]) -> None:
    assert figures["detection_seconds"] <= figures["bound_seconds"]
    assert figures["metrics_max_seconds"] < 0.1
    assert figures["host_runs"] >= 2
    assert figures["watchdog_pings"] >= FREEZE_SECONDS / 1.5
    assert figures["watchdog_max_gap_seconds"] < WATCHDOG_USEC / 1_000_000


async def test_freeze_postmaster(own_pg_cluster: PgCluster, tmp_path: Path,
                                 watchdog_socket: socket.socket) -> None:
    figures = await freeze_scenario(own_pg_cluster, tmp_path, watchdog_socket,
                                    lambda: [own_pg_cluster.postmaster_pid()])
    check(figures)


async def test_freeze_walacord_backends(own_pg_cluster: PgCluster, tmp_path: Path,
                                        watchdog_socket: socket.socket) -> None:
    figures = await freeze_scenario(own_pg_cluster, tmp_path, watchdog_socket,
                                    lambda: walacord_backend_pids(own_pg_cluster))
    check(figures)
