"""The HTTP server on a real socket: routing, methods, HEAD and a port already in use."""

from __future__ import annotations

import http.client
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import psutil
import pytest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tests.conftest import daemon_config, running_daemon
from walacord.config import AlertsConfig, HttpConfig
from walacord.web import Router, bind

pytestmark = pytest.mark.anyio


async def test_web_methods_and_unknown_paths(pg_db: str, tmp_path: Path) -> None:
    config = daemon_config(tmp_path, pg_db)
    async with running_daemon(config), httpx.AsyncClient() as http:
        base = f"http://{config.http.listen}"
        post = await http.post(base + "/metrics", content=b"x")
        head = await http.head(base + "/metrics")
        get = await http.get(base + "/metrics")
        missing = await http.get(base + "/nosuch")
        long_path = await http.get(base + "/" + "x" * 10_000)

    assert post.status_code == 405
    assert post.headers["allow"] == "GET, HEAD"
    assert "method POST is not allowed" in post.json()["error"]
    assert head.status_code == 200
    assert head.content == b""
    assert int(head.headers["content-length"]) > 0
    assert get.headers["content-type"].startswith("text/plain")
    assert "walacord_up 1.0" in get.text
    assert missing.status_code == 404
    assert "/nosuch" in missing.json()["error"]
    assert long_path.status_code == 404
    assert len(long_path.content) < 300


async def test_web_port_in_use_names_setting(pg_db: str, tmp_path: Path) -> None:
    occupier = bind("127.0.0.1", 0)
    port = occupier.getsockname()[1]
    config = daemon_config(tmp_path, pg_db, http=HttpConfig(listen=f"127.0.0.1:{port}"))
    try:
        with pytest.raises(Exception) as caught, anyio.fail_after(30):
            async with running_daemon(config):
                pass
    finally:
        occupier.close()

    messages = [str(error) for error in leaves(caught.value)]
    expected = f"cannot listen on 127.0.0.1:{port} ([http] listen)"
    assert any(expected in message for message in messages), messages


