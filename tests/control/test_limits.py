"""Error responses to bad lines, and the limits on size, idle time, request time, connections."""

from __future__ import annotations

import logging
import socket
import time
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import orjson
import pytest

from tests.control.harness import connect, make_config, running_server
from walacord.control.protocol import PROTOCOL_VERSION, ErrorCode
from walacord.control.server import EVICT_MIN_IDLE, ControlServer
from walacord.control.stream import SocketByteStream
from walacord.runtime import Runtime

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(("line", "code", "request_id"), [
    (b"{not json", ErrorCode.PARSE_ERROR, None),
    (b"", ErrorCode.PARSE_ERROR, None),
    (b"[1, 2]", ErrorCode.INVALID_REQUEST, None),
    (b'{"id": true, "method": "status", "version": 1}', ErrorCode.INVALID_REQUEST, None),
    (b'{"id": 3, "method": "status"}', ErrorCode.VERSION_MISMATCH, 3),
    (b'{"id": 4, "method": "status", "version": 99}', ErrorCode.VERSION_MISMATCH, 4),
    (b'{"id": "x", "version": 1}', ErrorCode.INVALID_REQUEST, "x"),
    (b'{"id": 5, "method": "status", "version": 1, "extra": 0}', ErrorCode.INVALID_REQUEST, 5),
    (b'{"id": 6, "method": "test.echo", "params": [1], "version": 1}', ErrorCode.INVALID_PARAMS,
     6),
    (b'{"id": 7, "method": "status", "params": {"x": 1}, "version": 1}',
     ErrorCode.INVALID_PARAMS, 7),
    (b"\xff\xfe garbage", ErrorCode.PARSE_ERROR, None),
])
async def test_bad_line_answered_with_error(socket_dir: Path, line: bytes, code: ErrorCode,
                                            request_id: object) -> None:
    async with running_server(make_config(socket_dir / "c.sock")), \
            connect(socket_dir / "c.sock") as client:
        await client.send(line + b"\n")
        response = await client.receive()
        after = await client.call("test.echo", {"value": "still served"})
    assert response["id"] == request_id
    assert response["error"]["code"] == code
    assert after["result"]["value"] == "still served"


async def test_version_mismatch_names_supported_versions(socket_dir: Path) -> None:
    async with running_server(make_config(socket_dir / "c.sock")), \
            connect(socket_dir / "c.sock") as client:
        await client.request("status", version=PROTOCOL_VERSION + 1)
        response = await client.receive()
    assert response["error"]["data"] == {"supported_versions": [PROTOCOL_VERSION]}


async def test_oversized_line_rejected_then_served(socket_dir: Path) -> None:
    config = make_config(socket_dir / "c.sock", max_request_bytes=4096)
    async with running_server(config), connect(socket_dir / "c.sock") as client:
        # 1 MiB without a newline first, then its end. The server must respond once.
        await client.send(b"x" * (1024 * 1024))
        response = await client.receive()
        await client.send(b"y" * 5000 + b"\n")
        after = await client.call("test.echo", {"value": 1})

        # A complete oversized line arriving in one piece is rejected too.
        await client.send(orjson.dumps({"id": 9, "method": "test.echo", "version": 1,
                                        "params": {"value": "z" * 5000}}) + b"\n")
        whole = await client.receive()
    assert response["error"]["code"] == ErrorCode.REQUEST_TOO_LARGE
    assert response["error"]["data"] == {"max_request_bytes": 4096}
    assert after["id"] == 1
    assert after["result"]["value"] == 1
    assert whole["error"]["code"] == ErrorCode.REQUEST_TOO_LARGE


async def test_line_at_limit_accepted(socket_dir: Path) -> None:
    config = make_config(socket_dir / "c.sock", max_request_bytes=4096)
    async with running_server(config), connect(socket_dir / "c.sock") as client:
        skeleton = orjson.dumps({"id": 1, "method": "test.echo", "version": 1,
                                 "params": {"value": ""}})
        padding = "p" * (4096 - len(skeleton))
        line = orjson.dumps({"id": 1, "method": "test.echo", "version": 1,
                             "params": {"value": padding}})
        assert len(line) == 4096
        await client.send(line + b"\n")
        response = await client.receive()
    assert response["result"]["value"] == padding


