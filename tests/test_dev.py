"""`walacord dev` run as a new user would: start it, ask for health, press Ctrl-C."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from walacord.pgcluster import PgCluster

pytestmark = pytest.mark.slow


def read_until(process: subprocess.Popen[str], pattern: str, limit: float) -> list[str]:
    """Read stdout lines until one matches `pattern`; return every line read."""
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if re.search(pattern, line):
            return lines
    raise AssertionError(f"no line matching {pattern!r} in {limit}s: {lines}")


def test_dev_sandbox_starts_and_stops() -> None:
    # Under root the server runs as nobody, which must be able to enter the parent.
    parent = Path(tempfile.mkdtemp(prefix="walacord-dev-"))
    parent.chmod(0o755)
    directory = parent / "sandbox"
    process = subprocess.Popen(
        [sys.executable, "-m", "walacord", "dev", "--dir", str(directory)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        banner = read_until(process, r"Ctrl-C", 90)
        health_url = next(line.split()[-1] for line in banner if "/api/health" in line)
        socket_line = next(line for line in banner if line.strip().startswith("control"))
        status = read_until(process, r"mode \w+ \| database up", 30)[-1]
        response = httpx.get(health_url, timeout=5)

        process.send_signal(signal.SIGINT)
        output, errors = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert socket_line.endswith(str(directory / "control.sock"))
    assert status.startswith("mode normal")
    assert response.status_code == 200
    assert response.json()["mode"] == "normal"
    assert process.returncode == 0, errors
    assert "sandbox stopped" in output
    cluster = PgCluster(directory / "pg", port=int((directory / "pg.port").read_text()))
    assert not cluster.is_running()
    shutil.rmtree(parent, ignore_errors=True)


def test_dev_outage_scenario_timeline() -> None:
    parent = Path(tempfile.mkdtemp(prefix="walacord-dev-"))
    parent.chmod(0o755)
    directory = parent / "sandbox"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "walacord", "dev", "--dir", str(directory),
             "--scenario", "outage"],
            capture_output=True, text=True, timeout=180,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    timeline = [line for line in result.stdout.splitlines() if line.startswith("  +")]
    reached = [re.search(r"mode (\w+) after", line) for line in timeline]
    assert result.returncode == 0, result.stdout + result.stderr
    assert [m.group(1) for m in reached if m] == ["normal", "emergency", "offline", "normal"]
    assert "done: every step reached its mode" in timeline[-1]
