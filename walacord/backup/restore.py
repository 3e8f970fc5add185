"""Restoring a backup file into a database, and the CREATE/DROP/RENAME DATABASE steps
around it.

A restore always goes into a fresh database under a temporary name first. That
database is renamed to the target only after pg_restore (or psql, for plain SQL) has
finished without error. A failed restore therefore never leaves a half-filled
database under the name an application uses. With `force`, one transaction renames
the old database to `<target>_previous_<hex>` and the new one to the target, and the
old one is dropped only after that transaction has committed. New connections to the
target are blocked from before its sessions are ended until that transaction ends.
Whichever step fails, and wherever walacord is killed, the old data stays under the
target's name or under the previous name until that drop.
"""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import psycopg

from walacord.backup.databases import (
    MAX_IDENTIFIER_BYTES,
    SCRATCH_COMMENT,
    Admin,
    ConnectionSettings,
    SessionsInUse,
    scratch_locks,
    scratch_name,
)
from walacord.backup.dump import ProgressCallback, describe_exit, summarize_stderr
from walacord.backup.manifest import Manifest, dump_file_problem, read_dump
from walacord.backup.pgclient import Command, client_environment, run_pipeline, with_dbname
from walacord.backup.verify import (
    ChecksumMismatch,
    count_archive_entries,
    hash_backup_file,
    list_archive,
)
from walacord.errors import BackupError

if TYPE_CHECKING:
    from walacord.backup.manager import BackupManager

log = logging.getLogger(__name__)

class DatabaseExists(BackupError):
    """The restore target exists and the caller did not pass force."""

    def __init__(self, database: str, *, supervised: bool = False) -> None:
        live = (" It is the database walacord supervises ([database] url): the "
                "application would see the backup's data, and every write since the "
                "backup would be lost. Stop the application first, or restore into a "
                "new --target-db and compare." if supervised else "")
        super().__init__(
            f"database {database!r} already exists; restoring would drop and replace "
            f"{database!r}.{live} Pass --force to replace {database!r}, or choose a new "
            "--target-db name")
        self.database = database


def describe_error(exc: BaseException) -> str:
    """Return the exception's message, or its kind when the message is empty."""
    if isinstance(exc, TimeoutError):
        return "timed out; raise the matching *_timeout in [backup] if the database is large"
    return str(exc) or type(exc).__name__


def describe_error_inline(exc: BaseException) -> str:
    """Return `describe_error(exc)` on one line, without a final full stop.

    A server error's message is its primary line, then "DETAIL:" on a line of its own.
    Here the detail follows in parentheses, so text can be appended to the sentence.
    """
    diag = exc.diag if isinstance(exc, psycopg.Error) else None
    if diag is not None and diag.message_primary:
        text = diag.message_primary.strip().rstrip(".")
        if diag.message_detail:
            text += f" ({diag.message_detail.strip().rstrip('.')})"
        return text
    return " ".join(describe_error(exc).split()).rstrip(".")


@dataclass
class RestoreResult:
    """Outcome of a finished restore."""

    id: str
    target_db: str
    replaced: bool
    duration_seconds: float
    # False when the file's sha256 differed from the manifest's and the caller
    # passed ignore_checksum.
    checksum_ok: bool = True


@dataclass
class RestoreRequest:
    """Everything one restore of an archive into an existing, empty database needs."""

    bindir: Path
    conninfo: str  # pointing at the database to fill, without password
    env: dict[str, str]
    fmt: str
    path: Path
    timeout: float
    no_owner: bool = False
    entry_total: int = 0
    progress: ProgressCallback | None = None


