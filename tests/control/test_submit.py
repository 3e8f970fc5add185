"""Requests served through a method's submit handler, from the socket's reader callback."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from tests.control.harness import LineClient, connect, make_config, running_server
from tests.control.test_limits import shorten_evict_min_idle
from walacord.control.protocol import ErrorCode

pytestmark = pytest.mark.anyio


async def park(client: LineClient) -> None:
    """Make the connection's task wait for a next request, as it does between the
    requests of a client that waits for each response. Only then does a request reach
    the reader callback."""
    assert "result" in await client.call("test.echo")
    await anyio.sleep(0.05)


async def test_submitted_call_answers(socket_dir: Path) -> None:
    async with running_server(make_config(socket_dir / "c.sock")) as runtime, \
            connect(socket_dir / "c.sock") as client:
        await park(client)
        response = await client.call("test.submit_sleep", {"seconds": 0.05})
        counted = runtime.metrics.control_requests.labels(
            method="test.submit_sleep", outcome="ok")._value.get()
    assert response["id"] == 2
    assert response["result"]["slept"] == 0.05
    assert counted == 1


async def test_submitted_call_keeps_response_order(socket_dir: Path) -> None:
    async with running_server(make_config(socket_dir / "c.sock")), \
            connect(socket_dir / "c.sock") as client:
        await park(client)
        await client.request("test.submit_sleep", {"seconds": 0.3})
        # The next request arrives while the first one runs, and its response must follow.
        await anyio.sleep(0.05)
        await client.request("test.echo", {"value": "second"})
        first = await client.receive()
        second = await client.receive()
    assert first["id"] == 2
    assert first["result"]["slept"] == 0.3
    assert second["id"] == 3
    assert second["result"]["value"] == "second"


async def test_submitted_call_timeout_is_call_timeout(socket_dir: Path) -> None:
    async with running_server(make_config(socket_dir / "c.sock")), \
            connect(socket_dir / "c.sock") as client:
        await park(client)
        began = time.monotonic()
        response = await client.call("test.submit_sleep", {"seconds": 5})
        elapsed = time.monotonic() - began
        after = await client.call("test.echo", {"value": "after"})
    assert response["error"]["code"] == ErrorCode.CALL_TIMEOUT
    assert "did not finish within 1s" in response["error"]["message"]
    assert elapsed < 3
    assert after["result"]["value"] == "after"


async def test_submitted_call_bad_params_rejected(socket_dir: Path) -> None:
    async with running_server(make_config(socket_dir / "c.sock")), \
            connect(socket_dir / "c.sock") as client:
        await park(client)
        response = await client.call("test.submit_sleep", {"minutes": 1})
    assert response["error"]["code"] == ErrorCode.INVALID_PARAMS


async def test_idle_timeout_waits_for_submitted_call(socket_dir: Path) -> None:
    config = make_config(socket_dir / "c.sock", idle_timeout=0.4)
    async with running_server(config), connect(socket_dir / "c.sock") as client:
        await park(client)
        await client.request("test.submit_sleep", {"seconds": 0.7})
        response = await client.receive(wait=3)
        answered = time.monotonic()
        idle = await client.receive(wait=3)
        idle_after = time.monotonic() - answered
    assert response["result"]["slept"] == 0.7
    assert idle["error"]["code"] == ErrorCode.IDLE_TIMEOUT
    assert 0.3 < idle_after < 2


async def test_large_submitted_response_written_whole(socket_dir: Path) -> None:
    async with running_server(make_config(socket_dir / "c.sock")), \
            connect(socket_dir / "c.sock") as client:
        await park(client)
        # More than the socket buffers take, so the connection's task writes the rest.
        await client.request("test.submit_sleep", {"size": 8 * 1024 * 1024})
        await anyio.sleep(0.3)
        response = await client.receive()
        after = await client.call("test.echo", {"value": "after"})
    assert len(response["result"]["filler"]) == 8 * 1024 * 1024
    assert after["result"]["value"] == "after"


async def test_connection_with_submitted_call_not_evicted(socket_dir: Path) -> None:
    config = make_config(socket_dir / "c.sock", max_connections=2)
    async with running_server(config) as runtime, connect(socket_dir / "c.sock") as busy, \
            connect(socket_dir / "c.sock") as idle:
        shorten_evict_min_idle(runtime, 0.1)
        await park(busy)
        assert "result" in await idle.call("test.echo")
        # The older connection waits for a submitted call, so the newer idle one goes.
        await busy.request("test.submit_sleep", {"seconds": 0.6})
        await anyio.sleep(0.2)
        async with connect(socket_dir / "c.sock") as newcomer:
            served = await newcomer.call("test.echo", {"value": 3})
        evicted = await idle.receive()
        completed = await busy.receive()
    assert served["result"]["value"] == 3
    assert evicted["error"]["code"] == ErrorCode.EVICTED
    assert completed["result"]["slept"] == 0.6
