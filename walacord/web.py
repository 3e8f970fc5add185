"""The HTTP server: Prometheus /metrics, liveness, readiness and JSON health.

Every handler reads state the components already keep in memory, and a request never runs a
probe or waits on PostgreSQL or Walacor, so a frozen dependency cannot slow a scrape.

The server is uvicorn's HTTP/1.1 protocol for the httptools parser (llhttp, in C) on a socket
walacord binds itself, driving a small ASGI application with exact and one-parameter routes.
uvicorn is used as a library: walacord owns the socket, the signals and the shutdown, so no
uvicorn code calls sys.exit or installs a signal handler.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import orjson
import uvicorn
from anyio.abc import TaskStatus
from prometheus_client import CONTENT_TYPE_LATEST
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from walacord import __version__
from walacord.config import split_listen
from walacord.exposition import TextExposition
from walacord.runtime import Runtime, sleep_until_tick

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 5.0
# Seconds an idle keep-alive connection stays open after a response.
KEEP_ALIVE_TIMEOUT = 75
# Seconds a connection may take to send a request's headers, from when it opens or from
# its first byte after a response. A client that sends nothing or trickles is closed.
HEADER_TIMEOUT = 10.0
# Maximum open connections. At the limit the longest-idle connection is closed to admit
# a new one, so idle or stalled clients cannot lock a scraper out. When every connection
# is inside a request, the new one is closed instead.
MAX_CONNECTIONS = 256
# Maximum bytes of one request's line and headers. Larger requests get 431 and a close,
# so a client streaming headers cannot grow the daemon's memory. Prometheus and curl
# send a few hundred bytes.
MAX_HEADER_BYTES = 64 * 1024
# Seconds a rejected connection keeps reading and discarding after its 431 response.
# Closing a socket with unread bytes makes the kernel send a reset, which can destroy
# the response before the client reads it.
LINGER_SECONDS = 2.0
JSON = "application/json"
# Scope key under which Protocol records when a request's bytes arrived.
RECEIVED_KEY = "walacord.received"


@dataclass
class Request:
    """Request data passed to a handler: the path, its route parameter and the query."""

    path: str
    match_info: dict[str, str] = field(default_factory=dict)
    query: bytes = b""
    # Monotonic time at which the request's bytes were read from the socket.
    received: float = 0.0


@dataclass
class Response:
    """Response a handler returns; HEAD requests get the same headers and no body."""

    body: bytes
    status: int = 200
    content_type: str = JSON


Handler = Callable[[Request], Awaitable[Response]]


def json_response(document: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(document), status)


class Router:
    """GET routes: exact paths, and "/prefix/{name}" paths with one trailing parameter."""

    def __init__(self) -> None:
        self.exact: dict[str, Handler] = {}
        self.prefixed: dict[str, tuple[str, Handler]] = {}

    def add_get(self, path: str, handler: Handler) -> None:
        if path.endswith("}") and "/{" in path:
            prefix, _, name = path.rpartition("/{")
            self.prefixed[prefix + "/"] = (name[:-1], handler)
        else:
            self.exact[path] = handler

    def resolve(self, path: str) -> tuple[Handler, dict[str, str]] | None:
        handler = self.exact.get(path)
        if handler is not None:
            return handler, {}
        prefix, _, last = path.rpartition("/")
        route = self.prefixed.get(prefix + "/")
        if route is not None and last:
            return route[1], {route[0]: last}
        return None


class Application:
    """The ASGI application: route, call the handler, send its response."""

    def __init__(self) -> None:
        self.router = Router()

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return
        response = await self.respond(scope)
        headers = [(b"content-type", response.content_type.encode()),
                   (b"content-length", str(len(response.body)).encode())]
        if response.status == 405:
            headers.append((b"allow", b"GET, HEAD"))
        await send({"type": "http.response.start", "status": response.status,
                    "headers": headers})
        body = b"" if scope["method"] == "HEAD" else response.body
        await send({"type": "http.response.body", "body": body})

    async def respond(self, scope: dict[str, Any]) -> Response:
        path = scope["path"]
        found = self.router.resolve(path)
        # A client may send a path of many kilobytes, so errors echo only its start.
        short_path = path if len(path) <= 100 else path[:97] + "..."
        if found is None:
            return json_response({"error": f"no such path {short_path!r}; try /metrics or "
                                           "/api/health"}, 404)
        if scope["method"] not in ("GET", "HEAD"):
            return json_response({"error": f"method {scope['method']} is not allowed on "
                                           f"{short_path}; use GET"}, 405)
        handler, match_info = found
        try:
            received = scope.get(RECEIVED_KEY) or time.monotonic()
            return await handler(Request(path, match_info, scope.get("query_string", b""),
                                         received))
        except Exception:
            log.exception("http.handler_failed", extra={"fields": {"path": path}})
            return json_response({"error": "internal error; see the walacord log"}, 500)


class Protocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with a header deadline and size limit, and
    idle-first eviction.

    uvicorn closes a connection that stays idle after a response, but not one that never
    completes its request headers, and its concurrency limit counts idle connections,
    so a few hundred held sockets would turn every scrape into a 503. Its httptools
    protocol sets no limit on header size either (uvicorn 0.55, httptools 0.9).
    """

    _header_deadline: asyncio.TimerHandle | None = None
    _last_active = 0.0
    _header_bytes = 0  # bytes received since the current request began
    _lingering = False  # the 431 response is sent; discard input until the close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._last_active = time.monotonic()
        self._arm_header_deadline()
        if len(self.connections) > MAX_CONNECTIONS:
            self._evict_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._last_active = time.monotonic()
        if self._lingering:
            return
        if not self._in_request():
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._reject_large_headers()
                return
        super().data_received(data)
        if self._in_request():
            self._cancel_header_deadline()
        else:
            self._arm_header_deadline()

    def on_headers_complete(self) -> None:
        # The parser calls this from data_received, so the request's headers, pipelined
        # ones included, arrived in the bytes read at _last_active.
        self.scope[RECEIVED_KEY] = self._last_active  # type: ignore[literal-required]
        self._header_bytes = 0
        super().on_headers_complete()

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_header_deadline(self) -> None:
        # Armed once per request: more bytes do not extend it, so trickling does not help.
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(HEADER_TIMEOUT, self._header_expired)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_expired(self) -> None:
        self._header_deadline = None
        if not self._in_request() and not self.transport.is_closing():
            self.transport.close()

    def _evict_idle(self) -> None:
        # A closed transport leaves `connections` only when its connection_lost runs,
        # a loop iteration later, so during a flood of new connections the set also
        # contains closing ones. They are neither counted nor closed again.
        open_connections = [conn for conn in self.connections
                            if isinstance(conn, Protocol) and not conn.transport.is_closing()]
        if len(open_connections) <= MAX_CONNECTIONS:
            return
        idle = [conn for conn in open_connections
                if conn is not self and not conn._in_request()]
        victim = min(idle, key=lambda conn: conn._last_active) if idle else self
        victim.transport.close()

    def _reject_large_headers(self) -> None:
        self._cancel_header_deadline()
        if self.transport.is_closing():
            return
        body = orjson.dumps({"error": f"request line and headers exceed {MAX_HEADER_BYTES} "
                                      "bytes"})
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body)
        self._lingering = True
        self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)
        log.warning("http.headers_too_large", extra={"fields": {
            "client": _client_host(self.transport), "limit_bytes": MAX_HEADER_BYTES}})


