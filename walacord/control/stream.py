"""A byte stream over a non-blocking socket that calls recv() only inside `receive()`.

Unread data therefore stays in the kernel's socket buffer, where it blocks the client's
sends instead of growing the daemon's memory. The anyio 4.16 alternatives fall short
here: UNIXSocketStream can raise InvalidStateError inside the event loop when a receive
is cancelled just as data arrives, and the transport-based SocketStream reads into a
queue until its first `receive()` pauses the transport.
"""

from __future__ import annotations

import socket

import anyio
from anyio.abc import ByteStream


class SocketByteStream(ByteStream):
    """Stream over a connected, non-blocking socket; one reader and one writer at a time."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._closed = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        waited = False
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                data = self._sock.recv(max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(self._sock)
                waited = True
                continue
            except OSError as exc:
                raise anyio.BrokenResourceError from exc
            if not waited:
                # Yield once per receive, because `send_nowait()` does not yield and a
                # peer that keeps the socket full must not hold the event loop. The
                # yield is shielded, since a cancellation here would lose the bytes read.
                await anyio.lowlevel.cancel_shielded_checkpoint()
            if not data:
                raise anyio.EndOfStream
            return data

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
            anyio.notify_closing(self._sock)
            self._sock.close()
        await anyio.lowlevel.checkpoint()
