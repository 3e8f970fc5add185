"""The daemon: one root task group that starts every component and stops them in order.

Start-up: load config, install logging, start each component and wait until it reports
started, then send READY=1. Signals only set events; the reload and stop steps run as
ordinary tasks. Shutdown on SIGTERM or SIGINT:

1. send STOPPING=1 and stop accepting work (drain hooks);
2. wait up to `[lifecycle] drain_timeout` for in-flight work to finish, or until a
   second SIGTERM or SIGINT;
3. cancel what is left and exit 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import anyio
from anyio.abc import TaskGroup
from prometheus_client import CollectorRegistry

from walacord import __version__, logs, memory
from walacord import config as config_module
from walacord.components import default_components
from walacord.config import Config
from walacord.errors import ConfigError, ConfigProblem, WalacordError
from walacord.metrics import Metrics
from walacord.runtime import Component, Runtime, sleep_until_tick
from walacord.statelock import StateDirLock
from walacord.systemd import Notifier

log = logging.getLogger(__name__)

ComponentFactory = Callable[[Runtime], Sequence[Component]]


# Seconds between attempts to take the state directory's lock after it could not be
# created at start-up (a read-only or full state directory).
LOCK_RETRY_INTERVAL = 5.0
# Seconds between malloc_trim calls that return freed heap pages to the kernel.
TRIM_INTERVAL = 60.0
CONFIG_READ_TIMEOUT = 10.0

# Settings read once at start-up; a reload stores them but they apply after a restart.
RESTART_ONLY = ("http", "control.socket", "control.group", "state", "walacor", "outbox",
                "backup", "logging.dir", "logging.queue_size")


def restart_required(old: Config, new: Config) -> list[str]:
    """Return the RESTART_ONLY settings that differ between `old` and `new`."""
    changed = []
    for name in RESTART_ONLY:
        section, _, key = name.partition(".")
        before, after = getattr(old, section), getattr(new, section)
        if key:
            before, after = getattr(before, key), getattr(after, key)
        if before != after:
            changed.append(name)
    return changed


def with_start_up_settings(started: Config, new: Config) -> Config:
    """Return `new` with every RESTART_ONLY setting taken from `started`."""
    for name in RESTART_ONLY:
        section, _, key = name.partition(".")
        value = getattr(started, section)
        if key:
            value = dataclasses.replace(getattr(new, section), **{key: getattr(value, key)})
        new = dataclasses.replace(new, **{section: value})
    return new


class Supervisor:
    """Owns the root task group, the systemd conversation and the signal handling."""

    def __init__(self, config: Config, config_path: str | None, *,
                 components: ComponentFactory = default_components,
                 registry: CollectorRegistry | None = None,
                 notifier: Notifier | None = None, handle_signals: bool = True) -> None:
        registry = registry or CollectorRegistry()
        self.runtime = Runtime(
            config=config, config_path=config_path, registry=registry,
            metrics=Metrics(registry), notifier=notifier or Notifier(),
            logs=logs._current,
        )
        self.runtime.reload_config = self.reload
        if logs._current is not None:
            metrics = self.runtime.metrics
            logs._current.count_into(
                metrics.log_lines_dropped.inc,
                lambda name: metrics.log_write_errors.labels(file=name).inc())
        # The config the daemon started with: restart-only settings keep these values
        # until a restart, whatever later reloads load.
        self._started_config = config
        self._component_factory = components
        self._reload_requested = anyio.Event()
        # The drain's scope while it runs, and whether a second SIGTERM or SIGINT asked
        # to end it, as an operator does when a drain waits on a hung dependency.
        self._drain_scope: anyio.CancelScope | None = None
        self._drain_cut = False
        # False where the caller owns the process's signals (`walacord dev`) and passes
        # each one to handle_signal.
        self._handle_signals_enabled = handle_signals

    async def run(self) -> None:
        runtime = self.runtime
        cfg = runtime.config
        log.info("daemon.starting", extra={"fields": {
            "version": __version__, "config": cfg.source, "environment": cfg.environment,
            "database": cfg.database.url, "walacor": cfg.walacor.url,
            "http": cfg.http.listen, "control": cfg.control.socket}})

        lock = StateDirLock(Path(cfg.state.dir))
        lock.acquire()
        try:
            await self._run(lock)
        finally:
            lock.release()
            # Frozen objects that became garbage are collectable again, which matters
            # only where the process goes on, as in tests that run the daemon in-process.
            memory.unfreeze()
        log.info("daemon.stopped")

    async def _run(self, lock: StateDirLock) -> None:
        runtime = self.runtime
        cfg = runtime.config
        async with anyio.create_task_group() as tg:
            if self._handle_signals_enabled:
                await tg.start(self._handle_signals)
            if not lock.complete:
                tg.start_soon(self._take_lock_later, lock)

            # Step 1: start components in order, each bounded by the start timeout.
            components = list(self._component_factory(runtime))
            for component in components:
                runtime.components[component.name] = component
                # A component with a long start-up step (the outbox's integrity check)
                # declares its own, longer bound.
                bound = max(cfg.lifecycle.start_timeout,
                            float(getattr(component, "start_timeout", 0.0)))
                runtime.notifier.extend_timeout(bound + 5)
                began = time.monotonic()
                with anyio.fail_after(bound):
                    await tg.start(self._run_component, component)
                log.info("component.started", extra={"fields": {
                    "component": component.name,
                    "duration_seconds": round(time.monotonic() - began, 3)}})

            # Step 2: announce readiness and keep the watchdog fed.
            memory.freeze_startup_objects()
            runtime.ready.set()
            runtime.metrics.up.set(1)
            runtime.notifier.ready(runtime.status_line())
            log.info("daemon.ready", extra={"fields": {"components": list(runtime.components)}})
            tg.start_soon(self._watchdog)
            tg.start_soon(self._status_loop)
            tg.start_soon(self._reload_loop)
            tg.start_soon(self._trim_loop)

            # Step 3: wait for SIGTERM/SIGINT, then drain and cancel.
            await runtime.stop_requested.wait()
            await self._shutdown(tg)

    async def _take_lock_later(self, lock: StateDirLock) -> None:
        """Take the state directory's lock, and write the PID into it, once the directory
        allows it.

        Raise StateDirLocked, which stops this daemon, when another daemon took the lock
        while this one ran without it: one daemon per directory, and the other holds it.
        """
        while not lock.complete:
            await anyio.sleep(LOCK_RETRY_INTERVAL)
            held = lock.held
            lock.acquire()
            if lock.held and not held:
                log.info("state.lock_acquired", extra={"fields": {"path": str(lock.path)}})

    async def _run_component(self, component: Component, *,
                             task_status: anyio.abc.TaskStatus[None]) -> None:
        try:
            await component.run(task_status=task_status)
        except Exception as exc:
            # A component that dies takes the daemon down, so systemd restarts it whole
            # instead of leaving a half-working supervisor.
            log.critical("component.crashed", exc_info=True, extra={"fields": {
                "component": component.name, "error": "; ".join(failure_messages(exc))}})
            self.runtime.request_stop()
            raise

    async def _shutdown(self, tg: TaskGroup) -> None:
        runtime = self.runtime
        bound = runtime.config.lifecycle.drain_timeout
        runtime.stopping = True
        runtime.metrics.up.set(0)
        runtime.notifier.stopping()
        log.info("shutdown.started", extra={"fields": {"drain_timeout_seconds": bound}})

        began = time.monotonic()
        with anyio.move_on_after(bound) as scope:
            self._drain_scope = scope
            if self._drain_cut:
                scope.cancel()
            async with anyio.create_task_group() as drains:
                for hook in reversed(runtime.drain_hooks):
                    drains.start_soon(hook)
        self._drain_scope = None
        if self._drain_cut:
            log.warning("shutdown.drain_cut_short", extra={"fields": {
                "duration_seconds": round(time.monotonic() - began, 3),
                "reason": "a second SIGTERM or SIGINT"}})
        elif scope.cancelled_caught:
            log.warning("shutdown.drain_timed_out", extra={"fields": {
                "drain_timeout_seconds": bound}})
        else:
            log.info("shutdown.drained", extra={"fields": {
                "duration_seconds": round(time.monotonic() - began, 3)}})

        log.info("shutdown.cancelling")
        tg.cancel_scope.cancel()

    async def _handle_signals(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
        with anyio.open_signal_receiver(*wanted) as signals:
            task_status.started()
            async for signum in signals:
                self.handle_signal(signum)

    def handle_signal(self, signum: int) -> None:
        """Stop on SIGTERM or SIGINT (a second one ends the drain), reload the config on
        SIGHUP and reopen the log files on SIGUSR1. Other signals are ignored."""
        name = signal.Signals(signum).name
        log.info("signal.received", extra={"fields": {"signal": name}})
        if signum in (signal.SIGTERM, signal.SIGINT):
            if self.runtime.stop_requested.is_set():
                # Work that the drain abandons is safe: enqueues are durable before
                # they are acknowledged, and sync resumes at the restart.
                self._drain_cut = True
                if self._drain_scope is not None:
                    self._drain_scope.cancel()
            self.runtime.request_stop()
        elif signum == signal.SIGHUP:
            self._reload_requested.set()
        elif signum == signal.SIGUSR1 and self.runtime.logs is not None:
            failures = self.runtime.logs.reopen()
            if failures:
                log.error("logs.reopen_failed", extra={"fields": {"files": failures}})

    async def _reload_loop(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested = anyio.Event()
            await self.reload()

    async def _read_config(self) -> Config:
        """Load the config file in a worker thread, within CONFIG_READ_TIMEOUT.

        A file on a hung mount could block the read forever. The thread is abandoned on
        timeout, so a stuck read blocks neither the next reload nor shutdown.
        """
        try:
            with anyio.fail_after(CONFIG_READ_TIMEOUT):
                return await anyio.to_thread.run_sync(
                    partial(config_module.load, self.runtime.config_path, reload=True),
                    abandon_on_cancel=True)
        except TimeoutError:
            raise ConfigError([ConfigProblem(str(self.runtime.config_path), "(file)",
                f"reading it took more than {CONFIG_READ_TIMEOUT:g} s; check the file "
                "system it is on")]) from None
        except (ConfigError, anyio.get_cancelled_exc_class()):
            raise
        except Exception as exc:
            # A loader bug must not take the running daemon down with it: the reload is
            # rejected and the old config stays.
            log.exception("config.load_crashed")
            raise ConfigError([ConfigProblem(str(self.runtime.config_path), "(file)",
                f"loading it failed unexpectedly ({type(exc).__name__}); the log has the "
                "traceback (event config.load_crashed)")]) from None

    async def reload(self) -> bool:
        """Load and apply the config file again; keep the old one when the new is invalid."""
        runtime = self.runtime
        runtime.notifier.reloading()
        try:
            new = await self._read_config()
        except ConfigError as exc:
            return self._reject_reload([str(p) for p in exc.problems])
        problems = [problem for check in runtime.reload_checks for problem in await check(new)]
        if problems:
            return self._reject_reload(problems)

        pending = restart_required(self._started_config, new)
        # Components read their settings from runtime.config, so the settings that
        # apply only after a restart keep their start-up values until then.
        new = with_start_up_settings(self._started_config, new)
        for hook in runtime.reload_hooks:
            await hook(new)
        runtime.config = new
        runtime.restart_required = pending
        if pending:
            log.warning("config.restart_required", extra={"fields": {
                "settings": pending,
                "hint": "these changes take effect after a restart: systemctl restart "
                        "walacord, or Ctrl-C and walacord dev again for the sandbox"}})
        logs.redact.set_secrets(new.secrets())
        if runtime.logs is not None:
            runtime.logs.set_level(new.logging.level)
        runtime.metrics.config_reloads.labels(result="applied").inc()
        log.info("config.reloaded", extra={"fields": {"config": new.source}})
        runtime.notifier.reloaded(runtime.status_line())
        return True

    def _reject_reload(self, problems: list[str]) -> bool:
        """Keep the running config, record why, and return False."""
        runtime = self.runtime
        runtime.metrics.config_reloads.labels(result="rejected").inc()
        runtime.reload_problems = problems
        # Every reload an operator asks for gets its own line, even repeated ones.
        log.error("config.reload_rejected", extra={"no_collapse": True, "fields": {
            "config": runtime.config_path, "problems": problems}})
        runtime.notifier.reloaded(runtime.status_line())
        return False

    async def _watchdog(self) -> None:
        """Send WATCHDOG=1 while every component beats within its own deadline."""
        runtime = self.runtime
        interval = runtime.notifier.watchdog_interval
        if interval is None:
            return
        reported: set[str] = set()
        while True:
            stalled = runtime.progress.stalled()
            if stalled:
                for name in stalled.keys() - reported:
                    runtime.metrics.watchdog_stalls.labels(component=name).inc()
                    log.error("watchdog.withheld", extra={"fields": {
                        "component": name, "silent_seconds": round(stalled[name], 1)}})
                reported = set(stalled)
            else:
                if reported:
                    log.info("watchdog.resumed")
                reported = set()
                runtime.notifier.watchdog()
            await anyio.sleep(interval)

    async def _trim_loop(self) -> None:
        # Start-up frees much of what imports and config parsing allocated. Return those
        # pages now and then every TRIM_INTERVAL, so RSS follows what the daemon uses.
        while True:
            await anyio.to_thread.run_sync(memory.trim)
            await anyio.sleep(TRIM_INTERVAL)

    async def _status_loop(self) -> None:
        while True:
            self.runtime.update_status()
            await sleep_until_tick(1.0)


# --- `walacord run` -----------------------------------------------------------------


def failure_leaves(exc: BaseException) -> list[BaseException]:
    """Return the exceptions inside nested exception groups, or `exc` itself."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in failure_leaves(inner)]
    return [exc]


