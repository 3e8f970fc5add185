"""Control-channel methods for backups: `backup.now`, `backup.list`, `backup.verify` and
`backup.restore`.

Each handler takes the manager and the request's params dict and returns a JSON-able
dict. Invalid params and failed operations raise ControlError with a JSON-RPC style
code. `handlers(manager)` binds them to a manager for the control server's method
registry. Long operations accept an optional `progress(done, total, message)` callback.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import psycopg

from walacord.backup.dump import ProgressCallback
from walacord.backup.manager import BackupManager
from walacord.backup.manifest import (
    CheckResult,
    Manifest,
    display_path,
    dump_file_problem,
    dumps_without_manifest,
    format_time,
    parse_time,
    restore_commands,
    unreadable_manifests,
    utc_now,
)
from walacord.backup.restore import DatabaseExists, describe_error
from walacord.backup.verify import ChecksumMismatch
from walacord.control.protocol import ErrorCode
from walacord.errors import BackupError, ControlError

INVALID_PARAMS = ErrorCode.INVALID_PARAMS
BACKUP_FAILED = ErrorCode.OPERATION_FAILED
TARGET_EXISTS = ErrorCode.TARGET_EXISTS
CHECKSUM_MISMATCH = ErrorCode.CHECKSUM_MISMATCH
# Check times are stored truncated to milliseconds, so an mtime up to 1 ms after one
# does not count as later.
MTIME_TOLERANCE_SECONDS = 0.001

Handler = Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]]


def _check_params(params: Mapping[str, Any] | None, allowed: dict[str, type]) -> dict[str, Any]:
    """Return `params` after checking names and types; raise ControlError otherwise."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ControlError(INVALID_PARAMS, f"unknown parameter {unknown[0]!r}; valid: "
                           f"{', '.join(sorted(allowed)) or '(none)'}")
    for name, expected in allowed.items():
        value = params.get(name)
        if value is not None and not isinstance(value, expected):
            raise ControlError(INVALID_PARAMS, f"invalid {name} {value!r}: expected "
                               f"{expected.__name__}")
    return params


def _check_dict(check: CheckResult | None) -> dict[str, Any] | None:
    if check is None:
        return None
    return {"ok": check.ok, "at": check.at, "error": check.error, **check.detail}


def _drill_dict(manifest: Manifest) -> dict[str, Any] | None:
    drill = _check_dict(manifest.drill)
    if drill is None:
        return None
    return {**drill, "stale": manifest.drill_stale}


def _list_dict(manifest: Manifest) -> dict[str, Any] | None:
    listing = _check_dict(manifest.list_check)
    if listing is None:
        return None
    return {**listing, "stale": manifest.list_stale}


def _file_size(path: Path) -> int | None:
    """Return the size of the file at `path`, or None when it cannot be read."""
    try:
        return path.stat().st_size
    except OSError:
        return None


def modified_after_check(manifest: Manifest, path: Path) -> str | None:
    """Return the file's mtime when it is later than the last checksum check, else None.

    A later mtime means the recorded verification may not describe the file's current
    bytes. Copying the file without keeping its mtime (`cp` without `-p`) also counts.
    """
    if manifest.checksum_check is None:
        return None
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    if mtime <= parse_time(manifest.checksum_check.at).timestamp() + MTIME_TOLERANCE_SECONDS:
        return None
    return format_time(datetime.fromtimestamp(mtime, UTC))


def entry_problems(manifest: Manifest, path: Path, modified_at: str | None,
                   file_size: int | None) -> list[str]:
    """Return one sentence per reason the backup does not count as verified."""
    problems = []
    file_problem = dump_file_problem(path)
    if file_problem is not None:
        problems.append(file_problem)
    if modified_at is not None and manifest.checksum_check is not None:
        problems.append(f"the file was modified at {modified_at}, after its last "
                        f"verification at {manifest.checksum_check.at}; run "
                        f"`walacorctl backup verify {manifest.id}`")
    checksum = manifest.checksum_check
    recorded_size = checksum.detail.get("size_bytes") if checksum is not None else None
    # A size that the latest checksum check recorded is named by that check below.
    if file_size is not None and file_size not in (manifest.size_bytes, recorded_size):
        problems.append(f"the file is {file_size} bytes, the manifest records "
                        f"{manifest.size_bytes} bytes, so it changed after its last "
                        f"verification; run `walacorctl backup verify {manifest.id}`")
    checks = [("checksum", manifest.checksum_check)]
    if not manifest.list_stale:
        checks.append(("readability", manifest.list_check))
    if not manifest.drill_stale:
        checks.append(("drill", manifest.drill))
    for name, check in checks:
        if check is not None and not check.ok:
            problems.append(f"{name} check failed at {check.at}: {check.error or 'no details'}")
    if manifest.checksum_check is None or manifest.list_check is None:
        problems.append("the backup was never verified")
    return problems