async def test_idle_connection_closed_with_error(socket_dir: Path) -> None:
    config = make_config(socket_dir / "c.sock", idle_timeout=0.3)
    async with running_server(config), connect(socket_dir / "c.sock") as client:
        began = time.monotonic()
        response = await client.receive(wait=3)
        closed = await client.is_closed()
    assert response["id"] is None
    assert response["error"]["code"] == ErrorCode.IDLE_TIMEOUT
    assert 0.25 < time.monotonic() - began < 2
    assert closed


async def test_slow_drip_request_times_out(socket_dir: Path) -> None:
    config = make_config(socket_dir / "c.sock", idle_timeout=5, request_timeout=0.5)
    async with running_server(config), connect(socket_dir / "c.sock") as client:
        began = time.monotonic()
        with anyio.move_on_after(3):
            for byte in b'{"id": 1, "method": "status", "version": 1}':
                try:
                    await client.send(bytes([byte]))
                except anyio.BrokenResourceError:
                    break  # the server has closed the connection
                await anyio.sleep(0.1)
        response = await client.receive()
    assert response["error"]["code"] == ErrorCode.REQUEST_TIMEOUT
    assert time.monotonic() - began < 2


async def test_truncated_request_answered_before_close(socket_dir: Path) -> None:
    async with running_server(make_config(socket_dir / "c.sock")), \
            connect(socket_dir / "c.sock") as client:
        await client.send(b'{"id": 1, "method": "sta')
        await client.stream.send_eof()
        response = await client.receive()
    assert response["error"]["code"] == ErrorCode.PARSE_ERROR
    assert "incomplete request" in response["error"]["message"]


def shorten_evict_min_idle(runtime: Runtime, seconds: float) -> None:
    server = runtime.components["control"]
    assert isinstance(server, ControlServer)
    server.evict_min_idle = seconds


async def test_extra_connection_rejected_when_all_busy(socket_dir: Path) -> None:
    config = make_config(socket_dir / "c.sock", max_connections=2)
    async with running_server(config) as runtime, connect(socket_dir / "c.sock") as first, \
            connect(socket_dir / "c.sock") as second:
        shorten_evict_min_idle(runtime, 0.3)
        assert (await first.call("test.echo"))["result"]["value"] is None
        assert (await second.call("test.echo"))["result"]["value"] is None
        # Both connections are serving a request, so neither may be evicted.
        await first.request("test.sleep", {"seconds": 0.5})
        await second.request("test.sleep", {"seconds": 0.5})
        await anyio.sleep(0.1)
        async with connect(socket_dir / "c.sock") as third:
            rejected_serving = await third.receive()
            assert await third.is_closed()

        # Just after their responses the connections are idle, but not long enough.
        first_slept = await first.receive()
        second_slept = await second.receive()
        async with connect(socket_dir / "c.sock") as fourth:
            rejected_recent = await fourth.receive()
            assert await fourth.is_closed()

        # Later a new client takes the place of the connection idle longest.
        await anyio.sleep(0.3)
        async with connect(socket_dir / "c.sock") as fifth:
            served = await fifth.call("test.echo", {"value": 5})
        evicted = await first.receive()
        assert await first.is_closed()
        still_open = await second.call("test.echo", {"value": 2})
        rejections = runtime.metrics.control_connections_rejected
    assert rejected_serving["error"]["code"] == ErrorCode.BUSY
    assert rejected_recent["error"]["code"] == ErrorCode.BUSY
    assert "none has been idle for 0.3s or longer" in rejected_recent["error"]["message"]
    assert "error" not in first_slept
    assert "error" not in second_slept
    assert served["result"]["value"] == 5
    assert evicted["error"]["code"] == ErrorCode.EVICTED
    assert still_open["result"]["value"] == 2
    assert rejections.labels(reason="busy")._value.get() == 2
    assert rejections.labels(reason="evicted")._value.get() == 1


