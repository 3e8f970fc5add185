"""Fixtures for fault-injection scenarios: the daemon, the emulator and the results file."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.daemon import ModeWatcher, WalacordDaemon, merge_sections
from tests.chaos.emulator import EmulatorProcess
from tests.chaos.results import ResultsFile, default_path
from tests.chaos.scenario import Scenario

# Settings every scenario daemon gets. Other test runs share CI's two cores, so the
# load average tells nothing about the fault under test, and its warning is turned off.
SCENARIO_SETTINGS: dict[str, dict[str, Any]] = {
    "probes.host": {"load_warning_per_cpu": 1000.0},
}
# A command line that runs another walacord build, e.g. "/opt/walacord/bin/walacord".
COMMAND_ENV = "WALACORD_CHAOS_COMMAND"


def cluster_base(prefix: str) -> Path:
    """Return a fresh directory the unprivileged server user can enter.

    pytest's tmp_path sits under a 0700 directory owned by root, which the `nobody`
    user that runs PostgreSQL under root cannot traverse, so clusters live in /tmp.
    """
    return Path(tempfile.mkdtemp(prefix=prefix))


@pytest.fixture(scope="session")
def chaos_results(tmp_path_factory: pytest.TempPathFactory) -> ResultsFile:
    """The session's results file; `record()` writes a scenario and checks its bounds."""
    return ResultsFile(default_path(tmp_path_factory.getbasetemp()))


def walacord_command() -> list[str] | None:
    """Return the command that runs walacord: $WALACORD_CHAOS_COMMAND, else this Python."""
    configured = os.environ.get(COMMAND_ENV, "").strip()
    return shlex.split(configured) if configured else None


@pytest.fixture
def start_walacord() -> Iterator[Callable[..., Scenario]]:
    """Start the real daemon against a database URL; stop it when the test ends.

    Call it as `start_walacord(url, settings={"probes.database": {...}})`; it returns a
    `Scenario` once the daemon is ready and its mode watcher runs.
    """
    started: list[tuple[WalacordDaemon, ModeWatcher, Path]] = []

    def start(database_url: str, *, settings: dict[str, dict[str, Any]] | None = None,
              walacor_url: str = "", notify_socket: Path | None = None,
              watchdog_usec: int = 400_000) -> Scenario:
        workdir = cluster_base("walacord-chaos-daemon-")
        daemon = WalacordDaemon(workdir, database_url, walacor_url=walacor_url,
                                settings=merge_sections(SCENARIO_SETTINGS, settings),
                                command=walacord_command(), notify_socket=notify_socket,
                                watchdog_usec=watchdog_usec)
        started.append((daemon, ModeWatcher(daemon.http_port), workdir))
        daemon.start()
        watcher = started[-1][1].start()
        return Scenario(daemon, watcher)

    try:
        yield start
    finally:
        for daemon, watcher, workdir in reversed(started):
            watcher.stop()
            daemon.stop()
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def emulator() -> Iterator[EmulatorProcess]:
    """The Walacor emulator in a process of its own, run by the same walacord command."""
    workdir = cluster_base("walacord-chaos-emulator-")
    process = EmulatorProcess(walacord_command() or [sys.executable, "-m", "walacord"],
                              workdir).start()
    try:
        yield process
    finally:
        process.stop()
        shutil.rmtree(workdir, ignore_errors=True)