async def test_web_unresolvable_host_names_setting(pg_db: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A name that does not resolve is reported as such, not as a port in use."""
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: str, *args: object, **kwargs: object) -> object:
        # Fails as glibc does for an unknown name, without asking a DNS server.
        if host == "metrics.walacord.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    config = daemon_config(tmp_path, pg_db,
                           http=HttpConfig(listen="metrics.walacord.invalid:9877"))
    with pytest.raises(Exception) as caught, anyio.fail_after(30):
        async with running_daemon(config):
            pass

    messages = [str(error) for error in leaves(caught.value)]
    expected = ("cannot resolve host 'metrics.walacord.invalid' of [http] listen: Name or "
                "service not known; give an IP address such as 127.0.0.1")
    assert any(expected in message for message in messages), messages
    assert not any("free the port" in message for message in messages), messages


def leaves(error: BaseException) -> list[BaseException]:
    """Return the exceptions inside nested exception groups."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]


def test_router_matches_exact_then_parameter() -> None:
    router = Router()

    async def whole(request: object) -> object:
        return request

    async def one(request: object) -> object:
        return request

    router.add_get("/api/health", whole)
    router.add_get("/api/health/{component}", one)

    assert router.resolve("/api/health") == (whole, {})
    assert router.resolve("/api/health/database") == (one, {"component": "database"})
    assert router.resolve("/api/health/") is None
    assert router.resolve("/api/other") is None


def test_bind_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        sock = bind("::1", 0)
    except OSError as exc:
        pytest.skip(f"IPv6 loopback unavailable: {exc}")
    try:
        assert sock.family == socket.AF_INET6
    finally:
        sock.close()


async def test_web_idle_connections_evicted(pg_db: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setattr("walacord.web.MAX_CONNECTIONS", 20)
    config = daemon_config(tmp_path, pg_db)
    host, port = config.http.listen.rsplit(":", 1)
    async with running_daemon(config), httpx.AsyncClient() as http:
        open_streams = []
        for index in range(40):
            stream = await anyio.connect_tcp(host, int(port))
            if index % 2:
                await stream.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # no blank line
            open_streams.append(stream)
        await anyio.sleep(0.2)
        statuses = [(await http.get(f"http://{config.http.listen}/metrics")).status_code
                    for _ in range(5)]
        closed = 0
        for stream in open_streams:
            with anyio.move_on_after(0.05):
                try:
                    await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    closed += 1
            await stream.aclose()

    assert statuses == [200] * 5
    # 40 open connections and the scraper against a limit of 20: the idlest were closed.
    assert closed >= 20


async def test_web_closes_incomplete_headers(pg_db: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("walacord.web.HEADER_TIMEOUT", 0.5)
    config = daemon_config(tmp_path, pg_db)
    host, port = config.http.listen.rsplit(":", 1)
    async with running_daemon(config):
        silent = await anyio.connect_tcp(host, int(port))
        trickle = await anyio.connect_tcp(host, int(port))
        await trickle.send(b"GET /metrics HTTP/1.1\r\n")
        with anyio.fail_after(5):
            for _ in range(3):
                await anyio.sleep(0.2)
                await trickle.send(b"X-Slow: 1\r\n")
            closed = []
            for stream in (silent, trickle):
                try:
                    closed.append(await stream.receive())
                except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                    closed.append(b"")
        await silent.aclose()
        await trickle.aclose()

    assert closed == [b"", b""]


async def test_web_pipelined_requests_in_order(pg_db: str, tmp_path: Path) -> None:
    config = daemon_config(tmp_path, pg_db)
    host, port = config.http.listen.rsplit(":", 1)
    requests = (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
                b"HEAD /livez HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /nosuch HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
    async with running_daemon(config):
        stream = await anyio.connect_tcp(host, int(port))
        received = b""
        responses: list[tuple[bytes, bytes]] = []
        with anyio.fail_after(10):
            await stream.send(requests)
            while len(responses) < 4:
                received += await stream.receive()
                responses = split_responses(received, head_at=1)
        await stream.aclose()

    statuses = [head.split(b"\r\n", 1)[0] for head, _ in responses]
    assert statuses == [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found",
                        b"HTTP/1.1 200 OK"]
    assert b"walacord_up 1.0" in responses[0][1]
    assert responses[1][1] == b""
    assert b'"status":"ok"' in responses[3][1]


def split_responses(data: bytes, head_at: int) -> list[tuple[bytes, bytes]]:
    """Return the complete (head, body) responses in `data`; number `head_at` is a HEAD's."""
    responses = []
    while b"\r\n\r\n" in data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(responses) == head_at:
            length = 0
        if len(rest) < length:
            break
        responses.append((head, rest[:length]))
        data = rest[length:]
    return responses


class SlowCollector(Collector):
    """A collector that blocks the event loop for a while and counts its renders."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.renders = 0
        self.value = 0.0

    def collect(self) -> Iterator[GaugeMetricFamily]:
        self.renders += 1
        time.sleep(self.seconds)
        yield GaugeMetricFamily("walacord_test_value", "Value the test sets.", self.value)


async def test_web_concurrent_scrapes_share_a_render(pg_db: str, tmp_path: Path) -> None:
    # Each alert evaluation reads the registry, which renders the slow collector too, so
    # an evaluation during the scrapes would count as a render of its own.
    config = daemon_config(tmp_path, pg_db,
                           alerts=AlertsConfig(evaluation_interval=3600.0))
    host, port = config.http.listen.rsplit(":", 1)
    slow = SlowCollector(0.05)
    clients = 8
    barrier = threading.Barrier(clients)

    def scrape() -> bytes:
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            barrier.wait()
            connection.request("GET", "/metrics")
            return connection.getresponse().read()
        finally:
            connection.close()

    async with running_daemon(config) as supervisor, httpx.AsyncClient() as web:
        supervisor.runtime.registry.register(slow)
        async with anyio.create_task_group() as tg:
            results: list[bytes] = []

            async def one() -> None:
                results.append(await anyio.to_thread.run_sync(scrape))

            for _ in range(clients):
                tg.start_soon(one)
        shared_renders = slow.renders
        # One request at a time: each must see the value set just before it.
        seen = []
        for value in (1.0, 2.0, 3.0):
            slow.value = value
            seen.append((await web.get(f"http://{config.http.listen}/metrics")).text)

    assert len(results) == clients
    assert all(b"walacord_test_value" in body for body in results)
    # The first request renders; those that arrived during that render share the next.
    assert shared_renders <= 3, shared_renders
    for value, text in zip((1.0, 2.0, 3.0), seen, strict=True):
        assert f"walacord_test_value {value}" in text


async def test_metrics_pass_promtool_lint(pg_db: str, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install the Debian package prometheus")
    config = daemon_config(tmp_path, pg_db)
    async with running_daemon(config), httpx.AsyncClient() as web:
        body = (await web.get(f"http://{config.http.listen}/metrics")).content

    result = await anyio.run_process([promtool, "check", "metrics"], input=body, check=False)

    problems = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, problems
    assert problems.strip() == ""


async def test_web_connection_flood_stays_capped(pg_db: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections that arrive faster than closed ones leave must not pile up."""
    monkeypatch.setattr("walacord.web.MAX_CONNECTIONS", 20)
    config = daemon_config(tmp_path, pg_db)
    host, port = config.http.listen.rsplit(":", 1)

    def open_many() -> list[socket.socket]:
        return [socket.create_connection((host, int(port))) for _ in range(300)]

    async with running_daemon(config), httpx.AsyncClient() as http:
        flood = await anyio.to_thread.run_sync(open_many)
        try:
            await anyio.sleep(0.5)
            # The test and the daemon share this process. The daemon's ends of the
            # connections are those whose local port is the server's.
            served = [conn for conn in psutil.Process().net_connections("tcp")
                      if conn.laddr.port == int(port) and conn.status == "ESTABLISHED"]
            status = (await http.get(f"http://{config.http.listen}/metrics")).status_code
        finally:
            for sock in flood:
                sock.close()

    assert len(served) <= 20
    assert status == 200


async def test_web_rejects_huge_headers(pg_db: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("walacord.web.MAX_HEADER_BYTES", 4096)
    config = daemon_config(tmp_path, pg_db)
    host, port = config.http.listen.rsplit(":", 1)
    async with running_daemon(config), httpx.AsyncClient() as http:
        stream = await anyio.connect_tcp(host, int(port))
        reply = b""
        with anyio.fail_after(5):
            try:
                await stream.send(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
                for _ in range(100):
                    await stream.send(b"X-Filler: " + b"y" * 500 + b"\r\n")
            except (anyio.BrokenResourceError, ConnectionResetError):
                pass
            try:
                while True:
                    reply += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                pass
        await stream.aclose()
        normal = await http.get(f"http://{config.http.listen}/livez",
                                headers={"X-Filler": "y" * 2000})

    assert reply.startswith(b"HTTP/1.1 431 ")
    assert b"exceed 4096 bytes" in reply
    assert normal.status_code == 200
