"""A byte stream over a non-blocking socket that calls recv() only inside a receive.

Unread data therefore stays in the kernel's socket buffer, where it blocks the client's
sends instead of growing the daemon's memory. The anyio 4.16 alternatives fall short
here: UNIXSocketStream can raise InvalidStateError inside the event loop when a receive
is cancelled just as data arrives, and the transport-based SocketStream reads into a
queue until its first `receive()` pauses the transport.

The socket stays registered with the event loop between receives, because adding and
removing it for every receive (as `anyio.wait_readable()` does) was a large share of a
short request's CPU time. It is removed only when it becomes readable while no receive
waits, so unread data never makes the loop spin. On anyio backends other than asyncio
the stream waits through `anyio.wait_readable()` instead, and has no data hook.
"""

from __future__ import annotations

import asyncio
import math
import socket
from collections.abc import Callable

import anyio
from anyio.abc import ByteStream

# Reasons a waiting receive wakes: data or end of stream, the stream's closing, or the
# deadline or `interrupt()`.
_READABLE, _CLOSED, _STOPPED = 1, 2, 3
# Takes bytes that arrived while a receive waited; returns True when it consumed them.
DataHook = Callable[[bytes], bool]


class SocketByteStream(ByteStream):
    """Stream over a connected, non-blocking socket; one reader and one writer at a time."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watching = False  # the socket is registered with the loop for reading
        self._paused = False
        # Bytes arrived while reading was paused: the peer sends requests without
        # waiting for each response.
        self.arrived_while_paused = False
        self._waiter: asyncio.Future[int | bytes] | None = None
        self._receive_size = 65536  # max_bytes of the receive that waits
        self._data_hook: DataHook | None = None
        self._portable_scope: anyio.CancelScope | None = None  # without asyncio

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await self.receive_before(max_bytes, None)
        assert data is not None, "interrupt() called during receive()"
        return data

    async def receive_before(self, max_bytes: int, deadline: float | None, *,
                             wait_first: bool = False) -> bytes | None:
        """Receive as `receive()` does; return None once `deadline` passes or
        `interrupt()` is called first.

        `deadline` is in `anyio.current_time()` seconds; None waits without a limit.
        `wait_first` skips the first recv(), which saves a failed system call when
        the caller has just sent a request and its response cannot be there yet.
        """
        waited = False
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            data: bytes | None = None
            if wait_first:
                wait_first = False
            else:
                try:
                    data = self._sock.recv(max_bytes)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise anyio.BrokenResourceError from exc
            if data is None:
                self._receive_size = max_bytes
                woken = await self._wait_readable(deadline)
                if isinstance(woken, bytes):
                    return woken
                if woken == _STOPPED:
                    return None
                if woken == _CLOSED:
                    raise anyio.ClosedResourceError
                waited = True
                continue
            if not waited:
                # Yield once per receive, because `send_nowait()` does not yield and a
                # peer that keeps the socket full must not hold the event loop. The
                # yield is shielded, since a cancellation here would lose the bytes read.
                await anyio.lowlevel.cancel_shielded_checkpoint()
            if not data:
                raise anyio.EndOfStream
            return data

    def interrupt(self) -> None:
        """Make a waiting `receive_before()` return None; bytes stay unread."""
        _wake(self._waiter, _STOPPED)
        if self._portable_scope is not None:
            self._portable_scope.cancel()

    def set_data_hook(self, hook: DataHook | None) -> None:
        """Offer bytes that arrive while a receive waits to `hook` first.

        The hook runs in the event loop's reader callback, so it saves the waiting
        task a wake-up. Bytes it does not consume go to the receive as usual.
        """
        self._data_hook = hook

    def pause_reading(self) -> None:
        """Leave bytes that arrive from now on unread, so a waiting receive stays waiting.

        The socket stays registered until such bytes arrive, because a client that
        waits for each response sends nothing meanwhile, and registering again costs
        a system call.
        """
        self._paused = True

    def resume_reading(self) -> None:
        """Undo `pause_reading()`."""
        if self._paused:
            self._paused = False
            waiter = self._waiter
            if waiter is not None and not waiter.done() and not self._closed:
                self._watch()

    def _watch(self) -> None:
        if not self._watching:
            assert self._loop is not None
            # A socket closed without aclose() leaves its number registered in the
            # loop, and add_reader() would then only swap the callback, so a stale
            # registration is removed first.
            self._loop.remove_reader(self._fd)
            self._loop.add_reader(self._fd, self._on_readable)
            self._watching = True

    async def _wait_readable(self, deadline: float | None) -> int | bytes:
        if self._waiter is not None:
            raise anyio.BusyResourceError("reading from")
        loop = self._loop
        if loop is None:
            try:
                loop = self._loop = asyncio.get_running_loop()
            except RuntimeError:
                return await self._wait_portable(deadline)
        waiter = self._waiter = loop.create_future()
        if not self._paused:
            self._watch()
        timer = None if deadline is None else loop.call_at(deadline, _wake, waiter, _STOPPED)
        try:
            return await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def _wait_portable(self, deadline: float | None) -> int:
        # NOTE: no test runs this path, because the test suite runs on asyncio only.
        with anyio.CancelScope(deadline=math.inf if deadline is None else deadline) as scope:
            self._portable_scope = scope
            try:
                await anyio.wait_readable(self._sock)
            except anyio.ClosedResourceError:
                return _CLOSED
            finally:
                self._portable_scope = None
        return _STOPPED if scope.cancelled_caught else _READABLE

    def _on_readable(self) -> None:
        waiter = self._waiter
        if self._paused:
            self.arrived_while_paused = True
        if waiter is None or self._paused:
            # No receive is waiting, so stop watching until the next one; the loop
            # would otherwise call this on every iteration while the data stays unread.
            self._unwatch()
        elif not waiter.done():
            # Reading here, not in the woken task, means a stale event costs no
            # wake-up. The loop can report a socket as readable after a task read it
            # in the same iteration, when a client's next receive already waits for
            # the next response.
            try:
                data = self._sock.recv(self._receive_size)
            except BlockingIOError:
                return
            except OSError:
                # The receive itself raises it, or reports the end of the stream.
                waiter.set_result(_READABLE)
                return
            if not data:
                waiter.set_result(_READABLE)  # end of stream; recv() returns b"" again
            elif self._data_hook is None or (not self._data_hook(data)
                                             and not waiter.done()):
                waiter.set_result(data)
        # A done waiter's task runs in this loop iteration and receives the data.

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            assert self._loop is not None
            self._loop.remove_reader(self._fd)

    def readable_now(self) -> bool:
        """Return whether data or the end of the stream is waiting, without reading it.

        A client that has no request in flight expects nothing. So either means that the
        server sent a notice and closed the connection (an idle timeout, an eviction),
        and a request sent now would be lost.
        """
        if self._closed:
            return True
        try:
            self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return True

    def send_nowait(self, item: bytes) -> int:
        """Write what the socket buffer takes of `item` now; return the bytes written.

        Raise BrokenResourceError or ClosedResourceError as `send()` does. A short
        response usually fits whole, so the caller skips `send()`'s deadline and
        checkpoint.
        """
        if self._closed:
            raise anyio.ClosedResourceError
        try:
            return self._sock.send(item)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise anyio.BrokenResourceError from exc

    async def send(self, item: bytes) -> None:
        view = memoryview(item)
        while view:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                await anyio.wait_writable(self._sock)
                continue
            except OSError as exc:
                raise anyio.BrokenResourceError from exc
            view = view[sent:]
        await anyio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise anyio.BrokenResourceError from exc

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._unwatch()
            _wake(self._waiter, _CLOSED)
            anyio.notify_closing(self._sock)
            self._sock.close()
        await anyio.lowlevel.checkpoint()


def _wake(waiter: asyncio.Future[int | bytes] | None, reason: int) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(reason)
