"""Errors for a file system under `[backup] dir` that has no space left.

pg_dump and gzip report a full file system only in their standard error, and file
writes in Python raise OSError with ENOSPC, or EDQUOT when the user's disk quota is
used up.
"""

from __future__ import annotations

import errno
from pathlib import Path

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# strerror() of those errnos in English: client programs run with LC_ALL=C.UTF-8.
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")
FREE_SPACE_ADVICE = (
    "Free space there: delete older backups, each dump with its .json manifest "
    "(`walacorctl backup list` shows them), or set [backup] dir to a larger volume and "
    "restart walacord. Lowering [backup] keep_days, keep_weekly or keep_monthly frees "
    "space only after walacord restarts and the next scheduled backup succeeds, because "
    "retention runs after it")


def is_disk_full(error: BaseException) -> bool:
    """Return whether `error` is a file write that found no space left."""
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


def mentions_disk_full(text: str) -> bool:
    """Return whether a client program's error output reports no space left."""
    return any(marker in text for marker in DISK_FULL_TEXTS)


def disk_full_advice(directory: Path, dump_bytes: int | None = None) -> str:
    """Return the sentences that name the full `directory` and what to do."""
    written = ""
    if dump_bytes is not None:
        written = f" after {dump_bytes} bytes of the dump were written"
    return (f"The file system of [backup] dir {directory} has no space left{written}. "
            f"{FREE_SPACE_ADVICE}")
