"""A small client for applications that hand operations to walacord's outbox.

It speaks the control protocol: a Unix socket carrying newline-delimited JSON, one
request `{"id": N, "method": M, "params": {...}, "version": 1}` per line, and one
response `{"id": N, "result": ...}` or `{"id": N, "error": {"code", "message", "data"}}`.
`AsyncOutboxClient` runs on anyio; `OutboxClient` blocks and suits plain scripts.
An enqueue returns only after walacord stored the operation durably.

    async with AsyncOutboxClient("/run/walacord/control.sock") as client:
        await client.enqueue_walacor(10001, key="invoice-42", data={"amount": 12})
"""

from __future__ import annotations

import socket
from types import TracebackType
from typing import Any, Self

import anyio
import orjson

from walacord.control.client import connect_failure
from walacord.control.stream import SocketByteStream
from walacord.errors import ControlClientError, ControlError, WalacordError

PROTOCOL_VERSION = 1
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


def _check_finite(value: Any, where: str) -> None:
    """Raise WalacordError naming the field when `value` contains NaN or an infinity.

    orjson would send them as null, so the stored payload would differ from the one given.
    """
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise WalacordError(f"{where} is {value!r}, which JSON cannot carry; send a "
                                "number, a string or null instead")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_finite(item, f"{where}[{index}]")


def _encode(request_id: int, method: str, params: dict[str, Any]) -> bytes:
    encoded = orjson.dumps({"id": request_id, "method": method, "params": params,
                            "version": PROTOCOL_VERSION}) + b"\n"
    # orjson writes NaN and the infinities as null, so only a request that contains
    # null needs the walk over every value.
    if b"null" in encoded:
        _check_finite(params, "params")
    return encoded


def _parse(line: bytes) -> dict[str, Any]:
    try:
        response = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise WalacordError(f"invalid response from walacord: {exc}") from None
    if not isinstance(response, dict):
        raise WalacordError(f"invalid response from walacord: {line[:200]!r}")
    return response


def _is_progress(response: dict[str, Any]) -> bool:
    """Tell a progress line, which a long call sends before its response, from the rest."""
    return "progress" in response and "result" not in response and "error" not in response


def _result(response: dict[str, Any], request_id: int) -> Any:
    error = response.get("error")
    # A request the server could not read (too long, say) gets an error without an id.
    # Responses come in request order, so it belongs to the request waiting first.
    unread = response.get("id") is None and isinstance(error, dict)
    if response.get("id") != request_id and not unread:
        raise WalacordError(f"response does not match request {request_id}: "
                            f"{str(response)[:200]}")
    if error is not None:
        raise ControlError(int(error.get("code", 0)), str(error.get("message", "")),
                           error.get("data"))
    return response.get("result")


class _Turn:
    """One call's place in the reading order of a connection."""

    __slots__ = ("done", "event")

    def __init__(self) -> None:
        self.done = False
        # Created only when a later call has to wait for this one.
        self.event: anyio.Event | None = None


