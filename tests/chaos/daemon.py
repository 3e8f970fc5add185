"""Run the real walacord daemon as a subprocess and watch its mode, for scenarios and bench.

`WalacordDaemon` writes a config file into a scratch directory, starts
``python -m walacord run --config FILE`` and talks to it over HTTP only, as an
operator's tooling would: ``/readyz`` for start-up and ``/api/health`` (a JSON document
with ``mode``) for the mode. `ModeWatcher` polls ``/api/health`` from a thread every
few milliseconds and keeps each change of mode with its monotonic and wall times;
`WalacordDaemon.mode_changes()` reads the ``mode.changed`` events from the JSON log.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from walacord.pgcluster import free_port

MODES = ("normal", "degraded", "emergency", "offline")
LOG_FILE = "walacor_integrity.log"
# Variables that would override the generated config file inside the daemon.
OVERRIDING_ENV = ("DATABASE_URL", "DATABASE_URL_FILE", "WALACOR_HOST", "WALACOR_USERNAME",
                  "WALACOR_PASSWORD", "WALACOR_PASSWORD_FILE", "LOG_LEVEL", "ENVIRONMENT",
                  "DEBUG", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                  "CREDENTIALS_DIRECTORY", "WALACORD_CONFIG")


def toml_value(value: Any) -> str:
    """Render a str, bool, number, list or dict (as an inline table) as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string for the characters used here.
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as a TOML value")


def toml_document(sections: dict[str, dict[str, Any]]) -> str:
    """Render {"probes.database": {"interval": 1.0}} as TOML tables."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def merge_sections(base: dict[str, dict[str, Any]],
                   extra: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    merged = {name: dict(values) for name, values in base.items()}
    for name, values in (extra or {}).items():
        merged.setdefault(name, {}).update(values)
    return merged


class WalacordDaemon:
    """One walacord daemon with its config, state and logs in `workdir`."""

    def __init__(self, workdir: Path, database_url: str, *, walacor_url: str = "",
                 settings: dict[str, dict[str, Any]] | None = None,
                 command: Sequence[str] | None = None,
                 notify_socket: Path | None = None, watchdog_usec: int = 400_000) -> None:
        self.workdir = Path(workdir)
        # With a notify socket the daemon talks to it as to systemd, watchdog included.
        self.notify_socket = notify_socket
        self.watchdog_usec = watchdog_usec
        self.http_port = free_port()
        self.config_path = self.workdir / "walacord.toml"
        self.log_dir = self.workdir / "logs"
        self.stderr_path = self.workdir / "stderr.log"
        self.command = list(command or [sys.executable, "-m", "walacord"])
        self.sections = merge_sections({
            "database": {"url": database_url},
            "walacor": {"url": walacor_url},
            "http": {"listen": f"127.0.0.1:{self.http_port}"},
            "control": {"socket": str(self.workdir / "control.sock")},
            "state": {"dir": str(self.workdir / "state")},
            "logging": {"dir": str(self.log_dir), "level": "info"},
        }, settings)
        self.process: subprocess.Popen[bytes] | None = None

    # --- lifecycle --------------------------------------------------------------------

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for directory in (self.log_dir, self.workdir / "state"):
            directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(toml_document(self.sections))
        return self.config_path

    def start(self, timeout: float = 30.0) -> None:
        """Start the daemon and wait until /readyz answers 200."""
        self.write_config()
        env = {key: value for key, value in os.environ.items() if key not in OVERRIDING_ENV}
        if self.notify_socket is not None:
            env["NOTIFY_SOCKET"] = str(self.notify_socket)
            env["WATCHDOG_USEC"] = str(self.watchdog_usec)
        with open(self.stderr_path, "ab") as stderr:
            self.process = subprocess.Popen(
                [*self.command, "run", "--config", str(self.config_path)],
                stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=self.workdir,
                start_new_session=True,
            )
        try:
            self.wait_ready(timeout)
        except BaseException:
            # A daemon that never became ready must not outlive the caller.
            self.stop()
            raise

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"walacord exited with {self.process.returncode} during "
                                   f"start-up; stderr:\n{self.stderr_tail()}")
            try:
                status, _ = self.get("/readyz")
            except OSError:
                status = 0
            if status == 200:
                return
            time.sleep(0.05)
        raise TimeoutError(f"walacord was not ready within {timeout}s; stderr:\n"
                           f"{self.stderr_tail()}")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM the daemon and wait; SIGKILL it if it outlives `timeout`."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return int(self.process.returncode)

    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("walacord is not running; call start() first")
        return self.process.pid

    def stderr_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.stderr_path.read_text().splitlines()[-lines:])
        except FileNotFoundError:
            return "(no stderr file)"

    def __enter__(self) -> WalacordDaemon:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- HTTP -------------------------------------------------------------------------

    def get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def health(self) -> tuple[int, dict[str, Any]]:
        status, body = self.get("/api/health")
        return status, orjson.loads(body)

    def mode(self) -> str:
        return str(self.health()[1]["mode"])

    def wait_for_mode(self, mode: str, timeout: float) -> float:
        """Poll until the daemon reports `mode`; return the monotonic time it was seen."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.mode()
            except (OSError, ValueError, KeyError):
                last = None
            if last == mode:
                return time.monotonic()
            time.sleep(0.01)
        raise TimeoutError(f"walacord did not reach mode {mode!r} within {timeout}s "
                           f"(last seen {last!r})")

    # --- logs -------------------------------------------------------------------------

    def events(self, name: str) -> list[dict[str, Any]]:
        """Return every log event called `name`, oldest first."""
        try:
            text = (self.log_dir / LOG_FILE).read_text()
        except FileNotFoundError:
            return []
        found = []
        for line in text.splitlines():
            try:
                document = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if document.get("event") == name:
                found.append(document)
        return found

    def mode_changes(self) -> list[tuple[float, str, str]]:
        """Return (wall time, from, to) for each `mode.changed` event in the log."""
        changes = []
        for event in self.events("mode.changed"):
            stamp = datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()
            changes.append((stamp, str(event["from"]), str(event["to"])))
        return changes


