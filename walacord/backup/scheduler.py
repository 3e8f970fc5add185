"""BackupScheduler: the daily backup, the periodic drill and re-check, and the age alert.

Wall-clock time chooses the next daily start (UTC `daily_at`) and, at start-up, turns
the manifests' timestamps into the age of the last backup and drill. The wait until
the start, the retry and drill intervals and the alert check interval are measured
on the monotonic clock, so a clock step does not make runs bunch up. The age behind
the stale alert also compares manifest timestamps with the wall clock, because it
must survive restarts.

Jitter is derived from the database identity and the date, not drawn at random, so
every host watching one database picks the same start. The host that wins the
advisory lock takes the backup and the others skip it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import anyio
import psycopg
from anyio.abc import TaskStatus

from walacord.backup.manager import BackupManager
from walacord.backup.manifest import Manifest, parse_time
from walacord.config import BackupConfig, parse_daily_at
from walacord.errors import BackupError

if TYPE_CHECKING:
    from walacord.runtime import Runtime

log = logging.getLogger(__name__)

DAY_SECONDS = 86400.0


def jitter_seconds(key: str, day: datetime, jitter: float) -> float:
    """Return a delay in [0, jitter) that depends only on `key` and the UTC date."""
    if jitter <= 0:
        return 0.0
    seed = hashlib.sha256(f"{key}/{day:%Y-%m-%d}".encode()).digest()
    return int.from_bytes(seed[:8], "big") / 2**64 * jitter


def next_daily_run(now: datetime, daily_at: str, jitter: float, key: str) -> datetime:
    """Return the first start strictly after `now`: `daily_at` UTC plus the day's jitter."""
    hour, minute = parse_daily_at(daily_at)
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    for offset in range(3):
        candidate_day = day + timedelta(days=offset)
        start = candidate_day.replace(hour=hour, minute=minute)
        start += timedelta(seconds=jitter_seconds(key, candidate_day, jitter))
        if start > now:
            return start
    raise AssertionError("a daily start always exists within three days")


def backup_missed(last_success: datetime | None, now: datetime, period: float) -> bool:
    """True when no backup succeeded within the last `period` seconds."""
    return last_success is None or (now - last_success).total_seconds() > period


def last_good_drill(manifests: list[Manifest]) -> datetime | None:
    """Return when the newest passed drill ran, or None when there is none.

    A stale drill tested other file bytes than its backup has now, so it does not count.
    """
    drills = [m.drill.at for m in manifests
              if m.drill is not None and m.drill.ok and not m.drill_stale]
    return datetime.fromisoformat(max(drills)) if drills else None


