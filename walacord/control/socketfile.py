"""Create the control socket file with mode 0660 and its group, replacing a stale one safely.

All functions here block (file system, NSS lookups); the server calls them in a worker
thread under a deadline.

Steps of `bind_control_socket`:
1. take an exclusive `flock` on PATH.lock, held for the daemon's lifetime, so two daemons
   never race for the same path;
2. when PATH exists, test it. A socket that accepts a connection belongs to a live
   process and is left alone. A socket that refuses connections is stale and removed.
   Anything that is not a socket is never removed;
3. bind a temporary name in the same directory, set mode and group on it, and rename it
   over PATH, so PATH never shows a socket with the wrong permissions.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from walacord.errors import ControlSocketError

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
# Linux's sun_path has room for 108 bytes including the terminating NUL.
MAX_PATH_BYTES = 107
# A process id has at most 7 digits: proc(5) gives 2**22 as the largest pid_max on
# 64-bit Linux, and pids stay below pid_max.
MAX_PID_DIGITS = 7
# The longest [control] socket path: step 3 binds ".NAME.PID.tmp" in the same
# directory, which is up to 13 bytes longer than the path itself.
MAX_SOCKET_PATH_BYTES = MAX_PATH_BYTES - len("..") - MAX_PID_DIGITS - len(".tmp")
STALE_TEST_TIMEOUT = 1.0


@dataclass
class BoundSocket:
    """A listening control socket and what is needed to remove it on exit."""

    sock: socket.socket
    path: Path
    lock_fd: int
    device: int
    inode: int
    group_applied: bool

    def remove(self) -> None:
        """Close the socket, unlink PATH if it is still ours, and release the lock."""
        self.sock.close()
        try:
            current = os.lstat(self.path)
            if (current.st_dev, current.st_ino) == (self.device, self.inode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.lock_fd)


def bind_control_socket(path: str, group_gid: int | None, backlog: int) -> BoundSocket:
    """Create and listen on the control socket at `path`; raise ControlSocketError."""
    target = Path(path)
    problem = socket_path_problem(path)
    if problem is not None:
        raise ControlSocketError(f"control socket path {problem}; set [control] socket to a "
                                 "shorter path")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ControlSocketError(f"cannot create directory {str(target.parent)!r} for the "
                                 f"control socket: {exc.strerror}") from None

    # Step 1: one daemon per path.
    lock_fd = _take_lock(target)
    try:
        # Step 2: replace a stale socket, never a live one.
        _remove_if_stale(target)

        # Step 3: bind under a temporary name, fix permissions, then rename into place.
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        _unlink_quietly(temporary)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(temporary))
            os.chmod(temporary, SOCKET_MODE)
            group_applied = _apply_group(temporary, target, group_gid)
            sock.listen(backlog)
            os.rename(temporary, target)
        except OSError as exc:
            sock.close()
            _unlink_quietly(temporary)
            raise ControlSocketError(f"cannot create control socket {path!r}: "
                                     f"{exc.strerror or exc}") from None
        sock.setblocking(False)
        info = os.lstat(target)
        return BoundSocket(sock, target, lock_fd, info.st_dev, info.st_ino, group_applied)
    except BaseException:
        os.close(lock_fd)
        raise


def socket_path_problem(path: str) -> str | None:
    """Return why `path` is too long for the control socket, or None when it fits."""
    size = len(os.fsencode(path))
    if size <= MAX_SOCKET_PATH_BYTES:
        return None
    return (f"{path!r} is {size} bytes, longer than the {MAX_SOCKET_PATH_BYTES} bytes that "
            f"fit: a Unix socket address takes at most {MAX_PATH_BYTES} bytes on Linux, and "
            "walacord first binds the socket under a temporary name up to "
            f"{MAX_PATH_BYTES - MAX_SOCKET_PATH_BYTES} bytes longer")


def _take_lock(target: Path) -> int:
    lock_path = target.with_name(target.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ControlSocketError(f"cannot open lock file {str(lock_path)!r}: "
                                 f"{exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ControlSocketError(
            f"another walacord has locked {str(lock_path)!r}, so it owns the control socket "
            f"{str(target)!r}; stop that daemon or set [control] socket to another path"
        ) from None
    return fd


def _remove_if_stale(target: Path) -> None:
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlSocketError(
            f"{str(target)!r} exists and is not a socket; walacord will not remove it: "
            "move it away or set [control] socket to another path")

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(STALE_TEST_TIMEOUT)
    try:
        probe.connect(os.fspath(target))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("control.stale_socket_removed", extra={"fields": {"path": str(target)}})
        _unlink_quietly(target)
        return
    except TimeoutError:
        # A full accept queue times out too; only a refused connection proves it dead.
        pass
    except OSError as exc:
        raise ControlSocketError(f"cannot test existing socket {str(target)!r}: "
                                 f"{exc.strerror}") from None
    finally:
        probe.close()
    raise ControlSocketError(
        f"a process is listening on {str(target)!r}; walacord will not replace a live "
        "socket: stop that process or set [control] socket to another path")


def _apply_group(path: Path, shown_path: Path, group_gid: int | None) -> bool:
    if group_gid is None:
        return False
    try:
        os.chown(path, -1, group_gid)
    except PermissionError:
        log.warning("control.group_not_applied", extra={"fields": {
            "path": str(shown_path), "gid": group_gid,
            "error": "permission denied: the daemon's user must be root or a group member"}})
        return False
    return True


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
