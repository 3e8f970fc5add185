"""The HTTP server: Prometheus /metrics, liveness, readiness and JSON health.

Every handler reads state the components already keep in memory, and a request never runs a
probe or waits on PostgreSQL or Walacor, so a frozen dependency cannot slow a scrape.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import anyio.lowlevel
import orjson
from aiohttp import web
from anyio.abc import TaskStatus
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from walacord import __version__
from walacord.config import split_listen
from walacord.runtime import Runtime

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 5.0


def json_response(document: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(document), status=status,
                        content_type="application/json")


class WebServer:
    """aiohttp server on `[http] listen`; other components add routes before it starts."""

    name = "http"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.app = web.Application()
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_get("/livez", self.livez)
        self.app.router.add_get("/readyz", self.readyz)
        self.bound: tuple[str, int] | None = None

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.runtime.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def livez(self, request: web.Request) -> web.Response:
        # Reaching this handler proves the event loop is turning; measure how promptly.
        began = time.monotonic()
        await anyio.lowlevel.checkpoint()
        lag = time.monotonic() - began
        return json_response({"status": "ok", "loop_lag_seconds": round(lag, 6),
                              "version": __version__})

    async def readyz(self, request: web.Request) -> web.Response:
        runtime = self.runtime
        ready = runtime.ready.is_set() and not runtime.stopping
        if ready:
            status = "ready"
        elif runtime.stopping:
            status = "stopping"
        else:
            status = "starting"
        document = {
            "status": status,
            "components": sorted(runtime.components),
        }
        return json_response(document, 200 if ready else 503)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        host, port = split_listen(self.runtime.config.http.listen)
        runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, reuse_address=True)
            await site.start()
            server = site._server
            sockets = getattr(server, "sockets", None) or []
            self.bound = sockets[0].getsockname()[:2] if sockets else (host, port)
            log.info("http.listening", extra={"fields": {
                "address": f"{self.bound[0]}:{self.bound[1]}"}})
            task_status.started()
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(SHUTDOWN_TIMEOUT):
                await runner.cleanup()
