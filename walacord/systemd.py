"""systemd's notify protocol: READY, STATUS, WATCHDOG, RELOADING, STOPPING.

Every call is a silent no-op when `NOTIFY_SOCKET` is unset, so walacord runs the same
outside systemd. The socket is non-blocking: a full notify queue drops the message
instead of stalling the event loop.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

import sdnotify

log = logging.getLogger(__name__)


class Notifier:
    """Send sd_notify messages to the socket named in the environment."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self._notifier: sdnotify.SystemdNotifier | None = None
        self._last_status = ""
        if self.enabled:
            notifier = sdnotify.SystemdNotifier()
            if notifier.socket is None:
                log.warning("systemd.notify_unavailable",
                            extra={"fields": {"socket": env.get("NOTIFY_SOCKET")}})
                self.enabled = False
            else:
                notifier.socket.setblocking(False)
                self._notifier = notifier

        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if self.enabled and usec.isdigit() and int(usec) > 0 and (
                not pid or pid == str(os.getpid())):
            # sd_watchdog_enabled(3) recommends pinging at half the timeout.
            self.watchdog_interval = int(usec) / 1_000_000 / 2

    def send(self, *lines: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(lines))

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        """Update STATUS= when `text` differs from what was last sent."""
        text = " ".join(text.split())
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def reloaded(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> None:
        self._last_status = status
        self.send("STOPPING=1", f"STATUS={status}")

    def extend_timeout(self, seconds: float) -> None:
        """Ask systemd for `seconds` more before it gives up on start-up or stop."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")
