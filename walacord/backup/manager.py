"""BackupManager: takes, verifies, drills, restores, lists and prunes backups of one
database, and keeps the backup metrics and alerts up to date.

Several walacord hosts may watch the same database. A backup runs only while its
session holds the advisory lock `BACKUP_LOCK_KEY` in that database. The other hosts
skip their run and log that a peer is busy.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import psycopg
from prometheus_client import CollectorRegistry
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from walacord.backup.alerts import (
    BACKUP_FAILED,
    BACKUP_STALE,
    FAILED_ALERT_OPERATIONS,
    AlertHook,
    BackupAlert,
    send_alert,
)
from walacord.backup.databases import (
    Admin,
    LeftoverDatabase,
    drop_leftover_databases,
    find_leftover_databases,
)
from walacord.backup.drill import drill_backup
from walacord.backup.dump import DumpFailed, ProgressCallback, summarize_stderr
from walacord.backup.journal import SCRATCH_JOURNAL_NAME, ScratchJournal
from walacord.backup.manifest import (
    CheckResult,
    Manifest,
    display_path,
    dump_file_problem,
    dump_path,
    manifest_path,
    read_manifest,
    scan_manifests,
    unreadable_manifests,
    utc_now,
    write_manifest,
)
from walacord.backup.pgclient import find_client_bindir, split_conninfo
from walacord.backup.restore import RestoreResult, describe_error, restore_backup
from walacord.backup.retention import BackupRecord, RetentionPlan, RetentionPolicy, plan_retention
from walacord.backup.take import take_backup
from walacord.backup.verify import verify_backup
from walacord.config import BackupConfig, Config
from walacord.errors import BackupError
from walacord.metrics import Metrics
from walacord.settings import PathSetting

log = logging.getLogger(__name__)

# Advisory locks are scoped to the database they are taken in, so one constant key
# serialises backups per database across every host.
BACKUP_LOCK_KEY = int.from_bytes(hashlib.sha256(b"walacord.backup").digest()[:8], "big",
                                 signed=True)


class BackupManager:
    """Backups of the database at `conninfo`, stored in `config.dir`."""

    def __init__(self, config: BackupConfig, *, conninfo: str, metrics: Metrics | None = None,
                 alert: AlertHook | None = None) -> None:
        self.config = config
        self.directory = Path(config.dir)
        self.metrics = metrics or Metrics(CollectorRegistry())
        # Names of the scratch databases this manager's drills and restores create.
        self.scratch_journal = ScratchJournal(self.directory / SCRATCH_JOURNAL_NAME,
                                              config.query_timeout)
        self.alert = alert
        self._conninfo = conninfo
        params, self._password = split_conninfo(conninfo)
        # A distinct name lets a DBA tell the backup's sessions from the daemon's.
        self._client_conninfo = make_conninfo(
            "", **{**params, "application_name": "walacord-backup"})
        self.database = params.get("dbname") or params.get("user") or "postgres"
        host = (params.get("host") or params.get("hostaddr") or "local").split(",")[0]
        self.server_host = "local" if host.startswith("/") else host
        self._bindir: Path | None = None
        self._files_lock = anyio.Lock()
        # Backups a restore is reading, with how many restores read each. Retention
        # keeps them until the restores end.
        self._in_use: collections.Counter[str] = collections.Counter()
        self._created_at = time.monotonic()
        self._peer_seen_at: float | None = None
        # Set while this manager takes a backup; set() and cleared when it ends.
        self._take_finished: anyio.Event | None = None
        self._failure_firing = False
        self._stale_firing = False
        self.last_success: datetime | None = None
        # The database walacord supervises ([database] url), and how to keep walacord's
        # own connections off it while a restore replaces it. The daemon sets both;
        # by default the backed-up database counts as supervised and nothing pauses.
        self.supervised_database = self.database
        self.database_paused: Callable[[str], AbstractAsyncContextManager[None]] = _no_pause

    @classmethod
    def from_config(cls, config: Config, *, metrics: Metrics | None = None,
                    alert: AlertHook | None = None) -> BackupManager:
        """Build the manager for `[backup]`, falling back to `[database]` for the URL."""
        if config.backup.url:
            params = conninfo_to_dict(config.backup.url)
            if not params.get("password") and config.database.password:
                params["password"] = config.database.password
            conninfo = make_conninfo("", **params)
        else:
            conninfo = config.database.conninfo()
        section = config.backup
        if not section.dir:
            section = dataclasses.replace(
                section, dir=PathSetting(str(Path(config.state.dir) / "backups")))
        manager = cls(section, conninfo=conninfo, metrics=metrics, alert=alert)
        supervised = conninfo_to_dict(config.database.conninfo())
        manager.supervised_database = str(supervised.get("dbname") or supervised.get("user")
                                          or manager.database)
        return manager

    # --- shared pieces ---------------------------------------------------------------

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_client_bindir(self.config.pg_bindir)
        return self._bindir

    @property
    def conninfo(self) -> str:
        """The libpq string of walacord's own sessions, password included."""
        return self._conninfo

    @property
    def client_conninfo(self) -> str:
        """The libpq string for pg_dump and friends: no password, no session options."""
        return self._client_conninfo

    @property
    def password(self) -> str:
        return self._password

    def maintenance_conninfo(self, avoid: str) -> str:
        """Return a connection string to run CREATE/DROP DATABASE from, not in `avoid`.

        PostgreSQL cannot drop the database a session is connected to, so when the
        configured database is `avoid`, this switches to "postgres", or to "template1"
        when `avoid` is "postgres" itself. Restores create from template0, so a session
        in template1 does not block them.
        """
        params = conninfo_to_dict(self._conninfo)
        if params.get("dbname", self.database) == avoid:
            params["dbname"] = "template1" if avoid == "postgres" else "postgres"
        return make_conninfo("", **params)

    def path_of(self, manifest: Manifest) -> Path:
        return self.directory / manifest.file

    async def read(self, backup: str | None = None) -> Manifest:
        """Return the manifest of `backup`, or of the newest backup when it is None."""
        if backup is not None:
            return await anyio.to_thread.run_sync(read_manifest, self.directory, backup)
        manifests = await self.list()
        if not manifests:
            raise BackupError(f"no backups in {self.directory}; run `walacorctl backup now`")
        return manifests[-1]

    async def list(self) -> builtins.list[Manifest]:
        """Return every backup with a readable manifest, oldest first."""
        if not self.directory.exists():
            return []
        with anyio.fail_after(self.config.query_timeout):
            manifests, damaged = await anyio.to_thread.run_sync(
                self._scan, abandon_on_cancel=True)
        self._refresh_gauges(manifests, damaged)
        return manifests

    def _scan(self) -> tuple[builtins.list[Manifest], int]:
        """Return the readable manifests and how many backups are damaged.

        A backup is damaged when its latest checks failed, its dump is missing or is
        not a regular file, or its manifest cannot be read.
        """
        manifests = scan_manifests(self.directory)
        damaged = len(unreadable_manifests(self.directory))
        damaged += sum(1 for m in manifests
                       if not m.verified or dump_file_problem(self.path_of(m)) is not None)
        return manifests, damaged

    def _refresh_gauges(self, manifests: builtins.list[Manifest], damaged: int) -> None:
        self.metrics.backup_count.set(len(manifests))
        self.metrics.backup_damaged.set(damaged)
        good = [m for m in manifests if m.list_check and m.list_check.ok]
        if good:
            newest = good[-1]
            self.last_success = max(self.last_success or newest.created, newest.created)
            self.metrics.backup_last_success.set(self.last_success.timestamp())
        verified_times = [t for m in manifests if (t := m.verified_at()) is not None]
        if verified_times:
            self.metrics.backup_last_verified.set(max(verified_times).timestamp())

    async def save(self, manifest: Manifest) -> None:
        with anyio.fail_after(self.config.query_timeout):
            await anyio.to_thread.run_sync(write_manifest, self.directory, manifest,
                                           abandon_on_cancel=True)

    async def record_failure(self, operation: str, backup: str | None, error: BaseException,
                             stderr: str = "") -> None:
        """Count and log a failed backup operation; alert when it is in FAILED_ALERT_OPERATIONS."""
        self.metrics.backup_failures.labels(operation=operation).inc()
        fields: dict[str, Any] = {"operation": operation, "database": self.database,
                                  "id": backup, "error": describe_error(error)}
        if stderr:
            fields["stderr"] = stderr
        log.error(f"backup.{operation}_failed", extra={"fields": fields})
        if operation not in FAILED_ALERT_OPERATIONS:
            return
        self._failure_firing = True
        await send_alert(self.alert, BackupAlert(
            BACKUP_FAILED, True,
            f"backup {operation} of database {self.database} failed: "
            f"{describe_error(error)}", fields),
            self.config.query_timeout)

    async def record_recovery(self) -> None:
        if self._failure_firing:
            self._failure_firing = False
            await send_alert(self.alert, BackupAlert(
                BACKUP_FAILED, False, f"backup of database {self.database} succeeded again",
                {"database": self.database}), self.config.query_timeout)

    # --- taking a backup ---------------------------------------------------------------

    async def take(self, *, progress: ProgressCallback | None = None) -> Manifest | None:
        """Take one backup and verify it; return None when a peer holds the backup lock.

        Raises BackupError when pg_dump or the verification fails. Before it raises,
        the partial file is deleted, the failure is counted and the alert hook is called.
        """
        try:
            lock_conn = await self._try_lock()
        except (psycopg.Error, TimeoutError) as exc:
            error = BackupError(f"cannot take the backup lock in database {self.database}: "
                                f"{describe_error(exc)}")
            await self.record_failure("dump", None, error)
            raise error from exc
        if lock_conn is None:
            self.metrics.backup_skipped.inc()
            if self.backup_running:
                reason = "a backup of this database is already running in this daemon"
            else:
                self._peer_seen_at = time.monotonic()
                reason = "another walacord instance holds this database's backup lock"
            log.info("backup.skipped", extra={"fields": {
                "database": self.database, "reason": reason}})
            return None

        finished = self._take_finished = anyio.Event()
        cleanup: builtins.list[Path] = []
        try:
            manifest = await take_backup(self, progress=progress, cleanup=cleanup)
        except Exception as exc:
            _remove_quietly(cleanup)
            stderr = ""
            if isinstance(exc, DumpFailed):
                stderr = "\n".join(summarize_stderr(c) for c in exc.commands)
            if ((isinstance(exc, DumpFailed) and exc.lock_timed_out)
                    or isinstance(exc, psycopg.errors.LockNotAvailable)):
                log.warning("backup.lock_wait_timed_out", extra={"fields": {
                    "database": self.database,
                    "lock_wait_timeout_seconds": self.config.lock_wait_timeout,
                    "reason": "a table lock (DDL in progress?) was not granted in time; "
                              "the backup gave up instead of queueing behind it"}})
            lock_timed_out = ((isinstance(exc, DumpFailed) and exc.lock_timed_out)
                              or isinstance(exc, psycopg.errors.LockNotAvailable))
            await self.record_failure("dump", None, exc, stderr)
            if lock_timed_out:
                raise BackupError(
                    f"backup of database {self.database} gave up after waiting "
                    f"{self.config.lock_wait_timeout:g} s ([backup] lock_wait_timeout) for a "
                    "table lock, which DDL or an explicit LOCK TABLE holds; retry once it "
                    f"ends. pg_dump: {describe_error(exc)}") from exc
            if isinstance(exc, BackupError):
                raise
            raise BackupError(f"backup of database {self.database} failed: "
                              f"{describe_error(exc)}") from exc
        except BaseException:
            _remove_quietly(cleanup)
            log.warning("backup.cancelled", extra={"fields": {"database": self.database}})
            raise
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.config.query_timeout):
                await lock_conn.close()
            self._take_finished = None
            finished.set()

        self.last_success = manifest.created
        self.metrics.backup_last_success.set(manifest.created.timestamp())
        self.metrics.backup_last_verified.set(manifest.created.timestamp())
        self.metrics.backup_duration.set(manifest.duration_seconds)
        self.metrics.backup_size.set(manifest.size_bytes)
        await self.record_recovery()
        return manifest

    @property
    def backup_running(self) -> bool:
        """Whether this manager is taking a backup now; a peer host's backup does not count."""
        return self._take_finished is not None

    async def wait_for_backup(self) -> None:
        """Wait until the backup this manager is taking, if any, has finished or failed."""
        finished = self._take_finished
        if finished is not None:
            await finished.wait()

    async def _try_lock(self) -> psycopg.AsyncConnection[Any] | None:
        """Open a dedicated session and try the advisory lock; None when it is taken.

        The lock is session-level, so closing the returned connection releases it, and
        a host that dies mid-backup releases it when its session ends.
        """
        with anyio.fail_after(self.config.query_timeout):
            conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
            try:
                cursor = await conn.execute("SELECT pg_try_advisory_lock(%s)",
                                            (BACKUP_LOCK_KEY,))
                row = await cursor.fetchone()
            except BaseException:
                await conn.close()
                raise
        if row and row[0]:
            return conn
        await conn.close()
        return None

    def seconds_since_backup(self) -> float:
        """Return seconds since this database last had a backup taken.

        A backup a peer host was taking counts too: when several hosts watch one
        database, the host that keeps losing the lock must not report it stale. With
        no backup at all, the time since this manager was created is returned.
        """
        candidates = [time.monotonic() - self._created_at]
        if self.last_success is not None:
            # Manifests carry wall-clock times because they outlive the process.
            candidates = [max(0.0, (utc_now() - self.last_success).total_seconds())]
        if self._peer_seen_at is not None:
            candidates.append(time.monotonic() - self._peer_seen_at)
        return min(candidates)

    async def check_staleness(self) -> bool:
        """Fire the stale alert when the last backup is older than `max_age`, resolve it
        when a newer one exists; return whether it is firing."""
        age = self.seconds_since_backup()
        stale = age > self.config.max_age
        if stale != self._stale_firing:
            self._stale_firing = stale
            last = self.last_success.isoformat() if self.last_success else None
            summary = (f"the last backup of database {self.database} is {age / 3600:.1f} h "
                       f"old, more than {self.config.max_age / 3600:g} h" if stale else
                       f"database {self.database} has a recent backup again")
            await send_alert(self.alert, BackupAlert(BACKUP_STALE, stale, summary, {
                "database": self.database, "age_seconds": round(age, 1),
                "last_success": last}), self.config.query_timeout)
        return stale

    # --- verification, drills and restores ----------------------------------------------

    async def verify(self, backup: str | None = None) -> Manifest:
        """Check a backup's checksum and readability; store and return the result."""
        async with self._files_lock:
            manifest = await self.read(backup)
            # The damaged-backups gauge counts the result, and a dump that is missing or
            # is not a regular file too.
            try:
                manifest = await verify_backup(self, manifest)
            except BackupError:
                await self.list()
                raise
            await self.list()
            return manifest

    async def drill(self, backup: str | None = None) -> Manifest:
        """Restore a backup into a scratch database, compare figures, drop it."""
        async with self._files_lock:
            manifest = await drill_backup(self, await self.read(backup))
            await self.list()
            return manifest

    async def restore(self, backup: str, target_db: str, *, force: bool = False,
                      no_owner: bool = False, ignore_checksum: bool = False,
                      progress: ProgressCallback | None = None) -> RestoreResult:
        """Restore `backup` into database `target_db`; replace it only with `force`.

        A file whose sha256 differs from its manifest's raises ChecksumMismatch unless
        `ignore_checksum` is set. Retention keeps the backup while the restore runs.
        """
        async with self._files_lock:
            manifest = await self.read(backup)
            self._in_use[manifest.id] += 1
        try:
            return await restore_backup(self, manifest, target_db, force=force,
                                        no_owner=no_owner, ignore_checksum=ignore_checksum,
                                        progress=progress)
        finally:
            self._in_use[manifest.id] -= 1
            if self._in_use[manifest.id] <= 0:
                del self._in_use[manifest.id]

    async def leftover_databases(self) -> builtins.list[LeftoverDatabase]:
        """Return the scratch databases and replaced copies that killed restores and
        drills left on the server, without dropping any.

        Scratch journal names whose database no longer exists are removed meanwhile.
        """
        return await find_leftover_databases(self.conninfo, self.config.query_timeout,
                                             self.scratch_journal)

    async def drop_leftover_databases(self) -> builtins.list[LeftoverDatabase]:
        """Drop the leftover scratch databases that are provably walacord's and unused.

        Every leftover is logged with its size; see `drop_leftover_databases` in
        walacord.backup.databases for the rule. Errors are logged, not raised, because
        a server that cannot be reached must not stop the scheduler.
        """
        admin = Admin(self.conninfo, self.config.query_timeout, self.scratch_journal)
        try:
            return await drop_leftover_databases(admin)
        except (psycopg.Error, TimeoutError) as exc:
            log.warning("backup.leftover_check_failed", extra={"fields": {
                "database": self.database, "error": describe_error(exc)}})
            return []

    async def record_checksum(self, manifest: Manifest, check: CheckResult) -> None:
        """Store a checksum result found outside `verify` (by a restore) in the manifest.

        The manifest is read again under the files lock, so a verify or drill that
        finished meanwhile keeps its results. A backup deleted meanwhile stays deleted.
        """
        manifest.checksum_check = check
        async with self._files_lock:
            if not manifest_path(self.directory, manifest.id).exists():
                return
            stored = await self.read(manifest.id)
            stored.checksum_check = check
            await self.save(stored)

    # --- retention ---------------------------------------------------------------------

    async def apply_retention(self, now: datetime | None = None) -> RetentionPlan:
        """Delete the backups the retention policy no longer keeps; log each deletion."""
        policy = RetentionPolicy(self.config.keep_days, self.config.keep_weekly,
                                 self.config.keep_monthly)
        async with self._files_lock:
            manifests = await self.list()
            plan = plan_retention(
                [BackupRecord(m.id, m.created, m.verified) for m in manifests],
                policy, now or utc_now())
            by_id = {m.id: m for m in manifests}
            for backup in [b for b in plan.delete if b in self._in_use]:
                plan.delete.remove(backup)
                plan.keep[backup] = "a restore is reading it"
                log.info("backup.deletion_deferred", extra={"fields": {
                    "id": backup, "reason": "a restore is reading it; the next "
                                            "retention run deletes it"}})
            for backup in plan.delete:
                manifest = by_id[backup]
                with anyio.fail_after(self.config.query_timeout):
                    await anyio.to_thread.run_sync(self._delete_files, manifest)
                self.metrics.backup_deleted.inc()
                log.info("backup.deleted", extra={"fields": {
                    "id": backup, "created_at": manifest.finished_at,
                    "verified": manifest.verified,
                    "reason": f"older than {policy.keep_days} days and kept by no tier"}})
            await self.list()
        return plan

    def _delete_files(self, manifest: Manifest) -> None:
        # The dump goes first: a crash in between leaves a manifest whose file is
        # missing, which `list` reports, rather than an unlisted dump.
        self.path_of(manifest).unlink(missing_ok=True)
        manifest_path(self.directory, manifest.id).unlink(missing_ok=True)

    def remove_partials(self) -> builtins.list[Path]:
        """Delete partial files left by a crashed run; call only while no take runs.

        walacord writes only regular files there. Anything else with such a name, such
        as a directory, is logged and left, so it never stops a backup.
        """
        removed = []
        for path in self.directory.glob(".*.partial"):
            if path.is_symlink() or not path.is_file():
                log.warning("backup.partial_skipped", extra={"fields": {
                    "path": display_path(path),
                    "reason": "not a regular file, so walacord did not write it",
                    "action": "move it out of the backups directory"}})
                continue
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("backup.partial_remove_failed", extra={"fields": {
                    "path": display_path(path), "error": str(exc)}})
                continue
            removed.append(path)
            log.warning("backup.partial_removed", extra={"fields": {
                "path": display_path(path)}})
        return removed

    def unique_id(self, base: str) -> str:
        """Return `base`, or `base-N` when a backup with that id exists already."""
        candidate, number = base, 1
        while (manifest_path(self.directory, candidate).exists()
               or any(dump_path(self.directory, candidate, fmt).exists()
                      for fmt in ("custom", "plain-gzip"))):
            number += 1
            candidate = f"{base}-{number}"
        return candidate


def _remove_quietly(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.error("backup.cleanup_failed", extra={"fields": {
                "path": display_path(path), "error": str(exc)}})


@contextlib.asynccontextmanager
async def _no_pause(reason: str) -> AsyncIterator[None]:
    yield
