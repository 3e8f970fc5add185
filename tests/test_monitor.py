"""The daemon's main job end to end: real PostgreSQL, the emulator, the HTTP server."""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import anyio
import httpx
import orjson
import psycopg
import pytest

from tests.conftest import daemon_config, running_daemon, wait_until
from walacord.alerts.rules import HOST_RESOURCE, RECYCLE_BUDGET_EXHAUSTED
from walacord.alerts.service import AlertService
from walacord.config import HostProbeConfig, HttpCheckConfig, ProbesConfig, RepairConfig
from walacord.emulator import Emulator
from walacord.errors import PoolRecycleError
from walacord.monitor import Monitor
from walacord.pgcluster import PgCluster, free_port
from walacord.supervisor import Supervisor

pytestmark = pytest.mark.anyio


def monitor_of(supervisor: Supervisor) -> Monitor:
    monitor = supervisor.runtime.components["monitor"]
    assert isinstance(monitor, Monitor)
    return monitor


def base_url(supervisor: Supervisor) -> str:
    return f"http://{supervisor.runtime.config.http.listen}"


async def wait_for_mode(monitor: Monitor, mode: str, limit: float) -> float:
    """Wait until the mode is `mode`; return the seconds it took."""
    try:
        return await wait_until(lambda: monitor.modes.mode.value == mode, limit, step=0.002)
    except TimeoutError:
        database = monitor.status()["probes"]["database"]
        raise AssertionError(f"mode still {monitor.modes.mode.value} after {limit}s, not "
                             f"{mode}: {monitor.modes.reason} database={database} "
                             f"pool={monitor.recycler.snapshot()}") from None


async def test_monitor_normal_with_emulator(pg_db: str, walacor_emulator: Emulator,
                                            tmp_path: Path) -> None:
    config = daemon_config(tmp_path, pg_db, walacor_emulator.url)
    async with running_daemon(config) as supervisor, httpx.AsyncClient() as http:
        response = await http.get(f"{base_url(supervisor)}/api/health")
    document = response.json()
    assert response.status_code == 200
    assert document["mode"] == "normal", document["reason"]
    assert document["probes"]["database"]["healthy"] is True
    assert document["probes"]["walacor"]["healthy"] is True
    assert document["probes"]["api"]["state"] == "not_configured"
    assert document["probes"]["host"]["state"] == "up"


async def test_monitor_host_levels_reach_alerts(pg_db: str, tmp_path: Path) -> None:
    # Memory above 0% used is a warning, so the host probe reports it on every run.
    host = HostProbeConfig(load_warning_per_cpu=1000, memory_warning_percent=0,
                           memory_critical_percent=100, interval=0.05, fast_interval=0.05)
    config = daemon_config(tmp_path, pg_db, probes=ProbesConfig(host=host))
    async with running_daemon(config) as supervisor:
        monitor = monitor_of(supervisor)
        alerts = supervisor.runtime.components["alerts"]
        assert isinstance(alerts, AlertService)

        def memory_alerts() -> set[str]:
            return {alert.labels["severity"] for alert in alerts.engine.alerts.values()
                    if alert.alertname == HOST_RESOURCE
                    and alert.labels.get("resource") == "memory"}

        await wait_until(lambda: memory_alerts() == {"warning"}, 10)
        # Later runs report the same level again, and the alert stays.
        runs = monitor.runners["host"].stats.runs
        await wait_until(lambda: monitor.runners["host"].stats.runs >= runs + 5, 10)
        await alerts.evaluate_once()
        assert memory_alerts() == {"warning"}

        # A reloaded threshold ends the warning, and the alert goes with it.
        lifted = dataclasses.replace(host, memory_warning_percent=100)
        supervisor.runtime.config = dataclasses.replace(
            config, probes=dataclasses.replace(config.probes, host=lifted))
        await wait_until(lambda: memory_alerts() == set(), 10)


async def test_monitor_writes_performance_log(pg_db: str, tmp_path: Path) -> None:
    from walacord import logs
    from walacord.config import LoggingConfig

    log_dir = tmp_path / "log"
    logs.setup("info", str(log_dir))
    try:
        config = daemon_config(tmp_path, pg_db, logging=LoggingConfig(
            dir=str(log_dir), performance_interval=1.0))
        async with running_daemon(config):
            await anyio.sleep(2.5)
    finally:
        logs.shutdown()
    lines = [orjson.loads(line) for line in (log_dir / logs.PERFORMANCE_FILE).read_text()
             .splitlines()]
    assert lines, "performance.log is empty"
    assert {line["event"] for line in lines} == {"performance.summary"}
    assert "p99" in lines[-1]["probes"]["database"]["latency_seconds"]


