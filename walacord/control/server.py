"""The control server component: accept connections on the Unix socket and authorise them.

Each connection is its own task in the server's task group, so a slow or hostile client
can delay only its own task. Peers that are not allowed get one error line and are
closed.

When `[control] max_connections` are open, a new connection takes the place of the
connection that has waited longest for its next request, if that wait is at least
EVICT_MIN_IDLE. That connection gets an EVICTED error line and is closed, so idle
clients cannot lock others out for the idle timeout. A new connection is rejected as
BUSY only when no open connection has been idle that long: each one is serving a
request, has received part of one, is still being authorised, or sent its last
request within EVICT_MIN_IDLE.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

import anyio
from anyio.abc import ByteStream, TaskStatus
from prometheus_client import Counter, Histogram

from walacord.control.auth import AccessPolicy, peer_credentials, resolve_policy
from walacord.control.connection import INVALID_METHOD_LABEL, Connection
from walacord.control.methods import register_core_methods
from walacord.control.protocol import ErrorCode, encode_error
from walacord.control.registry import Peer
from walacord.control.socketfile import BoundSocket, bind_control_socket
from walacord.control.stream import SocketByteStream
from walacord.runtime import Runtime

log = logging.getLogger(__name__)

SETUP_TIMEOUT = 10.0  # binding the socket and resolving the group, both local and quick
AUTH_TIMEOUT = 5.0  # reading /proc/PID/status, or NSS when /proc is unreadable
REJECT_TIMEOUT = 1.0  # time to deliver the error line to a rejected connection
LISTEN_BACKLOG = 128
ACCEPT_BACKOFF = 0.1  # pause after accept() fails for lack of file descriptors
# Connections idle for less than this are never evicted. It protects a client between
# two requests of one conversation, and a burst of new connections then gets BUSY
# instead of closing each other.
EVICT_MIN_IDLE = 1.0


@dataclass(frozen=True)
class RequestMetrics:
    """The metric children one method's calls update."""

    duration: Histogram
    ok: Counter
    error: Counter


