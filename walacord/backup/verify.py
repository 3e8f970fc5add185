"""Checking a backup file: its checksum, and that pg_restore or gzip can read it.

For custom-format dumps the readability check is `pg_restore --list`, which parses the
archive's table of contents. A dump of a database with no objects has no listed
entries, so the check requires the header that pg_restore prints after it has read the
whole table of contents, not a nonzero entry count. Plain SQL dumps have no table of
contents, so the check decompresses the whole file and requires pg_dump's closing line,
which it writes only after the last object.
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from walacord.backup.dump import summarize_stderr
from walacord.backup.manifest import (
    HASH_CHUNK_BYTES,
    CheckResult,
    Manifest,
    SizeMismatch,
    check_open_size,
    dump_file_problem,
    format_time,
    open_dump,
    read_dump,
    sha256_file,
    utc_now,
)
from walacord.backup.pgclient import Command, client_environment
from walacord.errors import BackupError
from walacord.processes import with_parent_death_signal

if TYPE_CHECKING:
    from walacord.backup.manager import BackupManager

log = logging.getLogger(__name__)

PLAIN_DUMP_TRAILER = b"-- PostgreSQL database dump complete"
TRAILER_WINDOW_BYTES = 4096
# Lines of the header that `pg_restore --list` (PostgreSQL 15) prints for a custom-format
# archive whose table of contents it has read to the end, even with no entries.
ARCHIVE_HEADER_LINES = (";     Format: CUSTOM", "; Selected TOC Entries:")


def count_archive_entries(listing: str) -> int:
    """Return the number of TOC entries in `pg_restore --list` output."""
    return sum(1 for line in listing.splitlines() if line and not line.startswith(";"))


def missing_header_lines(listing: str) -> list[str]:
    """Return the lines of ARCHIVE_HEADER_LINES that `pg_restore --list` output lacks."""
    lines = listing.splitlines()
    return [header for header in ARCHIVE_HEADER_LINES if header not in lines]


class ChecksumMismatch(BackupError):
    """A backup file whose size or sha256 differs from the one its manifest recorded at
    dump time. `actual` is None when the sizes differ, because the file was not hashed.
    """

    def __init__(self, path: Path, expected: str, actual: str | None, *,
                 size_bytes: int | None = None,
                 manifest_size_bytes: int | None = None) -> None:
        if actual is None:
            difference = (f"its size is {size_bytes} bytes, the manifest records "
                          f"{manifest_size_bytes} bytes")
        else:
            difference = f"its sha256 is {actual}, the manifest records {expected}"
        super().__init__(
            f"backup file {path} does not match its manifest: {difference}, so the file "
            "changed after it was written. Nothing was restored. Restore an older backup "
            "instead (`walacorctl backup list` shows them with their last verification), "
            "or pass --ignore-checksum to restore this file anyway")
        self.path = path
        self.expected = expected
        self.actual = actual
        self.size_bytes = size_bytes
        self.manifest_size_bytes = manifest_size_bytes

    @classmethod
    def from_check(cls, path: Path, manifest: Manifest,
                   check: CheckResult) -> ChecksumMismatch:
        """Build the error from a failed result of `hash_backup_file`."""
        sha256 = check.detail.get("sha256")
        # A file that was hashed has the manifest's size, so only a size check records one.
        size = check.detail.get("size_bytes", manifest.size_bytes)
        return cls(path, manifest.sha256, sha256 if isinstance(sha256, str) else None,
                   size_bytes=size if isinstance(size, int) else None,
                   manifest_size_bytes=manifest.size_bytes)


def check_result(ok: bool, error: str | None = None, **detail: Any) -> CheckResult:
    return CheckResult(ok=ok, at=format_time(utc_now()), detail=detail, error=error)


def checksum_check(expected: str, actual: str) -> CheckResult:
    if expected == actual:
        return check_result(True, sha256=actual)
    return check_result(False, f"sha256 is {actual}, the manifest records {expected}; the "
                               "file changed after it was written", sha256=actual)


def size_check(mismatch: SizeMismatch) -> CheckResult:
    """Return the failed checksum check for a file whose size differs from the manifest's."""
    return check_result(False, f"{mismatch}; the file changed after it was written, so its "
                               "sha256 was not computed", size_bytes=mismatch.size_bytes,
                        manifest_size_bytes=mismatch.manifest_size_bytes)


async def hash_backup_file(manager: BackupManager, manifest: Manifest) -> CheckResult:
    """Hash the backup file within `verify_timeout` and compare it with the manifest.

    A file whose size differs from the manifest's fails the check at once, unhashed.
    Raises BackupError when the file cannot be read, is not a regular file or hashing
    times out.
    """
    path = manager.path_of(manifest)
    try:
        with anyio.fail_after(manager.config.verify_timeout):
            digest = await anyio.to_thread.run_sync(sha256_file, path, manifest.size_bytes,
                                                    abandon_on_cancel=True)
    except SizeMismatch as mismatch:
        return size_check(mismatch)
    # TimeoutError is an OSError, so it is caught first.
    except TimeoutError as exc:
        raise BackupError(f"hashing backup file {path} timed out after "
                          f"{manager.config.verify_timeout:g} s; raise [backup] "
                          "verify_timeout if the file is large") from exc
    except OSError as exc:
        raise BackupError(f"cannot read backup file {path}: {exc}") from exc
    return checksum_check(manifest.sha256, digest)


