"""A blocking control client, used by `walacorctl` and usable from scripts.

    with ControlClient("/run/walacord/control.sock", timeout=10) as client:
        status = client.call("status")

Every read waits at most `timeout` seconds, and each progress line starts a new wait.
A failure to reach or read the daemon raises `ControlClientError`, whose message says
what failed and what to do. An error object from the daemon raises `ControlError` with
its code, message and data.
"""

from __future__ import annotations

import grp
import itertools
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

import orjson

from walacord.control.protocol import PROTOCOL_VERSION, ErrorCode, encode_request
from walacord.errors import ControlClientError, ControlError

# A status or a listing can be large, but never this large; the bound keeps a confused
# peer from filling the client's memory.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
READ_CHUNK_BYTES = 64 * 1024

ProgressCallback = Callable[[dict[str, Any]], None]


class ControlClient:
    """One connection to the daemon's control socket; calls run one at a time."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._ids = itertools.count(1)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer.clear()

    def connect(self) -> None:
        """Connect to the socket; raise ControlClientError with what to do."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise ControlClientError(connect_failure(self.path, exc, self.timeout)) from None
        self._sock = sock

    def call(self, method: str, params: dict[str, Any] | None = None, *,
             on_progress: ProgressCallback | None = None) -> Any:
        """Send one request and return its result; raise ControlError or ControlClientError."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        request_id = next(self._ids)
        try:
            self._sock.sendall(encode_request(request_id, method, params))
        except TimeoutError:
            self.close()
            raise ControlClientError(f"sending {method} to {self.path} timed out after "
                                     f"{self.timeout:g}s; raise --timeout") from None
        except OSError as exc:
            # A daemon that rejects the connection (permission, busy) writes an error line
            # and closes, maybe before this request went out. Show that error if it came.
            rejection = self._read_rejection(method)
            self.close()
            if rejection is not None:
                raise rejection from None
            raise ControlClientError(f"sending {method} to {self.path} failed: "
                                     f"{exc.strerror or exc}; is the daemon still running?"
                                     ) from None

        while True:
            message = self._read_message(method)
            if "progress" in message:
                if on_progress is not None and isinstance(message["progress"], dict):
                    on_progress(message["progress"])
                continue
            error = message.get("error")
            if isinstance(error, dict):
                raise _control_error(error)
            if message.get("id") != request_id:
                self.close()
                raise ControlClientError(
                    f"the daemon sent a response for request {message.get('id')!r} while "
                    f"walacorctl waited for {request_id}")
            return message.get("result")

    def _read_rejection(self, method: str) -> ControlError | None:
        try:
            message = self._read_message(method)
        except ControlClientError:
            return None
        error = message.get("error")
        return _control_error(error) if isinstance(error, dict) else None

    def _read_message(self, method: str) -> dict[str, Any]:
        line = self._read_line(method)
        try:
            message = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            self.close()
            raise ControlClientError(f"the daemon sent invalid JSON for {method}: {exc}") from None
        if not isinstance(message, dict):
            self.close()
            raise ControlClientError(f"the daemon sent a non-object response for {method}")
        return message

    def _read_line(self, method: str) -> bytes:
        assert self._sock is not None
        scanned = 0
        while True:
            newline = self._buffer.find(b"\n", scanned)
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[:newline + 1]
                return line
            scanned = len(self._buffer)
            if scanned > MAX_RESPONSE_BYTES:
                self.close()
                raise ControlClientError(f"the response to {method} is larger than "
                                         f"{MAX_RESPONSE_BYTES} bytes")
            try:
                chunk = self._sock.recv(READ_CHUNK_BYTES)
            except TimeoutError:
                self.close()
                raise ControlClientError(
                    f"no response to {method} within {self.timeout:g}s from {self.path}: the "
                    "daemon is busy or stuck; check its log, or raise --timeout") from None
            except OSError as exc:
                self.close()
                raise ControlClientError(f"reading the response to {method} failed: "
                                         f"{exc.strerror or exc}") from None
            if not chunk:
                self.close()
                raise ControlClientError(f"the daemon closed the connection before answering "
                                         f"{method}; check its log")
            self._buffer += chunk


def _control_error(error: dict[str, Any]) -> ControlError:
    code = error.get("code")
    message = str(error.get("message") or "unknown error")
    data = error.get("data")
    if code == ErrorCode.VERSION_MISMATCH:
        supported = data.get("supported_versions") if isinstance(data, dict) else None
        message = (f"version mismatch: walacorctl speaks control protocol {PROTOCOL_VERSION}, "
                   f"the daemon supports {supported}; install walacorctl and walacord from "
                   "the same release")
    return ControlError(int(code) if isinstance(code, int) else ErrorCode.INTERNAL_ERROR,
                        message, data)


def _group_hint(path: str) -> str:
    """Name the group that grants access to the socket at `path`."""
    try:
        gid = os.stat(path).st_gid
    except OSError:
        return "run as root or as a member of the socket's group"
    try:
        name = grp.getgrgid(gid).gr_name
    except KeyError:
        name = str(gid)
    if gid == 0:
        return "run as root, or ask an administrator to set [control] group"
    return (f"join group {name!r} (e.g. `usermod -aG {name} $USER`, then log in again) "
            "or run as root")


def _file_kind(path: str) -> str:
    """Return "socket", "directory", "regular file" or "special file" for an existing path."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "socket"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISDIR(mode):
        return "directory"
    return "regular file" if stat.S_ISREG(mode) else "special file"


def connect_failure(path: str, exc: OSError, timeout: float) -> str:
    """Return the message for a failed connect to the control socket at `path`."""
    if isinstance(exc, FileNotFoundError):
        return (f"control socket {path} not found: is walacord running? Check with "
                "`systemctl status walacord`; if it listens elsewhere, pass --socket PATH or "
                "set WALACORD_CONTROL_SOCKET")
    if isinstance(exc, ConnectionRefusedError):
        kind = _file_kind(path)
        if kind != "socket":
            return (f"{path} is a {kind}, not a socket: pass the daemon's control "
                    "socket with --socket PATH or WALACORD_CONTROL_SOCKET (the default is "
                    "[control] socket in walacord.toml)")
        return (f"nothing is listening on {path}: walacord is not running (the socket "
                "file is left from an earlier run); start it with `systemctl start walacord`")
    if isinstance(exc, PermissionError):
        return f"permission denied on {path}: {_group_hint(path)}"
    if isinstance(exc, TimeoutError):
        return (f"connecting to {path} timed out after {timeout:g}s: the daemon is "
                "overloaded or stuck; check its log, or raise --timeout")
    return f"cannot connect to {path}: {exc.strerror or exc}"