def failure_messages(exc: BaseException) -> list[str]:
    """Return one "Type: message" line per distinct error inside `exc`."""
    messages: list[str] = []
    for leaf in failure_leaves(exc):
        line = str(leaf) if isinstance(leaf, WalacordError) else (
            f"{type(leaf).__name__}: {leaf}")
        if line not in messages:
            messages.append(line)
    return messages


def command(args: argparse.Namespace) -> int:
    memory.limit_arenas()
    try:
        cfg = config_module.load(args.config)
    except ConfigError as exc:
        print(f"walacord: configuration {args.config} is invalid:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2

    try:
        logs.setup(cfg.logging.level, cfg.logging.dir or None,
                   queue_size=cfg.logging.queue_size, repeat_window=cfg.logging.repeat_window,
                   secrets=cfg.secrets())
    except OSError as exc:
        # The error may concern a file in the directory, such as one that a rotation
        # left owned by another user.
        target = exc.filename or cfg.logging.dir
        kind = "log directory" if str(target) == str(cfg.logging.dir) else "log file"
        print(f"walacord: cannot open {kind} {str(target)!r}: {exc.strerror}; fix its owner "
              "or permissions, or set [logging] dir", file=sys.stderr)
        return 1

    supervisor = Supervisor(cfg, args.config)
    try:
        anyio.run(supervisor.run, backend="asyncio")
    except Exception as exc:
        # Components fail inside task groups, so the error arrives wrapped in exception
        # groups; the log line names the errors themselves.
        error = "; ".join(failure_messages(exc))
        if all(isinstance(leaf, (WalacordError, OSError)) for leaf in failure_leaves(exc)):
            log.critical("daemon.failed", extra={"fields": {"error": error}})
        else:
            log.critical("daemon.crashed", exc_info=True, extra={"fields": {"error": error}})
        return 1
    finally:
        logs.shutdown()
    return 0
