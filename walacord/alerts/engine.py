"""The alert engine: conditions in, notifications out, with no I/O of its own.

On each evaluation the engine gathers the current conditions (pushed with `observe` and
returned by its sources) and moves each alert through pending -> firing -> resolved:

- a condition active for its `for` duration starts firing, and the engine emits a
  `firing` notification once, not on every evaluation;
- a firing alert whose condition is gone resolves and emits `resolved`;
- a firing alert is re-sent as `repeated` once per `repeat_interval`.

Every notification goes to alerts.log. It is also paged (sent to Alertmanager and the
hooks) unless a silence matches it, an alert it depends on is pending or firing
(`rules.DEPENDENCIES`), or the global rate cap is used up. A held alert is paged on a
later evaluation once the hold ends, as a `paged` notification. Resolutions of paged
alerts bypass the rate cap, so that nothing paged stays open.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from walacord.alerts.model import Alert, Condition, Silence, parse_rfc3339
from walacord.alerts.rules import DEPENDENCIES, Dependency, cause_of
from walacord.config import AlertsConfig

log = logging.getLogger(__name__)

NotificationKind = Literal["firing", "resolved", "repeated", "paged"]
ConditionSource = Callable[[], Iterable[Condition]]

_SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}
RATE_LIMIT = "rate limit"


@dataclass(frozen=True)
class Notification:
    """One event for alerts.log; `page` is true when it also goes to Alertmanager and hooks."""

    kind: NotificationKind
    alert: dict[str, Any]
    page: bool

    @property
    def fingerprint(self) -> str:
        return str(self.alert["fingerprint"])


@dataclass
class _Pushed:
    condition: Condition
    expires_at: float | None


class TokenBucket:
    """Allow `capacity` events per `window` seconds, refilled continuously."""

    def __init__(self, capacity: int, window: float, now: float) -> None:
        self.capacity = capacity
        self.window = window
        self.tokens = float(capacity)
        self.updated = now

    def take(self, now: float) -> bool:
        rate = self.capacity / self.window
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class AlertEngine:
    """Tracks alerts from conditions; `evaluate` returns the notifications to deliver."""

    def __init__(self, config: Callable[[], AlertsConfig], *, now: float,
                 dependencies: Iterable[Dependency] = DEPENDENCIES) -> None:
        self.config = config
        self.dependencies = tuple(dependencies)
        self.sources: list[ConditionSource] = []
        self.alerts: dict[str, Alert] = {}
        self.silences: list[Silence] = []
        # NOTE: resolved alerts are kept in memory only, so the list starts empty after
        # a restart. Firing alerts, silences and undelivered notifications are in
        # alerts.db.
        self.recent: deque[Alert] = deque(maxlen=config().recent_limit)
        self.rate_limited = 0
        self.source_errors = 0
        self._pushed: dict[str, _Pushed] = {}
        # Fingerprints with a `checked` inactive verdict since the last evaluation.
        self._checked_clear: set[str] = set()
        self._source_results: dict[int, list[Condition]] = {}
        self._bucket = TokenBucket(config().rate_limit, config().rate_limit_window, now)

    def add_source(self, source: ConditionSource) -> None:
        """Register a callable evaluated on every tick; what it omits counts as inactive."""
        self.sources.append(source)

    def observe(self, condition: Condition, *, now: float, hold: float | None = None) -> None:
        """Record a pushed condition; it stays until observed inactive or `hold` passes.

        Call it from the event loop's thread: the engine takes no lock.
        """
        if not condition.active:
            self._pushed.pop(condition.fingerprint, None)
            if condition.checked:
                self._checked_clear.add(condition.fingerprint)
            return
        expires_at = None if hold is None else now + hold
        self._pushed[condition.fingerprint] = _Pushed(condition, expires_at)

    def restore(self, documents: Iterable[dict[str, Any]], now: float, grace: float) -> None:
        """Load alerts that were firing when walacord stopped, from `Alert.document()` data.

        A restored alert does not fire again when its condition returns. If the condition
        is still absent `grace` seconds from now, the alert resolves, so Alertmanager
        closes it instead of waiting for its endsAt. A `checked` inactive verdict, such as
        a probe that succeeded, resolves it before the grace ends.
        """
        for document in documents:
            fp = str(document["fingerprint"])
            alert = Alert(fp, dict(document["labels"]), dict(document["annotations"]),
                          for_seconds=0.0, active_since=now,
                          starts_at=parse_rfc3339(document["startsAt"]), state="firing",
                          value=document.get("value"), paged=bool(document.get("paged")),
                          last_sent=now, restored_until=now + grace)
            self.alerts.setdefault(fp, alert)

    def firing_documents(self) -> list[dict[str, Any]]:
        """Return the firing alerts as documents, for alerts.db to restore after a restart."""
        return [a.document() for a in self.alerts.values() if a.state == "firing"]

    def evaluate(self, now: float, wall: float) -> list[Notification]:
        """Advance every alert to `now` (monotonic) and return what to log and page."""
        config = self.config()
        self._apply_config(config)

        # Step 1: collect the active conditions.
        active = self._active_conditions(now)

        # Step 2: start, update and fire alerts whose conditions are present.
        fired: list[Alert] = []
        for fp, condition in active.items():
            alert = self.alerts.get(fp)
            if alert is None:
                alert = Alert(fp, condition.full_labels(), {}, condition.for_seconds,
                              active_since=now, starts_at=wall)
                self.alerts[fp] = alert
            alert.restored_until = None
            alert.annotations = {"summary": condition.summary,
                                 "description": condition.description}
            alert.value = condition.value
            alert.for_seconds = condition.for_seconds
            if alert.state == "pending" and now - alert.active_since >= alert.for_seconds:
                alert.state = "firing"
                fired.append(alert)

        # Step 3: resolve firing alerts whose conditions are gone; forget pending ones.
        resolved: list[Alert] = []
        for fp in [fp for fp in self.alerts if fp not in active]:
            alert = self.alerts[fp]
            if alert.restored_until is not None and now < alert.restored_until \
                    and fp not in self._checked_clear:
                continue
            del self.alerts[fp]
            if alert.state == "firing":
                alert.state = "resolved"
                alert.ends_at = wall
                resolved.append(alert)
                self.recent.appendleft(alert)

        self._checked_clear.clear()

        # Step 4: decide paging for firing alerts, most severe and oldest first.
        paged_late: list[Alert] = []
        repeated: list[Alert] = []
        firing = sorted((a for a in self.alerts.values() if a.state == "firing"),
                        key=lambda a: (_SEVERITY_ORDER.get(a.labels["severity"], 9),
                                       a.active_since))
        for alert in firing:
            held_by = self._hold_reason(alert, wall)
            if alert.paged:
                alert.held_by = held_by
                last_sent = now if alert.last_sent is None else alert.last_sent
                if held_by is None and now - last_sent >= config.repeat_interval:
                    if self._bucket.take(now):
                        alert.last_sent = now
                        repeated.append(alert)
                    else:
                        self.rate_limited += 1
                continue
            if held_by is None and not self._bucket.take(now):
                held_by = RATE_LIMIT
                if alert.held_by != RATE_LIMIT:
                    self.rate_limited += 1
            alert.held_by = held_by
            if held_by is None:
                alert.paged = True
                alert.last_sent = now
                if alert not in fired:
                    paged_late.append(alert)

        # Step 5: emit in a stable order: new firings, resolutions, late pages, repeats.
        notifications = [Notification("firing", a.document(), a.paged) for a in fired]
        notifications += [Notification("resolved", a.document(), a.paged) for a in resolved]
        notifications += [Notification("paged", a.document(), True) for a in paged_late]
        notifications += [Notification("repeated", a.document(), True) for a in repeated]
        return notifications

    def _apply_config(self, config: AlertsConfig) -> None:
        if self.recent.maxlen != config.recent_limit:
            self.recent = deque(self.recent, maxlen=config.recent_limit)
        self._bucket.capacity = config.rate_limit
        self._bucket.window = config.rate_limit_window

    def _active_conditions(self, now: float) -> dict[str, Condition]:
        active: dict[str, Condition] = {}
        for fp, pushed in list(self._pushed.items()):
            if pushed.expires_at is not None and now >= pushed.expires_at:
                del self._pushed[fp]
            else:
                active[fp] = pushed.condition

        for index, source in enumerate(self.sources):
            try:
                self._source_results[index] = list(source())
            except Exception:
                # Keep the source's previous verdicts: a broken source must not resolve
                # every alert it feeds, nor fire new ones.
                self.source_errors += 1
                log.exception("alerts.source_failed", extra={"fields": {
                    "source": getattr(source, "__qualname__", repr(source))}})
            for condition in self._source_results.get(index, []):
                if condition.active:
                    active[condition.fingerprint] = condition
                elif condition.checked:
                    self._checked_clear.add(condition.fingerprint)
        return active

    def _hold_reason(self, alert: Alert, wall: float) -> str | None:
        for silence in self.silences:
            if silence.active(wall) and silence.matches(alert.labels):
                return f"silence {silence.id}"
        cause = cause_of(alert, self.alerts.values(), self.dependencies)
        if cause is not None:
            labels = ",".join(f"{k}={v}" for k, v in sorted(cause.labels.items())
                              if k not in ("alertname", "severity"))
            return f"depends on {cause.alertname}" + (f"{{{labels}}}" if labels else "")
        return None

    # --- listing ------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Return the number of alerts per state, for the walacord_alerts gauge."""
        counts = {"pending": 0, "firing": 0, "suppressed": 0, "silenced": 0}
        for alert in self.alerts.values():
            if alert.state == "pending":
                counts["pending"] += 1
            elif alert.held_by and alert.held_by.startswith("silence"):
                counts["silenced"] += 1
            elif alert.held_by:
                counts["suppressed"] += 1
            else:
                counts["firing"] += 1
        return counts

    def listing(self, wall: float) -> dict[str, Any]:
        """Return active, silenced and recently resolved alerts with the active silences."""
        current = sorted(self.alerts.values(), key=lambda a: a.active_since)
        silenced = [a.document() for a in current
                    if a.held_by and a.held_by.startswith("silence")]
        active = [a.document() for a in current
                  if not (a.held_by and a.held_by.startswith("silence"))]
        return {
            "active": active,
            "silenced": silenced,
            "recent": [a.document() for a in self.recent],
            "silences": [s.document() for s in self.silences if s.ends_at > wall],
        }
