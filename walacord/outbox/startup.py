"""Start-up checks of the outbox database: fsync self-test, integrity check, move aside.

These run before the store accepts anything, so a state directory that cannot make
writes durable, or a damaged database, is found before an enqueue is acknowledged.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import aiosqlite

from walacord.errors import OutboxDiskFull, OutboxStateDirUnusable

log = logging.getLogger(__name__)

SQLITE_CORRUPT = 11
SQLITE_FULL = 13
SQLITE_NOTADB = 26
SQLITE_IOERR = 10


def fsync_self_test(directory: Path) -> float:
    """Write, fsync and remove a file in `directory`, fsync the directory; return seconds."""
    path = directory / ".outbox-fsync-test"
    start = time.monotonic()
    try:
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            # Removed even when the write failed, so a full disk leaves no empty file.
            path.unlink(missing_ok=True)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutboxDiskFull(f"fsync self-test in {directory} failed: {exc.strerror}; "
                                 "free space in the state directory") from exc
        raise OutboxStateDirUnusable(
            f"fsync self-test in {directory} failed: {exc.strerror}; the state directory "
            "([state] dir) must be a writable directory on a file system that supports "
            "fsync") from exc
    return time.monotonic() - start


async def check_integrity(path: Path) -> str | None:
    """Run `PRAGMA quick_check` on the database at `path`; return the problem, or None."""
    try:
        async with aiosqlite.connect(path) as db:
            rows = await db.execute_fetchall("PRAGMA quick_check")
    except sqlite3.DatabaseError as exc:
        if is_corruption(exc):
            return str(exc)
        raise
    results = [str(row[0]) for row in rows]
    if results == ["ok"]:
        return None
    return "; ".join(results[:5])


def is_corruption(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    return code in (SQLITE_CORRUPT, SQLITE_NOTADB)


def is_disk_full(exc: sqlite3.Error, directory: Path) -> bool:
    """Tell whether `exc` came from a full file system, not from another I/O fault."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code == SQLITE_FULL:
        return True
    if code != SQLITE_IOERR:
        return False
    # A failed write(2) with ENOSPC reaches Python as a generic I/O error; free space
    # distinguishes the two.
    return 0 <= free_bytes(directory) < 64 * 1024


def free_bytes(directory: Path) -> int:
    """Return the bytes available to walacord in `directory`'s file system, or -1."""
    try:
        stats = os.statvfs(directory)
    except OSError:
        return -1
    return stats.f_bavail * stats.f_frsize


def has_free_space(directory: Path, required: int) -> bool:
    """Tell whether `directory`'s file system has `required` bytes free, or a tenth of its
    size when that is less, so that a small volume can leave the disk-full state."""
    try:
        stats = os.statvfs(directory)
    except OSError:
        return False
    size = stats.f_blocks * stats.f_frsize
    return stats.f_bavail * stats.f_frsize >= min(required, size // 10)


def move_aside(path: Path) -> Path:
    """Rename the database and its -wal/-shm files to `NAME.damaged-TIMESTAMP`; return it."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    counter = 1
    while target.exists():
        target = path.with_name(f"{path.name}.damaged-{stamp}-{counter}")
        counter += 1

    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{path}{suffix}")
        if source.exists():
            os.rename(source, f"{target}{suffix}")
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target
