"""Backup alerts handed to the hook the daemon passes in.

The hook receives a `BackupAlert` with `firing=True` when a problem starts and
`firing=False` when it is over; deduplication and delivery belong to the hook.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

log = logging.getLogger(__name__)

BACKUP_FAILED = "backup_failed"
BACKUP_STALE = "backup_stale"
# Failures of these operations mean the backups themselves are missing or damaged, so
# they raise BACKUP_FAILED. A failed restore or drill is counted and logged, but it is
# an operator's action or a test of an intact backup, and the next backup would not
# clear it.
FAILED_ALERT_OPERATIONS = frozenset({"dump", "verify"})


@dataclass(frozen=True)
class BackupAlert:
    """One backup alert: a stable name, firing or resolved, a summary and its values."""

    name: str
    firing: bool
    summary: str
    fields: dict[str, Any] = field(default_factory=dict)


AlertHook = Callable[[BackupAlert], Awaitable[None] | None]


async def send_alert(hook: AlertHook | None, alert: BackupAlert, time_limit: float) -> None:
    """Call `hook` with `alert`; a hook that fails or hangs is logged, never raised."""
    log.log(logging.ERROR if alert.firing else logging.INFO,
            "backup.alert_firing" if alert.firing else "backup.alert_resolved",
            extra={"fields": {"alert": alert.name, "summary": alert.summary, **alert.fields}})
    if hook is None:
        return
    try:
        with anyio.fail_after(time_limit):
            result = hook(alert)
            if inspect.isawaitable(result):
                await result
    except Exception as exc:  # a broken alert hook must not fail the backup itself
        log.error("backup.alert_hook_failed", extra={"fields": {
            "alert": alert.name, "error": repr(exc)}})
