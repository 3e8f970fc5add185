"""SocketByteStream: deadlines, interruption and the socket's registration with the loop."""

from __future__ import annotations

import socket

import anyio
import pytest

from walacord.control.stream import SocketByteStream

pytestmark = pytest.mark.anyio


async def test_receive_before_deadline_returns_none() -> None:
    ours, theirs = socket.socketpair()
    stream = SocketByteStream(ours)
    with theirs:
        late = await stream.receive_before(1024, anyio.current_time() + 0.1)
        theirs.send(b"after")
        data = await stream.receive_before(1024, anyio.current_time() + 5)
        await stream.aclose()
    assert late is None
    assert data == b"after"


async def test_interrupt_stops_waiting_receive() -> None:
    ours, theirs = socket.socketpair()
    stream = SocketByteStream(ours)
    results: list[bytes | None] = []

    async def receive() -> None:
        results.append(await stream.receive_before(1024, None))

    with theirs:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(receive)
            await anyio.sleep(0.05)
            stream.interrupt()
        await stream.aclose()
    assert results == [None]


async def test_aclose_ends_waiting_receive() -> None:
    ours, theirs = socket.socketpair()
    stream = SocketByteStream(ours)
    errors: list[BaseException] = []

    async def receive() -> None:
        try:
            await stream.receive()
        except anyio.ClosedResourceError as exc:
            errors.append(exc)

    with theirs:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(receive)
            await anyio.sleep(0.05)
            await stream.aclose()
    assert len(errors) == 1


async def test_stale_registration_removed() -> None:
    # A cancelled receive leaves the socket registered, and closing the socket directly
    # leaves its number in the loop. A new socket with that number must still be read.
    first, first_peer = socket.socketpair()
    stream = SocketByteStream(first)
    with anyio.move_on_after(0.05):
        await stream.receive()
    number = first.fileno()
    first.close()
    first_peer.close()

    second, second_peer = socket.socketpair()
    reused = number in (second.fileno(), second_peer.fileno())
    if second_peer.fileno() == number:
        second, second_peer = second_peer, second
    fresh = SocketByteStream(second)

    async def send_later() -> None:
        await anyio.sleep(0.1)
        second_peer.send(b"x")

    with second_peer:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(send_later)
            with anyio.fail_after(3):
                data = await fresh.receive()
        await fresh.aclose()
    assert reused
    assert data == b"x"


async def test_stale_event_keeps_receive_waiting() -> None:
    # The loop can report a socket as readable after a task has read it in the same
    # iteration. A receive that began meanwhile must go on waiting without a wake-up.
    ours, theirs = socket.socketpair()
    stream = SocketByteStream(ours)
    received: list[bytes] = []

    async def receive() -> None:
        received.append(await stream.receive())

    with theirs:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(receive)
            await anyio.sleep(0.05)
            waiter = stream._waiter
            assert waiter is not None
            stream._on_readable()
            assert not waiter.done()
            theirs.send(b"late")
        await stream.aclose()
    assert received == [b"late"]