class ControlServer:
    """Serves `runtime.methods` on `[control] socket`."""

    name = "control"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        register_core_methods(runtime)
        self.policy: AccessPolicy | None = None
        self.bound: BoundSocket | None = None
        self._active = 0  # connections being served, evicted ones excluded
        self._rejecting = 0
        self._connections: set[Connection] = set()
        self.evict_min_idle = EVICT_MIN_IDLE
        self._error_counters: dict[int, tuple[Counter, Counter]] = {}
        self._request_metrics: dict[str, RequestMetrics] = {}

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        config = self.runtime.config.control
        with anyio.fail_after(SETUP_TIMEOUT):
            self.policy = await anyio.to_thread.run_sync(resolve_policy, config.group)
            if config.group and self.policy.group_gid is None:
                log.warning("control.group_missing", extra={"fields": {
                    "group": config.group, "path": config.socket,
                    "fix": "create the group or set [control] group; until then only root "
                           "and the daemon's user may connect"}})
            self.bound = await anyio.to_thread.run_sync(
                bind_control_socket, config.socket, self.policy.group_gid, LISTEN_BACKLOG)

        try:
            log.info("control.listening", extra={"fields": {
                "path": config.socket, "group": config.group if self.bound.group_applied
                else None, "max_connections": config.max_connections}})
            task_status.started()
            async with anyio.create_task_group() as tg:
                while True:
                    connection = await self._accept(self.bound.sock)
                    self._dispatch(tg, connection)
        finally:
            self.bound.remove()
            self.runtime.metrics.control_connections.set(0)
            log.info("control.closed", extra={"fields": {"path": config.socket}})

    async def _accept(self, listening: socket.socket) -> socket.socket:
        # Accept here instead of through an anyio listener, whose UNIXSocketStream has a
        # cancellation race (see walacord.control.stream).
        while True:
            await anyio.wait_readable(listening)
            try:
                connection, _ = listening.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:
                # EMFILE and ENFILE: out of descriptors. Back off instead of spinning.
                log.error("control.accept_failed", extra={"fields": {"error": str(exc)}})
                await anyio.sleep(ACCEPT_BACKOFF)
                continue
            connection.setblocking(False)
            return connection

    def protocol_error_counters(self, code: int) -> tuple[Counter, Counter]:
        """Return the counters a protocol error increments, cached: bad lines come in floods."""
        counters = self._error_counters.get(code)
        if counters is None:
            metrics = self.runtime.metrics
            try:
                name = ErrorCode(code).name.lower()
            except ValueError:
                name = "other"
            counters = (
                metrics.control_requests.labels(method=INVALID_METHOD_LABEL, outcome="error"),
                metrics.control_protocol_errors.labels(error=name))
            self._error_counters[code] = counters
        return counters

    def request_metrics(self, method: str) -> RequestMetrics:
        """Return the metrics of calls to `method`, cached because `labels()` costs a
        few microseconds on every request of a high-rate method."""
        cached = self._request_metrics.get(method)
        if cached is None:
            metrics = self.runtime.metrics
            cached = RequestMetrics(
                duration=metrics.control_request_duration.labels(method=method),
                ok=metrics.control_requests.labels(method=method, outcome="ok"),
                error=metrics.control_requests.labels(method=method, outcome="error"))
            self._request_metrics[method] = cached
        return cached

    def _dispatch(self, tg: anyio.abc.TaskGroup, connection: socket.socket) -> None:
        limit = self.runtime.config.control.max_connections
        if self._active >= limit:
            self._evict_longest_idle(limit)
        if self._active < limit:
            self._active += 1
            self.runtime.metrics.control_connections.set(self._active)
            tg.start_soon(self._serve, connection)
        elif self._rejecting < limit:
            self._rejecting += 1
            tg.start_soon(self._reject_busy, connection, limit)
        else:
            # Under a flood even the error line is not worth a task: just close.
            self.runtime.metrics.control_connections_rejected.labels(reason="busy").inc()
            connection.close()

    def _evict_longest_idle(self, limit: int) -> None:
        latest = anyio.current_time() - self.evict_min_idle
        idle = [(since, served) for served in self._connections
                if not served.evicted and (since := served.idle_since()) is not None
                and since <= latest]
        if not idle:
            return
        since, victim = min(idle, key=lambda pair: pair[0])
        victim.evict()
        self._active -= 1
        self.runtime.metrics.control_connections_rejected.labels(reason="evicted").inc()
        log.info("control.evicted", extra={"fields": {
            "peer": victim.peer.describe(), "max_connections": limit,
            "idle_seconds": round(anyio.current_time() - since, 3)}})

    async def _serve(self, connection: socket.socket) -> None:
        served: Connection | None = None
        try:
            peer = peer_credentials(connection)
            stream = SocketByteStream(connection)
            async with stream:
                if not await self._authorise(peer):
                    await self._reject_permission(stream, peer)
                    return
                log.debug("control.connected", extra={"fields": {"peer": peer.describe()}})
                served = Connection(self, stream, peer)
                self._connections.add(served)
                await served.serve()
        except Exception:
            # One broken connection must never stop the server; log it and go on.
            log.error("control.connection_failed", exc_info=True)
        finally:
            connection.close()
            if served is not None:
                self._connections.discard(served)
            if served is None or not served.evicted:
                # An evicted connection gave up its place when it was evicted.
                self._active -= 1
            self.runtime.metrics.control_connections.set(self._active)

    async def _authorise(self, peer: Peer) -> bool:
        assert self.policy is not None
        decision = self.policy.fast_decision(peer)
        if decision is not None:
            return decision
        with anyio.fail_after(AUTH_TIMEOUT):
            return await anyio.to_thread.run_sync(self.policy.allows, peer)

    async def _reject_permission(self, stream: ByteStream, peer: Peer) -> None:
        assert self.policy is not None
        group = self.policy.group_name
        self.runtime.metrics.control_connections_rejected.labels(reason="permission").inc()
        log.warning("control.permission_denied", extra={"fields": {
            "uid": peer.uid, "gid": peer.gid, "pid": peer.pid, "group": group}})
        if self.policy.group_gid is None:
            hint = "only root and the daemon's user may use it"
        else:
            hint = f"join group {group!r} (then log in again), or run as root"
        message = (f"permission denied: uid {peer.uid} may not use the walacord control "
                   f"socket; {hint}")
        await _send_and_close(stream, encode_error(
            None, ErrorCode.PERMISSION_DENIED, message, {"uid": peer.uid, "group": group}))

    async def _reject_busy(self, connection: socket.socket, limit: int) -> None:
        self.runtime.metrics.control_connections_rejected.labels(reason="busy").inc()
        log.warning("control.busy", extra={"fields": {"max_connections": limit}})
        try:
            stream = SocketByteStream(connection)
            async with stream:
                await _send_and_close(stream, encode_error(
                    None, ErrorCode.BUSY,
                    f"too many control connections (max {limit}), and none has been idle "
                    f"for {self.evict_min_idle:g}s or longer; retry in a moment",
                    {"max_connections": limit}))
        except OSError:
            pass  # the client has gone already; nothing to tell it
        finally:
            connection.close()
            self._rejecting -= 1


async def _send_and_close(stream: ByteStream, data: bytes) -> None:
    with anyio.move_on_after(REJECT_TIMEOUT):
        try:
            await stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
    await stream.aclose()
