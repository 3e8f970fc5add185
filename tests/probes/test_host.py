"""The host probe on the real host, with thresholds moved to force each outcome."""

from __future__ import annotations

from pathlib import Path

import pytest

from walacord.config import HostProbeConfig
from walacord.probes.base import Status
from walacord.probes.host import ClockTracker, HostProbe

pytestmark = pytest.mark.anyio

CALM = {"load_warning_per_cpu": 1000.0, "swap_warning_percent": 100.0,
        "memory_warning_percent": 100.0, "memory_critical_percent": 100.0}


def make_probe(tmp_path: Path, **settings: object) -> HostProbe:
    config = HostProbeConfig(**{**CALM, **settings})  # type: ignore[arg-type]
    return HostProbe(lambda: config, lambda: [str(tmp_path), str(tmp_path / "not-yet")])


async def test_host_probe_ok(tmp_path: Path) -> None:
    result = await make_probe(tmp_path, disk_warning_percent=0.0,
                              disk_critical_percent=0.0).check()
    assert result.status is Status.OK, result.message
    assert 0 <= result.details["cpu_percent"] <= 100
    assert result.details["open_files"] > 0
    assert str(tmp_path) in result.details["disks"]
    # A directory that does not exist yet is measured on its nearest existing parent.
    assert str(tmp_path / "not-yet") in result.details["disks"]


async def test_host_probe_disk_warning(tmp_path: Path) -> None:
    result = await make_probe(tmp_path, disk_warning_percent=100.0,
                              disk_critical_percent=0.0).check()
    assert result.status is Status.WARNING
    assert result.reason == "disk_low"
    assert str(tmp_path) in result.message
    assert result.details["levels"]["disk"] == "warning"
    assert result.details["levels"]["memory"] == "ok"


async def test_host_probe_disk_critical(tmp_path: Path) -> None:
    result = await make_probe(tmp_path, disk_warning_percent=100.0,
                              disk_critical_percent=100.0).check()
    assert result.status is Status.CRITICAL
    assert result.reason == "disk_full"


async def test_host_probe_memory_critical(tmp_path: Path) -> None:
    result = await make_probe(tmp_path, disk_warning_percent=0.0, disk_critical_percent=0.0,
                              memory_warning_percent=0.0, memory_critical_percent=0.0).check()
    assert result.status is Status.CRITICAL
    assert result.reason == "memory"


async def test_host_probe_fd_warning(tmp_path: Path) -> None:
    result = await make_probe(tmp_path, disk_warning_percent=0.0, disk_critical_percent=0.0,
                              fd_warning_percent=0.0).check()
    assert result.status is Status.WARNING
    assert result.reason == "fd_high"


async def test_host_probe_local_causes_none(tmp_path: Path) -> None:
    probe = make_probe(tmp_path)
    assert await probe.local_causes(1.0) == []


def test_clock_tracker_sees_jump() -> None:
    tracker = ClockTracker()
    assert tracker.jump() == 0.0
    tracker.wall -= 30  # as if the wall clock had been 30 s behind at the last call
    assert tracker.jump() == pytest.approx(30, abs=0.5)
