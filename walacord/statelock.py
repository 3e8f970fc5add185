"""The lock that keeps two daemons from sharing one state directory.

Two daemons on one `[state] dir` would both open outbox.db, each turning the other's
in-flight operations back to pending at start-up, and both would send alerts and take
backups. The lock is `flock` on `<state dir>/walacord.lock`, which the kernel releases
when the process ends, even by SIGKILL, so a crash never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from walacord.errors import WalacordError

log = logging.getLogger(__name__)

LOCK_FILE = "walacord.lock"


class StateDirLocked(WalacordError):
    """Another walacord process holds the state directory's lock."""

    def __init__(self, message: str, holder: int | None = None) -> None:
        super().__init__(message)
        self.holder = holder  # the PID the lock file names, when it names one


class StateDirLock:
    """An exclusive lock on a state directory, held from `acquire()` to `release()`."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_FILE
        self._fd: int | None = None
        self._pid_written = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    @property
    def complete(self) -> bool:
        """True once the lock is held and the file names this process's PID."""
        return self._fd is not None and self._pid_written

    def acquire(self) -> None:
        """Take the lock; raise StateDirLocked when another process holds it.

        A directory where the lock file cannot be created (read-only, full) is logged and
        left unlocked, because the daemon must still start there in emergency mode.
        `held` then stays False, so the caller tries again later.
        """
        if self._fd is not None:
            self._write_pid()
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.warning("state.lock_unavailable", extra={"fields": {
                "path": str(self.path), "error": exc.strerror}})
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise StateDirLocked(
                f"another walacord{f' (pid {holder})' if holder else ''} is using the state "
                f"directory {self.path.parent} ([state] dir); stop it, or give this daemon a "
                "state directory of its own", holder) from None
        self._fd = fd
        self._write_pid()

    def _write_pid(self) -> None:
        if self._fd is None or self._pid_written:
            return
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            return  # the PID is only a hint for the message above; a full disk may refuse it
        self._pid_written = True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
