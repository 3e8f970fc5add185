"""Probe hysteresis, scheduling and the runner's deadline and skip handling."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel
import pytest

from tests.conftest import wait_until
from walacord.config import ProbeSettings
from walacord.probes.base import (
    Abandoner,
    CallAbandoned,
    Health,
    ProbeResult,
    ProbeRunner,
    ProbeState,
    Status,
    advance,
    next_delay,
)

OK = ProbeResult(Status.OK, "ok", "fine")
BAD = ProbeResult(Status.CRITICAL, "refused", "connection refused")
SLOW = ProbeResult(Status.WARNING, "slow", "slow")
GONE = ProbeResult(Status.CRITICAL, "refused", "cannot connect",
                   details={"definitive": True})
POLICY = ProbeSettings(failures_to_down=2, successes_to_up=2, min_dwell=1.0,
                       flap_window=100.0, flap_threshold=4, flap_hold=10.0, fast_interval=0.5)


def replay(results: list[tuple[float, ProbeResult]], policy: ProbeSettings = POLICY,
           state: ProbeState | None = None) -> list[Health]:
    state = state or ProbeState("database")
    path = []
    for at, result in results:
        state = advance(state, result, at, policy)
        path.append(state.health)
    return path


UP, DOWN = Health.UP, Health.DOWN

# (case, [(time, result)], expected health after each result)
SEQUENCES = [
    ("first result settles", [(0, BAD)], [DOWN]),
    ("one failure is not down", [(0, OK), (1, BAD), (2, OK)], [UP, UP, UP]),
    ("two failures go down at once", [(0, OK), (0.1, BAD), (0.2, BAD)], [UP, UP, DOWN]),
    ("warning counts as healthy", [(0, OK), (1, SLOW), (2, SLOW)], [UP, UP, UP]),
    ("one success is not up", [(0, BAD), (2, OK), (3, BAD)], [DOWN, DOWN, DOWN]),
    ("two successes after dwell go up", [(0, BAD), (2, OK), (3, OK)], [DOWN, DOWN, UP]),
    ("dwell holds recovery", [(0, OK), (10, BAD), (10.1, BAD), (10.2, OK), (10.3, OK),
                              (11.2, OK)], [UP, UP, DOWN, DOWN, DOWN, UP]),
    ("failure streak resets", [(0, OK), (1, BAD), (2, OK), (3, BAD)], [UP, UP, UP, UP]),
    ("definitive failure goes down at once", [(0, OK), (0.1, GONE)], [UP, DOWN]),
    ("definitive failure still needs dwell to recover",
     [(0, OK), (0.1, GONE), (0.2, OK), (0.3, OK), (1.2, OK)], [UP, DOWN, DOWN, DOWN, UP]),
]


@pytest.mark.parametrize(("case", "results", "expected"), SEQUENCES,
                         ids=[row[0] for row in SEQUENCES])
def test_advance_sequences(case: str, results: list[tuple[float, ProbeResult]],
                           expected: list[Health]) -> None:
    assert replay(results) == expected


def test_advance_flapping_damps_recovery() -> None:
    # Four changes within the flap window mark the probe as flapping.
    results: list[tuple[float, ProbeResult]] = [(0, OK)]
    t = 0.0
    for _ in range(2):
        results += [(t + 0.1, BAD), (t + 0.2, BAD), (t + 1.3, OK), (t + 1.4, OK)]
        t += 2
    state = ProbeState("database")
    for at, result in results:
        state = advance(state, result, at, POLICY)
    assert state.health is UP
    state = advance(state, BAD, t + 0.1, POLICY)
    state = advance(state, BAD, t + 0.2, POLICY)
    assert state.health is DOWN
    assert state.flapping

    # Recovery now needs flap_hold (10 s) of good runs at the fast interval: 20 runs.
    at = t + 2
    for _ in range(19):
        at += POLICY.fast_interval
        state = advance(state, OK, at, POLICY)
    assert state.health is DOWN
    assert state.message == ("connection refused; recovering: the latest run passed, and "
                             "the probe stays down while it is flapping (see flap_hold)")
    assert state.reason == "refused"
    state = advance(state, OK, at + POLICY.fast_interval, POLICY)
    assert state.health is UP
    assert state.message == "fine"


def test_held_down_message_names_recovery() -> None:
    state = ProbeState("database")
    for at, result in [(0, BAD), (0.5, OK)]:
        state = advance(state, result, at, POLICY)
    recovering = state.message
    state = advance(state, BAD, 0.7, POLICY)

    assert recovering == ("connection refused; recovering: the latest run passed, and the "
                          "probe stays down until enough good runs follow (see "
                          "successes_to_up and min_dwell)")
    assert state.message == "connection refused"


def test_advance_changes_expire_from_window() -> None:
    policy = ProbeSettings(failures_to_down=1, successes_to_up=1, min_dwell=0,
                           flap_window=5.0, flap_threshold=3)
    state = ProbeState("database")
    for at, result in [(0, OK), (1, BAD), (2, OK), (3, BAD)]:
        state = advance(state, result, at, policy)
    assert state.flapping is False
    state = advance(state, OK, 4, policy)
    assert state.flapping is True
    state = advance(state, OK, 20, policy)
    assert state.flapping is False


def test_next_delay_fast_after_change() -> None:
    policy = ProbeSettings(interval=10.0, fast_interval=0.2, fast_window=5.0, jitter=0.0)
    rng = random.Random(1)
    settled = ProbeState("x", Health.UP, since=0.0, last=OK)
    assert next_delay(settled, 100.0, policy, rng) == 10.0
    assert next_delay(settled, 2.0, policy, rng) == 0.2
    suspect = ProbeState("x", Health.UP, since=0.0, last=BAD)
    assert next_delay(suspect, 100.0, policy, rng) == 0.2


def test_next_delay_jitter_bounds() -> None:
    policy = ProbeSettings(interval=10.0, jitter=0.2, fast_window=0)
    state = ProbeState("x", Health.UP, since=0.0, last=OK)
    rng = random.Random(7)
    delays = [next_delay(state, 100.0, policy, rng) for _ in range(200)]
    assert min(delays) >= 8.0
    assert max(delays) <= 12.0
    assert max(delays) - min(delays) > 2.0


@dataclass
class ScriptedProbe:
    """A probe whose check sleeps `delay` seconds, optionally ignoring cancellation."""

    name: str = "scripted"
    delay: float = 0.0
    stubborn: bool = False
    result: ProbeResult = OK
    policy: ProbeSettings = field(default_factory=lambda: ProbeSettings(
        interval=0.5, timeout=0.2, fast_interval=0.05))
    calls: int = 0

    def settings(self) -> ProbeSettings:
        return self.policy

    def configured(self) -> bool:
        return True

    async def check(self) -> ProbeResult:
        self.calls += 1
        if self.stubborn:
            # Like a driver whose cancel never completes: cancellation is held off.
            with anyio.CancelScope(shield=True):
                await anyio.sleep(self.delay)
        else:
            await anyio.sleep(self.delay)
        return self.result


@pytest.mark.anyio
async def test_runner_abandons_stubborn_call() -> None:
    probe = ScriptedProbe(delay=1.0, stubborn=True)
    runner = ProbeRunner(probe)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.abandoner.run)
        began = time.monotonic()
        state = await runner.run_once()
        elapsed = time.monotonic() - began
        assert state.last is not None
        assert state.last.reason == "timeout"
        assert elapsed < 0.5

        # While the abandoned call unwinds, a new run is skipped and counted as failed.
        state = await runner.run_once()
        assert runner.stats.skipped == 1
        assert state.health is Health.DOWN
        assert probe.calls == 1
        assert runner.abandoner.outstanding == 1
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_runner_concurrent_run_is_skipped() -> None:
    probe = ScriptedProbe(delay=0.1)
    runner = ProbeRunner(probe)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.abandoner.run)
        tg.start_soon(runner.run_once)
        await anyio.sleep(0.02)
        await runner.run_once()
        tg.cancel_scope.cancel()
    assert probe.calls == 1
    assert runner.stats.skipped == 1


@pytest.mark.anyio
async def test_runner_pause_waits_for_run() -> None:
    """pause() returns once the run in progress has ended and its result is kept."""
    probe = ScriptedProbe(delay=0.1)
    runner = ProbeRunner(probe)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.abandoner.run)
        tg.start_soon(runner.run_once)
        await anyio.sleep(0.02)
        await runner.pause("restore")
        assert probe.calls == 1
        assert runner.state.last is not None
        assert runner.paused == "restore"
        # A run requested while paused does not start.
        await runner.run_once()
        assert probe.calls == 1
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_runner_paused_keeps_beating() -> None:
    """A paused runner starts no run but still beats, so the watchdog detects no stall.
    resume() starts a run at once."""
    probe = ScriptedProbe(policy=ProbeSettings(interval=0.1, timeout=0.05))
    beats: list[float] = []
    runner = ProbeRunner(probe, beat=lambda: beats.append(time.monotonic()))
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        await wait_until(lambda: probe.calls >= 1, 5)
        await runner.pause("restore")
        calls, paused_at = probe.calls, time.monotonic()
        await anyio.sleep(2.3)
        assert probe.calls == calls
        assert len([at for at in beats if at > paused_at]) >= 2
        runner.resume()
        await wait_until(lambda: probe.calls > calls, 0.5)
        assert runner.paused is None
        # One run after the resume, then the interval.
        await anyio.sleep(0.05)
        assert probe.calls == calls + 1
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_runner_marks_slow_run_warning() -> None:
    probe = ScriptedProbe(delay=0.05, policy=ProbeSettings(interval=1, timeout=0.5,
                                                           slow_after=0.01))
    runner = ProbeRunner(probe)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.abandoner.run)
        state = await runner.run_once()
        tg.cancel_scope.cancel()
    assert state.up
    assert state.warning
    assert state.last is not None and state.last.reason == "slow"


@pytest.mark.anyio
async def test_runner_trigger_runs_now() -> None:
    probe = ScriptedProbe(policy=ProbeSettings(interval=30, timeout=1, fast_window=0,
                                               fast_interval=30))
    runner = ProbeRunner(probe)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        await runner.first_result()
        assert probe.calls == 1
        runner.trigger()
        await wait_until(lambda: probe.calls >= 2, 2)
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_abandoner_passes_exceptions() -> None:
    abandoner = Abandoner()

    async def fail() -> None:
        raise ValueError("boom")

    async with anyio.create_task_group() as tg:
        await tg.start(abandoner.run)
        with pytest.raises(ValueError, match="boom"):
            await abandoner.call(fail, 1.0)
        tg.cancel_scope.cancel()
    assert abandoner.abandoned_total == 0


@pytest.mark.anyio
async def test_abandoner_calls_after_abandoned_call() -> None:
    abandoner = Abandoner()
    release = anyio.Event()

    async def stubborn() -> str:
        with anyio.CancelScope(shield=True):
            await release.wait()
        return "late"

    async def quick() -> str:
        await anyio.lowlevel.checkpoint()
        return "quick"

    async with anyio.create_task_group() as tg:
        await tg.start(abandoner.run)
        assert await abandoner.call(quick, 1.0) == "quick"
        with pytest.raises(CallAbandoned):
            await abandoner.call(stubborn, 0.05)
        # The abandoned call still runs, and later calls get a result of their own.
        assert await abandoner.call(quick, 1.0) == "quick"
        assert await abandoner.call(quick, 1.0) == "quick"
        assert abandoner.outstanding == 1

        release.set()
        await wait_until(lambda: abandoner.outstanding == 0, 1)
        assert await abandoner.call(quick, 1.0) == "quick"
        tg.cancel_scope.cancel()
    assert abandoner.abandoned_total == 1


@pytest.mark.anyio
async def test_abandoner_cancelled_caller_cancels_call() -> None:
    abandoner = Abandoner()
    cancelled = anyio.Event()

    async def slow() -> None:
        try:
            await anyio.sleep(10)
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise

    async with anyio.create_task_group() as tg:
        await tg.start(abandoner.run)
        with anyio.move_on_after(0.05):
            await abandoner.call(slow, 5.0)
        await wait_until(cancelled.is_set, 1)
        await wait_until(lambda: abandoner.outstanding == 0, 1)
        tg.cancel_scope.cancel()
    assert abandoner.abandoned_total == 0


@pytest.mark.anyio
async def test_runner_disabled_probe_not_configured() -> None:
    probe = ScriptedProbe(policy=ProbeSettings(enabled=False))
    runner = ProbeRunner(probe)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.abandoner.run)
        state = await runner.run_once()
        tg.cancel_scope.cancel()
    assert state.health is Health.NOT_CONFIGURED
    assert probe.calls == 0