@dataclass(frozen=True)
class Observation:
    """The daemon's mode as first seen by the watcher, with both clocks."""

    monotonic: float
    wall: float
    mode: str


class ModeWatcher:
    """Poll /api/health every `interval` seconds from a thread and keep each change."""

    def __init__(self, port: int, interval: float = 0.005) -> None:
        self.port = port
        self.interval = interval
        self.observations: list[Observation] = []
        self.errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="mode-watcher", daemon=True)

    def start(self) -> ModeWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def __enter__(self) -> ModeWatcher:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _poll(self) -> None:
        connection: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            try:
                if connection is None:
                    connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                connection.request("GET", "/api/health")
                response = connection.getresponse()
                mode = str(orjson.loads(response.read())["mode"])
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                self.errors += 1
                if connection is not None:
                    connection.close()
                connection = None
                self._stop.wait(self.interval)
                continue
            with self._lock:
                if not self.observations or self.observations[-1].mode != mode:
                    self.observations.append(Observation(time.monotonic(), time.time(), mode))
            self._stop.wait(self.interval)
        if connection is not None:
            connection.close()

    def current(self) -> str | None:
        with self._lock:
            return self.observations[-1].mode if self.observations else None

    def path(self, since: float = 0.0) -> list[str]:
        """Return the modes seen since monotonic time `since`, starting with the one
        current at that moment."""
        with self._lock:
            observations = list(self.observations)
        before = [item for item in observations if item.monotonic < since]
        after = [item.mode for item in observations if item.monotonic >= since]
        return ([before[-1].mode] if before else []) + after

    def wait_for(self, accept: str | Callable[[str], bool], *, since: float,
                 timeout: float) -> Observation | None:
        """Wait for the first observation at or after `since` whose mode matches.

        `accept` is a mode name or a predicate on it. Returns None on timeout, so the
        caller can record a missed bound instead of raising before the record is made.
        """
        matches = (lambda mode: mode == accept) if isinstance(accept, str) else accept
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                for item in self.observations:
                    if item.monotonic >= since and matches(item.mode):
                        return item
                current = self.observations[-1] if self.observations else None
            # The mode may already have matched before `since`, with no change after it.
            if current is not None and current.monotonic < since and matches(current.mode):
                return Observation(since, time.time(), current.mode)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.002)


def control(path: str, method: str, params: dict[str, Any] | None = None,
            timeout: float = 30.0) -> Any:
    """Call one control method and return its result; raise on an error response."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        client.connect(path)
        request = {"id": 1, "method": method, "version": 1, "params": params or {}}
        client.sendall(orjson.dumps(request) + b"\n")
        data = b""
        while True:
            chunk = client.recv(65536)
            if not chunk:
                break
            data += chunk
            lines = [line for line in data.split(b"\n") if line]
            if lines and b'"progress"' not in lines[-1] and data.endswith(b"\n"):
                break
    lines = data.splitlines()
    if not lines:
        raise ConnectionError(f"{method}: the daemon closed the connection before responding")
    response = orjson.loads(lines[-1])
    if "error" in response:
        raise AssertionError(f"{method} failed: {response['error']}")
    return response["result"]
