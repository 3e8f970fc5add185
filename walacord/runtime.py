"""State shared by the daemon's components: config, metrics, systemd notifier, progress.

One `Runtime` exists per daemon. Components read `runtime.config` each time they need
a value, so a reload takes effect without restarting them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry

from walacord.config import Config
from walacord.control.registry import MethodRegistry
from walacord.logs import LogSetup
from walacord.metrics import Metrics
from walacord.systemd import Notifier


async def sleep_until_tick(period: float) -> None:
    """Sleep until the next multiple of `period` seconds on the event loop's clock.

    Loops that repeat on the same period then wake together, in one pass of the event
    loop, instead of waking it once each.
    """
    await anyio.sleep_until(next_tick(anyio.current_time(), period))


def next_tick(now: float, period: float) -> float:
    """Return the first multiple of `period` after `now`."""
    return (math.floor(now / period) + 1) * period


class Component(Protocol):
    """A long-running part of the daemon, started by the supervisor's task group."""

    name: str

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; call `task_status.started()` once ready to serve."""


class Progress:
    """Liveness deadlines: each component beats, and the watchdog checks the deadlines."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._stall_after: dict[str, float] = {}

    def register(self, name: str, stall_after: float) -> Callable[[], None]:
        """Start tracking `name`; return the function it calls to report progress."""
        self._stall_after[name] = stall_after
        self._last[name] = time.monotonic()

        def beat() -> None:
            self._last[name] = time.monotonic()

        return beat

    def unregister(self, name: str) -> None:
        self._last.pop(name, None)
        self._stall_after.pop(name, None)

    def stalled(self, now: float | None = None) -> dict[str, float]:
        """Return each component past its deadline with the seconds since its last beat."""
        now = time.monotonic() if now is None else now
        return {
            name: now - last
            for name, last in self._last.items()
            if now - last > self._stall_after[name]
        }


@dataclass
class Runtime:
    """State shared by the supervisor and every component."""

    config: Config
    config_path: str | None
    registry: CollectorRegistry
    metrics: Metrics
    notifier: Notifier
    logs: LogSetup | None = None
    progress: Progress = field(default_factory=Progress)
    components: dict[str, Any] = field(default_factory=dict)
    ready: anyio.Event = field(default_factory=anyio.Event)
    stop_requested: anyio.Event = field(default_factory=anyio.Event)
    started_at: float = field(default_factory=time.monotonic)
    # Functions that contribute a short phrase to the one-line systemd STATUS=.
    status_parts: list[Callable[[], str]] = field(default_factory=list)
    # Coroutines run on a new config that passed validation, before any reload hook.
    # Each returns problems, one sentence each, and any problem rejects the reload.
    reload_checks: list[Callable[[Config], Coroutine[Any, Any, list[str]]]] = field(
        default_factory=list)
    # Coroutines run after a new config passed validation, before it is announced.
    reload_hooks: list[Callable[[Config], Coroutine[Any, Any, None]]] = field(default_factory=list)
    # Coroutines run on SIGTERM before cancellation: stop accepting work and finish it.
    drain_hooks: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    # Control methods; each capability registers its own when it is constructed.
    methods: MethodRegistry = field(default_factory=MethodRegistry)
    # Reloads the config file like SIGHUP and returns whether the new one was applied;
    # the supervisor sets it.
    reload_config: Callable[[], Coroutine[Any, Any, bool]] | None = None
    # Settings changed by the last reload that apply only after a restart.
    restart_required: list[str] = field(default_factory=list)
    # Why the last rejected reload was rejected, one sentence per problem.
    reload_problems: list[str] = field(default_factory=list)
    stopping: bool = False

    def status_line(self) -> str:
        parts = [part() for part in self.status_parts]
        parts = [p for p in parts if p]
        if self.stopping:
            return "stopping"
        if not self.ready.is_set():
            return "starting"
        return "; ".join(parts) if parts else "running"

    def update_status(self) -> None:
        self.notifier.status(self.status_line())

    def request_stop(self) -> None:
        self.stop_requested.set()
