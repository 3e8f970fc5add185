"""End to end: PostgreSQL stops, walacord's alert reaches a real Alertmanager, then resolves.

Everything runs on loopback with free ports and temporary directories:

- a private PostgreSQL cluster;
- Alertmanager (Debian `prometheus-alertmanager`) with a webhook receiver the test owns;
- Prometheus (Debian `prometheus`) scraping walacord's /metrics with the shipped rules;
- walacord with its Alertmanager sink.

When `walacord.probes` exists, walacord runs as the real daemon (`walacord run`) and
its own database probe feeds the alert. Until then, walacord's HTTP server and alerts
component run in-process, and a PostgreSQL connectivity check written here sets
`walacord_probe_success{probe="database"}` in walacord's registry, the metric the
probes export, so the alert still comes from walacord's own rule path.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import psycopg
import pytest
import yaml
from aiohttp import web
from prometheus_client import Gauge

from walacord import logs
from walacord.alerts.service import AlertService
from walacord.pgcluster import PgCluster, free_port
from walacord.web import WebServer

from .conftest import make_runtime

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

RULES = Path(__file__).resolve().parents[2] / "packaging" / "prometheus" / "walacord-rules.yml"
HAVE_PROBES = importlib.util.find_spec("walacord.probes") is not None

# The connectivity check runs every CHECK_INTERVAL with a CONNECT_TIMEOUT, and the
# alert fires after PROBE_DOWN_FOR, checked every EVALUATION_INTERVAL. The bounds add
# DELIVERY_MARGIN for the POST, Alertmanager's processing and a loaded CI machine.
# This test measured about 1.3 s to firing and 0.3 s to resolved on a 2-core VM.
CHECK_INTERVAL = 0.3
CONNECT_TIMEOUT = 2
PROBE_DOWN_FOR = 1.0
EVALUATION_INTERVAL = 0.2
DELIVERY_MARGIN = 5.0
FIRING_BOUND = CHECK_INTERVAL + CONNECT_TIMEOUT + PROBE_DOWN_FOR + EVALUATION_INTERVAL \
    + DELIVERY_MARGIN
RESOLVED_BOUND = CHECK_INTERVAL + CONNECT_TIMEOUT + EVALUATION_INTERVAL + DELIVERY_MARGIN
ALERTS_SETTINGS = {
    "evaluation_interval": EVALUATION_INTERVAL, "probe_down_for": PROBE_DOWN_FOR,
    "repeat_interval": 3600.0, "retry_initial": 0.2, "retry_max": 1.0,
    "mode_not_normal_for": 1.0,
}


# --- Alertmanager and Prometheus processes ---------------------------------------------


class Process:
    """A server process the test started, with its output in `log`."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv = argv
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        handle = open(self.log, "ab")  # noqa: SIM115 - the child keeps writing to it
        self.proc = subprocess.Popen(self.argv, stdout=handle, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        handle.close()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def wait_http(url: str, process: Process, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert process.proc is not None and process.proc.poll() is None, process.output()
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{url} not ready after {within}s:\n{process.output()}")


class Alertmanager:
    def __init__(self, base: Path, webhook_url: str) -> None:
        binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
        if binary is None:
            pytest.fail("Alertmanager not found: install the Debian package "
                        "prometheus-alertmanager")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base.mkdir(parents=True, exist_ok=True)
        config = base / "alertmanager.yml"
        # YAML is a superset of JSON, so the config is written as JSON.
        config.write_text(json.dumps({
            "route": {"receiver": "test", "group_by": ["alertname", "probe"],
                      "group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [{"name": "test", "webhook_configs": [
                {"url": webhook_url, "send_resolved": True}]}],
        }))
        self.process = Process([
            binary, f"--config.file={config}", f"--storage.path={base / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--cluster.listen-address=",  # no gossip port: a single, loopback-only instance
        ], base / "alertmanager.log")

    def start(self) -> None:
        self.process.start()
        wait_http(f"{self.url}/-/ready", self.process)

    def stop(self) -> None:
        self.process.stop()

    def alerts(self, alertname: str) -> list[dict[str, Any]]:
        """Return the active alerts with `alertname` that walacord sent (no `job` label)."""
        response = httpx.get(f"{self.url}/api/v2/alerts",
                             params={"filter": f'alertname="{alertname}"'}, timeout=5.0)
        response.raise_for_status()
        return [a for a in response.json() if "job" not in a["labels"]]


