"""Helpers that the daemon's components share."""

from __future__ import annotations

import time

import anyio
import pytest

from walacord.runtime import next_tick, sleep_until_tick

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(("now", "period", "expected"), [
    (10.2, 1.0, 11.0),
    (10.0, 1.0, 11.0),
    (10.99, 0.5, 11.0),
    (0.0, 0.25, 0.25),
])
def test_next_tick(now: float, period: float, expected: float) -> None:
    assert next_tick(now, period) == pytest.approx(expected)


async def test_sleep_until_tick_wakes_loops_together() -> None:
    woke: list[float] = []

    async def loop() -> None:
        await sleep_until_tick(0.2)
        woke.append(time.monotonic())

    # Start just after a tick, so no tick falls between the two starts.
    await sleep_until_tick(0.2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(loop)
        await anyio.sleep(0.05)
        tg.start_soon(loop)
    # Started 50 ms apart, both woke at the same multiple of 0.2 s.
    assert len(woke) == 2
    assert abs(woke[1] - woke[0]) < 0.01
    offset = woke[0] % 0.2
    assert min(offset, 0.2 - offset) < 0.02
