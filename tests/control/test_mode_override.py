"""`walacorctl mode set --ttl` against the real daemon, its probes and a real database."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import anyio
import pytest

from tests.conftest import daemon_config, running_daemon
from walacord.config import BackupConfig

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

        capped = await anyio.run_process(
            [WALACORCTL, "--socket", socket, "mode", "set", "degraded", "--ttl", "2d",
             "--reason", "too long"], check=False)
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
    assert capped.returncode == 0
    assert "override_max_ttl caps it" in capped.stderr.decode()
    assert "caps it" not in forced.stderr.decode()
    changes = [r for r in caplog.records if r.getMessage() == "mode.changed"]
    fields = [getattr(r, "fields", {}) for r in changes]
    to_emergency = [f for f in fields if f.get("to") == "emergency"]
    assert to_emergency, fields
    assert "planned failover drill" in str(to_emergency[0].get("reason"))
    assert any(f.get("from") == "emergency" and f.get("to") == "normal" for f in fields)