async def test_idle_connections_evicted_oldest_first(socket_dir: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Idle connections up to the default limit do not lock out a new client."""
    config = make_config(socket_dir / "c.sock")
    limit = config.control.max_connections
    caplog.set_level(logging.INFO, logger="walacord")
    async with running_server(config) as runtime, AsyncExitStack() as stack:
        idle = [await stack.enter_async_context(connect(socket_dir / "c.sock"))
                for _ in range(limit)]
        for client in idle:
            assert "result" in await client.call("test.echo")
        await anyio.sleep(EVICT_MIN_IDLE)
        async with connect(socket_dir / "c.sock") as newcomer:
            served = await newcomer.call("test.echo", {"value": "admitted"})
            evicted = await idle[0].receive()
            assert await idle[0].is_closed()
            open_connections = runtime.metrics.control_connections._value.get()
        second_oldest = await idle[1].call("test.echo", {"value": "kept"})
    assert served["result"]["value"] == "admitted"
    assert evicted["id"] is None
    assert evicted["error"]["code"] == ErrorCode.EVICTED
    assert "closed to admit a new client" in evicted["error"]["message"]
    assert evicted["error"]["data"] == {"max_connections": limit}
    assert second_oldest["result"]["value"] == "kept"
    assert open_connections == limit
    assert [r.getMessage() for r in caplog.records].count("control.evicted") == 1


async def test_partial_request_not_evicted(socket_dir: Path) -> None:
    config = make_config(socket_dir / "c.sock", max_connections=2, request_timeout=5)
    async with running_server(config) as runtime, connect(socket_dir / "c.sock") as partial, \
            connect(socket_dir / "c.sock") as idle:
        shorten_evict_min_idle(runtime, 0.1)
        assert "result" in await partial.call("test.echo")
        assert "result" in await idle.call("test.echo")
        # The older connection has sent half a request, so the newer idle one goes.
        await partial.send(b'{"id": 9, "method": "test.echo", ')
        await anyio.sleep(0.2)
        async with connect(socket_dir / "c.sock") as newcomer:
            served = await newcomer.call("test.echo", {"value": 3})
        evicted = await idle.receive()
        await partial.send(b'"params": {"value": 9}, "version": 1}\n')
        completed = await partial.receive()
    assert served["result"]["value"] == 3
    assert evicted["error"]["code"] == ErrorCode.EVICTED
    assert completed["result"]["value"] == 9


async def test_client_that_never_reads_is_dropped(socket_dir: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(socket_dir / "c.sock", write_timeout=0.3)
    caplog.set_level(logging.INFO, logger="walacord")
    async with running_server(config) as runtime, connect(socket_dir / "c.sock") as other:
        # Ask for large responses and never read them, until the socket buffers fill.
        # SocketByteStream reads only when asked; anyio's transport stream would read.
        hog_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        hog_socket.connect(str(socket_dir / "c.sock"))
        hog = SocketByteStream(hog_socket)
        value = "v" * 60000
        request = orjson.dumps({"id": 1, "method": "test.echo", "version": 1,
                                "params": {"value": value}}) + b"\n"
        with anyio.move_on_after(3):
            try:
                for _ in range(2000):
                    await hog.send(request)
            except anyio.BrokenResourceError:
                pass  # the server has dropped the hog
        began = time.monotonic()
        served = await other.call("test.echo", {"value": "fine"})
        assert time.monotonic() - began < 1
        open_connections = runtime.metrics.control_connections._value.get()
        await hog.aclose()
    assert served["result"]["value"] == "fine"
    assert any(r.getMessage() == "control.write_timed_out" for r in caplog.records)
    assert open_connections == 1


async def test_pipelined_data_waits_in_kernel_during_call(socket_dir: Path) -> None:
    async with running_server(make_config(socket_dir / "c.sock")):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(socket_dir / "c.sock"))
        client = SocketByteStream(sock)
        await client.send(orjson.dumps({"id": 1, "method": "test.sleep", "version": 1,
                                        "params": {"seconds": 0.8}}) + b"\n")
        # While the call runs the server reads nothing, so these sends must stall once
        # the kernel's socket buffers are full instead of filling the daemon's memory.
        sent = 0
        chunk = b"x" * 65536
        with anyio.move_on_after(0.5):
            while sent < 64 * 1024 * 1024:
                await client.send(chunk)
                sent += len(chunk)
        await client.aclose()
    assert sent < 8 * 1024 * 1024