def _client_host(transport: asyncio.BaseTransport) -> str:
    """Return the peer's address without its port, so that repeats from one client
    collapse in the log, or "unknown"."""
    address = transport.get_extra_info("peername")
    return str(address[0]) if isinstance(address, tuple) else "unknown"


def bind(host: str, port: int) -> socket.socket:
    """Bind and listen on HOST:PORT, IPv4 or IPv6, with SO_REUSEADDR."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class WebServer:
    """HTTP server on `[http] listen`; other components add routes before it starts."""

    name = "http"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.app = Application()
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_get("/livez", self.livez)
        self.app.router.add_get("/readyz", self.readyz)
        self.bound: tuple[str, int] | None = None
        # The last /metrics body and the monotonic time its rendering began.
        self._rendered: tuple[float, bytes] = (-1.0, b"")
        self._exposition = TextExposition(runtime.registry)

    async def metrics(self, request: Request) -> Response:
        # Rendering blocks the event loop, so scrapes that arrive together queue behind
        # each other. A body whose rendering began after a request arrived is as fresh as
        # one rendered for it, so such requests share it instead of rendering again.
        began, body = self._rendered
        if began < request.received:
            began = time.monotonic()
            body = self._exposition.render()
            self._rendered = (began, body)
        return Response(body, content_type=CONTENT_TYPE_LATEST)

    async def livez(self, request: Request) -> Response:
        # Reaching this handler proves the event loop is turning; measure how promptly.
        began = time.monotonic()
        await anyio.lowlevel.checkpoint()
        lag = time.monotonic() - began
        return json_response({"status": "ok", "loop_lag_seconds": round(lag, 6),
                              "version": __version__})

    async def readyz(self, request: Request) -> Response:
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
        try:
            sock = bind(host, port)
        except socket.gaierror as exc:
            # getaddrinfo failed, so no port was tried.
            raise OSError(exc.errno, f"cannot resolve host {host!r} of [http] listen: "
                                     f"{exc.strerror}; give an IP address such as 127.0.0.1, "
                                     "or a host name that resolves on this host") from exc
        except OSError as exc:
            # Only a port in use can be freed. Other errors, such as an address of
            # another host or a port below 1024 without privileges, need another setting.
            fix = ("free the port or change the setting" if exc.errno == errno.EADDRINUSE
                   else "change the setting")
            raise OSError(exc.errno, f"cannot listen on {host}:{port} ([http] listen): "
                                     f"{exc.strerror}; {fix}") from exc
        config = uvicorn.Config(
            self.app, http=Protocol, lifespan="off", log_config=None, access_log=False,
            server_header=False, proxy_headers=False, interface="asgi3",
            timeout_keep_alive=KEEP_ALIVE_TIMEOUT)
        server = uvicorn.Server(config)
        try:
            config.load()
            server.lifespan = config.lifespan_class(config)
            await server.startup(sockets=[sock])
            self.bound = sock.getsockname()[:2]
            log.info("http.listening", extra={"fields": {
                "address": f"{self.bound[0]}:{self.bound[1]}"}})
            task_status.started()
            while True:
                # The Date header is refreshed here, as uvicorn's own loop would.
                await server.on_tick(0)
                await sleep_until_tick(1.0)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(SHUTDOWN_TIMEOUT):
                server.force_exit = True
                if getattr(server, "servers", None):
                    await server.shutdown(sockets=[sock])
            sock.close()
