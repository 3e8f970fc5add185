"""Walacor fault scenarios: the emulator's own faults and the proxy in front of it.

The Walacor probe runs every second here (its default is 15 s) with a 0.8 s deadline,
so each scenario takes seconds. With PostgreSQL healthy, Walacor down means degraded
(`[modes] walacor_down` defaults to degraded).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.chaos.emulator import USER, EmulatorProcess
from tests.chaos.faultproxy import FaultProxy
from tests.chaos.results import ResultsFile
from tests.chaos.scenario import Bounds, Fault, Scenario
from walacord.pgcluster import PgCluster

pytestmark = pytest.mark.chaos

StartWalacord = Callable[..., Scenario]

# Down after two failed runs: up to one 1 s interval, the 0.8 s deadline of a hung
# run and a second run at the fast interval, with margin for shared CI cores.
DETECTION_S = 4.0
# Up after two good runs at the fast interval plus the probe's and the mode's minimum
# dwell of 1 s each, with margin.
RECOVERY_S = 5.0
BOUNDS = Bounds(DETECTION_S, RECOVERY_S)
DEGRADED_PATH = ["normal", "degraded", "normal"]


def walacor_settings(url: str) -> dict[str, dict[str, Any]]:
    return {
        "walacor": {"url": url, "username": USER[0], "password": USER[1],
                    "connect_timeout": 0.5, "read_timeout": 0.7, "request_timeout": 0.8},
        "probes.walacor": {"interval": 1.0, "timeout": 0.8, "fast_interval": 0.2},
    }


@pytest.fixture
def watched(pg_db: str, emulator: EmulatorProcess,
            start_walacord: StartWalacord) -> Scenario:
    scenario = start_walacord(pg_db, settings=walacor_settings(emulator.url))
    scenario.wait_normal()
    return scenario


def run_fault(scenario: Scenario, emulator: EmulatorProcess, rules: list[dict[str, Any]],
              hold: float = 2.0) -> Fault:
    """Set the rules, wait for detection, hold, clear them and wait for recovery."""
    fault = scenario.fault()
    emulator.set_faults(*rules)
    fault.wait_detected()
    scenario.hold(hold)
    emulator.clear_faults()
    fault.wait_recovered()
    return fault


@pytest.mark.parametrize(("name", "rule"), [
    ("walacor_5xx_burst", {"status": 503, "path": "/api/"}),
    ("walacor_hang", {"mode": "hang", "path": "/api/"}),
    ("walacor_trickle", {"mode": "trickle", "trickle_interval_ms": 300, "path": "/api/"}),
    ("walacor_connection_reset", {"mode": "reset", "path": "/api/"}),
    ("walacor_success_false", {"mode": "success_false", "path": "/api/schemas"}),
])
def test_walacor_fault_degrades(name: str, rule: dict[str, Any], watched: Scenario,
                                emulator: EmulatorProcess,
                                chaos_results: ResultsFile) -> None:
    fault = run_fault(watched, emulator, [rule])
    walacor = watched.probe("walacor")

    chaos_results.record(
        name, description=f"emulator fault {rule}",
        expected_path=DEGRADED_PATH, **fault.measured(BOUNDS),
        notes=f"probe after recovery: {walacor.get('state')} ({walacor.get('reason')})")


def test_walacor_429_with_retry_after(watched: Scenario, emulator: EmulatorProcess,
                                      chaos_results: ResultsFile) -> None:
    fault = run_fault(watched, emulator, [{"retry_after": 1, "path": "/api/"}])

    chaos_results.record(
        "walacor_429_retry_after",
        description="every request answered 429 with Retry-After: 1",
        expected_path=DEGRADED_PATH, **fault.measured(BOUNDS))


def test_walacor_single_error_is_absorbed(watched: Scenario, emulator: EmulatorProcess,
                                          chaos_results: ResultsFile) -> None:
    # One failed run is below failures_to_down (2), so the mode must not move.
    emulator.set_faults({"status": 500, "path": "/api/", "count": 1})
    began = watched.mark()
    watched.hold(4.0)
    emulator.clear_faults()

    chaos_results.record(
        "walacor_single_5xx",
        description="one 500 answer: below the probe's failure threshold",
        mode_path=watched.path(began), expected_path=["normal"])


def test_walacor_token_expiry(watched: Scenario, emulator: EmulatorProcess,
                              chaos_results: ResultsFile) -> None:
    # An expired token costs one extra login; the probe must not count it as a failure.
    logins_before = emulator.stats()["logins"]
    began = watched.mark()
    expired = 0
    for _ in range(4):
        expired += emulator.expire_tokens()
        watched.hold(1.0)
    logins_after = emulator.stats()["logins"]

    chaos_results.record(
        "walacor_token_expiry",
        description="every token revoked once a second for 4 s",
        mode_path=watched.path(began), expected_path=["normal"],
        notes=f"{expired} tokens revoked; logins {logins_before} -> {logins_after}")
    assert expired >= 1
    # The probe kept running through the revocations and logged in again.
    assert logins_after > logins_before


@pytest.fixture
def proxied_emulator(emulator: EmulatorProcess) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", emulator.port) as proxy:
        yield proxy


def test_walacor_port_blackholed(pg_db: str, emulator: EmulatorProcess,
                                 proxied_emulator: FaultProxy, start_walacord: StartWalacord,
                                 chaos_results: ResultsFile) -> None:
    scenario = start_walacord(
        pg_db, settings=walacor_settings(f"http://127.0.0.1:{proxied_emulator.port}"))
    scenario.wait_normal()

    fault = scenario.fault()
    proxied_emulator.blackhole()
    fault.wait_detected()
    scenario.hold(2.0)
    proxied_emulator.passthrough()
    fault.wait_recovered()

    chaos_results.record(
        "walacor_port_blackholed",
        description="the proxy in front of the emulator stops forwarding",
        expected_path=DEGRADED_PATH, **fault.measured(BOUNDS))


def test_postgres_and_walacor_down_is_offline(own_pg_cluster: PgCluster,
                                              emulator: EmulatorProcess,
                                              proxied_emulator: FaultProxy,
                                              start_walacord: StartWalacord,
                                              chaos_results: ResultsFile) -> None:
    scenario = start_walacord(
        own_pg_cluster.url(),
        settings=walacor_settings(f"http://127.0.0.1:{proxied_emulator.port}"))
    scenario.wait_normal()

    # Unreachable means no connection at all: the proxy resets every one to Walacor.
    fault = scenario.fault()
    proxied_emulator.reset()
    own_pg_cluster.stop("immediate")
    fault.wait_detected(accept="offline")
    own_pg_cluster.start()
    proxied_emulator.passthrough()
    fault.wait_recovered()

    # PostgreSQL alone is emergency, so the path may pass through it on the way; the
    # detection bound fails when offline is never reached.
    chaos_results.record(
        "postgres_and_walacor_unreachable",
        description="PostgreSQL stopped and every connection to Walacor reset at once",
        **fault.measured(BOUNDS))
    assert fault.path()[-1] == "normal"