def entry_notes(manifest: Manifest) -> list[str]:
    """Return one sentence per recorded result that no longer describes the file."""
    notes = []
    drill, listing, checksum = manifest.drill, manifest.list_check, manifest.checksum_check
    if checksum is None:
        return []
    found = f"found sha256 {checksum.detail.get('sha256')}"
    if manifest.size_changed:
        found = f"found the file's size changed to {checksum.detail.get('size_bytes')} bytes"
    if listing is not None and manifest.list_stale:
        outcome = "passed" if listing.ok else "failed"
        notes.append(f"the readability check that {outcome} at {listing.at} is stale and "
                     f"does not count: the checksum check at {checksum.at} {found}, so the "
                     "readability check read other bytes and was not run again")
    if drill is None or not manifest.drill_stale:
        return notes
    outcome = "passed" if drill.ok else "failed"
    tested = manifest.drill_sha256()
    if tested is None:
        reason = (f"its record has no sha256 of the file it tested, and the checksum check "
               f"at {checksum.at} passed")
    else:
        reason = (f"it tested the file with sha256 {tested}, but the checksum check at "
               f"{checksum.at} {found}")
    notes.append(f"the drill that {outcome} at {drill.at} is stale and does not count: "
                 f"{reason}. Run `walacorctl backup verify --drill {manifest.id}` to drill "
                 "the file as it is now")
    return notes


def backup_entry(manager: BackupManager, manifest: Manifest) -> dict[str, Any]:
    """Return the JSON shape of one backup, as `backup.list` shows it."""
    path = manager.path_of(manifest)
    modified_at = modified_after_check(manifest, path)
    file_size = _file_size(path)
    problems = entry_problems(manifest, path, modified_at, file_size)
    return {
        "id": manifest.id,
        "path": display_path(path),
        # The size the manifest recorded at dump time, and the file's size now (None
        # when the file is missing or cannot be read).
        "size_bytes": manifest.size_bytes,
        "file_size_bytes": file_size,
        "sha256": manifest.sha256,
        "verified": manifest.verified and not problems,
        # When the last checksum check ran, passed or not.
        "checked_at": manifest.checksum_check.at if manifest.checksum_check else None,
        "modified_after_check": modified_at,
        "problems": problems,
        # Results that no longer describe the file and so do not decide "verified".
        "notes": entry_notes(manifest),
        "file_present": path.exists(),
        "created_at": manifest.finished_at,
        "age_seconds": round((utc_now() - manifest.created).total_seconds(), 1),
        "database": manifest.database,
        "server_host": manifest.server_host,
        "server_version": manifest.server_version,
        "format": manifest.format,
        "duration_seconds": manifest.duration_seconds,
        "checksum": _check_dict(manifest.checksum_check),
        "list": _list_dict(manifest),
        "drill": _drill_dict(manifest),
    }