@pytest.mark.anyio
async def test_monitor_stop_and_start(own_pg_cluster: PgCluster, walacor_emulator: Emulator,
                                      tmp_path: Path) -> None:
    config = daemon_config(tmp_path, own_pg_cluster.url(), walacor_emulator.url)
    async with running_daemon(config) as supervisor, httpx.AsyncClient() as http:
        monitor = monitor_of(supervisor)
        assert monitor.modes.mode.value == "normal"

        began = time.monotonic()
        await anyio.to_thread.run_sync(lambda: own_pg_cluster.stop("immediate"))
        await wait_for_mode(monitor, "emergency", 5)
        detection = time.monotonic() - began
        response = await http.get(f"{base_url(supervisor)}/api/health")
        assert response.status_code == 503
        assert response.json()["status"] == "unavailable"

        await anyio.to_thread.run_sync(own_pg_cluster.start)
        recovery = await wait_for_mode(monitor, "normal", 3)
        response = await http.get(f"{base_url(supervisor)}/api/health")
        assert response.status_code == 200
    assert detection < 0.5
    print(f"detection {detection:.3f}s, recovery after start {recovery:.3f}s")


@pytest.mark.slow
async def test_monitor_detection_median_ten_runs(own_pg_cluster: PgCluster,
                                                 walacor_emulator: Emulator,
                                                 tmp_path: Path) -> None:
    # Ten outages in a row would mark the probe as flapping and spend the recycle
    # budget. Both are tested on their own, so they are lifted here.
    config = daemon_config(tmp_path, own_pg_cluster.url(), walacor_emulator.url,
                           repair=RepairConfig(recycle_budget_per_hour=100))
    probes = dataclasses.replace(config.probes, database=dataclasses.replace(
        config.probes.database, flap_threshold=1000))
    config = dataclasses.replace(config, probes=probes)
    detections, recoveries = [], []
    async with running_daemon(config) as supervisor:
        monitor = monitor_of(supervisor)
        for _ in range(10):
            await wait_for_mode(monitor, "normal", 10)
            # Timed from the moment pg_ctl is asked to stop the server.
            began = time.monotonic()
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync,
                              lambda: own_pg_cluster.stop("immediate"))
                await wait_for_mode(monitor, "emergency", 5)
                detections.append(time.monotonic() - began)
            await anyio.to_thread.run_sync(own_pg_cluster.start)
            recoveries.append(await wait_for_mode(monitor, "normal", 3))
    median = statistics.median(detections)
    print(f"detection median {median:.3f}s max {max(detections):.3f}s; recovery median "
          f"{statistics.median(recoveries):.3f}s max {max(recoveries):.3f}s")
    assert median < 0.5
    assert max(recoveries) < 3


async def test_monitor_read_only_recycles(own_pg_cluster: PgCluster, tmp_path: Path) -> None:
    config = daemon_config(tmp_path, own_pg_cluster.url())
    async with running_daemon(config) as supervisor:
        monitor = monitor_of(supervisor)
        registry = supervisor.runtime.registry
        own_pg_cluster.psql("ALTER SYSTEM SET default_transaction_read_only = on")
        own_pg_cluster.reload()
        await wait_for_mode(monitor, "emergency", 10)
        await wait_until(lambda: monitor.recycler.count >= 1, 10)
        report = monitor.probe_report("database")
        recycles = registry.get_sample_value("walacord_db_pool_recycles_total",
                                             {"reason": "read_only"})

        own_pg_cluster.psql("ALTER SYSTEM RESET default_transaction_read_only")
        own_pg_cluster.reload()
        await wait_for_mode(monitor, "normal", 10)
    assert report["reason"] == "read_only"
    assert "queries pass" in report["message"]
    assert recycles == 1
    assert monitor.recycler.last is not None
    assert monitor.recycler.last["healthy_after"] is True
    assert "pool_size" in monitor.recycler.last["pool_before"]


