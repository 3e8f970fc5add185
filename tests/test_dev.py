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
from collections import Counter
from pathlib import Path

import anyio
import httpx
import pytest

from walacord.dev import DEV_ETID, DEV_TABLE, EMULATOR_USER, _stop_cluster
from walacord.emulator import running_emulator
from walacord.pgcluster import PgCluster, process_exited
from walacord.scenarios import OPERATIONS_PER_SINK, STEP_LIMIT
from walacord.walacor.client import WalacorClient

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


def processes_naming(directory: Path) -> list[str]:
    """Return the command lines of running processes that contain `directory`, such as
    a postmaster started with -D under it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, UnicodeDecodeError):
            continue
        if str(directory) in cmdline:
            found.append(f"pid {entry.name}: {cmdline}")
    return found


def wait_for_path(path: Path, process: subprocess.Popen[str], limit: float) -> None:
    """Poll until `path` exists, and fail when `process` exits first or `limit` passes."""
    deadline = time.monotonic() + limit
    while not path.exists():
        assert process.poll() is None, f"walacord dev exited before {path} existed"
        assert time.monotonic() < deadline, f"{path} not created in {limit}s"
        time.sleep(0.01)


def start_sandbox(directory: Path, *options: str) -> subprocess.Popen[str]:
    """Start walacord dev as the leader of a process group, as a shell starts it."""
    return subprocess.Popen(
        [sys.executable, "-m", "walacord", "dev", "--dir", str(directory), *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)


def send_stop_signal(process: subprocess.Popen[str], signum: int) -> None:
    """Send SIGINT to the whole process group, as Ctrl-C in a terminal does, and any
    other signal to walacord dev alone, as kill or systemd does."""
    if signum == signal.SIGINT:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)


def remove_sandbox(parent: Path, process: subprocess.Popen[str]) -> None:
    """Kill what a failed test left running, then remove the sandbox's parent."""
    if process.poll() is None:
        process.kill()
        process.wait()
    data = parent / "sandbox" / "pg" / "data"
    if (data / "postmaster.pid").exists():
        PgCluster(data.parent).destroy()
    shutil.rmtree(parent, ignore_errors=True)


