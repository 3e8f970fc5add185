"""DatabasePause: one pause for overlapping callers, and a resume however they leave."""

from __future__ import annotations

import anyio
import pytest

from tests.conftest import wait_until
from walacord.dbpool import DatabasePause

pytestmark = pytest.mark.anyio


class RecordingUser:
    """A part of the daemon that records its pauses and resumes."""

    def __init__(self, events: list[str], name: str, pause_takes: float = 0.0) -> None:
        self.events = events
        self.name = name
        self.pause_takes = pause_takes

    async def pause_database(self, reason: str) -> None:
        self.events.append(f"pause {self.name}")
        await anyio.sleep(self.pause_takes)

    async def resume_database(self) -> None:
        self.events.append(f"resume {self.name}")


async def test_overlapping_callers_share_one_pause() -> None:
    events: list[str] = []
    pause = DatabasePause([RecordingUser(events, "pool"), RecordingUser(events, "sink")])
    first_done = anyio.Event()

    async def first() -> None:
        async with pause.paused("restore one"):
            await anyio.sleep(0.05)
        first_done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await anyio.sleep(0.01)
        async with pause.paused("restore two"):
            await first_done.wait()
            # The first caller left, but this one still needs the users paused.
            assert events == ["pause pool", "pause sink"]
    assert events == ["pause pool", "pause sink", "resume sink", "resume pool"]


async def test_failed_body_resumes() -> None:
    events: list[str] = []
    pause = DatabasePause([RecordingUser(events, "pool")])
    with pytest.raises(RuntimeError):
        async with pause.paused("restore"):
            raise RuntimeError("rename failed")
    assert events == ["pause pool", "resume pool"]


async def test_cancelled_while_pausing_resumes() -> None:
    events: list[str] = []
    slow_sink = RecordingUser(events, "sink", pause_takes=10.0)
    pause = DatabasePause([RecordingUser(events, "pool"), slow_sink])
    with anyio.move_on_after(0.1):
        async with pause.paused("restore"):
            events.append("body")
    assert events == ["pause pool", "pause sink", "resume sink", "resume pool"]
    # A later caller pauses again from the start.
    slow_sink.pause_takes = 0.0
    async with pause.paused("restore"):
        pass
    assert events[-4:] == ["pause pool", "pause sink", "resume sink", "resume pool"]


async def test_sink_pool_stays_closed_after_stop() -> None:
    """A resume after the outbox backends stopped, as from a restore that shutdown
    cancels, opens no pool whose workers would keep the daemon alive."""
    from walacord.outbox.backends import SinkPool

    # Nothing connects: the pool is opened without waiting and closed at once.
    pool = SinkPool("host=127.0.0.1 port=1 dbname=none connect_timeout=1",
                    checkout_timeout=1.0)
    await pool.open()
    await pool.pause_database("restore")
    await pool.close()
    try:
        await pool.resume_database()
        assert pool.pool.closed
    finally:
        await pool.pool.close(timeout=1)


async def test_paused_checkout_gives_up_at_shutdown() -> None:
    """A sink checkout that waits for a restore's pause to end gives up when the daemon
    drains, so the drain does not wait until drain_timeout."""
    from psycopg_pool import PoolTimeout

    from walacord.outbox.backends import SinkPool

    pool = SinkPool("host=127.0.0.1 port=1 dbname=none connect_timeout=1",
                    checkout_timeout=1.0)
    await pool.pause_database("restore")
    outcome: list[BaseException] = []

    async def checkout() -> None:
        try:
            async with pool.connection(timeout=30):
                pass
        except PoolTimeout as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(checkout)
        await anyio.sleep(0.05)
        assert outcome == []
        with anyio.fail_after(1):
            pool.stop_waiting()
            await wait_until(lambda: outcome, 1)
    assert "walacord is stopping" in str(outcome[0])
    await pool.close()
