"""The alerts component: evaluates the rules on a tick and delivers what they raise.

Two tasks share the component's task group:

- the evaluation loop runs the engine every `[alerts] evaluation_interval`, writes each
  notification to alerts.log and queues paged ones in alerts.db, one row per sink;
- the delivery loop drains the queue per sink in order. A failed batch stays queued
  and its sink waits a jittered, doubling delay before the next attempt.

Components report conditions with `observe`, and CRITICAL log records become
`WalacordCriticalError` alerts through `CriticalLogHandler`.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from walacord.alerts import rules
from walacord.alerts.engine import AlertEngine, Notification
from walacord.alerts.model import Condition, Silence, parse_matchers
from walacord.alerts.rules import MetricsSource
from walacord.alerts.sinks import AlertmanagerSink, HookSink, Sink, write_alert_log
from walacord.alerts.store import AlertStore, Delivery
from walacord.config import AlertsConfig, Config
from walacord.errors import AlertDeliveryError
from walacord.logs import ALERT_LOGGER
from walacord.outbox.startup import is_disk_full
from walacord.runtime import Runtime, sleep_until_tick

log = logging.getLogger(__name__)

DB_FILE = "alerts.db"
STORE_ERRORS = (TimeoutError, OSError, sqlite3.Error)
IDLE_WAKE = 5.0
# Seconds between attempts to move from the in-memory store back to alerts.db, after
# the state directory could not hold it.
DURABLE_RETRY_INTERVAL = 30.0


class CriticalLogHandler(logging.Handler):
    """Collect CRITICAL records from any thread; the evaluation loop turns them into alerts."""

    def __init__(self) -> None:
        super().__init__(level=logging.CRITICAL)
        self.records: deque[tuple[str, str]] = deque(maxlen=100)

    def emit(self, record: logging.LogRecord) -> None:
        # The alert subsystem's own critical lines would feed back into it.
        if record.name.startswith(ALERT_LOGGER):
            return
        message = record.getMessage()
        event = message if " " not in message and "." in message else record.name
        fields = getattr(record, "fields", None) or {}
        error = fields.get("error") if isinstance(fields, dict) else None
        if record.exc_info and record.exc_info[1] is not None:
            error = error or repr(record.exc_info[1])
        detail = f"{event} logged by {record.name}" + (f": {error}." if error else ".")
        self.records.append((event, detail))


class AlertService:
    """The `alerts` component; see the module docstring."""

    name = "alerts"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.engine = AlertEngine(self._config, now=time.monotonic())
        self.engine.add_source(MetricsSource(runtime.registry, self._config))
        self.critical_handler = CriticalLogHandler()
        self.store: AlertStore | None = None
        self.sinks: dict[str, Sink] = {}
        self._unsaved: list[tuple[str, str, str, dict[str, object]]] = []
        self._retry_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._wake = anyio.Event()
        self._firing_changed = False
        # Held by every store call that could interleave with a switch of the store.
        # Deliveries need no lock, because the switch runs between delivery rounds.
        self._store_lock = anyio.Lock()
        self._durable_retry_at = 0.0

    def _config(self) -> AlertsConfig:
        return self.runtime.config.alerts

    def observe(self, condition: Condition, hold: float | None = None) -> None:
        """Report a condition from a component; see `AlertEngine.observe`."""
        self.engine.observe(condition, now=time.monotonic(), hold=hold)

    # --- lifecycle ------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        runtime = self.runtime
        config = self._config()
        path = Path(runtime.config.state.dir) / DB_FILE

        # Step 1: open alerts.db, load the silences and build the sinks.
        self.store = await self._open_store(path, config)
        root = logging.getLogger()
        try:
            self.engine.silences = await self.store.silences(time.time())
            self.engine.restore(await self.store.firing(), time.monotonic(),
                                config.restore_grace)
            await self._build_sinks(runtime.config)
            root.addHandler(self.critical_handler)
            runtime.reload_hooks.append(self._on_reload)
            beat = runtime.progress.register(
                self.name, max(runtime.config.lifecycle.component_stall,
                               3 * config.evaluation_interval))
            log.info("alerts.started", extra={"fields": {
                "store": str(path), "sinks": sorted(self.sinks)}})

            # Step 2: evaluate and deliver until cancelled.
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._evaluate_loop, beat)
                tg.start_soon(self._deliver_loop)
                task_status.started()
        finally:
            root.removeHandler(self.critical_handler)
            runtime.progress.unregister(self.name)
            with anyio.CancelScope(shield=True):
                await self._close_sinks()
                await self.store.close()

    async def _open_store(self, path: Path, config: AlertsConfig) -> AlertStore:
        try:
            return await AlertStore.open(path, config.store_timeout)
        except (sqlite3.OperationalError, OSError) as exc:
            error = "file system is full" if (
                isinstance(exc, sqlite3.Error) and is_disk_full(exc, path.parent)) else str(exc)
        # Alerts matter most when the state directory is full or unusable, so they still
        # run, without a durable queue, until walacord restarts with a usable directory.
        log.error("alerts.store_in_memory", extra={"fields": {
            "path": str(path), "error": error,
            "hint": f"free space in or fix [state] dir; walacord retries alerts.db every "
                    f"{DURABLE_RETRY_INTERVAL:g}s"}})
        self._durable_retry_at = time.monotonic() + DURABLE_RETRY_INTERVAL
        return await AlertStore.open(path, config.store_timeout, in_memory=True)

    async def _return_to_durable_store(self) -> None:
        """Move the in-memory store's rows into alerts.db once the state directory
        takes it again, so alerts survive restarts from then on."""
        store = self.store
        if store is None or not store.in_memory or time.monotonic() < self._durable_retry_at:
            return
        self._durable_retry_at = time.monotonic() + DURABLE_RETRY_INTERVAL
        config = self._config()
        try:
            durable = await AlertStore.open(store.path, config.store_timeout)
        except (sqlite3.OperationalError, OSError):
            return  # still unusable; the next attempt comes after the interval
        async with self._store_lock:
            try:
                moved = await durable.adopt(store)
                await durable.replace_firing(self.engine.firing_documents())
            except STORE_ERRORS as exc:
                log.warning("alerts.store_switch_failed", extra={"fields": {
                    "path": str(store.path), "error": repr(exc)}})
                with anyio.CancelScope(shield=True):
                    await durable.close()
                return
            self.store = durable
        log.info("alerts.store_durable", extra={"fields": {
            "path": str(durable.path), "deliveries_moved": moved}})
        with anyio.CancelScope(shield=True):
            await store.close()

    async def _on_reload(self, new: Config) -> None:
        await self._build_sinks(new)

    async def _build_sinks(self, config: Config) -> None:
        alerts = config.alerts
        configured: dict[str, Sink] = {}
        if alerts.alertmanager_url:
            configured["alertmanager"] = AlertmanagerSink(
                alerts.alertmanager_url, alerts.alertmanager_timeout, alerts.repeat_interval)
        for index, argv in enumerate(alerts.hooks):
            hook = HookSink(index, argv, alerts.hook_timeout)
            configured[hook.name] = hook
        await self._close_sinks()
        self.sinks = configured
        assert self.store is not None
        async with self._store_lock:
            dropped = await self.store.drop_other_sinks(configured)
        if dropped:
            self.runtime.metrics.alert_deliveries_dropped.labels(reason="sink_removed").inc(dropped)
            log.warning("alerts.queue_dropped", extra={"fields": {
                "reason": "sink no longer configured", "rows": dropped}})

    async def _close_sinks(self) -> None:
        for sink in self.sinks.values():
            closer = getattr(sink, "aclose", None)
            if closer is not None:
                await closer()

    # --- evaluation -----------------------------------------------------------------

    async def _evaluate_loop(self, beat: Any) -> None:
        while True:
            await self.evaluate_once()
            beat()
            await sleep_until_tick(self._config().evaluation_interval)

    async def evaluate_once(self) -> list[Notification]:
        """Run one evaluation: log every notification and queue the paged ones."""
        metrics = self.runtime.metrics
        config = self._config()
        now = time.monotonic()
        while self.critical_handler.records:
            event, detail = self.critical_handler.records.popleft()
            self.engine.observe(rules.critical_error(event, detail, config), now=now,
                                hold=config.critical_error_resolve_after)

        rate_limited_before = self.engine.rate_limited
        errors_before = self.engine.source_errors
        notifications = self.engine.evaluate(now, time.time())
        metrics.alert_notifications_rate_limited.inc(
            self.engine.rate_limited - rate_limited_before)
        metrics.alert_source_errors.inc(self.engine.source_errors - errors_before)
        for state, count in self.engine.counts().items():
            metrics.alerts.labels(state=state).set(count)

        if notifications:
            self._firing_changed = True
        for notification in notifications:
            write_alert_log(notification)
            metrics.alert_notifications.labels(kind=notification.kind).inc()
            if notification.page:
                self._unsaved.extend(
                    (sink, notification.fingerprint, notification.kind, notification.alert)
                    for sink in self.sinks)
        # The firing set is saved before delivery can start, so an alert a receiver has
        # seen is always known to a restarted walacord, which can then resolve it.
        await self._save_firing()
        await self._save_unsaved(config)
        return notifications

    async def _save_firing(self) -> None:
        if not self._firing_changed or self.store is None:
            return
        try:
            async with self._store_lock:
                await self.store.replace_firing(self.engine.firing_documents())
        except STORE_ERRORS as exc:
            log.error("alerts.state_write_failed", extra={"fields": {"error": repr(exc)}})
            return
        self._firing_changed = False

    async def _save_unsaved(self, config: AlertsConfig) -> None:
        if not self._unsaved or self.store is None:
            return
        try:
            async with self._store_lock:
                cut = await self.store.enqueue(self._unsaved, config.queue_max_rows)
        except STORE_ERRORS as exc:
            # Keep the rows in memory and try again on the next evaluation.
            log.error("alerts.queue_write_failed", extra={"fields": {
                "error": repr(exc), "rows": len(self._unsaved)}})
            return
        self._unsaved.clear()
        if cut:
            self.runtime.metrics.alert_deliveries_dropped.labels(reason="queue_full").inc(cut)
            log.warning("alerts.queue_dropped", extra={"fields": {
                "reason": "queue_max_rows reached", "rows": cut}})
        self._wake.set()

    # --- delivery -------------------------------------------------------------------

    async def _deliver_loop(self) -> None:
        while True:
            async with anyio.create_task_group() as tg:
                for sink in list(self.sinks.values()):
                    tg.start_soon(self._drain_sink, sink)
            await self._return_to_durable_store()
            await self._update_queue_gauge()

            now = time.monotonic()
            waits = [at - now for name, at in self._retry_at.items() if name in self.sinks]
            timeout = max(0.0, min([IDLE_WAKE, *waits]))
            with anyio.move_on_after(timeout):
                await self._wake.wait()
            self._wake = anyio.Event()

    async def _drain_sink(self, sink: Sink) -> None:
        config = self._config()
        try:
            while time.monotonic() >= self._retry_at.get(sink.name, 0.0):
                if not await self._deliver_batch(sink, config):
                    return
        except STORE_ERRORS as exc:
            log.error("alerts.queue_access_failed", extra={"fields": {
                "sink": sink.name, "error": repr(exc)}})
            self._retry_at[sink.name] = time.monotonic() + config.retry_initial

    async def _deliver_batch(self, sink: Sink, config: AlertsConfig) -> bool:
        """Send the sink's oldest rows; return True when more may be waiting."""
        assert self.store is not None
        metrics = self.runtime.metrics
        batch = distinct_prefix(await self.store.pending(sink.name, sink.batch_size))
        if not batch:
            return False

        try:
            await sink.deliver(batch)
        except AlertDeliveryError as exc:
            metrics.alert_deliveries.labels(sink=sink.kind, result="failure").inc()
            if exc.permanent:
                await self.store.delete([d.id for d in batch])
                metrics.alert_deliveries_dropped.labels(reason="rejected").inc(len(batch))
                log.error("alerts.delivery_rejected", extra={"fields": {
                    "sink": sink.name, "error": str(exc), "rows": len(batch)}})
                return True
            await self.store.record_failure([d.id for d in batch], str(exc))
            delay = self._backoff(sink.name, config)
            log.warning("alerts.delivery_failed", extra={"fields": {
                "sink": sink.name, "error": str(exc), "attempt": batch[0].attempts + 1,
                "retry_in_seconds": round(delay, 2)}})
            return False

        await self.store.delete([d.id for d in batch])
        metrics.alert_deliveries.labels(sink=sink.kind, result="success").inc()
        if self._failures.pop(sink.name, 0):
            log.info("alerts.delivery_recovered", extra={"fields": {"sink": sink.name}})
        log.info("alerts.delivered", extra={"fields": {
            "sink": sink.name, "fingerprints": [d.fingerprint for d in batch],
            "kinds": [d.kind for d in batch]}})
        return True

    def _backoff(self, sink: str, config: AlertsConfig) -> float:
        failures = self._failures.get(sink, 0) + 1
        self._failures[sink] = failures
        delay = min(config.retry_max, config.retry_initial * 2 ** (failures - 1))
        delay *= random.uniform(0.5, 1.0)
        self._retry_at[sink] = time.monotonic() + delay
        return delay

    async def _update_queue_gauge(self) -> None:
        if self.store is None:
            return
        try:
            self.runtime.metrics.alert_delivery_queue.set(await self.store.count())
        except STORE_ERRORS:
            pass  # the next round tries again; a stale gauge is harmless

    # --- silences and listing, for the control channel --------------------------------

    def listing(self) -> dict[str, Any]:
        return self.engine.listing(time.time())

    async def silence(self, matcher: str, duration: float, reason: str,
                      created_by: str = "") -> Silence:
        """Store a silence durably, then apply it from the next evaluation on."""
        assert self.store is not None
        silence = Silence.create(parse_matchers(matcher), duration, reason, time.time(),
                                 created_by)
        async with self._store_lock:
            await self.store.add_silence(silence)
        self.engine.silences.append(silence)
        log.info("alerts.silenced", extra={"fields": {
            "silence": silence.id, "matchers": [str(m) for m in silence.matchers],
            "ends_at": silence.document()["endsAt"], "reason": reason}})
        return silence

    async def unsilence(self, silence_id: str) -> bool:
        assert self.store is not None
        now = time.time()
        async with self._store_lock:
            found = await self.store.expire_silence(silence_id, now)
        self.engine.silences = [s for s in self.engine.silences if s.id != silence_id]
        if found:
            log.info("alerts.unsilenced", extra={"fields": {"silence": silence_id}})
        return found


def distinct_prefix(rows: Sequence[Delivery]) -> list[Delivery]:
    """Return the leading rows up to the first repeated fingerprint.

    A batch never carries two notifications of one alert, so a firing and its resolution
    reach the receiver as separate requests, in order.
    """
    seen: set[str] = set()
    batch = []
    for row in rows:
        if row.fingerprint in seen:
            break
        seen.add(row.fingerprint)
        batch.append(row)
    return batch