def test_dev_sandbox_starts_and_stops() -> None:
    # Under root the server runs as nobody, which must be able to enter the parent.
    parent = Path(tempfile.mkdtemp(prefix="walacord-dev-"))
    parent.chmod(0o755)
    directory = parent / "sandbox"
    process = subprocess.Popen(
        [sys.executable, "-m", "walacord", "dev", "--dir", str(directory),
         "--http", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        banner = read_until(process, r"Ctrl-C", 90)
        health_url = next(line.split()[-1] for line in banner if "/api/health" in line)
        # Port 0 asked for a free port; the banner shows the one the daemon listens on.
        assert not health_url.startswith("http://127.0.0.1:0/"), health_url
        socket_line = next(line for line in banner if line.strip().startswith("control"))
        status = read_until(process, r"mode \w+ \| database up", 30)[-1]
        second = subprocess.run(
            [sys.executable, "-m", "walacord", "dev", "--dir", f"{directory}/",
             "--http", "127.0.0.1:0"], capture_output=True, text=True, timeout=60)
        response = httpx.get(health_url, timeout=5)

        process.send_signal(signal.SIGINT)
        output, errors = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert socket_line.endswith(str(directory / "control.sock"))
    # A loaded machine makes the host probe warn, which is degraded, not a failure.
    assert re.match(r"mode (normal|degraded) \| database up \| walacor up", status), status
    assert response.status_code == 200
    # A second sandbox on the same directory stops at once and leaves the first running.
    assert second.returncode == 1, second.stderr
    assert f"another walacord dev (pid {process.pid}) is using {directory}" in second.stderr
    assert "Traceback" not in second.stderr
    assert response.json()["mode"] in ("normal", "degraded")
    assert process.returncode == 0, errors
    assert "sandbox stopped" in output
    cluster = PgCluster(directory / "pg", port=int((directory / "pg.port").read_text()))
    assert not cluster.is_running()
    shutil.rmtree(parent, ignore_errors=True)


async def walacor_rows_per_key(state_path: Path) -> Counter[str]:
    """Count the sandbox's Walacor records per walacord_key, read back from the
    emulator's state file by a fresh emulator."""
    user, password = EMULATOR_USER
    async with (
        running_emulator(users={user: password}, state_path=str(state_path)) as emulator,
        WalacorClient(emulator.url, username=user, password=password) as client,
    ):
        result = await client.query(DEV_ETID, {}, page_no=0, page_size=0)
    return Counter(str(row.get("walacord_key")) for row in result.rows)


def postgres_rows_per_key(directory: Path) -> Counter[str]:
    """Start the sandbox's stopped cluster again and count the payments rows per key."""
    cluster = PgCluster(directory / "pg", port=int((directory / "pg.port").read_text()))
    cluster.start()
    try:
        output = cluster.psql(f"SELECT key, count(*) FROM {DEV_TABLE} GROUP BY key")
    finally:
        cluster.stop("fast")
    return Counter({key: int(count) for key, count in
                    (line.split("|") for line in output.splitlines() if line)})


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
        # Counted again here, apart from the scenario's own check, so a step that only
        # prints its result cannot pass.
        walacor_rows = anyio.run(walacor_rows_per_key, directory / "emulator.sqlite3")
        postgres_rows = postgres_rows_per_key(directory)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    timeline = [line for line in result.stdout.splitlines() if line.startswith("  +")]
    reached = [re.search(r"mode (\w+) after", line) for line in timeline]
    operations = 2 * OPERATIONS_PER_SINK

    assert result.returncode == 0, result.stdout + result.stderr
    assert [m.group(1) for m in reached if m] == ["normal", "emergency", "offline", "normal"]
    accepted = [re.search(r"pending (\d+), in flight (\d+)", line) for line in timeline
                if f"outbox accepted {operations} operations" in line]
    # PostgreSQL is down, so its half stays undelivered; Walacor is still up then, and
    # the enqueue may already have sent its half.
    assert accepted and accepted[0], timeline
    assert int(accepted[0].group(1)) + int(accepted[0].group(2)) >= OPERATIONS_PER_SINK
    assert any(f"applied {operations} of {operations}, pending 0" in line
               for line in timeline), timeline
    assert "done: every step passed" in timeline[-1]
    assert len(walacor_rows) == OPERATIONS_PER_SINK, walacor_rows
    assert set(walacor_rows.values()) == {1}, walacor_rows
    assert len(postgres_rows) == OPERATIONS_PER_SINK, postgres_rows
    assert set(postgres_rows.values()) == {1}, postgres_rows
    assert all("-walacor-" in key for key in walacor_rows)
    assert all("-postgres-" in key for key in postgres_rows)


def test_dev_invalid_http_exits_before_postgres() -> None:
    parent = Path(tempfile.mkdtemp(prefix="walacord-dev-"))
    directory = parent / "sandbox"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "walacord", "dev", "--dir", str(directory),
             "--http", "127.0.0.1:99999"],
            capture_output=True, text=True, timeout=90)
        created = directory.exists()
    finally:
        shutil.rmtree(parent, ignore_errors=True)

    assert result.returncode == 2, result.stdout + result.stderr
    assert "--http: invalid address '127.0.0.1:99999'" in result.stderr
    assert not created


# Each case signals walacord dev once it reaches a stage of start-up, seen from outside.
# The stages: initdb has begun (PG_VERSION), pg_ctl start has begun (postmaster.pid),
# the emulator is up and the daemon is starting (walacord.toml), or the banner is
# printed. A signal after the banner is the normal stop and exits 0. The cases run in
# order on one directory, so the first one creates the cluster.
START_STAGES = [
    ("initdb", signal.SIGTERM),
    ("pg_ctl start", signal.SIGTERM),
    ("pg_ctl start", signal.SIGINT),
    ("daemon start", signal.SIGINT),
    ("running", signal.SIGTERM),
]