async def backup_now(manager: BackupManager, params: Mapping[str, Any] | None, *,
                     progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Take a backup now and return its entry, or report that one is running already."""
    _check_params(params, {})
    try:
        manifest = await manager.take(progress=progress)
    except BackupError as exc:
        raise ControlError(BACKUP_FAILED, f"backup failed: {exc}") from exc
    if manifest is None:
        if manager.backup_running:
            where = "in this daemon"
        else:
            where = "on another walacord host, which holds the database's backup lock"
        return {"status": "skipped",
                "reason": f"a backup of database {manager.database} is already running "
                          f"{where}; no second backup was started"}
    return {"status": "completed", **backup_entry(manager, manifest)}


async def backup_list(manager: BackupManager,
                      params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return every backup, newest first, and what is wrong in the directory and on the
    server: damaged manifests, dumps without a manifest and leftover scratch databases."""
    _check_params(params, {})
    manifests = await manager.list()
    # A backup whose manifest is damaged is not listed, so it is named here instead.
    unreadable = await anyio.to_thread.run_sync(unreadable_manifests, manager.directory)
    orphans = await anyio.to_thread.run_sync(dumps_without_manifest, manager.directory)
    named = {*orphans, *(entry["dump"] for entry in unreadable if entry["dump"])}
    commands = (await anyio.to_thread.run_sync(restore_commands, manager.directory, named)
                if named else {})
    # Every key is always present, so that scripts reading `--json` output can rely on
    # the shape. The error is None when the lookup worked.
    listing: dict[str, Any] = {
        "backups": [backup_entry(manager, m) for m in reversed(manifests)],
        "unreadable": unreadable, "without_manifest": orphans,
        "restore_commands": commands,
        "leftover_databases": [], "leftover_databases_error": None,
        "scratch_journal_error": None}
    # Scratch databases and replaced copies that killed restores and drills left on
    # the server; each is a full copy of a database.
    try:
        listing["leftover_databases"] = [
            leftover.as_dict() for leftover in await manager.leftover_databases()]
    except (psycopg.Error, TimeoutError) as exc:
        listing["leftover_databases_error"] = (
            f"cannot look for leftover scratch databases: {describe_error(exc)}")
    else:
        # The lookup reads the journal, so its problem is current here.
        listing["scratch_journal_error"] = manager.scratch_journal.problem
    return listing


async def backup_verify(manager: BackupManager, params: Mapping[str, Any] | None, *,
                        progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Verify a backup (the newest by default) and, with `drill`, restore-test it."""
    checked = _check_params(params, {"id": str, "drill": bool})
    try:
        manifest = await manager.verify(checked.get("id"))
        if checked.get("drill"):
            if progress is not None:
                progress(0, 1, f"restore drill of {manifest.id}")
            manifest = await manager.drill(manifest.id)
    except BackupError as exc:
        raise ControlError(BACKUP_FAILED, f"verification failed: {exc}") from exc
    return backup_entry(manager, manifest)


async def backup_restore(manager: BackupManager, params: Mapping[str, Any] | None, *,
                         progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Restore a backup into `target_db`; replacing an existing one needs `force`.

    A file whose sha256 differs from its manifest's is rejected unless
    `ignore_checksum` is set.
    """
    checked = _check_params(params, {"id": str, "target_db": str, "force": bool,
                                     "no_owner": bool, "ignore_checksum": bool})
    for required in ("id", "target_db"):
        if not checked.get(required):
            raise ControlError(INVALID_PARAMS, f"missing parameter {required!r}")
    try:
        result = await manager.restore(
            checked["id"], checked["target_db"], force=bool(checked.get("force")),
            no_owner=bool(checked.get("no_owner")),
            ignore_checksum=bool(checked.get("ignore_checksum")), progress=progress)
    except DatabaseExists as exc:
        raise ControlError(TARGET_EXISTS, str(exc), {"database": exc.database}) from exc
    except ChecksumMismatch as exc:
        raise ControlError(CHECKSUM_MISMATCH, f"restore rejected: {exc}", {
            "path": str(exc.path), "sha256": exc.actual,
            "manifest_sha256": exc.expected, "size_bytes": exc.size_bytes,
            "manifest_size_bytes": exc.manifest_size_bytes}) from exc
    except BackupError as exc:
        raise ControlError(BACKUP_FAILED, f"restore failed: {exc}") from exc
    return {"id": result.id, "target_db": result.target_db, "replaced": result.replaced,
            "duration_seconds": result.duration_seconds, "checksum_ok": result.checksum_ok}


def handlers(manager: BackupManager) -> dict[str, Handler]:
    """Return the backup methods bound to `manager`, keyed by method name."""
    return {
        "backup.now": partial(backup_now, manager),
        "backup.list": partial(backup_list, manager),
        "backup.verify": partial(backup_verify, manager),
        "backup.restore": partial(backup_restore, manager),
    }
