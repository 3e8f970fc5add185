"""Fixtures for the alert tests: a runtime on a temporary state dir and an HTTP receiver."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from walacord import logs
from walacord.config import AlertsConfig, Config, StateConfig
from walacord.metrics import Metrics
from walacord.pgcluster import PgCluster, free_port
from walacord.runtime import Runtime
from walacord.systemd import Notifier


def make_runtime(state_dir: Path, **alerts: Any) -> Runtime:
    config = Config(state=StateConfig(dir=str(state_dir)),
                    alerts=dataclasses.replace(AlertsConfig(), **alerts))
    registry = CollectorRegistry()
    return Runtime(config=config, config_path=None, registry=registry,
                   metrics=Metrics(registry), notifier=Notifier({}))


class Receiver:
    """A loopback HTTP server that records `POST /api/v2/alerts` bodies, as Alertmanager's."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.batches: list[list[dict[str, Any]]] = []
        self.status = 200
        self._runner: web.AppRunner | None = None

    async def _post(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        if self.status == 200:
            self.batches.append(body)
        return web.Response(status=self.status, text="" if self.status == 200 else "busy")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/api/v2/alerts", self._post)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def alerts(self) -> list[dict[str, Any]]:
        return [alert for batch in self.batches for alert in batch]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A receiver on a free port, not yet started: call `await receiver.start()`."""
    server = Receiver(free_port())
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def alert_log_dir(tmp_path: Path) -> Iterator[Path]:
    """Install walacord's JSON logging into a temporary directory; yields the directory."""
    directory = tmp_path / "logs"
    logs.setup("info", str(directory), repeat_window=60.0)
    try:
        yield directory
    finally:
        logs.shutdown()


def read_alert_log(directory: Path) -> list[dict[str, Any]]:
    """Flush the log pipeline and return the alerts.log lines as dicts."""
    if logs._current is not None:
        logs._current._queue.join()
        for handler in logs._current.file_handlers:
            handler.flush()
    path = directory / logs.ALERT_FILE
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def own_pg_cluster() -> Iterator[PgCluster]:
    """A cluster of the test's own, for tests that stop and restart the server.

    NOTE: this replaces the shared fixture of the same name, whose directory under
    pytest's 0700 /tmp/pytest-of-root cannot be entered by the unprivileged user that
    runs PostgreSQL when the tests run as root. mkdtemp directly under /tmp can.
    """
    base = Path(tempfile.mkdtemp(prefix="walacord-pg-"))
    cluster = PgCluster(base)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)
