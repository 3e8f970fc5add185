"""One control connection: read request lines under deadlines, call methods, write responses.

Requests on one connection are served in order, one at a time, with one exception:
a request of a method registered as `concurrent` (such as `outbox.enqueue`) runs
together with the concurrent requests already buffered behind it, up to
PIPELINE_WINDOW of them, so a client that pipelines enqueues shares one group commit
among them. Responses always follow request order. Responses to pipelined requests
are written together once no complete request line is buffered or 64 KiB of responses
are queued, so a quick response can wait behind a slow call pipelined after it.

A request that arrives alone while the connection waits for its next request, for a
method with a submit handler (such as `outbox.enqueue`), starts from the socket's
reader callback, and the callback that ends it writes the response. It costs no task
switch. Reading pauses until that response is written, which keeps request order.

Every read has a deadline: the first byte of a request must come within `idle_timeout`
of the previous response, and the rest of the line within `request_timeout` of its
first byte. Every write has `write_timeout`. A line longer than `max_request_bytes` gets
one error response, and its remaining bytes are discarded as they arrive. Memory per
connection therefore stays below `max_request_bytes` plus one read chunk.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import TYPE_CHECKING

import anyio

from walacord.control.calls import run_batch, run_call, submit_call
from walacord.control.protocol import (
    ErrorCode,
    Request,
    RequestId,
    decode_request,
    encode_error,
    encode_progress,
)
from walacord.control.registry import Method, Peer
from walacord.control.stream import SocketByteStream

if TYPE_CHECKING:
    from walacord.control.server import ControlServer

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 64 * 1024
OUTPUT_FLUSH_BYTES = 64 * 1024
# Buffered requests of concurrent methods that one connection runs at once. Memory stays
# bounded because no more bytes are read while they run.
PIPELINE_WINDOW = 64
INVALID_METHOD_LABEL = "(invalid)"


class ReadEvent(enum.Enum):
    """A reason a read ended without a complete line."""

    END_OF_STREAM = "end of stream"
    TRUNCATED = "truncated"
    TOO_LARGE = "too large"
    IDLE_TIMEOUT = "idle timeout"
    REQUEST_TIMEOUT = "request timeout"


class LineReader:
    """Split a byte stream into lines without ever holding more than `max_line` bytes of one."""

    def __init__(self, stream: SocketByteStream, max_line: int) -> None:
        self._stream = stream
        self._max_line = max_line
        self._buffer = bytearray()
        self._start = 0  # first unconsumed byte in _buffer
        self._scanned = 0  # bytes from _start known to hold no newline
        self._discarding = False  # inside an oversized line that already got its error
        self._request_began: float | None = None
        self._closed = False
        self._cancelled = False
        # Set by the connection while it serves a request without reading: the idle
        # timeout then does not run, and restarts at `idle_from` afterwards.
        self.busy = False
        self.idle_from = 0.0

    async def read_line(self, idle_timeout: float, request_timeout: float
                        ) -> bytes | ReadEvent | None:
        """Return the next line without its newline, or the ReadEvent that ended the read.

        Return None when `cancel()` stopped the read.
        """
        self._cancelled = False
        while True:
            # Step 1: return a complete line already in the buffer.
            newline = self._buffer.find(b"\n", self._start + self._scanned)
            if newline >= 0:
                line = bytes(self._buffer[self._start:newline])
                self._start = newline + 1
                self._scanned = 0
                self._request_began = anyio.current_time() if self._pending() else None
                if self._discarding:
                    self._discarding = False
                    continue
                if len(line) > self._max_line:
                    return ReadEvent.TOO_LARGE
                return line

            # Step 2: report an oversized line once, then drop its bytes as they come.
            self._scanned = self._pending()
            if self._discarding:
                self._drop_pending()
            elif self._pending() > self._max_line:
                self._drop_pending()
                self._discarding = True
                return ReadEvent.TOO_LARGE

            # Step 3: wait for more bytes, under the idle or the request deadline.
            if self._closed:
                partial = self._pending() > 0 and not self._discarding
                self._drop_pending()
                return ReadEvent.TRUNCATED if partial else ReadEvent.END_OF_STREAM
            event = await self._receive(idle_timeout, request_timeout)
            if self._cancelled:
                return None
            if event is not None:
                return event

    def cancel(self) -> None:
        """Stop a `read_line()` that is waiting for bytes; it returns None."""
        self._cancelled = True
        self._stream.interrupt()

    def waiting_for_request(self) -> bool:
        """Return whether no byte of a next request has arrived yet."""
        return self._request_began is None

    def is_empty(self) -> bool:
        """Return whether the reader contains no bytes and no unfinished line to discard."""
        return self._start == len(self._buffer) and not self._discarding and not self._closed

    def has_line(self) -> bool:
        """Return whether a complete line is already buffered, so reading will not wait."""
        return self._buffer.find(b"\n", self._start + self._scanned) >= 0

    def peek_line(self) -> bytes | None:
        """Return the next buffered line without consuming it, or None when there is no
        complete line of valid length; `skip_line()` then consumes it."""
        if self._discarding:
            return None
        newline = self._buffer.find(b"\n", self._start + self._scanned)
        if newline < 0 or newline - self._start > self._max_line:
            return None
        return bytes(self._buffer[self._start:newline])

    def skip_line(self) -> None:
        """Consume the line that `peek_line()` returned."""
        newline = self._buffer.find(b"\n", self._start + self._scanned)
        assert newline >= 0, "skip_line() without a buffered line"
        self._start = newline + 1
        self._scanned = 0
        self._request_began = anyio.current_time() if self._pending() else None

    def _pending(self) -> int:
        return len(self._buffer) - self._start

    def _drop_pending(self) -> None:
        self._buffer.clear()
        self._start = 0
        self._scanned = 0

    async def _receive(self, idle_timeout: float, request_timeout: float) -> ReadEvent | None:
        waiting_for_request = self._request_began is None
        if waiting_for_request:
            self.idle_from = anyio.current_time()
        while True:
            if not waiting_for_request:
                assert self._request_began is not None
                deadline = self._request_began + request_timeout
            elif self.busy:
                deadline = anyio.current_time() + idle_timeout
            else:
                deadline = self.idle_from + idle_timeout
            # The stream's own deadline serves both the timeouts and cancel(), because a
            # CancelScope costs microseconds and this runs once per request. Waiting
            # before the first recv() of a request lets a request that arrives whole
            # reach the stream's data hook, and saves a failed recv() when none is there.
            # A client that pipelines often has the next request there already.
            wait_first = waiting_for_request and not self._stream.arrived_while_paused
            try:
                chunk = await self._stream.receive_before(
                    READ_CHUNK_BYTES, deadline, wait_first=wait_first)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._closed = True
                return None
            if chunk is not None:
                break
            if self._cancelled:
                return None
            if not waiting_for_request:
                return ReadEvent.REQUEST_TIMEOUT
            if not self.busy and anyio.current_time() >= self.idle_from + idle_timeout:
                return ReadEvent.IDLE_TIMEOUT

        if self._start and self._start == len(self._buffer):
            self._drop_pending()
        elif self._start > READ_CHUNK_BYTES:
            # Compact now and then instead of on every line, so many short lines in one
            # chunk cost linear time.
            del self._buffer[:self._start]
            self._start = 0
        if self._request_began is None:
            self._request_began = anyio.current_time()
        self._buffer += chunk
        return None


class ConnectionClosedError(Exception):
    """The peer stopped reading or closed the socket; internal to this module."""


class Connection:
    """Serve requests on one accepted, authorised connection until it closes."""

    def __init__(self, server: ControlServer, stream: SocketByteStream, peer: Peer) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        # Responses wait here while more request lines are already buffered, so a client
        # that pipelines many requests gets their responses in few writes.
        self._output: list[bytes] = []
        self._output_bytes = 0
        self._reader: LineReader | None = None
        self._idle_since: float | None = None  # anyio.current_time() the last read began
        self.evicted = False
        # A request served from the stream's reader callback is in progress, or its
        # response could not be written.
        self._submitted = False
        self._submit_failed = False

    def idle_since(self) -> float | None:
        """Return when the connection began waiting for its next request, or None.

        None means it is serving a request, or has received part of the next one.
        """
        reader = self._reader
        if (self._idle_since is None or reader is None or not reader.waiting_for_request()
                or self._submitted):
            return None
        return self._idle_since

    def evict(self) -> None:
        """Close this idle connection to admit another; it gets an EVICTED error first."""
        self.evicted = True
        if self._reader is not None:
            self._reader.cancel()

    async def serve(self) -> None:
        try:
            await self._serve_requests()
            await self._flush()
        except ConnectionClosedError:
            log.debug("control.client_gone", extra={"fields": {"peer": self.peer.describe()}})

    async def _serve_requests(self) -> None:
        config = self.server.runtime.config.control
        reader = self._reader = LineReader(self.stream, config.max_request_bytes)
        self.stream.set_data_hook(self._serve_at_once)
        while True:
            if self._output and not reader.has_line():
                await self._flush()
            self.stream.resume_reading()
            outcome = await self._read_request(reader)
            if self.evicted:
                await self._send_protocol_error(
                    None, ErrorCode.EVICTED,
                    f"connection closed to admit a new client: all "
                    f"{config.max_connections} control connections were open and this one "
                    "was idle the longest. Reconnect to send more requests",
                    {"max_connections": config.max_connections})
                return
            if outcome is None:
                # _submitted_response() handed over a response it could not write.
                if self._submit_failed:
                    raise ConnectionClosedError
                continue
            if isinstance(outcome, bytes):
                await self._serve_line(outcome, reader)
                continue

            if outcome is ReadEvent.END_OF_STREAM:
                return
            if outcome is ReadEvent.TOO_LARGE:
                await self._send_protocol_error(
                    None, ErrorCode.REQUEST_TOO_LARGE,
                    f"request longer than {config.max_request_bytes} bytes; the rest of the "
                    "line is discarded. Split it into smaller requests",
                    {"max_request_bytes": config.max_request_bytes})
                continue
            if outcome is ReadEvent.TRUNCATED:
                await self._send_protocol_error(
                    None, ErrorCode.PARSE_ERROR,
                    "incomplete request: the connection closed before its newline")
                return
            if outcome is ReadEvent.IDLE_TIMEOUT:
                await self._send_protocol_error(
                    None, ErrorCode.IDLE_TIMEOUT,
                    f"no request for {config.idle_timeout:g}s; closing the connection. "
                    "Reconnect to send more requests",
                    {"idle_timeout_seconds": config.idle_timeout})
                return
            await self._send_protocol_error(
                None, ErrorCode.REQUEST_TIMEOUT,
                f"request not completed within {config.request_timeout:g}s of its first byte; "
                "closing the connection. Send each request as one line at once",
                {"request_timeout_seconds": config.request_timeout})
            return

    async def _read_request(self, reader: LineReader) -> bytes | ReadEvent | None:
        """Read the next line as read_line does; return None when evict() cancelled the read."""
        config = self.server.runtime.config.control
        self._idle_since = anyio.current_time()
        try:
            return await reader.read_line(config.idle_timeout, config.request_timeout)
        finally:
            self._idle_since = None

    def _serve_at_once(self, data: bytes) -> bool:
        """Start the request in `data` when `data` is one whole line and its method has a
        submit handler. Return whether it did.

        The stream's reader callback calls this while the task waits for a next
        request. Reading pauses until the response is written, so responses keep
        request order. The task serves all other data as usual.
        """
        reader = self._reader
        newline = data.find(b"\n")
        # The task serves a client that pipelines, because it runs buffered requests
        # together. Served here one at a time, each would pause reading and split the
        # group commit.
        if (newline != len(data) - 1 or reader is None or not reader.is_empty()
                or self._output or self.evicted or self._submitted
                or self.stream.arrived_while_paused
                or newline > self.server.runtime.config.control.max_request_bytes):
            return False
        request = decode_request(data)
        if request.error is not None:
            return False
        method = self.server.runtime.methods.get(request.method)
        if method is None or method.submit is None:
            return False

        self._submitted = reader.busy = True
        self.stream.pause_reading()
        submit_call(self.server, self.peer, method, request, self._submitted_response)
        return True

    def _submitted_response(self, response: bytes) -> None:
        self._submitted = False
        reader = self._reader
        assert reader is not None
        reader.busy = False
        # The data hook runs on asyncio only, whose loop clock is anyio.current_time().
        # Reading it directly skips anyio's backend lookup on every response.
        reader.idle_from = self._idle_since = asyncio.get_running_loop().time()
        try:
            sent = self.stream.send_nowait(response)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._submit_failed = True
            reader.cancel()
            return
        if sent < len(response):
            # The socket buffer is full, so the task writes the rest under write_timeout.
            self._output.append(response[sent:])
            self._output_bytes += len(response) - sent
            reader.cancel()
            return
        self.stream.resume_reading()

    async def _serve_line(self, line: bytes, reader: LineReader) -> None:
        request = decode_request(line)
        if request.error is not None:
            await self._send_protocol_error(request.id, request.error.code,
                                            request.error.message, request.error.data)
            return

        method = self.server.runtime.methods.get(request.method)
        if method is None:
            await self._send_protocol_error(
                request.id, ErrorCode.METHOD_NOT_FOUND,
                f"unknown method {request.method[:80]!r}; this daemon provides: "
                f"{', '.join(self.server.runtime.methods.names())}")
            return

        window = self._take_window(method, request, reader)
        if len(window) == 1:
            await self._send(await self._timed_call(method, request))
            return
        if method.batch_handler is not None and all(each is method for each, _ in window):
            for response in await run_batch(self.server, self.peer, method,
                                            [each for _, each in window]):
                await self._send(response)
            return

        responses = [b""] * len(window)

        async def serve(index: int, method: Method, request: Request) -> None:
            responses[index] = await self._timed_call(method, request)

        async with anyio.create_task_group() as tasks:
            for index, (each_method, each_request) in enumerate(window):
                tasks.start_soon(serve, index, each_method, each_request)
        for response in responses:
            await self._send(response)

    def _take_window(self, method: Method, request: Request, reader: LineReader
                     ) -> list[tuple[Method, Request]]:
        """Return the request, and the concurrent requests buffered behind it when its
        method is concurrent; the first line that does not qualify stays buffered."""
        window = [(method, request)]
        methods = self.server.runtime.methods
        while method.concurrent and len(window) < PIPELINE_WINDOW:
            line = reader.peek_line()
            if line is None:
                break
            following = decode_request(line)
            following_method = None if following.error else methods.get(following.method)
            if following_method is None or not following_method.concurrent:
                break
            reader.skip_line()
            window.append((following_method, following))
        return window

    async def _timed_call(self, method: Method, request: Request) -> bytes:
        return await run_call(self.server, self.peer, method, request,
                              lambda done, total, message: self._send_progress(
                                  request.id, done, total, message))

    async def _send_protocol_error(self, request_id: RequestId, code: int, message: str,
                                   data: object = None) -> None:
        for counter in self.server.protocol_error_counters(code):
            counter.inc()
        log.debug("control.request_rejected", extra={"fields": {
            "code": code, "error": message, "uid": self.peer.uid}})
        await self._send(encode_error(request_id, code, message, data))

    async def _send_progress(self, request_id: RequestId, done: float, total: float | None,
                             message: str) -> None:
        await self._send(encode_progress(request_id, done, total, message))
        await self._flush()

    async def _send(self, data: bytes) -> None:
        """Queue a response line; it is written before the next read or when much is queued."""
        self._output.append(data)
        self._output_bytes += len(data)
        if self._output_bytes >= OUTPUT_FLUSH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        if not self._output:
            return
        data = b"".join(self._output) if len(self._output) > 1 else self._output[0]
        self._output.clear()
        self._output_bytes = 0
        timeout = self.server.runtime.config.control.write_timeout
        try:
            # Most responses fit in the socket buffer at once, which needs no deadline.
            sent = self.stream.send_nowait(data)
            if sent == len(data):
                return
            data = data[sent:]
            with anyio.fail_after(timeout):
                await self.stream.send(data)
        except TimeoutError:
            log.info("control.write_timed_out", extra={"fields": {
                "peer": self.peer.describe(), "write_timeout_seconds": timeout}})
            raise ConnectionClosedError from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise ConnectionClosedError from None
