"""The crash loop against the real daemon, with a cycle count CI can afford.

`WALACORD_CRASH_CYCLES` sets the number of cycles (default 10, about 2.5 s each on two
cores). `bench/crash_loop.py` runs the long version and records it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict

import pytest

from tests.chaos.conftest import cluster_base, walacord_command
from tests.chaos.crashloop import run_crash_loop
from tests.chaos.emulator import EmulatorProcess
from tests.chaos.results import ResultsFile

pytestmark = pytest.mark.chaos

CYCLES = int(os.environ.get("WALACORD_CRASH_CYCLES", "10"))


def test_crash_loop_exactly_once(pg_db: str, emulator: EmulatorProcess,
                                 chaos_results: ResultsFile) -> None:
    workdir = cluster_base("walacord-chaos-crashloop-")
    try:
        result = run_crash_loop(workdir, pg_db, emulator, walacord_command(), cycles=CYCLES)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    chaos_results.record(
        "crash_loop",
        description=f"{result.cycles} SIGKILL-and-restart cycles while 3 clients enqueue "
                    "to Walacor (20 % 503) and PostgreSQL",
        recovery_s=result.drain_s, recovery_bound_s=60.0,
        lost=result.lost, duplicated=result.duplicated,
        notes=f"{result.acked} acknowledged ({result.walacor_acked} Walacor, "
              f"{result.postgres_acked} PostgreSQL); recovery is the final drain")
    assert result.problems == [], asdict(result)
