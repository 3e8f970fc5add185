"""Faults aimed at the daemon itself: a bad config on SIGHUP, SIGTERM with work hanging."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

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
