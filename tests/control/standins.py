"""Small real implementations of the control interfaces, for tests of the control channel.

`StandInMonitor` implements ModeControl and ProbeControl with an override that expires
on the monotonic clock and logs `mode.changed` like the real mode machine must. Probe
states are whatever a test sets. The test methods exercise the server's limits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
from anyio.abc import TaskStatus

from walacord.control.interfaces import ModeState, OverrideState, ProbeState
from walacord.control.protocol import ErrorCode
from walacord.control.registry import Call, MethodRegistry
from walacord.errors import ControlError, WalacordError

log = logging.getLogger("walacord.tests.standin")


def _now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class StandInMonitor:
    """A mode machine and probe table whose computed mode a test sets directly."""

    name = "monitor"

    def __init__(self) -> None:
        self.computed_mode = "normal"
        self.computed_reason = "every critical probe is healthy"
        self.mode = self.computed_mode
        self.reason = self.computed_reason
        self.since = _now_text()
        self.override: dict[str, Any] | None = None
        self.probes: dict[str, ProbeState] = {
            "database": {"healthy": True, "reason": "ok", "latency_seconds": 0.0021},
            "walacor": {"healthy": True, "reason": "ok", "latency_seconds": 0.0154},
        }
        self.runs: list[list[str]] = []

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._expire()
            await anyio.sleep(0.05)

    def _transition(self, mode: str, reason: str) -> None:
        if mode != self.mode or reason != self.reason:
            log.info("mode.changed", extra={"fields": {"from": self.mode, "to": mode,
                                                       "reason": reason}})
            self.mode, self.reason, self.since = mode, reason, _now_text()

    def _expire(self) -> None:
        if self.override is not None and time.monotonic() >= self.override["deadline"]:
            self.override = None
            self._transition(self.computed_mode,
                             f"override expired; {self.computed_reason}")

    def mode_state(self) -> ModeState:
        self._expire()
        override: OverrideState | None = None
        if self.override is not None:
            override = {
                "mode": self.override["mode"], "reason": self.override["reason"],
                "set_by": self.override["set_by"], "expires_at": self.override["expires_at"],
                "remaining_seconds": round(self.override["deadline"] - time.monotonic(), 3)}
        return {"mode": self.mode, "reason": self.reason, "since": self.since,
                "override": override}

    async def set_override(self, mode: str, ttl_seconds: float, reason: str,
                           actor: str) -> ModeState:
        expires = datetime.fromtimestamp(time.time() + ttl_seconds, UTC)
        self.override = {"mode": mode, "reason": reason, "set_by": actor,
                         "deadline": time.monotonic() + ttl_seconds,
                         "expires_at": expires.isoformat(timespec="seconds")}
        self._transition(mode, f"manual override by {actor}: {reason}")
        return self.mode_state()

    async def clear_override(self, actor: str) -> ModeState:
        if self.override is not None:
            self.override = None
            self._transition(self.computed_mode, f"override cleared by {actor}")
        return self.mode_state()

    def set_computed(self, mode: str, reason: str) -> None:
        self.computed_mode, self.computed_reason = mode, reason
        if self.override is None:
            self._transition(mode, reason)

    def probe_states(self) -> dict[str, ProbeState]:
        return dict(self.probes)

    async def run_probes(self, names: Sequence[str]) -> dict[str, ProbeState]:
        self.runs.append(list(names))
        return {name: self.probes[name] for name in names}


class StandInPool:
    """A pool whose recycle counts calls and fails once its budget is spent."""

    name = "pool"

    def __init__(self, budget: int = 2) -> None:
        self.budget = budget
        self.recycles: list[str] = []

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await anyio.sleep_forever()

    async def recycle_pool(self, reason: str) -> dict[str, Any]:
        if len(self.recycles) >= self.budget:
            raise WalacordError(f"recycle budget of {self.budget} per hour is exhausted")
        self.recycles.append(reason)
        # The shape of PoolRecycler.recycle's result, with a nested dict and a Unix time.
        return {"recycled": True, "reason": reason, "at": 1_780_000_000.5,
                "pool_before": {"pool_size": 3, "pool_available": 2},
                "healthy_after": True, "proof": "SELECT 1 on a new connection",
                "duration_seconds": 0.0123}


# --- test methods ----------------------------------------------------------------


@dataclass(frozen=True)
class EchoParams:
    value: Any = None


@dataclass(frozen=True)
class SleepParams:
    seconds: float


@dataclass(frozen=True)
class ProgressParams:
    steps: int


async def echo(params: EchoParams, call: Call) -> Any:
    return {"value": params.value, "uid": call.peer.uid if call.peer else None}


async def sleep(params: SleepParams, call: Call) -> Any:
    await anyio.sleep(params.seconds)
    return {"slept": params.seconds}


async def progress(params: ProgressParams, call: Call) -> Any:
    for step in range(params.steps):
        await call.progress(step + 1, params.steps, f"step {step + 1}")
    return {"steps": params.steps}


async def crash(params: None, call: Call) -> Any:
    raise RuntimeError("handler bug")


@dataclass(frozen=True)
class SubmitParams:
    seconds: float = 0.0
    size: int = 0  # characters of filler in the result


async def submitted_sleep(params: SubmitParams, call: Call) -> Any:
    await anyio.sleep(params.seconds)
    return {"slept": params.seconds, "filler": "f" * params.size}


def submit_sleep(params: SubmitParams, timeout: float, on_done: Callable[[Any], None]) -> None:
    """Call `on_done` from a timer after `seconds`, as a submit handler must: once, on
    the event loop, and with TimeoutError when `timeout` passes first."""
    loop = asyncio.get_running_loop()
    if params.seconds > timeout:
        loop.call_later(timeout, on_done, TimeoutError())
        return
    result = {"slept": params.seconds, "filler": "f" * params.size}
    loop.call_later(params.seconds, on_done, result)


async def echo_batch(params: list[EchoParams], calls: list[Call]) -> list[Any]:
    """Echo each value; "bad" fails its own call and "crash" fails the whole batch."""
    values = [each.value for each in params]
    if "crash" in values:
        raise RuntimeError("batch handler bug")
    return [ControlError(ErrorCode.INVALID_PARAMS, "bad value", {"field": "value"})
            if value == "bad" else {"value": value, "batch": len(values)} for value in values]


def register_test_methods(methods: MethodRegistry) -> None:
    methods.register("test.echo", echo, EchoParams, mutating=False)
    methods.register("test.sleep", sleep, SleepParams, mutating=False, timeout=1.0)
    methods.register("test.concurrent_sleep", sleep, SleepParams, mutating=False, timeout=1.0,
                     concurrent=True)
    methods.register("test.echo_batch", echo, EchoParams, mutating=False,
                     batch_handler=echo_batch)
    methods.register("test.progress", progress, ProgressParams, mutating=False)
    methods.register("test.crash", crash, mutating=False)
    methods.register("test.submit_sleep", submitted_sleep, SubmitParams, mutating=False,
                     timeout=1.0, submit=submit_sleep)
