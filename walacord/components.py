"""The daemon's components in start order, and the control methods each one adds.

The supervisor calls `default_components(runtime)` once at start-up. Components that
others depend on come first, and they stop in reverse order. Control methods are
registered here, before the control server starts accepting connections.
"""

from __future__ import annotations

from functools import partial

from walacord.runtime import Component, Runtime

BACKUP_MUTATING = {"backup.now", "backup.verify", "backup.restore"}


def default_components(runtime: Runtime) -> list[Component]:
    from walacord.alerts.control import handlers as alert_methods
    from walacord.alerts.service import AlertService
    from walacord.backup import control as backup_control
    from walacord.backup.scheduler import BackupScheduler
    from walacord.control.server import ControlServer
    from walacord.web import WebServer

    config = runtime.config
    methods = runtime.methods
    components: list[Component] = []

    # The control socket starts first, so an operator can ask what a slow start waits for.
    if config.control.socket:
        components.append(ControlServer(runtime))
    if config.http.listen:
        components.append(WebServer(runtime))

    alerts = AlertService(runtime)
    components.append(alerts)
    methods.register_plain(alert_methods(alerts),
                           mutating={"alerts.silence", "alerts.unsilence"})

    backups = BackupScheduler.for_runtime(runtime)
    components.append(backups)
    manager = backups.manager
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

