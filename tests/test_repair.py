"""Repair budgets and the application restart command."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from walacord.config import RepairConfig
from walacord.metrics import Metrics
from walacord.repair import Budget, Restarter

pytestmark = pytest.mark.anyio


def test_budget_slides() -> None:
    budget = Budget(lambda: 2, lambda: 10.0)
    budget.spend(0.0)
    budget.spend(1.0)
    assert budget.available(5.0) is False
    assert budget.available(10.5) is True
    assert budget.used(10.5) == 1


def restarter(tmp_path: Path, **settings: object) -> tuple[Restarter, CollectorRegistry, Path]:
    marker = tmp_path / "restarts.txt"
    command = [sys.executable, "-c",
               "import os, sys; open(sys.argv[1], 'a').write("
               "os.environ['WALACORD_RESTART_REASON'] + '\\n')", str(marker)]
    config = RepairConfig(restart_command=command, **settings)  # type: ignore[arg-type]
    registry = CollectorRegistry()
    return Restarter(lambda: config, Metrics(registry)), registry, marker


async def test_restarter_runs_command(tmp_path: Path) -> None:
    restart, registry, marker = restarter(tmp_path)
    result = await restart.restart("API probe down")
    assert result["restarted"] is True
    assert marker.read_text() == "API probe down\n"
    assert registry.get_sample_value("walacord_app_restarts_total", {"result": "ok"}) == 1


async def test_restarter_budget_stops(tmp_path: Path) -> None:
    restart, registry, marker = restarter(tmp_path, restart_budget=2, restart_window=3600)
    results = [await restart.restart("down") for _ in range(3)]
    assert [r["restarted"] for r in results] == [True, True, False]
    assert "restarting stopped" in results[2]["error"]
    assert restart.snapshot()["budget_exhausted"] is True
    assert len(marker.read_text().splitlines()) == 2
    assert registry.get_sample_value("walacord_app_restarts_total", {"result": "refused"}) == 1


async def test_restarter_timeout_counts_failure(tmp_path: Path) -> None:
    config = RepairConfig(restart_command=[sys.executable, "-c", "import time; time.sleep(30)"],
                          restart_timeout=0.3)
    registry = CollectorRegistry()
    restart = Restarter(lambda: config, Metrics(registry))
    result = await restart.restart("down")
    assert result["restarted"] is False
    assert result["exit_code"] is None
    assert registry.get_sample_value("walacord_app_restarts_total", {"result": "failed"}) == 1


def test_restarter_due_after_delay(tmp_path: Path) -> None:
    restart, _, _ = restarter(tmp_path, restart_after=30)
    assert restart.due(10) is False
    assert restart.due(31) is True
    unconfigured = Restarter(lambda: RepairConfig(), Metrics(CollectorRegistry()))
    assert unconfigured.due(1000) is False