async def list_archive(bindir: Path, path: Path, env: dict[str, str],
                       time_limit: float) -> tuple[CheckResult, str]:
    """Run `pg_restore --list` on a custom-format archive; return the check and listing.

    The archive reaches pg_restore as its standard input, opened here with
    `open_dump()`. So a FIFO put in place of the file fails at once as a special file
    instead of blocking pg_restore until its deadline. Raise BackupError when the file
    cannot be opened or is not a regular file.
    """
    command = Command([str(bindir / "pg_restore"), "--list"])
    with read_dump(path) as archive, anyio.fail_after(time_limit):
        argv = await with_parent_death_signal(command.argv, env)
        result = await anyio.run_process(argv, check=False, env=env, stdin=archive)
    listing = result.stdout.decode(errors="replace")
    entries = count_archive_entries(listing)
    if result.returncode != 0:
        command.stderr_tail.extend(result.stderr.decode(errors="replace").splitlines())
        return check_result(False, f"pg_restore --list exited with {result.returncode}: "
                                   f"{summarize_stderr(command)}"), listing
    missing = missing_header_lines(listing)
    if missing:
        return check_result(False, "pg_restore --list exited with 0 but its output lacks "
                                   f"the archive header line {missing[0]!r}"), listing
    return check_result(True, entries=entries), listing


def hash_and_check_plain(path: Path,
                         expected_size: int | None = None) -> tuple[str, CheckResult]:
    """Hash a gzip'd plain dump and check it decompresses to a complete dump, in one pass.

    With `expected_size`, a file of another size raises SizeMismatch before any byte
    is read.
    """
    digest = hashlib.sha256()
    decompressor = zlib.decompressobj(wbits=31)  # 31: gzip header and trailer
    tail = b""
    total = 0
    try:
        with open_dump(path) as handle:
            check_open_size(handle, expected_size)
            while chunk := handle.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
                data = decompressor.decompress(chunk)
                # gzip allows several members back to back; decompress each in turn.
                while decompressor.eof and decompressor.unused_data:
                    rest = decompressor.unused_data
                    decompressor = zlib.decompressobj(wbits=31)
                    data += decompressor.decompress(rest)
                total += len(data)
                tail = (tail + data)[-TRAILER_WINDOW_BYTES:]
    except zlib.error as exc:
        return digest.hexdigest(), check_result(False, f"gzip data is corrupt: {exc}")
    if not decompressor.eof:
        return digest.hexdigest(), check_result(False, "gzip stream is truncated")
    if PLAIN_DUMP_TRAILER not in tail:
        return digest.hexdigest(), check_result(
            False, "the SQL does not end with pg_dump's completion line; the dump stopped early")
    return digest.hexdigest(), check_result(True, uncompressed_bytes=total)


# --- verifying a stored backup -------------------------------------------------------


async def verify_backup(manager: BackupManager, manifest: Manifest) -> Manifest:
    """Recompute the checksum and re-run the archive check; store both in the manifest.

    A failed check is counted and alerted on, and the manifest records it. A file whose
    size differs from the manifest's fails the checksum check at once. Neither check
    reads it then, so the manifest keeps the result of the last readability check. A
    file that is missing, is not a regular file (a FIFO, say) or cannot be opened is
    counted and alerted on too, and raises BackupError.
    """
    path = manager.path_of(manifest)
    problem = dump_file_problem(path)
    if problem is not None:
        error = BackupError(f"{problem}; its manifest remains")
        await manager.record_failure("verify", manifest.id, error)
        raise error

    list_result: CheckResult | None = None
    try:
        with anyio.fail_after(manager.config.verify_timeout):
            if manifest.format == "plain-gzip":
                digest, list_result = await anyio.to_thread.run_sync(
                    hash_and_check_plain, path, manifest.size_bytes, abandon_on_cancel=True)
            else:
                digest = await anyio.to_thread.run_sync(sha256_file, path, manifest.size_bytes,
                                                        abandon_on_cancel=True)
                with client_environment("") as env:
                    list_result, _ = await list_archive(manager.bindir, path, env,
                                                        manager.config.verify_timeout)
    except SizeMismatch as mismatch:
        manifest.checksum_check = size_check(mismatch)
    except BackupError as exc:
        # The file was replaced by a special file after the check above.
        await manager.record_failure("verify", manifest.id, exc)
        raise
    # TimeoutError is an OSError, so it is caught first.
    except TimeoutError as exc:
        error = BackupError(f"verifying backup file {path} timed out after "
                            f"{manager.config.verify_timeout:g} s; raise [backup] "
                            "verify_timeout if the file is large")
        await manager.record_failure("verify", manifest.id, error)
        raise error from exc
    except OSError as exc:
        error = BackupError(f"cannot read backup file {path}: {exc.strerror or exc}")
        await manager.record_failure("verify", manifest.id, error)
        raise error from exc
    else:
        manifest.checksum_check = checksum_check(manifest.sha256, digest)
        manifest.list_check = list_result
    await manager.save(manifest)

    checksum = manifest.checksum_check
    if checksum.ok and list_result is not None and list_result.ok:
        manager.metrics.backup_last_verified.set(utc_now().timestamp())
        log.info("backup.verified", extra={"fields": {
            "id": manifest.id, "sha256": digest, "entries": list_result.detail.get("entries")}})
    else:
        # Only the errors of checks that ran now: after a size mismatch, that is one.
        errors = [checksum.error] + ([list_result.error] if list_result is not None else [])
        await manager.record_failure("verify", manifest.id,
                                     BackupError("; ".join(e for e in errors if e)))
    return manifest