def test_dev_signal_during_start_stops_all() -> None:
    parent = Path(tempfile.mkdtemp(prefix="walacord-dev-"))
    parent.chmod(0o755)
    directory = parent / "sandbox"
    data = directory / "pg" / "data"
    process = None
    try:
        for stage, signum in START_STAGES:
            (directory / "walacord.toml").unlink(missing_ok=True)
            process = start_sandbox(directory, "--http", "127.0.0.1:0")
            if stage == "initdb":
                wait_for_path(data / "PG_VERSION", process, 60)
            elif stage == "pg_ctl start":
                wait_for_path(data / "postmaster.pid", process, 60)
            elif stage == "daemon start":
                wait_for_path(directory / "walacord.toml", process, 60)
            else:
                read_until(process, r"Ctrl-C", 90)
            send_stop_signal(process, signum)
            output, errors = process.communicate(timeout=90)
            case = f"{signal.Signals(signum).name} at {stage}: {output}{errors}"

            expected = 0 if stage == "running" else 128 + signum
            assert process.returncode == expected, case
            assert f"sandbox stopped by {signal.Signals(signum).name}" in output, case
            assert "Traceback" not in errors, case
            assert "failed" not in errors, case
            assert processes_naming(directory) == [], case
            assert not (data / "postmaster.pid").exists(), case
    finally:
        if process is not None:
            remove_sandbox(parent, process)
        shutil.rmtree(parent, ignore_errors=True)


def test_stop_cluster_kills_frozen_server(own_pg_cluster: PgCluster,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    postmaster = own_pg_cluster.postmaster_pid()
    # A stopped postmaster never acts on pg_ctl's stop request, so pg_ctl times out.
    os.kill(postmaster, signal.SIGSTOP)

    stopped = _stop_cluster(own_pg_cluster, timeout=1)

    errors = capsys.readouterr().err
    assert stopped is False
    assert "walacord dev: stopping PostgreSQL failed: pg_ctl" in errors
    assert "PostgreSQL was killed with SIGKILL" in errors
    assert process_exited(postmaster)


# Each case signals the outage scenario while it waits for a mode: emergency after
# PostgreSQL stops, or offline after Walacor fails as well.
SCENARIO_STAGES = [
    ("stopping PostgreSQL (pg_ctl stop -m immediate)", signal.SIGINT),
    ("Walacor emulator now returns 503", signal.SIGTERM),
]


def test_dev_scenario_interrupt_stops_promptly() -> None:
    parent = Path(tempfile.mkdtemp(prefix="walacord-dev-"))
    parent.chmod(0o755)
    directory = parent / "sandbox"
    process = None
    try:
        for step, signum in SCENARIO_STAGES:
            process = start_sandbox(directory, "--scenario", "outage")
            before = read_until(process, re.escape(step), 120)
            send_stop_signal(process, signum)
            signalled = time.monotonic()
            rest, errors = process.communicate(timeout=STEP_LIMIT * 4)
            took = time.monotonic() - signalled
            output = "\n".join(before) + "\n" + rest
            name = signal.Signals(signum).name
            case = f"{name} at {step!r} after {took:.1f}s: {output}{errors}"

            # A step waits up to STEP_LIMIT for its mode, so a faster exit shows that the
            # signal cut the wait short.
            assert took < STEP_LIMIT, case
            assert process.returncode == 128 + signum, case
            assert f"{name} received: stopping the sandbox" in output, case
            assert "outage scenario interrupted" in output, case
            assert "FAILED" not in output, case
            assert f"sandbox stopped by {name}" in output, case
            assert "Traceback" not in errors, case
            assert "failed" not in errors, case
            assert processes_naming(directory) == [], case
    finally:
        if process is not None:
            remove_sandbox(parent, process)
        shutil.rmtree(parent, ignore_errors=True)
