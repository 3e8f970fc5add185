"""The host probe: CPU, load, memory, swap, file descriptors, disk space and inodes.

psutil calls block, so each run happens in a worker thread. `local_causes()` checks
"is it me?": when every remote probe fails at once, it looks for a local reason
(disk full, file descriptors exhausted, clock jump, name resolution) first.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import psutil

from walacord.config import HostProbeConfig
from walacord.probes.base import ProbeResult, Status

# Free space at or below this fraction counts as a full disk for "is it me?".
DISK_FULL_RATIO = 0.01
# Reason class of a threshold breach -> the resource it concerns.
RESOURCE_OF = {"disk_full": "disk", "disk_low": "disk", "memory": "memory", "swap": "swap",
               "fd_exhausted": "open_files", "fd_high": "open_files", "load": "load",
               "clock_jump": "clock"}
RESOURCES = tuple(dict.fromkeys(RESOURCE_OF.values()))


@dataclass
class ClockTracker:
    """Detects the wall clock moving against the monotonic clock between runs."""

    wall: float = 0.0
    mono: float = 0.0

    def jump(self) -> float:
        """Return the seconds the wall clock moved beyond the monotonic clock since last call."""
        wall, mono = time.time(), time.monotonic()
        previous_wall, previous_mono = self.wall, self.mono
        self.wall, self.mono = wall, mono
        if not previous_mono:
            return 0.0
        return (wall - previous_wall) - (mono - previous_mono)


class HostProbe:
    """Reads host figures through psutil and compares them with the thresholds."""

    name = "host"

    def __init__(self, settings: Callable[[], HostProbeConfig],
                 dirs: Callable[[], Sequence[str]],
                 hostnames: Callable[[], Sequence[str]] = lambda: ()) -> None:
        self._settings = settings
        self._dirs = dirs
        self._hostnames = hostnames
        self.clock = ClockTracker()
        self.process = psutil.Process()
        # The first cpu_percent() call has no interval to compare against and returns
        # a meaningless 0.0, so prime it now.
        psutil.cpu_percent(interval=None)
        self.process.cpu_percent(interval=None)
        self.last_figures: dict[str, Any] = {}
        # Set by the monitor when every remote probe went down at once.
        self.suspect_local = False

    def settings(self) -> HostProbeConfig:
        return self._settings()

    def configured(self) -> bool:
        return True

    async def check(self) -> ProbeResult:
        settings = self.settings()
        dirs = list(self._dirs())
        figures = await anyio.to_thread.run_sync(self._read, dirs)
        figures["clock_jump_seconds"] = round(self.clock.jump(), 3)
        self.last_figures = figures
        if self.suspect_local:
            self.suspect_local = False
            causes = await self.local_causes(settings.timeout / 2)
            figures["local_causes"] = causes
            if causes:
                return ProbeResult(Status.CRITICAL, "local_cause",
                                   f"local cause: {'; '.join(causes)}", details=figures)
        return self._verdict(figures, settings)

    def _read(self, dirs: list[str]) -> dict[str, Any]:
        memory = psutil.virtual_memory()
        swap = psutil.swap_memory()
        soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        figures: dict[str, Any] = {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "process_cpu_percent": self.process.cpu_percent(interval=None),
            "load_per_cpu": round(os.getloadavg()[0] / (psutil.cpu_count() or 1), 3),
            "memory_used_percent": memory.percent,
            "swap_used_percent": swap.percent,
            "open_files": self.process.num_fds(),
            "open_files_limit": soft_limit,
            "process_rss_bytes": self.process.memory_info().rss,
            "disks": {},
        }
        for directory in dirs:
            path = _existing_parent(directory)
            if path is None:
                continue
            stat = os.statvfs(path)
            free = stat.f_bavail / stat.f_blocks if stat.f_blocks else 1.0
            inodes = stat.f_favail / stat.f_files if stat.f_files else 1.0
            figures["disks"][directory] = {"free_ratio": round(free, 4),
                                           "inodes_free_ratio": round(inodes, 4)}
        return figures

    def _verdict(self, figures: dict[str, Any], settings: HostProbeConfig) -> ProbeResult:
        critical: list[tuple[str, str]] = []
        warning: list[tuple[str, str]] = []

        for directory, disk in figures["disks"].items():
            lowest = min(disk["free_ratio"], disk["inodes_free_ratio"]) * 100
            scarce = "space" if disk["free_ratio"] <= disk["inodes_free_ratio"] else "inodes"
            text = f"{directory} has {lowest:.1f}% {scarce} free"
            if lowest < settings.disk_critical_percent:
                critical.append(("disk_full", text))
            elif lowest < settings.disk_warning_percent:
                warning.append(("disk_low", text))

        memory = figures["memory_used_percent"]
        if memory > settings.memory_critical_percent:
            critical.append(("memory", f"memory is {memory:.0f}% used"))
        elif memory > settings.memory_warning_percent:
            warning.append(("memory", f"memory is {memory:.0f}% used"))
        if figures["swap_used_percent"] > settings.swap_warning_percent:
            warning.append(("swap", f"swap is {figures['swap_used_percent']:.0f}% used"))

        fd_percent = 100 * figures["open_files"] / max(1, figures["open_files_limit"])
        fd_text = f"{figures['open_files']} of {figures['open_files_limit']} file descriptors open"
        if fd_percent > settings.fd_critical_percent:
            critical.append(("fd_exhausted", fd_text))
        elif fd_percent > settings.fd_warning_percent:
            warning.append(("fd_high", fd_text))
        if figures["load_per_cpu"] > settings.load_warning_per_cpu:
            warning.append(("load", f"load is {figures['load_per_cpu']:.1f} per CPU"))
        if abs(figures["clock_jump_seconds"]) > settings.clock_jump:
            warning.append(("clock_jump", f"the wall clock jumped "
                            f"{figures['clock_jump_seconds']:+.1f}s"))

        # Per-resource level, for alerts that page on one resource at a time.
        levels = dict.fromkeys(RESOURCES, "ok")
        for reasons, level in ((warning, "warning"), (critical, "critical")):
            for reason, _ in reasons:
                levels[RESOURCE_OF[reason]] = level
        figures["levels"] = levels

        if critical:
            return ProbeResult(Status.CRITICAL, critical[0][0],
                               "; ".join(text for _, text in critical + warning),
                               details=figures)
        if warning:
            return ProbeResult(Status.WARNING, warning[0][0],
                               "; ".join(text for _, text in warning), details=figures)
        return ProbeResult(Status.OK, "ok", "host figures are within their thresholds",
                           details=figures)

    async def local_causes(self, deadline: float) -> list[str]:
        """Return local reasons that would make every remote probe fail, if any."""
        figures = await anyio.to_thread.run_sync(self._read, list(self._dirs()))
        causes = []
        for directory, disk in figures["disks"].items():
            if min(disk["free_ratio"], disk["inodes_free_ratio"]) <= DISK_FULL_RATIO:
                causes.append(f"disk full at {directory}")
        if figures["open_files"] >= figures["open_files_limit"] - 2:
            causes.append("file descriptors exhausted")
        jump = self.clock.jump()
        if abs(jump) > self.settings().clock_jump:
            causes.append(f"clock jumped {jump:+.1f}s")
        for name in self._hostnames():
            with anyio.move_on_after(deadline) as scope:
                try:
                    await anyio.getaddrinfo(name, None)
                except (socket.gaierror, OSError):
                    causes.append(f"name resolution failed for {name}")
            if scope.cancelled_caught:
                causes.append(f"name resolution timed out for {name}")
        return causes


def _existing_parent(directory: str) -> Path | None:
    path = Path(directory)
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return None
