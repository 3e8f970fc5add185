"""Faults aimed at the daemon itself: a bad config on SIGHUP, SIGTERM with work hanging,
and a flood of control-socket connections."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from tests.chaos.emulator import USER, EmulatorProcess
from tests.chaos.results import ResultsFile
from tests.chaos.scenario import Scenario

pytestmark = pytest.mark.chaos

StartWalacord = Callable[..., Scenario]

# A reload runs as soon as the signal task wakes; 1 s allows for a loaded CI machine.
RELOAD_S = 1.0
DRAIN_TIMEOUT_S = 2.0
# SIGTERM -> exit: the drain timeout, then cancellation and the HTTP server's close.
EXIT_BOUND_S = DRAIN_TIMEOUT_S + 3.0


def test_daemon_sighup_with_invalid_config(pg_db: str, start_walacord: StartWalacord,
                                           chaos_results: ResultsFile) -> None:
    scenario = start_walacord(pg_db)
    scenario.wait_normal()
    daemon = scenario.daemon
    good = daemon.config_path.read_text()
    rejected = scenario.metrics_value("walacord_config_reloads_total", result="rejected")
    applied = scenario.metrics_value("walacord_config_reloads_total", result="applied")

    began = scenario.mark()
    daemon.config_path.write_text(good + "\n[database\nurl = \n")
    daemon.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    detection = scenario.wait_for_counter("walacord_config_reloads_total", rejected,
                                          since=began, timeout=10, result="rejected")
    scenario.hold(1.0)
    status, document = daemon.health()

    daemon.config_path.write_text(good)
    restored = scenario.mark()
    daemon.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    recovery = scenario.wait_for_counter("walacord_config_reloads_total", applied,
                                         since=restored, timeout=10, result="applied")

    chaos_results.record(
        "daemon_sighup_invalid_config",
        description="SIGHUP after the config file was broken: the old config stays",
        detection_s=detection, detection_bound_s=RELOAD_S,
        recovery_s=recovery, recovery_bound_s=RELOAD_S,
        mode_path=scenario.path(began), expected_path=["normal"],
        notes="detection is the rejected reload, recovery the next applied one")
    assert status == 200
    assert document["mode"] == "normal"
    assert daemon.process is not None
    assert daemon.process.poll() is None
    assert daemon.events("config.reload_rejected")


def test_daemon_sigterm_while_walacor_hangs(pg_db: str, emulator: EmulatorProcess,
                                            start_walacord: StartWalacord,
                                            chaos_results: ResultsFile) -> None:
    settings: dict[str, dict[str, Any]] = {
        "walacor": {"url": emulator.url, "username": USER[0], "password": USER[1]},
        "probes.walacor": {"interval": 1.0, "timeout": 0.8, "fast_interval": 0.2},
        "lifecycle": {"drain_timeout": DRAIN_TIMEOUT_S},
    }
    scenario = start_walacord(pg_db, settings=settings)
    scenario.wait_normal()

    # Every Walacor request now hangs, so work is in flight when SIGTERM arrives.
    emulator.set_faults({"mode": "hang", "path": "/api/"})
    time.sleep(1.5)
    daemon = scenario.daemon
    began = scenario.mark()
    code = daemon.stop(timeout=30)
    exit_s = scenario.mark() - began

    chaos_results.record(
        "daemon_sigterm_walacor_hanging",
        description="SIGTERM while every Walacor request hangs",
        detection_s=exit_s, detection_bound_s=EXIT_BOUND_S,
        notes=f"exit status {code}; detection is the time from SIGTERM to exit")
    assert code == 0
    assert daemon.events("daemon.stopped")


def control_call(path: str, method: str, timeout: float = 5.0) -> dict[str, Any]:
    """Send one control request on a new connection and return the decoded response."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        client.connect(path)
        client.sendall(orjson.dumps({"id": 1, "method": method, "version": 1}) + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = client.recv(65536)
            if not chunk:
                break
            data += chunk
    return dict(orjson.loads(data.splitlines()[-1]))


def test_daemon_control_connection_flood(pg_db: str, start_walacord: StartWalacord,
                                         chaos_results: ResultsFile) -> None:
    limit = 16
    scenario = start_walacord(pg_db, settings={"control": {"max_connections": limit}})
    scenario.wait_normal()
    path = scenario.daemon.sections["control"]["socket"]
    # Past the limit the server rejects a new connection as busy, or evicts the
    # longest-idle one once it has been idle long enough; both count as rejections.
    rejected_before = scenario.metrics_value("walacord_control_connections_rejected_total")

    # Four times the limit: idle connections, half of them sending a line of garbage.
    began = scenario.mark()
    flood: list[socket.socket] = []
    try:
        for index in range(limit * 4):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.settimeout(5)
            client.connect(path)
            if index % 2:
                client.sendall(b"{not json\n")
            flood.append(client)
        detection = scenario.wait_for_counter(
            "walacord_control_connections_rejected_total", rejected_before, since=began,
            timeout=10)
        scenario.hold(2.0)
        status, _ = scenario.daemon.health()
    finally:
        for client in flood:
            client.close()

    closed = scenario.mark()
    recovery = None
    deadline = closed + 10
    while scenario.mark() < deadline:
        try:
            response = control_call(path, "status", timeout=2)
        except OSError:
            response = {}
        if "result" in response:
            recovery = scenario.mark() - closed
            break
        time.sleep(0.05)

    chaos_results.record(
        "daemon_control_connection_flood",
        description=f"{limit * 4} control connections against a limit of {limit}",
        detection_s=detection, detection_bound_s=RELOAD_S,
        recovery_s=recovery, recovery_bound_s=2.0,
        mode_path=scenario.path(began), expected_path=["normal"],
        notes="detection is the first rejection, recovery the first answered status "
              f"call after the flood; /metrics max "
              f"{max(scenario.metrics_latencies) * 1000:.1f} ms during it")
    assert status == 200
    assert max(scenario.metrics_latencies) < 0.1
