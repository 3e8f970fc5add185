"""The daemon's components in start order, and the control methods each one adds.

The supervisor calls `default_components(runtime)` once at start-up. Components that
others depend on come first, and they stop in reverse order. Control methods are
registered here, before the control server starts accepting connections.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING

from walacord.alerts import rules
from walacord.probes.base import ProbeState
from walacord.runtime import Component, Runtime

if TYPE_CHECKING:
    from walacord.alerts.service import AlertService
    from walacord.outbox.service import Outbox

log = logging.getLogger(__name__)

BACKUP_MUTATING = {"backup.now", "backup.verify", "backup.restore"}


def default_components(runtime: Runtime) -> list[Component]:
    from walacord import health
    from walacord.alerts.control import handlers as alert_methods
    from walacord.alerts.control import silence_as_caller
    from walacord.alerts.service import AlertService
    from walacord.backup import control as backup_control
    from walacord.backup.scheduler import BackupScheduler
    from walacord.control.server import ControlServer
    from walacord.dbpool import DatabasePause
    from walacord.monitor import Monitor
    from walacord.outbox.backends import OutboxBackends
    from walacord.outbox.control import register_methods as register_outbox_methods
    from walacord.outbox.service import Outbox, build_sinks
    from walacord.web import WebServer

    config = runtime.config
    methods = runtime.methods
    components: list[Component] = []

    # The control socket starts first, so an operator can ask what a slow start waits for.
    if config.control.socket:
        components.append(ControlServer(runtime))
    # The monitor is built first so the web server can route health requests to it.
    # It starts after the web server, so /livez and /metrics respond while probes warm up.
    monitor = Monitor(runtime)
    if config.http.listen:
        server = WebServer(runtime)
        health.mount(server.app, monitor)
        components.append(server)

    alerts = AlertService(runtime)
    components.append(alerts)

    # The outbox starts before the monitor, so the first probe results can wake its sync.
    backends = OutboxBackends(config)
    outbox = Outbox(config, build_sinks(config, walacor=backends.walacor, pool=backends.pool),
                    metrics=runtime.metrics, on_alert=partial(_outbox_alert, alerts),
                    extend_start_timeout=runtime.notifier.extend_timeout)
    components.extend([backends, outbox])
    # At shutdown a running sync pass finishes its rounds, up to drain_timeout. A round
    # that waits for a restore's pause to end gives up instead.
    runtime.drain_hooks.append(outbox.engine.drain)
    runtime.drain_hooks.append(backends.drain)
    register_outbox_methods(methods, outbox)
    monitor.outbox_full = lambda: outbox.store.full_reason
    monitor.state_listeners.append(partial(_tell_outbox, outbox))

    components.append(monitor)
    alert_handlers = alert_methods(alerts)
    del alert_handlers["alerts.silence"]
    methods.register_plain(alert_handlers, mutating={"alerts.unsilence"})
    methods.register("alerts.silence", silence_as_caller(alerts), dict, mutating=True)

    backups = BackupScheduler.for_runtime(runtime)
    components.append(backups)
    manager = backups.manager
    # A forced restore over the supervised database pauses these while it swaps it.
    manager.database_paused = DatabasePause([monitor, backends]).paused
    methods.register_plain({"backup.list": backup_control.handlers(manager)["backup.list"]},
                           mutating=set())
    backup = config.backup
    for name, handler, timeout in (
        ("backup.now", backup_control.backup_now, backup.dump_timeout + backup.verify_timeout),
        ("backup.verify", backup_control.backup_verify,
         backup.verify_timeout + backup.drill_timeout),
        ("backup.restore", backup_control.backup_restore, backup.restore_timeout),
    ):
        methods.register_with_progress(name, partial(handler, manager), mutating=True,
                                       timeout=timeout)

    return components



# The outbox sink that each probe vouches for.
SINK_OF_PROBE = {"database": "postgres", "walacor": "walacor"}


def _tell_outbox(outbox: Outbox, state: ProbeState) -> None:
    sink = SINK_OF_PROBE.get(state.name)
    if sink is None:
        return
    if state.up:
        outbox.engine.sink_healthy(sink)
    elif state.down:
        outbox.engine.sink_unhealthy(sink)


def _outbox_alert(alerts: AlertService, kind: str, message: str) -> None:
    """Turn an outbox problem (full, disk full, damaged file, conservation) into an alert."""
    log.error("outbox.alert", extra={"fields": {"kind": kind, "message": message}})
    config = alerts.runtime.config.alerts
    if kind == "outbox_conservation":
        alerts.observe(rules.conservation_failed(True, config, message))
    else:
        alerts.observe(rules.critical_error(f"outbox.{kind.removeprefix('outbox_')}", message,
                                            config))
