"""The application API probe against a real HTTP server on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
from aiohttp import web

from walacord.config import ApiProbeConfig, HttpCheckConfig
from walacord.pgcluster import free_port
from walacord.probes.base import ProbeResult, Status
from walacord.probes.http import ApiProbe

pytestmark = pytest.mark.anyio


@pytest.fixture
async def app_server() -> AsyncIterator[str]:
    """An HTTP server with /ok, /broken (500) and /slow (0.3 s) on a free port."""
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"status": "healthy"})

    async def broken(request: web.Request) -> web.Response:
        return web.json_response({"status": "failing"}, status=500)

    async def slow(request: web.Request) -> web.Response:
        await anyio.sleep(0.3)
        return web.json_response({"status": "healthy"})

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/broken", broken)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def check(*items: HttpCheckConfig) -> tuple[ApiProbe, ProbeResult]:
    probe = ApiProbe(lambda: ApiProbeConfig(checks=list(items), timeout=1, interval=5))
    try:
        return probe, await probe.check()
    finally:
        await probe.aclose()


async def test_api_probe_ok_with_body_match(app_server: str) -> None:
    _, result = await check(HttpCheckConfig(url=f"{app_server}/ok", body_contains="healthy"))
    assert result.status is Status.OK


async def test_api_probe_wrong_status(app_server: str) -> None:
    _, result = await check(HttpCheckConfig(url=f"{app_server}/ok"),
                            HttpCheckConfig(url=f"{app_server}/broken"))
    assert result.status is Status.CRITICAL
    assert result.reason == "status_500"
    assert len(result.details["checks"]) == 2


async def test_api_probe_body_mismatch(app_server: str) -> None:
    _, result = await check(HttpCheckConfig(url=f"{app_server}/ok", body_contains="ready"))
    assert result.reason == "body_mismatch"


async def test_api_probe_slow_is_warning(app_server: str) -> None:
    _, result = await check(HttpCheckConfig(url=f"{app_server}/slow", slow_after=0.1))
    assert result.status is Status.WARNING


async def test_api_probe_refused() -> None:
    _, result = await check(HttpCheckConfig(url=f"http://127.0.0.1:{free_port()}/"))
    assert result.status is Status.CRITICAL
    assert result.reason == "refused"


def test_api_probe_empty_is_not_configured() -> None:
    probe = ApiProbe(lambda: ApiProbeConfig())
    assert probe.configured() is False
