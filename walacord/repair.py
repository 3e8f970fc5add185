"""Repairs walacord may make on its own: recycling its pool and restarting the app.

Both are bounded by a budget over a sliding window, so a fault that repairs cannot
fix does not turn into a loop. Past the budget, walacord stops, raises an alert on the
`walacord.alerts` logger and says so in the health output.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from walacord.config import RepairConfig
from walacord.logs import ALERT_LOGGER
from walacord.modes import run_command

log = logging.getLogger(__name__)
alerts = logging.getLogger(ALERT_LOGGER)

HOUR = 3600.0


class Budget:
    """At most `limit` uses within any `window` seconds."""

    def __init__(self, limit: Callable[[], int], window: Callable[[], float]) -> None:
        self._limit = limit
        self._window = window
        self.uses: deque[float] = deque()

    def _prune(self, now: float) -> None:
        while self.uses and now - self.uses[0] > self._window():
            self.uses.popleft()

    def available(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        self._prune(now)
        return len(self.uses) < self._limit()

    def spend(self, now: float | None = None) -> None:
        self.uses.append(time.monotonic() if now is None else now)

    def used(self, now: float | None = None) -> int:
        self._prune(time.monotonic() if now is None else now)
        return len(self.uses)


class Recycler:
    """Replaces the pool's connections, within an hourly budget, and proves the result."""

    def __init__(self, config: Callable[[], RepairConfig], pool: Any,
                 prove: Callable[[], Awaitable[tuple[bool, str]]], metrics: Any) -> None:
        self._config = config
        self.pool = pool
        self._prove = prove
        self.metrics = metrics
        self.budget = Budget(lambda: self._config().recycle_budget_per_hour, lambda: HOUR)
        self.exhausted = False
        self.last: dict[str, Any] | None = None
        self.count = 0

    async def recycle(self, reason: str, *, trigger: str | None = None) -> dict[str, Any]:
        """Replace every connection because of `reason`; return what was done.

        `trigger` is the metric label, `reason` by default. An operator's free-text
        reason passes a fixed trigger, so it cannot add a label value per request.
        """
        trigger = trigger or reason
        # Step 1: check the budget.
        if not self.budget.available():
            self.metrics.db_pool_recycles_refused.labels(reason=trigger).inc()
            if not self.exhausted:
                self.exhausted = True
                alerts.error("pool.recycle_budget_exhausted", extra={"fields": {
                    "reason": reason, "budget_per_hour": self._config().recycle_budget_per_hour}})
            return {"recycled": False, "reason": reason,
                    "error": "the hourly recycle budget is spent"}
        self.exhausted = False
        self.budget.spend()

        # Step 2: record the old pool's figures and replace it.
        began = time.monotonic()
        before = await self.pool.recycle()

        # Step 3: prove health on a fresh connection.
        healthy, proof = await self._prove()
        self.count += 1
        self.metrics.db_pool_recycles.labels(reason=trigger).inc()
        self.last = {"recycled": True, "reason": reason, "at": time.time(),
                     "pool_before": before, "healthy_after": healthy, "proof": proof,
                     "duration_seconds": round(time.monotonic() - began, 3)}
        level = logging.INFO if healthy else logging.WARNING
        log.log(level, "pool.recycled", extra={"fields": self.last})
        return self.last

    def snapshot(self) -> dict[str, Any]:
        return {"recycles": self.count, "used_this_hour": self.budget.used(),
                "budget_per_hour": self._config().recycle_budget_per_hour,
                "budget_exhausted": self.exhausted, "last": self.last}


class Restarter:
    """Runs the configured restart command when the application API stays down."""

    def __init__(self, config: Callable[[], RepairConfig], metrics: Any) -> None:
        self._config = config
        self.metrics = metrics
        self.budget = Budget(lambda: self._config().restart_budget,
                             lambda: self._config().restart_window)
        self.exhausted = False
        self.last: dict[str, Any] | None = None
        self.count = 0

    def configured(self) -> bool:
        return bool(self._config().restart_command)

    def due(self, down_for: float) -> bool:
        return self.configured() and down_for >= self._config().restart_after

    async def restart(self, reason: str) -> dict[str, Any]:
        """Run the restart command unless the budget is spent; return what happened."""
        cfg = self._config()
        if not cfg.restart_command:
            return {"restarted": False, "error": "no restart_command is configured"}
        if not self.budget.available():
            self.metrics.app_restarts.labels(result="refused").inc()
            if not self.exhausted:
                self.exhausted = True
                alerts.error("app.restart_budget_exhausted", extra={"fields": {
                    "reason": reason, "budget": cfg.restart_budget,
                    "window_seconds": cfg.restart_window}})
            return {"restarted": False, "error": f"{cfg.restart_budget} restarts within "
                    f"{cfg.restart_window:g}s already ran; restarting stopped"}
        self.exhausted = False
        self.budget.spend()
        log.warning("app.restarting", extra={"fields": {
            "argv": cfg.restart_command, "reason": reason}})
        code = await run_command(list(cfg.restart_command), cfg.restart_timeout,
                                 {"WALACORD_RESTART_REASON": reason}, event="app.restart")
        result = "ok" if code == 0 else "failed"
        self.count += 1
        self.metrics.app_restarts.labels(result=result).inc()
        self.last = {"restarted": code == 0, "exit_code": code, "reason": reason,
                     "at": time.time()}
        return self.last

    def snapshot(self) -> dict[str, Any]:
        cfg = self._config()
        return {"configured": self.configured(), "restarts": self.count,
                "used_in_window": self.budget.used(), "budget": cfg.restart_budget,
                "window_seconds": cfg.restart_window, "budget_exhausted": self.exhausted,
                "last": self.last}
