"""HTTP health endpoints: /api/health, one per component, and /api/health/metrics.

Handlers read the monitor's cached state; none runs a probe. Every document passes
through the log redactor before it is sent, so a secret that slipped into an error
message is replaced by "***".
"""

from __future__ import annotations

from typing import Any

import orjson

from walacord import __version__, logs
from walacord.monitor import Monitor
from walacord.web import Application, Request, Response

# URL path segment -> probe name.
COMPONENTS = {"database": "database", "api": "api", "walacor": "walacor", "system": "host"}


def _response(document: Any, status: int) -> Response:
    body = logs.redact(orjson.dumps(document, default=str).decode())
    return Response(body.encode(), status)


def mount(app: Application, monitor: Monitor) -> None:
    """Add the health routes to `app`."""

    async def whole(request: Request) -> Response:
        code, document = monitor.health()
        document["version"] = __version__
        return _response(document, code)

    async def component(request: Request) -> Response:
        name = COMPONENTS.get(request.match_info["component"])
        if name is None:
            return _response({"error": f"unknown component; use one of "
                              f"{', '.join([*COMPONENTS, 'metrics'])}"}, 404)
        code, document = monitor.health(name)
        return _response(document, code)

    async def performance(request: Request) -> Response:
        return _response(monitor.performance(), 200)

    app.router.add_get("/api/health", whole)
    app.router.add_get("/api/health/metrics", performance)
    app.router.add_get("/api/health/{component}", component)
