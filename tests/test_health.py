"""The HTTP health endpoints and /metrics, served by a running daemon."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import WALACOR_USER, daemon_config, running_daemon
from walacord.emulator import Emulator
from walacord.pgcluster import PgCluster

pytestmark = pytest.mark.anyio

ENDPOINTS = ["/api/health", "/api/health/database", "/api/health/api",
             "/api/health/walacor", "/api/health/system", "/api/health/metrics",
             "/metrics", "/livez", "/readyz"]


async def test_health_endpoints_answer(pg_db: str, walacor_emulator: Emulator,
                                       tmp_path: Path) -> None:
    config = daemon_config(tmp_path, pg_db, walacor_emulator.url)
    async with running_daemon(config), httpx.AsyncClient() as http:
        base = f"http://{config.http.listen}"
        responses = {path: await http.get(base + path) for path in ENDPOINTS}
        unknown = await http.get(base + "/api/health/nosuch")

    for path in ENDPOINTS:
        assert responses[path].status_code == 200, path
    database = responses["/api/health/database"].json()
    assert database["probe"] == "database"
    assert database["state"] == "up"
    assert database["latency_seconds"] > 0
    assert database["since"].endswith("+00:00")
    assert database["last_error"] is None
    system = responses["/api/health/system"].json()
    assert "memory_used_percent" in system["details"]
    api = responses["/api/health/api"].json()
    assert api["state"] == "not_configured"
    assert unknown.status_code == 404


async def test_health_metrics_percentiles(pg_db: str, tmp_path: Path) -> None:
    config = daemon_config(tmp_path, pg_db)
    async with running_daemon(config) as supervisor, httpx.AsyncClient() as http:
        await supervisor.runtime.components["monitor"].run_probe("database")
        document = (await http.get(f"http://{config.http.listen}/api/health/metrics")).json()
    database = document["probes"]["database"]
    assert database["runs"] >= 2
    latency = database["latency_seconds"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]


async def test_metrics_exposition_names(pg_db: str, tmp_path: Path) -> None:
    config = daemon_config(tmp_path, pg_db)
    async with running_daemon(config), httpx.AsyncClient() as http:
        text = (await http.get(f"http://{config.http.listen}/metrics")).text
    for line in ('walacord_mode{mode="normal"} 1.0', 'walacord_mode{mode="emergency"} 0.0',
                 'walacord_probe_success{probe="database"} 1.0',
                 'walacord_probe_duration_seconds_count{probe="database"}',
                 'walacord_db_pool_connections{state="idle"}',
                 "walacord_db_pool_requests_waiting", "walacord_build_info{version="):
        assert line in text, line


async def test_health_leaks_no_secret(pg_cluster: PgCluster, pg_db: str,
                                      walacor_emulator: Emulator, tmp_path: Path) -> None:
    config = daemon_config(tmp_path, pg_db, walacor_emulator.url)
    async with running_daemon(config), httpx.AsyncClient() as http:
        bodies = [(await http.get(f"http://{config.http.listen}{path}")).text
                  for path in ENDPOINTS]
    for body in bodies:
        assert pg_cluster.password not in body
        assert WALACOR_USER[1] not in body


async def test_health_503_in_emergency(own_pg_cluster: PgCluster, tmp_path: Path) -> None:
    config = daemon_config(tmp_path, own_pg_cluster.url())
    async with running_daemon(config) as supervisor, httpx.AsyncClient() as http:
        supervisor.runtime.components["monitor"].set_mode("emergency", "drill", 60)
        whole = await http.get(f"http://{config.http.listen}/api/health")
        database = await http.get(f"http://{config.http.listen}/api/health/database")
    assert whole.status_code == 503
    assert whole.json()["override"]["reason"] == "drill"
    # The component endpoint reports the probe itself, which is still up.
    assert database.status_code == 200