async def test_monitor_smart_shutdown_releases_pool(own_pg_cluster: PgCluster,
                                                    tmp_path: Path) -> None:
    config = daemon_config(tmp_path, own_pg_cluster.url())
    probes = dataclasses.replace(config.probes, database=dataclasses.replace(
        config.probes.database, fresh_connection_every=0.5))
    config = dataclasses.replace(config, probes=probes)
    async with running_daemon(config) as supervisor:
        monitor = monitor_of(supervisor)
        began = time.monotonic()
        # A smart shutdown waits for every session; it must finish because walacord
        # lets go of its pool and its LISTEN connection.
        await anyio.to_thread.run_sync(lambda: own_pg_cluster.stop("smart", timeout=20))
        elapsed = time.monotonic() - began
        await wait_for_mode(monitor, "emergency", 5)
    assert elapsed < 10
    print(f"smart shutdown finished in {elapsed:.2f}s")


async def test_monitor_recycle_budget(pg_db: str, tmp_path: Path) -> None:
    config = daemon_config(tmp_path, pg_db, repair=RepairConfig(recycle_budget_per_hour=1))
    async with running_daemon(config) as supervisor:
        monitor = monitor_of(supervisor)
        first = await monitor.recycle_pool("stuck after the 02:00 deploy")
        with pytest.raises(PoolRecycleError, match="budget") as refused:
            await monitor.recycle_pool("still stuck")
        registry = supervisor.runtime.registry
        engine = supervisor.runtime.components["alerts"].engine
        active = engine._active_conditions(time.monotonic()).values()
    assert first["recycled"] is True
    assert "not recycled" in str(refused.value)
    assert monitor.recycler.snapshot()["budget_exhausted"] is True
    assert first["reason"] == "stuck after the 02:00 deploy"
    # The operator's text stays out of the label, so each request adds no series.
    assert registry.get_sample_value("walacord_db_pool_recycles_total",
                                     {"reason": "manual"}) == 1
    assert registry.get_sample_value("walacord_db_pool_recycles_refused_total",
                                     {"reason": "manual"}) == 1
    assert any(c.alertname == RECYCLE_BUDGET_EXHAUSTED for c in active)


async def test_monitor_override_and_clear(pg_db: str, tmp_path: Path) -> None:
    async with running_daemon(daemon_config(tmp_path, pg_db)) as supervisor:
        monitor = monitor_of(supervisor)
        set_result = monitor.set_mode("offline", "database maintenance", 60)
        during = supervisor.runtime.status_line()
        cleared = monitor.clear_mode()
    assert set_result["mode"] == "offline"
    assert set_result["override"]["reason"] == "database maintenance"
    assert "mode offline" in during
    assert cleared["cleared"] is True
    assert cleared["mode"] == "normal"


async def test_monitor_short_override_expires(pg_db: str, tmp_path: Path) -> None:
    # The loop wakes when the override ends, not at its next idle evaluation.
    async with running_daemon(daemon_config(tmp_path, pg_db)) as supervisor:
        monitor = monitor_of(supervisor)
        await wait_for_mode(monitor, "normal", 10)
        monitor.set_mode("degraded", "short drill", 0.3)
        took = await wait_for_mode(monitor, "normal", 3)
    # Without a wake at the end, an idle loop would notice it up to 1 s (EVALUATE_EVERY) late.
    assert took < 0.3 + 0.2


async def test_monitor_control_protocols(pg_db: str, tmp_path: Path) -> None:
    async with running_daemon(daemon_config(tmp_path, pg_db)) as supervisor:
        monitor = monitor_of(supervisor)
        states = monitor.probe_states()
        ran = await monitor.run_probes(["database", "host"])
        forced = await monitor.set_override("degraded", 60, "load test", "uid=0 pid=1")
        cleared = await monitor.clear_override("uid=0 pid=1")
    assert states["database"]["healthy"] is True
    assert states["api"]["healthy"] is None
    assert states["api"]["reason"] == "not configured"
    assert set(ran) == {"database", "host"}
    assert forced["mode"] == "degraded"
    assert forced["override"]["set_by"] == "uid=0 pid=1"
    assert 0 < forced["override"]["remaining_seconds"] <= 60
    assert cleared["override"] is None
    assert cleared["mode"] == "normal"


