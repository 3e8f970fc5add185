"""Host fault scenarios: the state directory or the log directory runs out of space.

Each directory is a small tmpfs (or loop filesystem) of its own, filled to the last
byte while the daemon runs. Disk free below 10 % is critical for the host probe; with
every remote probe healthy that makes the mode degraded, not offline.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.chaos.conftest import cluster_base
from tests.chaos.faults import SmallFilesystem
from tests.chaos.results import ResultsFile
from tests.chaos.scenario import Bounds, Scenario

pytestmark = pytest.mark.chaos

StartWalacord = Callable[..., Scenario]

# The host probe runs every second here (default 10 s) so the scenario stays short:
# two failed runs at most 1 s apart, with margin.
DETECTION_S = 4.0
# Two good runs plus the probe's and the mode's minimum dwell of 1 s, with margin.
RECOVERY_S = 6.0
HOST_EVERY_SECOND = {"interval": 1.0, "timeout": 0.8, "fast_interval": 0.2}


@pytest.fixture
def small_disk() -> Iterator[SmallFilesystem]:
    base = cluster_base("walacord-chaos-disk-")
    disk = SmallFilesystem(base / "mnt", size_bytes=8 * 1024 * 1024)
    try:
        yield disk.mount()
    finally:
        disk.unmount()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("section", ["state", "logging"])
def test_host_disk_full(section: str, pg_db: str, small_disk: SmallFilesystem,
                        start_walacord: StartWalacord, chaos_results: ResultsFile) -> None:
    directory: Path = small_disk.mountpoint
    scenario = start_walacord(pg_db, settings={
        section: {"dir": str(directory)},
        "probes.host": HOST_EVERY_SECOND,
    })
    scenario.wait_normal()

    fault = scenario.fault()
    small_disk.fill()
    fault.wait_detected()
    # The daemon keeps serving while it cannot write to the full directory.
    scenario.hold(2.0)
    host = scenario.probe("host")
    small_disk.free_space()
    fault.wait_recovered()

    chaos_results.record(
        f"host_{section}_dir_disk_full",
        description=f"the [{section}] dir's filesystem filled to the last byte",
        expected_path=["normal", "degraded", "normal"],
        **fault.measured(Bounds(DETECTION_S, RECOVERY_S)),
        notes=f"host probe while full: {host.get('state')} ({host.get('message')})")
    assert scenario.daemon.process is not None
    assert scenario.daemon.process.poll() is None