def restore_commands(request: RestoreRequest) -> list[Command]:
    """Return the pipeline that loads the archive from its standard input. Progress
    comes from verbose stderr."""
    done = 0

    def on_restore_line(line: str) -> None:
        nonlocal done
        if request.progress is None:
            return
        if line.startswith(("pg_restore: creating ", "pg_restore: processing data")):
            done += 1
            request.progress(min(done, request.entry_total), request.entry_total,
                             line.removeprefix("pg_restore: "))

    if request.fmt == "custom":
        argv = [str(request.bindir / "pg_restore"), "--verbose", "--exit-on-error",
                f"--dbname={request.conninfo}"]
        if request.no_owner:
            argv += ["--no-owner", "--no-privileges"]
        return [Command(argv, on_stderr_line=on_restore_line)]

    # NOTE: a plain SQL dump carries its ALTER OWNER and GRANT statements, so no_owner
    # has no effect here and a non-superuser restore of another role's objects fails.
    return [
        Command(["gzip", "-dc"]),
        Command([str(request.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                 f"--dbname={request.conninfo}"]),
    ]


async def load_archive(request: RestoreRequest) -> None:
    """Load the archive into the database; raise BackupError with the program's stderr.

    The archive is opened here and given to the first program as its standard input,
    as `list_archive()` does, so a FIFO in place of the file fails at once.
    """
    commands = restore_commands(request)
    with read_dump(request.path) as archive:
        await run_pipeline(commands, env=request.env, time_limit=request.timeout,
                           stdin=archive, stdout=subprocess.DEVNULL)
    failed = [c for c in commands if c.returncode != 0]
    if failed:
        details = "; ".join(f"{describe_exit(c)}: "
                            f"{summarize_stderr(c) or '(no error output)'}" for c in failed)
        raise BackupError(f"restore of {request.path.name} failed: {details}")
    if request.progress is not None:
        request.progress(request.entry_total, request.entry_total, "done")


# --- restoring a stored backup ---------------------------------------------------------


# PostgreSQL creates every database from these; neither can be dropped or replaced.
TEMPLATE_DATABASES = frozenset({"template0", "template1"})


def check_target_name(target_db: str) -> None:
    if not target_db or len(target_db.encode()) > MAX_IDENTIFIER_BYTES:
        raise BackupError(f"invalid target database name {target_db!r}: give 1 to "
                          f"{MAX_IDENTIFIER_BYTES} bytes")
    if target_db in TEMPLATE_DATABASES:
        raise BackupError(f"invalid target database {target_db!r}: PostgreSQL's template "
                          "databases cannot be replaced; choose a new --target-db name")


async def restore_backup(manager: BackupManager, manifest: Manifest, target_db: str, *,
                         force: bool, no_owner: bool, ignore_checksum: bool = False,
                         progress: ProgressCallback | None) -> RestoreResult:
    """Restore into a temporary database, then rename it to `target_db`.

    With `force`, an existing `target_db` is renamed aside in the transaction that
    renames the new copy into place, and dropped after that transaction commits. The
    file's sha256 must match the manifest's, or this raises ChecksumMismatch before
    creating any database; `ignore_checksum` restores it anyway.
    A mismatch is stored in the manifest either way, so `backup list` shows it.
    """
    check_target_name(target_db)
    config = manager.config
    path = manager.path_of(manifest)
    problem = dump_file_problem(path)
    if problem is not None:
        raise BackupError(f"{problem}; choose another id from `walacorctl backup list`")

    admin = Admin(manager.maintenance_conninfo(avoid=target_db), config.query_timeout)
    try:
        replacing = await admin.exists(target_db)
    except (psycopg.Error, TimeoutError) as exc:
        raise BackupError(f"cannot check whether database {target_db!r} exists: "
                          f"{describe_error(exc)}") from exc
    supervised = target_db == manager.supervised_database
    if replacing and not force:
        raise DatabaseExists(target_db, supervised=supervised)
    if replacing and supervised:
        log.warning("backup.restore_replaces_supervised", extra={"fields": {
            "id": manifest.id, "target_db": target_db,
            "action": "the application sees the backup's data once the restore ends"}})
    checksum_ok = await check_checksum(manager, manifest, ignore_checksum=ignore_checksum)

    entry_total = 0
    if manifest.format == "custom":
        with client_environment("") as env:
            _, listing = await list_archive(manager.bindir, path, env, config.verify_timeout)
        entry_total = count_archive_entries(listing)

    temporary = scratch_name(target_db, "restoring")
    previous = scratch_name(target_db, "previous") if replacing else None
    started = time.monotonic()
    log.info("backup.restore_started", extra={"fields": {
        "id": manifest.id, "target_db": target_db, "temporary_db": temporary,
        "previous_db": previous, "replacing": replacing}})
    names = [temporary] if previous is None else [temporary, previous]
    try:
        async with scratch_locks(admin.conninfo, names, config.query_timeout):
            with client_environment(manager.password) as env:
                request = RestoreRequest(
                    bindir=manager.bindir,
                    conninfo=with_dbname(manager.client_conninfo, temporary), env=env,
                    fmt=manifest.format, path=path, timeout=config.restore_timeout,
                    no_owner=no_owner, entry_total=entry_total, progress=progress)
                await restore_in_place(manager, manifest, admin, request,
                                       Placement(temporary, target_db, previous))
    except (psycopg.Error, TimeoutError) as exc:
        # restore_in_place raises only BackupError, so this came from the lock session.
        error = BackupError(f"cannot take the scratch database lock for {temporary}: "
                            f"{describe_error(exc)}; nothing was restored")
        await manager.record_failure("restore", manifest.id, error)
        raise error from exc

    duration = round(time.monotonic() - started, 3)
    log.info("backup.restore_finished", extra={"fields": {
        "id": manifest.id, "target_db": target_db, "replaced": replacing,
        "duration_seconds": duration}})
    return RestoreResult(id=manifest.id, target_db=target_db, replaced=replacing,
                         duration_seconds=duration, checksum_ok=checksum_ok)


# Renames of the new copy into place before giving up when sessions keep connecting.
RENAME_ATTEMPTS = 5


@dataclass(frozen=True)
class Placement:
    """The databases of one restore: where it loads, where it goes, where the old one goes."""

    temporary: str
    target: str
    previous: str | None  # None when `target` does not exist yet


async def restore_in_place(manager: BackupManager, manifest: Manifest, admin: Admin,
                           request: RestoreRequest, placement: Placement) -> None:
    """Create `placement.temporary`, load the archive, and rename it to the target.

    The caller holds the scratch locks of the temporary and previous names. On any
    failure, the temporary database is dropped, the old target keeps its data under
    its own name or under `placement.previous`, and the BackupError raised names it.
    """
    temporary, target, previous = placement.temporary, placement.target, placement.previous
    # The journal names the temporary database from before CREATE DATABASE until its
    # drop or rename, so start-up cleanup can drop it after a kill before its COMMENT.
    admin = admin.with_journal(manager.scratch_journal)
    swap = SwapEffects()
    try:
        try:
            await admin.create(temporary, f"{SCRATCH_COMMENT}: restore of backup "
                                          f"{manifest.id} into {target}")
        except (psycopg.Error, TimeoutError) as exc:
            raise BackupError(f"cannot create database {temporary}: {describe_error(exc)}; "
                              "the restoring role needs CREATEDB") from exc
        await load_archive(request)
        if previous is not None:
            log.warning("backup.restore_replacing", extra={"fields": {
                "target_db": target, "id": manifest.id, "previous_db": previous,
                "action": f"if walacord stops before the restore ends, the data of "
                          f"{target} is in {previous} or still in {target}"}})
        if previous is not None and target == manager.supervised_database:
            # walacord's own pool, database probe, crash watch and outbox sink would
            # reconnect at once, and fail while connections are blocked, so they pause
            # for the swap.
            async with manager.database_paused(
                    f"restore of backup {manifest.id} replaces database {target}"):
                await put_in_place(admin, placement, swap)
        else:
            await put_in_place(admin, placement, swap)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            left_behind = ""
            try:
                await admin.drop(temporary)
            except (psycopg.Error, TimeoutError) as drop_error:
                log.error("backup.restore_cleanup_failed", extra={"fields": {
                    "temporary_db": temporary, "error": str(drop_error),
                    "action": f"drop database {temporary} by hand"}})
                left_behind = (f". The temporary copy {temporary} could not be dropped "
                               f"({describe_error(drop_error).strip()}); walacord drops it "
                               "at its next start once nothing uses it, or drop it by hand")
            parts = [swap.describe_ended(target),
                     await describe_outcome(admin, placement) + left_behind,
                     swap.still_blocked or ""]
            outcome = ". ".join(part for part in parts if part)
        if not isinstance(exc, Exception):
            log.warning("backup.restore_cancelled", extra={"fields": {
                "id": manifest.id, "target_db": target, "outcome": outcome}})
            raise
        if isinstance(exc, BackupError):
            error = BackupError(f"{exc}. {outcome}")
        else:
            hint = ""
            if isinstance(exc, psycopg.errors.ObjectInUse):
                hint = ("; a session walacord's role may not end, such as a superuser's, "
                        "or a prepared transaction keeps it in use. End those "
                        "(pg_stat_activity and pg_prepared_xacts list them), then run the "
                        "restore again")
            error = BackupError(f"restore of {manifest.id} into {target} failed: "
                                f"{describe_error_inline(exc)}{hint}. {outcome}")
        await manager.record_failure("restore", manifest.id, error)
        raise error from exc

    if previous is not None:
        with anyio.CancelScope(shield=True):
            try:
                await admin.drop(previous)
            except (psycopg.Error, TimeoutError) as exc:
                log.error("backup.restore_cleanup_failed", extra={"fields": {
                    "previous_db": previous, "target_db": target, "error": str(exc),
                    "action": f"{target} holds the restored data; drop database "
                              f"{previous}, the data it replaced, by hand"}})


@dataclass
class SwapEffects:
    """Effects on the target's clients of putting a restored copy in place."""

    # Pids of the sessions on the target that walacord terminated.
    ended: list[int] = field(default_factory=list)
    # A sentence naming the database that still rejects new connections because
    # setting ALLOW_CONNECTIONS back failed, or None.
    still_blocked: str | None = None

    def describe_ended(self, target: str) -> str:
        """Return a sentence on the sessions ended, without a full stop, or "" when
        there were none."""
        if not self.ended:
            return ""
        pids = ", ".join(map(str, self.ended))
        if len(self.ended) == 1:
            return (f"Before the failure, walacord ended 1 session on {target} (pid "
                    f"{pids}), so its client lost its connection")
        return (f"Before the failure, walacord ended {len(self.ended)} sessions on {target} "
                f"(pids {pids}), so their clients lost their connections")


async def put_in_place(admin: Admin, placement: Placement, swap: SwapEffects) -> None:
    """Rename the temporary copy to the target, and with a previous name the target to it.

    With a previous name, new connections to the target are rejected from before its
    sessions are ended until the renames have committed or failed. Without that,
    pools, including those of other walacord hosts, reconnect between the termination
    and the rename and make it fail. The target's ALLOW_CONNECTIONS is set back in
    every outcome, and the copy renamed to the target gets its ALLOW_CONNECTIONS and
    CONNECTION LIMIT.
    """
    if placement.previous is None:
        await rename_with_retries(admin, placement, swap, None)
        return
    settings = await admin.connection_settings(placement.target)
    statement = settings.reopen_statement(placement.target).as_string()
    # NOTE: a walacord killed (SIGKILL, host crash) before the reopening leaves the
    # database rejecting connections; this log line names the statement that undoes it.
    log.warning("backup.restore_connections_blocked", extra={"fields": {
        "target_db": placement.target,
        "action": f"if walacord stops before it logs backup.restore_connections_restored, "
                  f"run {statement}"}})
    renamed = False
    try:
        await admin.block_connections(placement.target)
        await rename_with_retries(admin, placement, swap, settings)
        renamed = True
    finally:
        with anyio.CancelScope(shield=True):
            await reopen_connections(admin, placement, swap, settings, renamed=renamed)


async def reopen_connections(admin: Admin, placement: Placement, swap: SwapEffects,
                             settings: ConnectionSettings, *, renamed: bool) -> None:
    """Set the replaced database's ALLOW_CONNECTIONS back; on failure log it and set
    `swap.still_blocked`. After the renames that database is the previous one."""
    try:
        name = await admin.reopen_connections(settings)
    except (psycopg.Error, TimeoutError) as exc:
        name = placement.previous if renamed and placement.previous else placement.target
        statement = settings.reopen_statement(name).as_string()
        log.error("backup.restore_connections_not_restored", extra={"fields": {
            "database": name, "error": describe_error_inline(exc),
            "action": f"run {statement} as the database's owner or a superuser"}})
        swap.still_blocked = (f"Database {name} still rejects new connections, because "
                              f"setting ALLOW_CONNECTIONS back failed "
                              f"({describe_error_inline(exc)}); run {statement} as its "
                              "owner or a superuser")
        return
    log.info("backup.restore_connections_restored", extra={"fields": {
        "database": name, "allow_connections": settings.allow_connections}})


async def rename_with_retries(admin: Admin, placement: Placement, swap: SwapEffects,
                              settings: ConnectionSettings | None) -> None:
    """End the sessions that block the renames, then run them, in one transaction.

    Sessions on the temporary database are ended, and with a previous name the
    sessions on the target too, as DROP DATABASE ... WITH (FORCE) would. A session
    that connects between the ending and the rename makes PostgreSQL raise
    ObjectInUse, so the rename is retried. With the target's connections blocked,
    only a connection that began before the block can do that. It is not retried when
    a session could not be ended.
    """
    for attempt in range(1, RENAME_ATTEMPTS + 1):
        try:
            await admin.rename_into_place(placement.temporary, placement.target,
                                          placement.previous, settings=settings,
                                          ended=swap.ended)
            return
        except SessionsInUse as exc:
            if exc.remaining or attempt == RENAME_ATTEMPTS:
                raise exc.error from None
            log.warning("backup.restore_rename_retried", extra={"fields": {
                "temporary_db": placement.temporary, "target_db": placement.target,
                "attempt": attempt, "error": str(exc.error).strip()}})
            await anyio.sleep(0.2 * attempt)


async def describe_outcome(admin: Admin, placement: Placement) -> str:
    """Return a sentence on where the target's data is after a failed restore."""
    target, previous = placement.target, placement.previous
    try:
        target_exists = await admin.exists(target)
        previous_exists = previous is not None and await admin.exists(previous)
    except (psycopg.Error, TimeoutError) as exc:
        where = f" or in database {previous}" if previous else ""
        return (f"Checking the databases afterwards failed ({describe_error(exc)}): the "
                f"data of {target} is still in {target}{where}")
    if previous_exists:
        return (f"The data {target} had before is in database {previous}, and {target} "
                f"holds the restored data; check {target}, then drop {previous} or "
                f"rename it back to {target}")
    if previous is not None:
        return f"Database {target} is unchanged"
    if target_exists:
        return f"Database {target} exists and may hold the restored data; check it"
    return f"No database {target} was created"


async def check_checksum(manager: BackupManager, manifest: Manifest, *,
                         ignore_checksum: bool) -> bool:
    """Compare the file's size and sha256 with the manifest's; return whether they match.

    A mismatch is stored in the manifest. Then ChecksumMismatch is raised and counted
    as a failed restore, unless `ignore_checksum` is set, which logs a warning instead.
    """
    try:
        check = await hash_backup_file(manager, manifest)
    except BackupError as exc:
        await manager.record_failure("restore", manifest.id, exc)
        raise
    if check.ok:
        return True

    path = manager.path_of(manifest)
    await manager.record_checksum(manifest, check)
    if not ignore_checksum:
        error = ChecksumMismatch.from_check(path, manifest, check)
        await manager.record_failure("restore", manifest.id, error)
        raise error
    log.warning("backup.restore_checksum_ignored", extra={"fields": {
        "id": manifest.id, "path": str(path), "error": check.error,
        "sha256": check.detail.get("sha256"), "manifest_sha256": manifest.sha256,
        "reason": "the caller passed ignore_checksum; the restore may fail or load "
                  "changed data"}})
    return False