async def test_monitor_unconfigured_probe_not_healthy(pg_db: str, walacor_emulator: Emulator,
                                                      tmp_path: Path) -> None:
    """The unconfigured api probe reads the same in status, check, /metrics and /api/health."""
    from tests.control.harness import walacorctl

    config = daemon_config(tmp_path, pg_db, walacor_emulator.url)
    socket = Path(config.control.socket)
    async with running_daemon(config) as supervisor, httpx.AsyncClient() as http:
        await monitor_of(supervisor).run_probes(["api", "database", "walacor", "host"])
        status = await anyio.to_thread.run_sync(
            lambda: walacorctl("--json", "status", socket=socket))
        check = await anyio.to_thread.run_sync(lambda: walacorctl("check", socket=socket))
        table = await anyio.to_thread.run_sync(lambda: walacorctl("status", socket=socket))
        metrics = (await http.get(f"{base_url(supervisor)}/metrics")).text
        health = (await http.get(f"{base_url(supervisor)}/api/health")).json()

    assert status.returncode == 0, status.stderr
    api = orjson.loads(status.stdout)["probes"]["api"]
    assert api["healthy"] is None
    assert api["reason"] == "not configured"
    assert api["latency_seconds"] is None
    assert check.returncode == 0, check.stdout + check.stderr
    assert "(not configured: api) |" in check.stdout
    assert "probes_healthy=3;;;0;3" in check.stdout
    assert "api_latency" not in check.stdout
    api_row = next(line for line in table.stdout.splitlines() if line.startswith("api "))
    assert api_row.split()[1:3] == ["not", "configured"]
    assert 'walacord_probe_success{probe="api"}' not in metrics
    assert 'walacord_probe_up{probe="api"}' not in metrics
    assert 'walacord_probe_success{probe="database"} 1.0' in metrics
    assert health["probes"]["api"]["healthy"] is None


async def test_monitor_pooled_connection_killed(pg_db: str, tmp_path: Path) -> None:
    async with running_daemon(daemon_config(tmp_path, pg_db)) as supervisor:
        monitor = monitor_of(supervisor)
        with psycopg.connect(pg_db, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE application_name = 'walacord' AND pid <> pg_backend_pid()")
        # Broken pooled connections while the server is fine: the pool is recycled.
        await wait_until(lambda: monitor.recycler.count >= 1, 10)
        await wait_for_mode(monitor, "normal", 10)
    assert monitor.recycler.last is not None
    assert monitor.recycler.last["reason"] == "broken_connections"


async def test_monitor_restarts_app_within_budget(pg_db: str, tmp_path: Path) -> None:
    marker = tmp_path / "restarts.txt"
    command = [sys.executable, "-c", "import sys; open(sys.argv[1], 'a').write('x\\n')",
               str(marker)]
    config = daemon_config(tmp_path, pg_db, repair=RepairConfig(
        restart_command=command, restart_after=0.3, restart_budget=2, restart_window=3600))
    api = dataclasses.replace(config.probes.api, interval=0.5, timeout=0.3, fast_interval=0.1,
                              checks=[HttpCheckConfig(url=f"http://127.0.0.1:{free_port()}/")])
    config = dataclasses.replace(config, probes=dataclasses.replace(config.probes, api=api))
    async with running_daemon(config) as supervisor, httpx.AsyncClient() as http:
        monitor = monitor_of(supervisor)
        await wait_until(lambda: monitor.restarter.snapshot()["budget_exhausted"], 10)
        document = (await http.get(f"{base_url(supervisor)}/api/health")).json()
    assert len(marker.read_text().splitlines()) == 2
    assert document["mode"] == "degraded"
    assert document["repair"]["restart"]["budget_exhausted"] is True
    assert document["repair"]["restart"]["restarts"] == 2


async def test_monitor_all_remote_down_checks_host(tmp_path: Path) -> None:
    # Nothing listens on either port, so every remote probe fails at once.
    dead_database = f"postgresql://nobody:pw@127.0.0.1:{free_port()}/postgres"
    dead_walacor = f"http://127.0.0.1:{free_port()}"
    config = daemon_config(tmp_path, dead_database, dead_walacor)
    async with running_daemon(config) as supervisor:
        monitor = monitor_of(supervisor)
        await wait_for_mode(monitor, "offline", 10)
        await wait_until(lambda: "local_causes" in monitor.probe_report("host")["details"], 10)
        host = monitor.probe_report("host")
    assert monitor.modes.reason.startswith("PostgreSQL (refused) and Walacor")
    # This host has no local cause, so the host probe stays up with an empty list.
    assert host["details"]["local_causes"] == []
    assert host["state"] == "up"