class BackupScheduler:
    """Runs the manager's backups, drills and retention on their schedule."""

    name = "backup"

    def __init__(self, manager: BackupManager, *, period: float = DAY_SECONDS) -> None:
        self.manager = manager
        self.period = period
        self._drill_due_at = 0.0  # monotonic; set from the last drill at start-up

    @classmethod
    def for_runtime(cls, runtime: Runtime) -> BackupScheduler:
        """Build the daemon's scheduler, with metrics on the runtime's registry.

        No alert hook is passed because the alert engine raises its backup alerts
        from these metrics. NOTE: the manager keeps the [backup] section it was built
        with, so a config reload takes effect only after a restart.

        The scheduler registers a drain hook, so at shutdown the supervisor waits for
        a backup in progress, up to `[lifecycle] drain_timeout`, before it cancels it.
        """
        scheduler = cls(BackupManager.from_config(runtime.config, metrics=runtime.metrics))

        async def drain() -> None:
            await scheduler.drain(runtime.config.lifecycle.drain_timeout)

        runtime.drain_hooks.append(drain)
        return scheduler

    @property
    def config(self) -> BackupConfig:
        return self.manager.config

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start the schedule; report started once state is read from the backup dir."""
        manager = self.manager
        if not self.config.enabled:
            log.info("backup.disabled", extra={"fields": {"database": manager.database}})
            task_status.started()
            await anyio.sleep_forever()
        if not await self._prepare(task_status):
            task_status = anyio.TASK_STATUS_IGNORED  # already reported started
        manifests = await manager.list()
        last_drill = last_good_drill(manifests)
        if last_drill is not None:
            since = (datetime.now(UTC) - last_drill).total_seconds()
            self._drill_due_at = time.monotonic() + max(0.0, self.config.drill_interval - since)
        else:
            self._drill_due_at = time.monotonic()

        missed = backup_missed(manager.last_success, datetime.now(UTC), self.period)
        log.info("backup.scheduler_started", extra={"fields": {
            "database": manager.database, "daily_at_utc": self.config.daily_at,
            "last_success": manager.last_success.isoformat() if manager.last_success else None,
            "missed_run": missed}})
        task_status.started()
        # No drill or restore of this daemon runs yet, and those of other hosts hold
        # their scratch locks, so only leftovers of killed runs are dropped.
        await manager.drop_leftover_databases()

        async with anyio.create_task_group() as group:
            group.start_soon(self._watch_age)
            succeeded = await self.run_cycle("missed run at start-up") if missed else True
            while True:
                succeeded = await self._sleep_until_next_run(retry=not succeeded)

    async def _prepare(self, task_status: TaskStatus[None]) -> bool:
        """Create the backup directory; return False when it reported started meanwhile.

        A directory that cannot be created (read-only or full file system) must not stop
        the daemon: it reports started, records a failure, which alerts, and retries
        every `check_interval` until the directory works.
        """
        first = True
        while True:
            try:
                with anyio.fail_after(self.config.query_timeout):
                    await anyio.to_thread.run_sync(_prepare_directory, self.manager)
                return first
            except OSError as exc:
                if first:
                    await self.manager.record_failure("dump", None, OSError(
                        exc.errno, f"cannot prepare the backup directory "
                                   f"{self.manager.directory} ([backup] dir): {exc.strerror}"))
                    task_status.started()
                    first = False
            await anyio.sleep(self.config.check_interval)

    async def _sleep_until_next_run(self, *, retry: bool) -> bool:
        """Sleep until the next daily start, or a retry when that comes first; run it."""
        now = datetime.now(UTC)
        start = next_daily_run(now, self.config.daily_at, self.config.jitter,
                               f"{self.manager.server_host}/{self.manager.database}")
        delay = (start - now).total_seconds()
        reason = "daily schedule"
        if retry and self.config.retry_interval < delay:
            delay, reason = self.config.retry_interval, "retry after a failed backup"
        log.info("backup.next_run", extra={"fields": {
            "in_seconds": round(delay), "reason": reason}})
        await anyio.sleep(delay)
        return await self.run_cycle(reason)

    async def run_cycle(self, reason: str) -> bool:
        """Back up, then prune and drill when due; return False when the backup failed.

        A run skipped because a peer holds the lock counts as done.
        """
        manager = self.manager
        log.info("backup.cycle_started", extra={"fields": {"reason": reason}})
        try:
            manifest = await manager.take()
        except BackupError:
            # The manager has logged, counted and alerted on it. Stored backups matter
            # most while new ones fail, so they are still re-checked.
            await self._recheck_quietly()
            return False
        if manifest is None:
            await self._recheck_quietly()
            return True

        try:
            await manager.apply_retention()
        except (BackupError, OSError, TimeoutError) as exc:
            await manager.record_failure("retention", None, exc)

        if time.monotonic() >= self._drill_due_at:
            try:
                await manager.drill(manifest.id)
            except (BackupError, OSError, TimeoutError, psycopg.Error) as exc:
                log.error("backup.drill_not_run", extra={"fields": {"error": str(exc)}})
            self._drill_due_at = time.monotonic() + self.config.drill_interval
        await self.recheck_stored(skip=manifest.id)
        return True

    async def _recheck_quietly(self) -> None:
        try:
            await self.recheck_stored()
        except (BackupError, OSError, TimeoutError) as exc:
            log.error("backup.recheck_not_run", extra={"fields": {
                "error": str(exc) or type(exc).__name__}})

    async def recheck_stored(self, *, skip: str | None = None) -> list[str]:
        """Verify again the stored backups last checked `recheck_interval` ago or more.

        Storage can damage a file long after its backup was verified, and retention
        keeps the newest verified backup however old it is. The longest-unchecked
        backups go first. Each result is stored in its manifest, and a failed check is
        counted, logged and alerted on by `verify`. Returns the ids that failed.
        """
        interval = self.config.recheck_interval
        if interval <= 0:
            return []
        # Manifest times are wall-clock times, because they outlive the process.
        now = datetime.now(UTC)
        due: list[tuple[datetime, str]] = []
        for manifest in await self.manager.list():
            check = manifest.checksum_check
            checked = parse_time(check.at) if check is not None else None
            if manifest.id != skip and (checked is None
                                        or (now - checked).total_seconds() >= interval):
                due.append((checked or datetime.min.replace(tzinfo=UTC), manifest.id))
        failed: list[str] = []
        for _, backup in sorted(due):
            try:
                result = await self.manager.verify(backup)
            except (BackupError, OSError, TimeoutError) as exc:
                log.error("backup.recheck_not_run", extra={"fields": {
                    "id": backup, "error": str(exc) or type(exc).__name__}})
                failed.append(backup)
                continue
            if not (result.checksum_check and result.checksum_check.ok
                    and result.list_check and result.list_check.ok):
                failed.append(backup)
        if due:
            log.log(logging.ERROR if failed else logging.INFO, "backup.recheck_finished",
                    extra={"fields": {"checked": len(due), "failed": failed,
                                      "recheck_interval_seconds": interval}})
        return failed

    async def drain(self, drain_timeout: float) -> None:
        """Wait for the backup this daemon is taking to finish; return at once when none is.

        The caller bounds the wait. `drain_timeout` is only logged, so the log shows
        how long the backup may still take before it is cancelled.
        """
        if not self.manager.backup_running:
            return
        log.info("backup.drain_waiting", extra={"fields": {
            "database": self.manager.database, "drain_timeout_seconds": drain_timeout}})
        began = time.monotonic()
        await self.manager.wait_for_backup()
        log.info("backup.drain_finished", extra={"fields": {
            "database": self.manager.database,
            "waited_seconds": round(time.monotonic() - began, 3)}})

    async def _watch_age(self) -> None:
        while True:
            try:
                # Rescanning the directory keeps walacord_backups_damaged current when
                # someone deletes a dump or a manifest by hand.
                await self.manager.list()
            except (OSError, TimeoutError) as exc:
                log.warning("backup.scan_failed", extra={"fields": {
                    "directory": str(self.manager.directory), "error": str(exc)}})
            await self.manager.check_staleness()
            await anyio.sleep(self.config.check_interval)


def _prepare_directory(manager: BackupManager) -> None:
    manager.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    manager.remove_partials()