class Prometheus:
    def __init__(self, base: Path, target: str, alertmanager: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("Prometheus not found: install the Debian package prometheus")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base.mkdir(parents=True, exist_ok=True)
        config = base / "prometheus.yml"
        config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
            "scrape_configs": [{"job_name": "walacord",
                                "static_configs": [{"targets": [target]}]}],
        }))
        self.process = Process([
            binary, f"--config.file={config}", f"--storage.tsdb.path={base / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ], base / "prometheus.log")

    def start(self) -> None:
        self.process.start()
        wait_http(f"{self.url}/-/ready", self.process)

    def stop(self) -> None:
        self.process.stop()

    def alerting_rules(self) -> list[str]:
        response = httpx.get(f"{self.url}/api/v1/rules", params={"type": "alert"}, timeout=5.0)
        response.raise_for_status()
        return [rule["name"] for group in response.json()["data"]["groups"]
                for rule in group["rules"]]

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5.0)
        response.raise_for_status()
        return list(response.json()["data"]["result"])


# --- the webhook receiver behind Alertmanager -------------------------------------------


class Webhook:
    """A loopback webhook recording Alertmanager's notifications: (status, alertname, probe)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.received: list[tuple[str, str, str]] = []

    async def _hook(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        for alert in body.get("alerts", []):
            labels = alert["labels"]
            if "job" not in labels:
                self.received.append((alert["status"], labels.get("alertname", ""),
                                      labels.get("probe", "")))
        return web.Response(text="ok")

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[Webhook]:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            yield self
        finally:
            await runner.cleanup()


# --- walacord -----------------------------------------------------------------------------


@asynccontextmanager
async def walacord_in_process(state: Path, log_dir: Path, database_url: str, http_port: int,
                              alertmanager_url: str) -> AsyncIterator[Callable[[], float]]:
    """Run walacord's HTTP server and alerts component plus the test's database check.

    Yields a function returning the delivery failures counted so far.
    """
    logs.setup("info", str(log_dir))
    runtime = make_runtime(state, alertmanager_url=alertmanager_url, **ALERTS_SETTINGS)
    runtime.config = runtime.config.__class__(
        **{**runtime.config.__dict__,
           "http": runtime.config.http.__class__(listen=f"127.0.0.1:{http_port}")})
    success = Gauge("walacord_probe_success", "1 when the last probe succeeded.",
                    ["probe"], registry=runtime.registry)

    async def check_database() -> None:
        while True:
            try:
                with anyio.fail_after(CONNECT_TIMEOUT + 1):
                    conn = await psycopg.AsyncConnection.connect(
                        database_url, connect_timeout=CONNECT_TIMEOUT, autocommit=True)
                    async with conn:
                        await conn.execute("SELECT 1")
                success.labels(probe="database").set(1)
            except (psycopg.Error, TimeoutError, OSError):
                success.labels(probe="database").set(0)
            await anyio.sleep(CHECK_INTERVAL)

    def failures() -> float:
        value = runtime.registry.get_sample_value(
            "walacord_alert_deliveries_total", {"sink": "alertmanager", "result": "failure"})
        return value or 0.0

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(WebServer(runtime).run)
            await tg.start(AlertService(runtime).run)
            tg.start_soon(check_database)
            yield failures
            tg.cancel_scope.cancel()
    finally:
        logs.shutdown()


@asynccontextmanager
async def walacord_daemon(state: Path, log_dir: Path, database_url: str, http_port: int,
                          alertmanager_url: str) -> AsyncIterator[Callable[[], float]]:
    """Run `walacord run` with its own probes; yields the delivery failures from /metrics."""
    settings = "\n".join(f"{key} = {json.dumps(value)}" for key, value in ALERTS_SETTINGS.items())
    config = state / "walacord.toml"
    config.write_text(f"""
[database]
url = {json.dumps(database_url)}
[http]
listen = "127.0.0.1:{http_port}"
[state]
dir = {json.dumps(str(state))}
[logging]
dir = {json.dumps(str(log_dir))}
[control]
socket = {json.dumps(str(state / "control.sock"))}
[alerts]
alertmanager_url = {json.dumps(alertmanager_url)}
{settings}
""")
    daemon = Process([sys.executable, "-m", "walacord", "run", "--config", str(config)],
                     state / "daemon.log")
    daemon.start()
    try:
        await anyio.to_thread.run_sync(wait_http, f"http://127.0.0.1:{http_port}/readyz", daemon)

        def failures() -> float:
            text = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=5).text
            for line in text.splitlines():
                if line.startswith("walacord_alert_deliveries_total{") and \
                        'sink="alertmanager"' in line and 'result="failure"' in line:
                    return float(line.rsplit(" ", 1)[1])
            return 0.0

        yield failures
    finally:
        await anyio.to_thread.run_sync(daemon.stop)


# --- the test -----------------------------------------------------------------------------


def alert_log_events(log_dir: Path, alertname: str, probe: str) -> list[str]:
    if logs._current is not None:
        logs._current._queue.join()
        for handler in logs._current.file_handlers:
            handler.flush()
    path = log_dir / logs.ALERT_FILE
    lines = [orjson.loads(line) for line in path.read_text().splitlines()] if path.exists() \
        else []
    return [line["event"] for line in lines
            if line.get("alertname") == alertname and line["labels"].get("probe") == probe]


async def wait_until(predicate: Callable[[], Any], within: float, what: str) -> float:
    """Poll `predicate` in a thread until truthy; return the seconds it took."""
    began = time.monotonic()
    while True:
        if await anyio.to_thread.run_sync(predicate):
            return time.monotonic() - began
        if time.monotonic() - began > within:
            pytest.fail(f"{what} not seen within {within}s")
        await anyio.sleep(0.2)


async def test_e2e_database_alert_reaches_alertmanager(
        own_pg_cluster: PgCluster, tmp_path: Path) -> None:
    webhook = Webhook()
    http_port = free_port()
    alertmanager = Alertmanager(tmp_path / "am", webhook.url)
    prometheus = Prometheus(tmp_path / "prom", f"127.0.0.1:{http_port}",
                            f"127.0.0.1:{alertmanager.port}")
    log_dir = tmp_path / "logs"
    state = tmp_path / "state"
    state.mkdir()
    run_walacord = walacord_daemon if HAVE_PROBES else walacord_in_process
    name, probe = "WalacordProbeDown", "database"

    def walacord_alert_active() -> bool:
        return any(a["labels"].get("probe") == probe and a["status"]["state"] == "active"
                   for a in alertmanager.alerts(name))

    def walacord_alert_gone() -> bool:
        return not any(a["labels"].get("probe") == probe for a in alertmanager.alerts(name))

    async with webhook.serving():
        await anyio.to_thread.run_sync(alertmanager.start)
        try:
            async with run_walacord(state, log_dir, own_pg_cluster.url(), http_port,
                                    alertmanager.url) as delivery_failures:
                await anyio.to_thread.run_sync(prometheus.start)
                try:
                    # Step 1: Prometheus scrapes walacord and reads the database probe as up.
                    await wait_until(lambda: prometheus.query(
                        'walacord_probe_success{job="walacord",probe="database"} == 1'),
                        30, "Prometheus scraping walacord with the database up")
                    loaded = await anyio.to_thread.run_sync(prometheus.alerting_rules)
                    shipped = [rule["alert"] for group in yaml.safe_load(RULES.read_text())
                               ["groups"] for rule in group["rules"]]
                    assert sorted(loaded) == sorted(shipped)

                    # Step 2: stop PostgreSQL; the alert fires in Alertmanager once.
                    await anyio.to_thread.run_sync(own_pg_cluster.stop, "immediate")
                    fired_after = await wait_until(walacord_alert_active, FIRING_BOUND,
                                                   "the database alert in Alertmanager")
                    await wait_until(lambda: prometheus.query(
                        'walacord_probe_success{job="walacord",probe="database"} == 0'),
                        10, "Prometheus seeing the database probe fail")
                    await anyio.sleep(2)  # about ten more evaluations while still down

                    # Step 3: restart PostgreSQL; the alert resolves.
                    await anyio.to_thread.run_sync(own_pg_cluster.start)
                    resolved_after = await wait_until(walacord_alert_gone, RESOLVED_BOUND,
                                                      "the database alert resolved")
                    await wait_until(lambda: ("resolved", name, probe) in webhook.received,
                                     10, "Alertmanager's resolved notification")

                    assert fired_after <= FIRING_BOUND
                    assert resolved_after <= RESOLVED_BOUND
                    assert alert_log_events(log_dir, name, probe) == [
                        "alert.firing", "alert.resolved"]
                    assert ("firing", name, probe) in webhook.received

                    # Step 4: stop Alertmanager, then PostgreSQL. The firing alert waits
                    # in alerts.db while delivery fails.
                    failures_before = await anyio.to_thread.run_sync(delivery_failures)
                    await anyio.to_thread.run_sync(alertmanager.stop)
                    await anyio.to_thread.run_sync(own_pg_cluster.stop, "immediate")
                    await wait_until(
                        lambda: alert_log_events(log_dir, name, probe).count("alert.firing")
                        == 2, FIRING_BOUND, "the second firing in alerts.log")
                    await wait_until(lambda: delivery_failures() > failures_before, 10,
                                     "a failed delivery while Alertmanager is down")

                    # Step 5: Alertmanager comes back and receives the queued alert.
                    await anyio.to_thread.run_sync(alertmanager.start)
                    await wait_until(walacord_alert_active, FIRING_BOUND,
                                     "the queued alert delivered to Alertmanager")

                    # Step 6: PostgreSQL comes back; the alert resolves again.
                    await anyio.to_thread.run_sync(own_pg_cluster.start)
                    await wait_until(walacord_alert_gone, RESOLVED_BOUND,
                                     "the second alert resolved")
                    assert alert_log_events(log_dir, name, probe) == [
                        "alert.firing", "alert.resolved", "alert.firing", "alert.resolved"]
                finally:
                    await anyio.to_thread.run_sync(prometheus.stop)
        finally:
            await anyio.to_thread.run_sync(alertmanager.stop)
