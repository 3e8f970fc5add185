"""The state directory lock: one daemon per [state] dir, released when the process ends."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from tests.conftest import daemon_config, mounted_tmpfs, running_daemon
from walacord.config import BackupConfig, ControlConfig, HttpConfig, StateConfig
from walacord.pgcluster import free_port
from walacord.statelock import StateDirLock, StateDirLocked
from walacord.supervisor import Supervisor

pytestmark = pytest.mark.anyio


async def test_second_daemon_on_state_dir_fails(pg_db: str, tmp_path: Path) -> None:
    config = daemon_config(tmp_path, pg_db)
    other = dataclasses.replace(
        config, control=ControlConfig(socket=str(tmp_path / "other.sock")),
        http=HttpConfig(listen=f"127.0.0.1:{free_port()}"))
    async with running_daemon(config):
        with pytest.raises(StateDirLocked) as caught, anyio.fail_after(10):
            await Supervisor(other, None).run()

    assert f"(pid {os.getpid()})" in str(caught.value)
    assert str(tmp_path) in str(caught.value)
    assert "[state] dir" in str(caught.value)


def test_lock_released_when_holder_is_killed(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from walacord.statelock import StateDirLock; "
         "StateDirLock(Path(sys.argv[1])).acquire(); print('held', flush=True); "
         "time.sleep(60)", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StateDirLocked):
            StateDirLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)

    lock = StateDirLock(tmp_path)
    lock.acquire()
    lock.release()


def test_unwritable_state_dir_is_not_locked(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    lock = StateDirLock(blocker / "state")

    lock.acquire()
    lock.release()

    # The daemon goes on and starts in emergency mode; the lock is only skipped.
    assert "state.lock_unavailable" in caplog.messages


async def test_lock_taken_once_directory_is_writable(pg_db: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("walacord.supervisor.LOCK_RETRY_INTERVAL", 0.2)
    with mounted_tmpfs(tmp_path / "state", "ro,size=4m") as state:
        config = daemon_config(tmp_path, pg_db, state=StateConfig(dir=str(state)),
                               backup=BackupConfig(enabled=False))
        other = dataclasses.replace(
            config, control=ControlConfig(socket=str(tmp_path / "other.sock")),
            http=HttpConfig(listen=f"127.0.0.1:{free_port()}"))
        async with running_daemon(config):
            await anyio.run_process(["mount", "-o", "remount,rw", str(state)])
            lock_file = state / "walacord.lock"
            with anyio.fail_after(10):
                while not (lock_file.exists() and lock_file.read_text().strip()):  # noqa: ASYNC110
                    await anyio.sleep(0.1)
            with pytest.raises(StateDirLocked), anyio.fail_after(10):
                await Supervisor(other, None).run()
            holder = lock_file.read_text().strip()

    assert holder == str(os.getpid())