class AsyncOutboxClient:
    """One connection to the control socket.

    Tasks may share it: their requests are pipelined, written together when they
    queue up during a write, and each task reads its own response in request order.
    walacord serves pipelined enqueues together, so they share one durable commit.
    After a failed send or read the connection is out of step and every later call
    raises WalacordError; open a new client then.
    """

    def __init__(self, path: str = DEFAULT_SOCKET, *, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._stream: SocketByteStream | None = None
        self._buffer = bytearray()  # received bytes not yet returned as a response line
        # Encoded requests not yet written, and whether a task is writing them.
        self._outgoing: list[bytes] = []
        self._sending = False
        # The turn of the call queued last, until its response has been read.
        self._last_turn: _Turn | None = None
        self._broken: str | None = None
        self._next_id = 0

    async def __aenter__(self) -> Self:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            with anyio.fail_after(self.timeout):
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
        self._stream = SocketByteStream(sock)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._stream is not None:
            await self._stream.aclose()
        self._stream = None

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Send one request and return its result; raise ControlError on an error reply.

        Raise TimeoutError when the response takes longer than `timeout` seconds,
        counted from when the call starts, including the wait for pipelined calls
        sent before it.
        """
        stream = self._stream
        if stream is None:
            raise WalacordError("client is not connected; use it as `async with`")
        # The deadline goes to each wait instead of into a CancelScope around the call,
        # because a CancelScope costs several microseconds per call.
        deadline = anyio.current_time() + self.timeout
        self._check_usable()
        # Queue the request and take the next place in the reading order with no
        # await in between, so that the reading order is the sending order.
        # Encoding can reject the input, so it comes before the turn is taken.
        request_id = self._next_id + 1
        encoded = _encode(request_id, method, params or {})
        self._next_id = request_id
        previous, own_turn = self._last_turn, _Turn()
        self._last_turn = own_turn
        self._outgoing.append(encoded)
        try:
            if not self._sending:
                await self._send_outgoing(stream, deadline, method)
            if previous is not None and not previous.done:
                if previous.event is None:
                    previous.event = anyio.Event()
                with anyio.CancelScope(deadline=deadline):
                    await previous.event.wait()
                if not previous.done:
                    raise self._timed_out(method)
            self._check_usable()
            # A response to the request just sent cannot have arrived yet, unless
            # earlier calls are still being read.
            response = _parse(await self._receive_line(stream, deadline, method,
                                                       wait_first=previous is None))
            while _is_progress(response):
                response = _parse(await self._receive_line(stream, deadline, method))
        except BaseException as exc:
            if self._broken is None:
                self._broken = f"{method} failed: {exc!r}"
            raise
        finally:
            own_turn.done = True
            if own_turn.event is not None:
                own_turn.event.set()
            if self._last_turn is own_turn:
                self._last_turn = None
        return _result(response, request_id)

    def _timed_out(self, method: str) -> TimeoutError:
        return TimeoutError(f"{method} got no response from {self.path} within "
                            f"{self.timeout:g}s")

    async def _send_outgoing(self, stream: SocketByteStream, deadline: float,
                             method: str) -> None:
        """Write queued requests until none is left.

        Requests that other tasks queue while a write is in progress go out together
        in the next write, so pipelined calls cost few system calls. A request that
        fits in the socket buffer is written without a wait.
        """
        self._sending = True
        try:
            while self._outgoing:
                data = b"".join(self._outgoing) if len(self._outgoing) > 1 \
                    else self._outgoing[0]
                self._outgoing.clear()
                sent = stream.send_nowait(data)
                if sent < len(data):
                    with anyio.CancelScope(deadline=deadline) as scope:
                        await stream.send(data[sent:])
                    if scope.cancelled_caught:
                        raise self._timed_out(method)
        finally:
            self._sending = False

    async def _receive_line(self, stream: SocketByteStream, deadline: float,
                            method: str, *, wait_first: bool = False) -> bytes:
        """Return the next response line without its newline; `wait_first` is passed to
        the first receive."""
        buffer = self._buffer
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
            try:
                chunk = await stream.receive_before(65536, deadline, wait_first=wait_first)
                wait_first = False
            except anyio.EndOfStream:
                raise WalacordError("walacord closed the connection before responding"
                                    ) from None
            if chunk is None:
                raise self._timed_out(method)
            buffer += chunk

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise WalacordError(f"the connection to {self.path} is out of step because "
                                f"{self._broken}; open a new client")

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
    """The blocking twin of AsyncOutboxClient, for code without an event loop."""

    def __init__(self, path: str = DEFAULT_SOCKET, *, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._next_id = 0

    def __enter__(self) -> Self:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise ControlClientError(connect_failure(self.path, exc, self.timeout)) from None
        self._sock = sock
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        if self._sock is None:
            raise WalacordError("client is not connected; use it as `with`")
        self._next_id += 1
        self._sock.sendall(_encode(self._next_id, method, params or {}))
        return self._receive(self._next_id)

    def _receive(self, request_id: int) -> Any:
        assert self._sock is not None
        while b"\n" not in self._buffer:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise WalacordError("walacord closed the connection before responding")
            self._buffer += chunk
            if len(self._buffer) > MAX_RESPONSE_BYTES:
                raise WalacordError("response from walacord is larger than "
                                    f"{MAX_RESPONSE_BYTES} bytes")
        line, self._buffer = self._buffer.split(b"\n", 1)
        response = _parse(line)
        if _is_progress(response):
            return self._receive(request_id)
        return _result(response, request_id)

    def enqueue(self, operation: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.call("outbox.enqueue", operation)
        return result

    def enqueue_many(self, operations: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(self.call("outbox.enqueue", {"operations": operations})["results"])

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("outbox.stats")
        return result
