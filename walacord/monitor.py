"""The monitor: runs every probe, decides the mode, and makes the repairs.

`Monitor` is the component the supervisor starts. It owns the database pool, one
`ProbeRunner` per probe, the `ModeMachine`, the pool `Recycler` and the application
`Restarter`. The control socket and the HTTP health endpoints call its plain methods
(`status()`, `health()`, `run_probe()`, `set_mode()`, ...), which return JSON-able dicts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import anyio
from anyio.abc import TaskGroup, TaskStatus
from prometheus_client import Gauge
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict

from walacord.config import PROBE_NAMES, Config
from walacord.dbpool import DatabasePool
from walacord.errors import ModeOverrideError, PoolRecycleError
from walacord.logs import PERFORMANCE_LOGGER
from walacord.modes import Mode, ModeMachine, wall_time
from walacord.probes.base import Health, Probe, ProbeResult, ProbeRunner, ProbeState
from walacord.probes.database import CrashWatcher, DatabaseProbe, classify, describe
from walacord.probes.host import HostProbe
from walacord.probes.http import ApiProbe
from walacord.probes.walacor import WalacorProbe
from walacord.repair import Recycler, Restarter
from walacord.runtime import Runtime, next_tick

log = logging.getLogger(__name__)
# Written to performance.log: probe latency percentiles and counts.
perf_log = logging.getLogger(PERFORMANCE_LOGGER)

# The mode is re-evaluated at least this often. Probe state changes wake the monitor at
# once, and it also wakes when an override or a dwell ends, so this bounds how late it
# detects what nothing announces: the outbox filling up and a due application restart.
EVALUATE_EVERY = 1.0
# Reasons of a failed test connection that the [database] settings themselves cause.
SETTINGS_FAILURES = frozenset({"auth", "config", "dns", "privilege"})
REMOTE_PROBES = ("database", "walacor", "api")


class Monitor:
    """Probes, mode and repairs; stored as `runtime.components["monitor"]`."""

    name = "monitor"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        cfg = runtime.config
        self.metrics = runtime.metrics

        # The probes, each reading its settings from the current config on every run.
        self.pool = DatabasePool(cfg.database)
        self.database = DatabaseProbe(self.pool, lambda: self.config.probes.database)
        self.host = HostProbe(lambda: self.config.probes.host, self._watched_dirs,
                              self._remote_hostnames)
        self.api = ApiProbe(lambda: self.config.probes.api)
        self.walacor = WalacorProbe(lambda: self.config.probes.walacor,
                                    lambda: self.config.walacor)

        # What acts on the probe states: the mode, the repairs and the crash watcher.
        self.modes = ModeMachine(cfg.modes, self.metrics)
        # Set by the outbox when it is wired in: why it rejects new operations, if it does, and
        # who wants to hear about a probe going up or down.
        self.outbox_full: Callable[[], str | None] = lambda: None
        self.state_listeners: list[Callable[[ProbeState], None]] = []
        self.recycler = Recycler(lambda: self.config.repair, self.pool, self._prove_fresh,
                                 self.metrics)
        self.restarter = Restarter(lambda: self.config.repair, self.metrics)
        self.watcher = CrashWatcher(self.pool, self._on_server_event,
                                    lambda: self.config.database.connect_timeout)

        # One runner per probe, each checked by the watchdog.
        probes: list[Probe] = [self.database, self.walacor, self.api, self.host]
        self.runners: dict[str, ProbeRunner] = {}
        for probe in probes:
            beat = runtime.progress.register(f"probe.{probe.name}", self._stall_after(probe))
            self.runners[probe.name] = ProbeRunner(
                probe, on_state=self._on_state, on_result=self._on_result, beat=beat)

        self._tg: TaskGroup | None = None
        self._changed = anyio.Event()
        self._repairing: set[str] = set()
        self._skipped_seen: dict[str, int] = {}
        self._abandoned_seen: dict[str, int] = {}
        self._want_released = False
        self._recycled_for: str | None = None
        self._last_restart_at = -float("inf")
        self._pool_wake = anyio.Event()
        # Per host resource: the alerts component, level and `for` duration last reported
        # to it. The engine keeps a pushed condition until it is reported inactive, so an
        # unchanged level is not reported again.
        self._host_levels_sent: dict[str, tuple[object, str, float]] = {}
        runtime.status_parts.append(self.modes.status_part)
        runtime.reload_checks.append(self._check_database_settings)
        runtime.reload_hooks.append(self._reload)

    @property
    def config(self) -> Config:
        return self.runtime.config

    def _stall_after(self, probe: Probe) -> float:
        settings = probe.settings()
        return (settings.interval * (1 + settings.jitter) + settings.timeout
                + self.config.lifecycle.component_stall)

    def _watched_dirs(self) -> list[str]:
        cfg = self.config
        dirs: list[str] = [cfg.state.dir, *cfg.probes.host.dirs]
        if cfg.logging.dir:
            dirs.append(cfg.logging.dir)
        return dirs

    def _remote_hostnames(self) -> list[str]:
        names: list[str] = []
        try:
            hosts = str(conninfo_to_dict(self.config.database.url).get("host") or "")
        except Exception:  # an unparsable URL was already rejected by the config check
            hosts = ""
        names.extend(h for h in hosts.split(",") if h and not h.startswith("/"))
        if self.config.walacor.url:
            names.append(urlsplit(self.config.walacor.url).hostname or "")
        return [n for n in names if n and not _is_address(n)]

    # --- lifecycle --------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        beat = self.runtime.progress.register(self.name, self.config.lifecycle.component_stall)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await tg.start(self.pool.run)
                await tg.start(self.database.run)
                for runner in self.runners.values():
                    await tg.start(runner.run)
                if self.config.probes.database.crash_watch:
                    await tg.start(self.watcher.run)
                tg.start_soon(self.modes.run_hooks)
                tg.start_soon(self._keep_pool)

                # Ready once every probe has a first result, so the mode means something.
                bound = max(p.probe.settings().timeout for p in self.runners.values()) + 1
                with anyio.move_on_after(bound):
                    for runner in self.runners.values():
                        await runner.first_result()
                self._evaluate()
                task_status.started()

                performance_logged = time.monotonic()
                while True:
                    beat()
                    self._publish_pool()
                    self._evaluate()
                    every = self.config.logging.performance_interval
                    if time.monotonic() - performance_logged >= every:
                        performance_logged = time.monotonic()
                        perf_log.info("performance.summary", extra={
                            "fields": self.performance()})
                    await self._check_restart()
                    with anyio.move_on_after(self._evaluate_delay()):
                        await self._changed.wait()
                    self._changed = anyio.Event()
        finally:
            self._tg = None
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self.api.aclose()
                await self.walacor.aclose()

    def _evaluate_delay(self) -> float:
        """Return the seconds until the next evaluation unless something wakes the loop.

        Idle evaluations fall on the whole-second ticks that the other once-a-second
        loops also wake on (`sleep_until_tick`).
        """
        now = time.monotonic()
        wake_at = next_tick(now, EVALUATE_EVERY)
        due = self.modes.time_change_at(now)
        if due is not None:
            wake_at = min(wake_at, due)
        return max(0.0, wake_at - now)

    async def _check_database_settings(self, new: Config) -> list[str]:
        """Connect once with changed [database] settings; return why they cannot work.

        A reload replaces the pool, so a wrong password or database name would turn a
        working daemon into one in emergency mode. Only failures that the settings
        cause reject the reload. When the server cannot be reached at all, the new
        settings are applied unverified, because the old ones may be what is broken.
        """
        settings = new.database
        if settings == self.pool.config or not settings.url:
            return []
        try:
            with anyio.fail_after(settings.connect_timeout + 1.0):
                conn = await AsyncConnection.connect(settings.conninfo(), autocommit=True)
                try:
                    await conn.execute("SELECT 1")
                finally:
                    with anyio.CancelScope(shield=True):
                        await conn.close()
        except Exception as exc:
            reason = classify(exc)
            if reason in SETTINGS_FAILURES:
                return [f"database: a test connection with the new settings failed "
                        f"({reason}: {describe(exc)}), so the daemon keeps the old ones; fix "
                        "[database] or the server, then reload again"]
            log.warning("config.database_unverified", extra={"fields": {
                "reason": reason, "error": describe(exc),
                "hint": "the new [database] settings are applied, but no test connection "
                        "succeeded; check the mode and the database probe"}})
        return []

    async def _reload(self, new: Config) -> None:
        self.modes.apply_config(new.modes)
        # A shortened or ended override shows in the mode and its reason at once.
        self._evaluate()
        if new.database != self.pool.config:
            self.pool.config = new.database
            self._spawn_repair("config_changed")

    # --- reacting to probes -----------------------------------------------------

    def _on_server_event(self, event: str) -> None:
        # The probe's next run weighs what the server sent before the drop.
        self.database.note_server_drop(
            self.watcher.last_drop if event == "connection_dropped" else None)
        self.runners["database"].trigger()

    def _on_result(self, name: str, result: ProbeResult) -> None:
        metrics = self.metrics
        if result.reason == "not_configured":
            # A probe with nothing to check exports no sample, so it neither passes
            # nor fails in dashboards and alert rules.
            _remove_label(metrics.probe_success, name)
            _remove_label(metrics.probe_up, name)
        else:
            metrics.probe_success.labels(probe=name).set(1 if result.healthy else 0)
            metrics.probe_duration.labels(probe=name).observe(result.latency)
        if not result.healthy:
            metrics.probe_failures.labels(probe=name, reason=result.reason).inc()
        runner = self.runners[name]
        for seen, value, counter in (
                (self._skipped_seen, runner.stats.skipped, metrics.probe_skipped),
                (self._abandoned_seen, runner.abandoner.abandoned_total,
                 metrics.probe_abandoned)):
            delta = value - seen.get(name, 0)
            if delta > 0:
                counter.labels(probe=name).inc(delta)
            seen[name] = value
        if name == "database":
            self._on_database_result(result)
        elif name == "host":
            self._on_host_result(result)
        elif name == "walacor" and result.details.get("tls_days_left") is not None:
            metrics.walacor_tls_expiry_seconds.set(result.details["tls_days_left"] * 86400)

    def _on_host_result(self, result: ProbeResult) -> None:
        details = result.details
        for directory, disk in details.get("disks", {}).items():
            self.metrics.host_disk_free_ratio.labels(dir=directory).set(disk["free_ratio"])
        if "memory_used_percent" in details:
            self.metrics.host_memory_used_ratio.set(details["memory_used_percent"] / 100)
        alerts = self.runtime.components.get("alerts")
        if alerts is None or "levels" not in details:
            return
        from walacord.alerts import rules

        for resource, level in details["levels"].items():
            sent = (alerts, level, self.config.alerts.host_resources_for)
            if self._host_levels_sent.get(resource) == sent:
                continue
            self._host_levels_sent[resource] = sent
            for condition in rules.host_resource(resource, level, None, self.config.alerts):
                alerts.observe(condition)

    def _on_database_result(self, result: ProbeResult) -> None:
        details = result.details
        if details.get("release"):
            self._want_released = True
            self._pool_wake.set()
        elif details.get("fresh_connection") == "ok":
            self._want_released = False
            self._pool_wake.set()
        # Recycle only once the failure is confirmed (the probe is down), and once per
        # trigger while it stays down, so one slow query or a lasting read-only primary
        # does not spend the hourly budget.
        state = self.runners["database"].state
        trigger = details.get("recycle")
        if state.up:
            self._recycled_for = None
        elif trigger and state.down and trigger != self._recycled_for:
            self._recycled_for = trigger
            self._spawn_repair(trigger)

    def _on_state(self, old: ProbeState, new: ProbeState) -> None:
        if new.health is not Health.NOT_CONFIGURED:
            self.metrics.probe_up.labels(probe=new.name).set(1 if new.up else 0)
        if old.health is not new.health:
            for listener in self.state_listeners:
                listener(new)
        if old.health is not new.health or old.last is None or new.last is None or (
                old.last.status is not new.last.status):
            self._changed.set()
            self._evaluate()
        if new.name in REMOTE_PROBES and new.down and old.health is not Health.DOWN:
            self._maybe_blame_host()

    def _maybe_blame_host(self) -> None:
        # "Is it me?": when every configured remote probe is down, look for a local cause.
        remote = [self.runners[n].state for n in REMOTE_PROBES
                  if self.runners[n].state.health is not Health.NOT_CONFIGURED]
        if remote and all(s.down for s in remote):
            self.host.suspect_local = True
            self.runners["host"].trigger()

    def _evaluate(self) -> None:
        transitions = self.modes.transitions
        self.modes.evaluate(self.observations(), outbox_full=self.outbox_full())
        if self.modes.transitions != transitions:
            self.runtime.update_status()

    def observations(self) -> dict[str, ProbeState]:
        return {name: runner.state for name, runner in self.runners.items()
                if runner.state.health is not Health.NOT_CONFIGURED}

    def _spawn(self, function: Any, *args: Any) -> None:
        if self._tg is not None:
            self._tg.start_soon(function, *args)

    def _spawn_repair(self, reason: str) -> None:
        if "recycle" in self._repairing:
            return
        self._repairing.add("recycle")

        async def work() -> None:
            try:
                await self.recycler.recycle(reason)
            finally:
                self._repairing.discard("recycle")
            self._report_recycle_budget()
            self.runners["database"].trigger()

        self._spawn(work)

    async def _keep_pool(self) -> None:
        """Release the pool while the server shuts down, and reopen it once it is back.

        One task does both, in order, so a release and a reopen never race.
        """
        while True:
            await self._pool_wake.wait()
            self._pool_wake = anyio.Event()
            if self._want_released and not self.pool.pool.closed:
                self.watcher.release()
                before = await self.pool.release()
                self.metrics.db_pool_recycles.labels(reason="shutting_down").inc()
                log.warning("pool.released", extra={"fields": {
                    "reason": "the server is shutting down (SQLSTATE 57P03)",
                    "pool_before": before}})
            elif (not self._want_released and self.pool.pool.closed
                  and self.pool.paused is None):
                await self.pool.reopen()
                log.info("pool.reopened")
                self.runners["database"].trigger()

    async def pause_database(self, reason: str) -> None:
        """Keep every connection of the monitor off the database until resume_database().

        The database probe finishes a run in progress, then starts none; its state keeps
        the last result, and reports show `paused`. The crash watch closes its
        connection, and the pool closes its connections.
        """
        began = time.monotonic()
        runner = self.runners["database"]
        await runner.pause(reason)
        await self.watcher.pause()
        before = await self.pool.pause(reason)
        log.warning("database.paused", extra={"fields": {
            "reason": reason, "pool_before": before,
            "duration_seconds": round(time.monotonic() - began, 3)}})

    async def resume_database(self) -> None:
        """Undo pause_database(): open the pool, reconnect the crash watch, probe at once."""
        reason = self.pool.paused
        await self.pool.resume()
        self.watcher.resume()
        self.runners["database"].resume()
        log.info("database.resumed", extra={"fields": {"reason": reason}})

    async def _prove_fresh(self) -> tuple[bool, str]:
        """Open a new connection and run SELECT 1, within the database probe's deadline."""
        async def attempt() -> None:
            conn = await self.pool.connect()
            try:
                await conn.execute("SELECT 1")
            finally:
                with anyio.CancelScope(shield=True):
                    await conn.close()

        try:
            await self.database.abandoner.call(attempt, self.config.probes.database.timeout)
        except TimeoutError:
            return False, "a new connection did not answer SELECT 1 in time"
        except Exception as exc:
            return False, f"a new connection failed ({classify(exc)}: {describe(exc)})"
        return True, "a new connection answers SELECT 1"

    async def _check_restart(self) -> None:
        # While the API probe stays down, restart every `restart_after` seconds; the
        # restarter's budget ends a loop of restarts that do not help.
        state = self.runners["api"].state
        if not state.down or "restart" in self._repairing:
            return
        now = time.monotonic()
        if not self.restarter.due(min(now - state.since, now - self._last_restart_at)):
            return
        self._last_restart_at = now
        self._repairing.add("restart")

        async def work() -> None:
            try:
                await self.restarter.restart(f"API probe down: {state.message}")
            finally:
                self._repairing.discard("restart")

        self._spawn(work)

    def _publish_pool(self) -> None:
        counts = self.pool.connections()
        for state in ("idle", "used"):
            self.metrics.db_pool_connections.labels(state=state).set(counts[state])
        self.metrics.db_pool_requests_waiting.set(counts["waiting"])

    # --- methods for the control socket and the HTTP endpoints ------------------

    def probe_report(self, name: str, now: float | None = None) -> dict[str, Any]:
        """Return one probe's state, reason, latency, since and last error."""
        now = time.monotonic() if now is None else now
        runner = self.runners[name]
        state = runner.state
        last = state.last
        failure = state.last_failure
        return {
            "state": state.health.value,
            "healthy": None if state.health in (Health.UNKNOWN, Health.NOT_CONFIGURED)
            else state.up,
            "status": last.status.value if last else None,
            "reason": state.reason,
            "message": state.message,
            "latency_seconds": round(last.latency, 6) if last else None,
            "since": wall_time(state.since, now) if state.since else None,
            "last_run": wall_time(last.at, now) if last and last.at else None,
            "last_error": None if failure is None else {
                "reason": failure.reason, "message": failure.message,
                "at": wall_time(failure.at, now) if failure.at else None},
            "flapping": state.flapping,
            "paused": runner.paused,
            "configured": state.health is not Health.NOT_CONFIGURED,
            "details": last.details if last else {},
        }

    def status(self) -> dict[str, Any]:
        """Return mode, reason, since, override and every probe, as `walacorctl status` shows."""
        now = time.monotonic()
        snapshot = self.modes.snapshot(now)
        return {
            **snapshot,
            "probes": {name: self.probe_report(name, now) for name in self.runners},
            "repair": {"pool": self.recycler.snapshot(), "restart": self.restarter.snapshot()},
        }

    def health(self, component: str | None = None) -> tuple[int, dict[str, Any]]:
        """Return the HTTP status and the document for /api/health or one component."""
        mode = self.modes.mode
        code = 200 if mode in (Mode.NORMAL, Mode.DEGRADED) else 503
        document = self.status()
        document["status"] = {Mode.NORMAL: "ok", Mode.DEGRADED: "degraded"}.get(
            mode, "unavailable")
        if component is None:
            return code, document
        probe = document["probes"][component]
        probe_code = 503 if probe["state"] == Health.DOWN.value else 200
        return probe_code, {"mode": document["mode"], "probe": component, **probe}

    def performance(self) -> dict[str, Any]:
        """Return probe latency percentiles and run counts for /api/health/metrics."""
        probes = {}
        for name, runner in self.runners.items():
            stats = runner.stats
            probes[name] = {
                "runs": stats.runs, "skipped": stats.skipped, "timeouts": stats.timeouts,
                "latency_seconds": {label: _round(stats.percentile(q)) for label, q in
                                    (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))},
            }
        return {"mode": self.modes.mode.value, "probes": probes,
                "pool": self.pool.connections(),
                "mode_transitions": self.modes.transitions}

    def list_probes(self) -> list[dict[str, Any]]:
        result = []
        for name, runner in self.runners.items():
            settings = runner.probe.settings()
            result.append({"name": name, "state": runner.state.health.value,
                           "interval_seconds": settings.interval,
                           "timeout_seconds": settings.timeout,
                           "runs": runner.stats.runs, "skipped": runner.stats.skipped})
        return result

    async def run_probe(self, name: str) -> dict[str, Any]:
        """Run probe `name` now and return its report."""
        if name not in self.runners:
            raise KeyError(f"unknown probe {name!r}; use one of {', '.join(PROBE_NAMES)}")
        await self.runners[name].run_once()
        self._evaluate()
        return self.probe_report(name)

    def get_mode(self) -> dict[str, Any]:
        return self.modes.snapshot()

    def set_mode(self, mode: str, reason: str, ttl: float, actor: str = "") -> dict[str, Any]:
        """Force `mode` for `ttl` seconds; raise ModeOverrideError on an invalid mode or TTL."""
        try:
            chosen = Mode(mode)
        except ValueError:
            raise ModeOverrideError(f"invalid mode {mode!r}; use one of "
                             f"{', '.join(m.value for m in Mode)}") from None
        self.modes.set_override(chosen, reason, ttl, set_by=actor)
        self._evaluate()
        # The loop then waits for the override's end rather than a full EVALUATE_EVERY.
        self._changed.set()
        return self.modes.snapshot()

    def clear_mode(self) -> dict[str, Any]:
        cleared = self.modes.clear_override()
        self._evaluate()
        self._changed.set()
        return {"cleared": cleared, **self.modes.snapshot()}

    async def recycle_pool(self, reason: str = "manual") -> dict[str, Any]:
        """Recycle the pool now and return what was done.

        Raises PoolRecycleError when the hourly budget is spent or a new connection
        fails afterwards, with a message for the operator.
        """
        result = await self.recycler.recycle(reason, trigger="manual")
        self._report_recycle_budget()
        self.runners["database"].trigger()
        if not result["recycled"]:
            raise PoolRecycleError(f"pool not recycled: {result['error']}")
        if not result["healthy_after"]:
            raise PoolRecycleError(f"pool recycled, but {result['proof']}")
        return result

    def _report_recycle_budget(self) -> None:
        alerts = self.runtime.components.get("alerts")
        if alerts is None:
            return
        from walacord.alerts import rules

        snapshot = self.recycler.snapshot()
        detail = f"{snapshot['used_this_hour']} of {snapshot['budget_per_hour']} used this hour"
        alerts.observe(rules.recycle_budget_exhausted(self.recycler.exhausted,
                                                       self.config.alerts, detail))

    # --- the control channel's protocols (ModeControl, ProbeControl, PoolControl) ---

    def mode_state(self) -> dict[str, Any]:
        """Return mode, reason, since and override, without blocking."""
        snapshot = self.modes.snapshot()
        return {key: snapshot[key] for key in ("mode", "reason", "since", "override")}

    async def set_override(self, mode: str, ttl_seconds: float, reason: str,
                           actor: str) -> dict[str, Any]:
        self.set_mode(mode, reason, ttl_seconds, actor)
        return self.mode_state()

    async def clear_override(self, actor: str) -> dict[str, Any]:
        if self.modes.override is not None:
            log.info("mode.override_clear_requested", extra={"fields": {"actor": actor}})
        self.clear_mode()
        return self.mode_state()

    def probe_states(self) -> dict[str, dict[str, Any]]:
        """Return each probe as `walacorctl status` shows it: healthy, reason, latency.

        `healthy` is None only for a probe that is not configured or disabled, with
        the probe's message ("not configured" or "disabled in the config") as reason.
        A probe with no result yet counts as not healthy.
        """
        states = {}
        for name in self.runners:
            report = self.probe_report(name)
            if report["state"] == Health.NOT_CONFIGURED.value:
                states[name] = {"healthy": None, "reason": report["message"],
                                "latency_seconds": None, "since": report["since"] or "",
                                "paused": None, "details": {}}
                continue
            states[name] = {
                "healthy": bool(report["healthy"]),
                "reason": report["reason"], "latency_seconds": report["latency_seconds"],
                "since": report["since"] or "", "paused": report["paused"],
                "details": report["details"]}
        return states

    async def run_probes(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Run the named probes now, side by side, and return their states."""
        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(self.run_probe, name)
        states = self.probe_states()
        return {name: states[name] for name in names}


def _remove_label(gauge: Gauge, probe: str) -> None:
    try:
        gauge.remove(probe)
    except KeyError:
        pass  # never exported for this probe


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _is_address(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True
