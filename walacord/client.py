"""A small client for applications that hand operations to walacord's outbox.

It speaks the control protocol: a Unix socket carrying newline-delimited JSON, one
request `{"id": N, "method": M, "params": {...}, "version": 1}` per line, and one
response `{"id": N, "result": ...}` or `{"id": N, "error": {"code", "message", "data"}}`.
`AsyncOutboxClient` runs on anyio; `OutboxClient` blocks and suits plain scripts.
An enqueue returns only after walacord stored the operation durably.

    async with AsyncOutboxClient("/run/walacord/control.sock") as client:
        await client.enqueue_walacor(10001, key="invoice-42", data={"amount": 12})

Every error the clients raise for a failed call is a WalacordError:

- ControlError: walacord sent an error response, whose `code` and `data` give the reason.
- ControlTimeoutError (also a TimeoutError) and ControlConnectionError (also a
  ConnectionError): the response never came, so the request may or may not have taken
  effect. walacord stores each key only once, so enqueueing the same operation again
  is safe. The client closes that connection and the next call opens a new one.
- RequestEncodeError (also a TypeError and a ValueError): a value in the request
  cannot be sent as JSON. Nothing was sent, and the connection stays usable.
- ControlClientError: the client could not connect to the socket.
"""

from __future__ import annotations

import math
import socket
from types import TracebackType
from typing import Any, Self

import anyio

# Re-exported, because walacord.client defined it before client_json existed.
from walacord.client_json import PROTOCOL_VERSION as PROTOCOL_VERSION
from walacord.client_json import (
    check_response_id,
    encode_request,
    is_progress,
    parse_response,
    response_result,
)
from walacord.control.client import connect_failure
from walacord.control.stream import SocketByteStream
from walacord.errors import (
    ControlClientError,
    ControlConnectionError,
    ControlTimeoutError,
    WalacordError,
)

MAX_RESPONSE_BYTES = 64 * 1024 * 1024
DEFAULT_SOCKET = "/run/walacord/control.sock"


def walacor_operation(etid: int, *, key: str, data: dict[str, Any],
                      ordering_key: str | None = None) -> dict[str, Any]:
    """Build an operation that stores `data` as a Walacor record of `etid`."""
    operation: dict[str, Any] = {"sink": "walacor", "etid": etid, "key": key, "data": data}
    if ordering_key is not None:
        operation["ordering_key"] = ordering_key
    return operation


def postgres_operation(statement: str, *, key: str, params: dict[str, Any],
                       ordering_key: str | None = None) -> dict[str, Any]:
    """Build an operation that runs the configured statement `statement` with `params`."""
    operation: dict[str, Any] = {"sink": "postgres", "statement": statement, "key": key,
                                 "params": params}
    if ordering_key is not None:
        operation["ordering_key"] = ordering_key
    return operation


def _outcome_unknown(method: str) -> str:
    """Say what a caller may assume about a request whose response never came."""
    if method == "outbox.enqueue":
        return ("The operation may or may not have been stored. Retrying it with the same "
                "key is safe, because walacord stores each key only once.")
    return f"{method} may or may not have taken effect."


def _timed_out(path: str, method: str, timeout: float) -> ControlTimeoutError:
    return ControlTimeoutError(
        f"{method} timed out because walacord at {path} sent no response within "
        f"{timeout:g}s. {_outcome_unknown(method)} The next call opens a new connection.")


def _connection_lost(path: str, method: str, reason: str) -> ControlConnectionError:
    return ControlConnectionError(
        f"The connection to walacord at {path} closed before {method} got its response "
        f"({reason}). The daemon may have restarted. {_outcome_unknown(method)} "
        "The next call opens a new connection.")


def _checked_timeout(timeout: float) -> float:
    """Return `timeout`, or raise WalacordError when it is not a positive, finite number of
    seconds: socket calls reject NaN and negative values with errors of their own, and
    treat 0 as non-blocking."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) \
            or not 0 < timeout < math.inf:
        raise WalacordError(f"timeout must be a positive, finite number of seconds, got "
                            f"{timeout!r}")
    return float(timeout)


def _readable_now(sock: socket.socket) -> bool:
    """Return whether data or the end of the stream waits on `sock`, without reading."""
    # With a timeout set, recv() first waits up to that long for data; a non-blocking
    # socket returns at once.
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(timeout)
    return True


def _os_reason(exc: BaseException | None) -> str:
    """Return the system's description of a socket error, such as "Broken pipe"."""
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return "end of stream"


