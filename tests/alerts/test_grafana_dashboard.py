"""The Grafana dashboard: valid JSON, the required panels, and PromQL that parses."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

DASHBOARD = Path(__file__).resolve().parents[2] / "packaging" / "grafana" / "walacord.json"

# Metrics the dashboard may use: the ones walacord exports, plus Prometheus's `up`.
KNOWN_METRICS = {
    "up", "walacord_mode", "walacord_probe_success", "walacord_probe_duration_seconds_bucket",
    "walacord_probe_duration_seconds_sum", "walacord_probe_duration_seconds_count",
    "walacord_probe_failures_total", "walacord_db_pool_recycles_total",
    "walacord_outbox_pending_operations", "walacord_outbox_oldest_pending_age_seconds",
    "walacord_outbox_dead_operations", "walacord_backup_last_success_timestamp_seconds",
    "walacord_backup_failures_total", "walacord_alerts", "walacord_alert_deliveries_total",
    "walacord_alert_delivery_queue_length", "walacord_build_info",
}


def load() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_panels_unique_and_in_grid() -> None:
    panels = load()["panels"]
    ids = [p["id"] for p in panels]

    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]


@pytest.mark.parametrize("metric", [
    "walacord_mode", "walacord_probe_success", "walacord_probe_duration_seconds_bucket",
    "walacord_db_pool_recycles_total", "walacord_outbox_pending_operations",
    "walacord_outbox_oldest_pending_age_seconds", "walacord_backup_last_success_timestamp_seconds",
])
def test_dashboard_shows_required_metric(metric: str) -> None:
    assert any(metric in expr for expr in expressions(load()))


def test_dashboard_uses_only_known_metrics() -> None:
    used = set()
    for expr in expressions(load()):
        without_strings = re.sub(r'"[^"]*"', '""', expr)
        used |= set(re.findall(r"\b(?:walacord_[a-z_]+|up)\b(?=\{)", without_strings))

    assert used - KNOWN_METRICS == set()
    assert used


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool not found: install the Debian package prometheus")
    # Grafana's variables replaced by values, each query checked as a recording rule.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}",
         "expr": expr.replace("$__rate_interval", "5m").replace("$instance", ".*")}
        for i, expr in enumerate(expressions(load()))]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))

    result = subprocess.run([binary, "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr
