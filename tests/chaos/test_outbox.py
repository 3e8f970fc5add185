"""Outbox scenarios: nothing acknowledged is lost and nothing reaches Walacor twice.

Operations go in through the control socket (`outbox.enqueue`), as an application
would send them, and the emulator is then asked how many rows each key has. An
operation counts as acknowledged once `outbox.enqueue` returned it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from tests.chaos.daemon import control
from tests.chaos.emulator import ETID, USER, EmulatorProcess, create_schema, rows_per_key
from tests.chaos.results import ResultsFile
from tests.chaos.scenario import Scenario

pytestmark = pytest.mark.chaos

StartWalacord = Callable[..., Scenario]

OPERATIONS = 200
# Draining 200 operations after the restart, with the sync pass every 0.2 s, takes a
# few seconds; the bound leaves room for CI.
DRAIN_S = 20.0


def outbox_settings(url: str) -> dict[str, dict[str, Any]]:
    return {
        "walacor": {"url": url, "username": USER[0], "password": USER[1]},
        "probes.walacor": {"interval": 1.0, "timeout": 0.8, "fast_interval": 0.2},
        "outbox": {"sync_interval": 0.2, "retry_initial": 0.1, "retry_max": 1.0,
                   "sync_batch_min": 5, "sync_batch_max": 20},
        "lifecycle": {"drain_timeout": 2.0},
    }


def enqueue(path: str, keys: list[str]) -> set[str]:
    """Enqueue one Walacor operation per key in batches; return the acknowledged keys."""
    acked: set[str] = set()
    for start in range(0, len(keys), 50):
        batch = [{"sink": "walacor", "etid": ETID, "key": key,
                  "data": {"walacord_key": key, "amount": index}}
                 for index, key in enumerate(keys[start:start + 50], start)]
        result = control(path, "outbox.enqueue", {"operations": batch})
        acked.update(item["key"] for item in result["results"])
    return acked


def wait_drained(path: str, timeout: float) -> tuple[float | None, dict[str, Any]]:
    """Wait until nothing is pending or in flight; return (seconds, last stats)."""
    began = time.monotonic()
    stats: dict[str, Any] = {}
    while time.monotonic() - began < timeout:
        try:
            stats = control(path, "outbox.stats", timeout=5)
        except OSError:
            time.sleep(0.1)
            continue
        if stats["pending"] == 0 and stats["in_flight"] == 0:
            return time.monotonic() - began, stats
        time.sleep(0.1)
    return None, stats


def count_losses(acked: set[str], rows: Counter[str]) -> tuple[int, int]:
    lost = sum(1 for key in acked if rows[key] == 0)
    duplicated = sum(1 for key in acked if rows[key] > 1)
    return lost, duplicated


def test_outbox_sigterm_during_sync(pg_db: str, emulator: EmulatorProcess,
                                    start_walacord: StartWalacord,
                                    chaos_results: ResultsFile) -> None:
    anyio.run(create_schema, emulator.url)
    scenario = start_walacord(pg_db, settings=outbox_settings(emulator.url))
    scenario.wait_normal()
    path = scenario.daemon.sections["control"]["socket"]

    # Walacor responds slowly, so a sync pass is in flight when SIGTERM arrives.
    emulator.set_faults({"latency_ms": 300, "path": "/api/envelopes/submit"})
    acked = enqueue(path, [f"sigterm-{index}" for index in range(OPERATIONS)])
    time.sleep(0.5)
    before = control(path, "outbox.stats")
    began = scenario.mark()
    exit_code = scenario.daemon.stop(timeout=30)
    exit_s = scenario.mark() - began
    stderr = scenario.daemon.stderr_tail()

    emulator.clear_faults()
    scenario.daemon.start()
    drained_s, stats = wait_drained(path, timeout=60)
    rows = anyio.run(rows_per_key, emulator.url)
    lost, duplicated = count_losses(acked, rows)

    chaos_results.record(
        "outbox_sigterm_during_sync",
        description=f"SIGTERM while {OPERATIONS} operations sync to a slow Walacor; "
                    "restart and drain",
        detection_s=exit_s, detection_bound_s=2.0 + 3.0,
        recovery_s=drained_s, recovery_bound_s=DRAIN_S,
        lost=lost, duplicated=duplicated,
        notes=f"exit status {exit_code}; detection is SIGTERM to exit, recovery the "
              f"drain after the restart; {before['done']} of {OPERATIONS} done at SIGTERM")
    assert before["done"] < OPERATIONS, "the sync finished before SIGTERM; slow it down"
    assert exit_code == 0, stderr
    assert len(acked) == OPERATIONS
    assert stats["conserved"] is True


def test_outbox_commit_then_drop(pg_db: str, emulator: EmulatorProcess,
                                 start_walacord: StartWalacord,
                                 chaos_results: ResultsFile) -> None:
    anyio.run(create_schema, emulator.url)
    scenario = start_walacord(pg_db, settings=outbox_settings(emulator.url))
    scenario.wait_normal()
    path = scenario.daemon.sections["control"]["socket"]

    # A third of the submits are stored and then the connection drops before the
    # response, so the outbox must find the record by key instead of sending it again.
    # The first submit always drops, so a lucky random draw cannot skip the fault.
    emulator.set_faults(
        {"mode": "drop_after_commit", "count": 1, "path": "/api/envelopes/submit"},
        {"mode": "drop_after_commit", "ratio": 0.3, "path": "/api/envelopes/submit"})
    began = scenario.mark()
    acked = enqueue(path, [f"drop-{index}" for index in range(OPERATIONS)])
    drained_s, stats = wait_drained(path, timeout=60)
    emulator.clear_faults()
    submits = emulator.stats()
    rows = anyio.run(rows_per_key, emulator.url)
    lost, duplicated = count_losses(acked, rows)

    chaos_results.record(
        "walacor_commit_then_drop",
        description=f"{OPERATIONS} operations while 30 % of Walacor submits commit and "
                    "then drop the connection",
        recovery_s=drained_s, recovery_bound_s=DRAIN_S,
        lost=lost, duplicated=duplicated,
        notes=f"recovery is enqueue to drained, {scenario.mark() - began:.1f} s in all; "
              f"emulator stats {submits}")
    assert len(acked) == OPERATIONS
    assert stats["conserved"] is True
    assert submits["requests"]["/api/envelopes/submit"].get("drop_after_commit", 0) >= 1