class _Turn:
    """One call's place in the reading order of a connection."""

    __slots__ = ("done", "event")

    def __init__(self) -> None:
        self.done = False
        # Created only when a later call has to wait for this one.
        self.event: anyio.Event | None = None


class _Connection:
    """One connection of an AsyncOutboxClient and the calls pipelined on it."""

    __slots__ = ("broken", "buffer", "calls", "last_turn", "outgoing", "sending", "stream")

    def __init__(self, stream: SocketByteStream) -> None:
        self.stream = stream
        self.buffer = bytearray()  # received bytes not yet returned as a response line
        # Encoded requests not yet written, and whether a task is writing them.
        self.outgoing: list[bytes] = []
        self.sending = False
        # The turn of the call queued last, until its response has been read.
        self.last_turn: _Turn | None = None
        self.calls = 0  # calls that took a turn and have not finished
        # Why the connection is out of step, once a call failed with its response unread.
        self.broken: str | None = None


class AsyncOutboxClient:
    """A client of the control socket that opens one connection at a time.

    Tasks may share it: their requests are pipelined, written together when they
    queue up during a write, and each task reads its own response in request order.
    walacord serves pipelined enqueues together, so they share one durable commit.
    A call that fails after sending its request (a timeout, a closed connection, a
    cancellation) leaves its response unread, so the connection is out of step. Calls
    already queued behind it raise ControlConnectionError, the connection closes once
    they have finished, and the next call opens a new connection.
    """

    def __init__(self, path: str = DEFAULT_SOCKET, *, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = _checked_timeout(timeout)
        self._connection: _Connection | None = None
        self._entered = False
        self._connect_lock: anyio.Lock | None = None
        self._next_id = 0

    async def __aenter__(self) -> Self:
        self._connect_lock = anyio.Lock()
        self._connection = _Connection(await self._open_stream(
            anyio.current_time() + self.timeout))
        self._entered = True
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self._entered = False
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.stream.aclose()

    async def _open_stream(self, deadline: float) -> SocketByteStream:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            with anyio.fail_after(max(deadline - anyio.current_time(), 0)):
                while True:
                    try:
                        sock.connect(self.path)
                        break
                    except BlockingIOError:
                        # The listen backlog is full, so wait until the socket accepts one.
                        await anyio.wait_writable(sock)
        except OSError as exc:
            sock.close()
            raise ControlClientError(connect_failure(self.path, exc, self.timeout)) from None
        except BaseException:
            sock.close()
            raise
        return SocketByteStream(sock)

    async def _reconnect(self, deadline: float) -> _Connection:
        """Return the current connection, opening a new one if the last one is out of step."""
        if not self._entered or self._connect_lock is None:
            raise WalacordError("client is not connected; use it as `async with`")
        async with self._connect_lock:
            connection = self._connection
            if connection is None or connection.broken is not None:
                connection = _Connection(await self._open_stream(deadline))
                self._connection = connection
        return connection

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Send one request and return its result; raise ControlError on an error reply.

        Raise ControlTimeoutError when the response takes longer than `timeout`
        seconds, counted from when the call starts, including the wait for pipelined
        calls sent before it. Raise ControlConnectionError when the connection closes
        first. After either error the request may or may not have taken effect.
        """
        # The deadline goes to each wait instead of into a CancelScope around the call,
        # because a CancelScope costs several microseconds per call.
        deadline = anyio.current_time() + self.timeout
        connection = self._connection
        if connection is not None and connection.broken is None and connection.calls == 0 \
                and connection.stream.readable_now():
            # With no request in flight, bytes or the end of the stream mean that walacord
            # closed the connection: it stopped, or the connection was idle for [control]
            # idle_timeout, whose notice comes before the close.
            connection.broken = "walacord closed it between calls"
            await connection.stream.aclose()
        if connection is None or connection.broken is not None:
            connection = await self._reconnect(deadline)
        # Queue the request and take the next place in the reading order with no
        # await in between, so that the reading order is the sending order.
        # Encoding can reject the input, so it comes before the turn is taken.
        request_id = self._next_id + 1
        encoded = encode_request(request_id, method, params or {})
        self._next_id = request_id
        previous, own_turn = connection.last_turn, _Turn()
        connection.last_turn = own_turn
        connection.outgoing.append(encoded)
        connection.calls += 1
        try:
            if not connection.sending:
                await self._send_outgoing(connection, deadline, method)
            if previous is not None and not previous.done:
                if previous.event is None:
                    previous.event = anyio.Event()
                with anyio.CancelScope(deadline=deadline):
                    await previous.event.wait()
                if not previous.done:
                    raise _timed_out(self.path, method, self.timeout)
            if connection.broken is not None:
                raise self._out_of_step(method, connection.broken)
            # A response to the request just sent cannot have arrived yet, unless
            # earlier calls are still being read.
            line = await self._receive_line(connection, deadline, method,
                                            wait_first=previous is None)
            response = parse_response(line)
            while is_progress(response):
                line = await self._receive_line(connection, deadline, method)
                response = parse_response(line)
            check_response_id(response, request_id)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError,
                anyio.EndOfStream) as exc:
            if connection.broken is None:
                error = _connection_lost(self.path, method, _os_reason(exc.__cause__))
                connection.broken = f"{method} failed with {type(error).__name__}"
            else:
                # Another call closed the connection after it fell out of step.
                error = self._out_of_step(method, connection.broken)
            raise error from None
        except BaseException as exc:
            if connection.broken is None:
                connection.broken = f"{method} failed with {type(exc).__name__}"
            raise
        finally:
            own_turn.done = True
            if own_turn.event is not None:
                own_turn.event.set()
            if connection.last_turn is own_turn:
                connection.last_turn = None
            connection.calls -= 1
            if connection.broken is not None and connection.calls == 0:
                with anyio.CancelScope(shield=True):
                    await connection.stream.aclose()
        return response_result(response)

    def _out_of_step(self, method: str, broken: str) -> ControlConnectionError:
        return ControlConnectionError(
            f"{method} was sent on a connection to walacord at {self.path} that an "
            f"earlier call left out of step ({broken}). {_outcome_unknown(method)} "
            "The next call opens a new connection.")

    async def _send_outgoing(self, connection: _Connection, deadline: float,
                             method: str) -> None:
        """Write queued requests until none is left.

        Requests that other tasks queue while a write is in progress go out together
        in the next write, so pipelined calls cost few system calls. A request that
        fits in the socket buffer is written without a wait.
        """
        outgoing = connection.outgoing
        connection.sending = True
        try:
            while outgoing:
                data = b"".join(outgoing) if len(outgoing) > 1 else outgoing[0]
                outgoing.clear()
                sent = connection.stream.send_nowait(data)
                if sent < len(data):
                    with anyio.CancelScope(deadline=deadline) as scope:
                        await connection.stream.send(data[sent:])
                    if scope.cancelled_caught:
                        raise _timed_out(self.path, method, self.timeout)
        finally:
            connection.sending = False

    async def _receive_line(self, connection: _Connection, deadline: float, method: str,
                            *, wait_first: bool = False) -> bytes:
        """Return the next response line without its newline; `wait_first` is passed to
        the first receive.

        Raise ControlTimeoutError at the deadline, and EndOfStream when walacord has
        closed the connection.
        """
        buffer = connection.buffer
        scanned = 0
        while True:
            newline = buffer.find(b"\n", scanned)
            if newline >= 0:
                line = bytes(buffer[:newline])
                del buffer[:newline + 1]
                return line
            if len(buffer) > MAX_RESPONSE_BYTES:
                raise WalacordError("response from walacord is larger than "
                                    f"{MAX_RESPONSE_BYTES} bytes")
            scanned = len(buffer)
            chunk = await connection.stream.receive_before(65536, deadline,
                                                           wait_first=wait_first)
            wait_first = False
            if chunk is None:
                raise _timed_out(self.path, method, self.timeout)
            buffer += chunk

    async def enqueue(self, operation: dict[str, Any]) -> dict[str, Any]:
        """Enqueue one operation; return its id, key, state and whether it was new."""
        result: dict[str, Any] = await self.call("outbox.enqueue", operation)
        return result

    async def enqueue_many(self, operations: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Enqueue a batch in one durable transaction, all or none."""
        result = await self.call("outbox.enqueue", {"operations": operations})
        return list(result["results"])

    async def enqueue_walacor(self, etid: int, *, key: str, data: dict[str, Any],
                              ordering_key: str | None = None) -> dict[str, Any]:
        return await self.enqueue(walacor_operation(etid, key=key, data=data,
                                                    ordering_key=ordering_key))

    async def enqueue_postgres(self, statement: str, *, key: str, params: dict[str, Any],
                               ordering_key: str | None = None) -> dict[str, Any]:
        return await self.enqueue(postgres_operation(statement, key=key, params=params,
                                                     ordering_key=ordering_key))

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("outbox.stats")
        return result


class OutboxClient:
    """The blocking twin of AsyncOutboxClient, for code without an event loop.

    One thread at a time may use it. `timeout` bounds the connect, the send and each
    read of a response (a progress line starts a new wait), whereas
    AsyncOutboxClient bounds the whole call. A call that fails after sending its
    request closes the connection, and the next call opens a new one.
    """

    def __init__(self, path: str = DEFAULT_SOCKET, *, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = _checked_timeout(timeout)
        self._sock: socket.socket | None = None
        self._entered = False
        self._buffer = b""
        self._next_id = 0

    def __enter__(self) -> Self:
        self._sock = self._connect()
        self._entered = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._entered = False
        self._close()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise ControlClientError(connect_failure(self.path, exc, self.timeout)) from None
        return sock

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._buffer = b""

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Send one request and return its result; raise ControlError on an error reply.

        Raise ControlTimeoutError or ControlConnectionError when the response does
        not come, in which case the request may or may not have taken effect.
        """
        if not self._entered:
            raise WalacordError("client is not connected; use it as `with`")
        request_id = self._next_id + 1
        encoded = encode_request(request_id, method, params or {})
        self._next_id = request_id
        sock = self._sock
        if sock is not None and (self._buffer or _readable_now(sock)):
            # With no request in flight, bytes or the end of the stream mean that walacord
            # closed the connection: it stopped, or the connection was idle for [control]
            # idle_timeout, whose notice comes before the close.
            self._close()
            sock = None
        if sock is None:
            sock = self._sock = self._connect()

        # Any failure from here on can leave the response unread, and a later call
        # would read it as its own, so the connection is closed.
        try:
            if sock.gettimeout() != self.timeout:
                sock.settimeout(self.timeout)
            sock.sendall(encoded)
            response = self._receive(sock, method)
            check_response_id(response, request_id)
        except WalacordError:
            self._close()
            raise
        except TimeoutError:
            self._close()
            raise _timed_out(self.path, method, self.timeout) from None
        except OSError as exc:
            self._close()
            raise _connection_lost(self.path, method, _os_reason(exc)) from None
        except BaseException:
            self._close()
            raise
        return response_result(response)

    def _receive(self, sock: socket.socket, method: str) -> dict[str, Any]:
        """Read the next response, skipping progress lines."""
        while True:
            while b"\n" not in self._buffer:
                chunk = sock.recv(65536)
                if not chunk:
                    raise _connection_lost(self.path, method, _os_reason(None))
                self._buffer += chunk
                if len(self._buffer) > MAX_RESPONSE_BYTES:
                    raise WalacordError("response from walacord is larger than "
                                        f"{MAX_RESPONSE_BYTES} bytes")
            line, self._buffer = self._buffer.split(b"\n", 1)
            response = parse_response(line)
            if not is_progress(response):
                return response

    def enqueue(self, operation: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.call("outbox.enqueue", operation)
        return result

    def enqueue_many(self, operations: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(self.call("outbox.enqueue", {"operations": operations})["results"])

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("outbox.stats")
        return result
