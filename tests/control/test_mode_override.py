"""`walacorctl mode set --ttl` against the real daemon, its probes and a real database."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path

import anyio
import orjson
import pytest

from tests.conftest import daemon_config, kill_leftovers, live_pids, running_daemon, wait_until
from walacord.config import BackupConfig, ModesConfig

WALACORCTL = str(Path(sys.executable).parent / "walacorctl")


@pytest.mark.anyio
async def test_mode_override_expires_by_itself(pg_db: str, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="walacord")
    config = daemon_config(tmp_path, pg_db, backup=BackupConfig(enabled=False))
    socket = config.control.socket
    async with running_daemon(config):
        before = await anyio.run_process([WALACORCTL, "--socket", socket, "check"], check=False)
        assert before.returncode == 0, before.stdout.decode()

        forced = await anyio.run_process(
            [WALACORCTL, "--socket", socket, "mode", "set", "emergency", "--ttl", "5",
             "--reason", "planned failover drill"], check=False)
        assert forced.returncode == 0, forced.stderr.decode()
        set_at = time.monotonic()
        during = await anyio.run_process([WALACORCTL, "--socket", socket, "check"], check=False)
        assert during.returncode == 2, during.stdout.decode()

        with anyio.fail_after(10):
            while True:
                after = await anyio.run_process([WALACORCTL, "--socket", socket, "check"],
                                                check=False)
                if after.returncode == 0:
                    break
                await anyio.sleep(0.2)
        elapsed = time.monotonic() - set_at

    assert 4.5 <= elapsed <= 7.0
    assert forced.stderr.decode() == ""
    changes = [r for r in caplog.records if r.getMessage() == "mode.changed"]
    fields = [getattr(r, "fields", {}) for r in changes]
    to_emergency = [f for f in fields if f.get("to") == "emergency"]
    assert to_emergency, fields
    assert "planned failover drill" in str(to_emergency[0].get("reason"))
    assert any(f.get("from") == "emergency" and f.get("to") == "normal" for f in fields)


@pytest.mark.anyio
async def test_mode_override_ttl_over_limit(pg_db: str, tmp_path: Path) -> None:
    config = daemon_config(tmp_path, pg_db, backup=BackupConfig(enabled=False))
    socket = config.control.socket
    async with running_daemon(config):
        rejected = await anyio.run_process(
            [WALACORCTL, "--socket", socket, "mode", "set", "degraded", "--ttl", "2d",
             "--reason", "too long"], check=False)
        as_json = await anyio.run_process(
            [WALACORCTL, "--socket", socket, "--json", "mode", "set", "degraded",
             "--ttl", "400d", "--reason", "too long"], check=False)
        after = await anyio.run_process([WALACORCTL, "--socket", socket, "--json", "mode"],
                                        check=False)

    message = rejected.stderr.decode()
    assert rejected.returncode == 1, message
    assert "172800s (2.0 days)" in message
    assert "86400s (1.0 days)" in message
    assert "[modes] override_max_ttl" in message
    error = orjson.loads(as_json.stdout)["error"]
    assert as_json.returncode == 1
    assert "34560000s (400.0 days)" in error["message"]
    assert error["data"] == {"ttl_seconds": 34560000.0, "override_max_ttl_seconds": 86400.0}
    assert orjson.loads(after.stdout)["override"] is None


@pytest.mark.anyio
async def test_mode_override_ttl_raised_limit(pg_db: str, tmp_path: Path) -> None:
    config = daemon_config(tmp_path, pg_db, backup=BackupConfig(enabled=False),
                           modes=ModesConfig(override_max_ttl=10 * 86400))
    socket = config.control.socket
    async with running_daemon(config):
        forced = await anyio.run_process(
            [WALACORCTL, "--socket", socket, "--json", "mode", "set", "degraded",
             "--ttl", "8d", "--reason", "long migration"], check=False)

    assert forced.returncode == 0, forced.stdout.decode() + forced.stderr.decode()
    override = orjson.loads(forced.stdout)["override"]
    assert override["mode"] == "degraded"
    assert 8 * 86400 - 60 < override["remaining_seconds"] <= 8 * 86400


@pytest.mark.anyio
async def test_mode_hook_timeout_leaves_no_process(pg_db: str, tmp_path: Path) -> None:
    pid_file = tmp_path / "hook-pids"
    # Each run appends the shell's pid and its background child's pid, then hangs.
    hook = ["/bin/sh", "-c", f"echo $$ >> {pid_file}; sleep 100 & echo $! >> {pid_file}; "
                             "exec sleep 100"]
    config = daemon_config(tmp_path, pg_db, backup=BackupConfig(enabled=False),
                           modes=ModesConfig(hooks=[hook], hook_timeout=1.0))
    socket = config.control.socket
    pids: list[int] = []
    try:
        async with running_daemon(config):
            forced = await anyio.run_process(
                [WALACORCTL, "--socket", socket, "mode", "set", "offline", "--ttl", "30s",
                 "--reason", "hook test"], check=False)
            assert forced.returncode == 0, forced.stderr.decode()
            await wait_until(lambda: pid_file.exists(), 10)
            cleared = await anyio.run_process([WALACORCTL, "--socket", socket, "mode", "clear"],
                                              check=False)
            assert cleared.returncode == 0, cleared.stderr.decode()
            # The second run starts once the first is killed at its 1 s timeout.
            await wait_until(lambda: len(pid_file.read_text().split()) >= 4, 10)
            pids = [int(word) for word in pid_file.read_text().split()]
            await wait_until(lambda: not live_pids(pids), 10)

        assert len(pids) == 4
        assert live_pids(pids) == []
    finally:
        kill_leftovers(pids)


@pytest.mark.anyio
async def test_reload_with_lower_limit_ends_override_at_once(pg_db: str,
                                                              tmp_path: Path) -> None:
    config = daemon_config(tmp_path, pg_db, backup=BackupConfig(enabled=False))
    async with running_daemon(config) as supervisor:
        monitor = supervisor.runtime.components["monitor"]
        monitor.set_mode("degraded", "maintenance", 7200)
        await anyio.sleep(1.1)
        lowered = dataclasses.replace(
            config, modes=dataclasses.replace(config.modes, override_max_ttl=1))
        for hook in supervisor.runtime.reload_hooks:
            await hook(lowered)
        state = monitor.mode_state()

    assert state["override"] is None
    assert state["mode"] == "normal"
