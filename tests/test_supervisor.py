"""Daemon lifecycle against a fake systemd notify socket: READY, WATCHDOG, reload, stop."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import httpx
import pytest
from anyio.abc import TaskStatus
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.conftest import NotifyRecorder
from walacord import config, logs
from walacord.errors import ConfigError
from walacord.pgcluster import free_port
from walacord.runtime import Runtime
from walacord.supervisor import Supervisor
from walacord.systemd import Notifier

SECRET = "s3cr3t-pw"


def private_config(tmp_path: Path) -> config.Config:
    """Return the built-in defaults with every path and port of the daemon's own in
    `tmp_path`, so a test never touches /var/lib/walacord or /run/walacord."""
    defaults = config.load(None, {})
    return dataclasses.replace(
        defaults, state=config.StateConfig(dir=str(tmp_path / "state")),
        logging=dataclasses.replace(defaults.logging, dir=""),
        control=dataclasses.replace(defaults.control, socket=str(tmp_path / "control.sock")),
        http=config.HttpConfig(listen=""))


class StallableComponent:
    """A component that reports progress until `stalled` is set, then again once cleared."""

    name = "stallable"

    def __init__(self, runtime: Runtime) -> None:
        self.beat = runtime.progress.register(self.name, stall_after=0.5)
        self.stalled = False

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            if not self.stalled:
                self.beat()
            await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_watchdog_withheld_while_component_stalls(notify_socket: NotifyRecorder,
                                                       tmp_path: Path) -> None:
    cfg = private_config(tmp_path)
    holder: list[StallableComponent] = []

    def components(runtime: Runtime) -> list[StallableComponent]:
        holder.append(StallableComponent(runtime))
        return holder

    supervisor = Supervisor(cfg, None, components=components, notifier=Notifier())
    async with anyio.create_task_group() as tg:
        tg.start_soon(supervisor.run)
        await anyio.sleep(1.0)
        fed = sum(1 for line in notify_socket.lines() if line == "WATCHDOG=1")
        assert fed >= 3

        holder[0].stalled = True
        await anyio.sleep(0.8)  # past the 0.5 s deadline
        before = sum(1 for line in notify_socket.lines() if line == "WATCHDOG=1")
        await anyio.sleep(1.0)
        after = sum(1 for line in notify_socket.lines() if line == "WATCHDOG=1")
        assert after == before

        holder[0].stalled = False
        await anyio.sleep(0.6)
        resumed = sum(1 for line in notify_socket.lines() if line == "WATCHDOG=1")
        assert resumed > after
        assert supervisor.runtime.metrics.watchdog_stalls.labels(
            component="stallable")._value.get() == 1
        supervisor.runtime.request_stop()


@pytest.mark.anyio
async def test_reload_keeps_old_config_when_invalid(tmp_path: Path,
                                                    notify_socket: NotifyRecorder) -> None:
    path = tmp_path / "walacord.toml"
    state = (f"[state]\ndir = '{tmp_path / 'state'}'\n[backup]\nenabled = false\n"
             f"[control]\nsocket = '{tmp_path / 'control.sock'}'\n")
    path.write_text("[logging]\nlevel = 'info'\ndir = ''\n[http]\nlisten = ''\n" + state)
    supervisor = Supervisor(config.load(path, {}), str(path), notifier=Notifier())
    async with anyio.create_task_group() as tg:
        tg.start_soon(supervisor.run)
        await supervisor.runtime.ready.wait()
        # The kernel queues only a few datagrams per socket, so read them as they come.
        notify_socket.poll()

        path.write_text("[logging]\nlevel = 'loud'\n")
        assert await supervisor.reload() is False
        notify_socket.poll()
        assert supervisor.runtime.config.logging.level == "info"

        path.write_text("[logging]\nlevel = 'warning'\ndir = ''\n[http]\nlisten = ''\n"
                        + state)
        assert await supervisor.reload() is True
        assert supervisor.runtime.config.logging.level == "warning"
        supervisor.runtime.request_stop()

    lines = notify_socket.lines()
    assert lines.count("RELOADING=1") == 2
    assert sum(1 for line in lines if line.startswith("MONOTONIC_USEC=")) == 2


@pytest.mark.anyio
async def test_reload_back_to_start_config_needs_no_restart(tmp_path: Path) -> None:
    path = tmp_path / "walacord.toml"
    base = (f"[logging]\ndir = ''\n[http]\nlisten = ''\n[backup]\nenabled = false\n"
            f"[control]\nsocket = '{tmp_path / 'control.sock'}'\n")
    path.write_text(base + f"[state]\ndir = '{tmp_path / 'state'}'\n")
    supervisor = Supervisor(config.load(path, {}), str(path), notifier=Notifier())
    async with anyio.create_task_group() as tg:
        tg.start_soon(supervisor.run)
        await supervisor.runtime.ready.wait()

        path.write_text(base + f"[state]\ndir = '{tmp_path / 'elsewhere'}'\n")
        assert await supervisor.reload() is True
        changed = list(supervisor.runtime.restart_required)
        # Until the restart, the components go on with the start-up value.
        applied_dir = supervisor.runtime.config.state.dir
        path.write_text(base + f"[state]\ndir = '{tmp_path / 'state'}'\n")
        assert await supervisor.reload() is True
        restored = list(supervisor.runtime.restart_required)
        supervisor.runtime.request_stop()

    assert changed == ["state"]
    assert applied_dir == str(tmp_path / "state")
    assert restored == []


@pytest.mark.anyio
async def test_reload_of_empty_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "walacord.toml"
    path.write_text(f"[logging]\ndir = ''\nlevel = 'debug'\n[http]\nlisten = ''\n"
                    f"[backup]\nenabled = false\n[state]\ndir = '{tmp_path / 'state'}'\n"
                    f"[control]\nsocket = '{tmp_path / 'control.sock'}'\n")
    supervisor = Supervisor(config.load(path, {}), str(path), notifier=Notifier())
    async with anyio.create_task_group() as tg:
        tg.start_soon(supervisor.run)
        await supervisor.runtime.ready.wait()

        path.write_text("# truncated by a failed config push\n")
        emptied = await supervisor.reload()
        path.unlink()
        removed = await supervisor.reload()
        level = supervisor.runtime.config.logging.level
        supervisor.runtime.request_stop()

    assert emptied is False
    assert removed is False
    assert level == "debug"
    with pytest.raises(ConfigError) as caught:
        config.load(path, {}, reload=True)
    assert "restore it; the running daemon keeps its current configuration" in str(caught.value)


@pytest.mark.anyio
async def test_stuck_config_read_times_out(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "walacord.toml"
    path.write_text(f"[logging]\ndir = ''\nlevel = 'debug'\n[http]\nlisten = ''\n"
                    f"[backup]\nenabled = false\n[state]\ndir = '{tmp_path / 'state'}'\n"
                    f"[control]\nsocket = '{tmp_path / 'control.sock'}'\n")
    supervisor = Supervisor(config.load(path, {}), str(path), notifier=Notifier())
    release = threading.Event()

    def stuck_load(*args: object, **kwargs: object) -> config.Config:
        release.wait(30)  # a read on a hung mount
        raise AssertionError("the reload should have given up by now")

    async with anyio.create_task_group() as tg:
        tg.start_soon(supervisor.run)
        await supervisor.runtime.ready.wait()
        monkeypatch.setattr("walacord.supervisor.CONFIG_READ_TIMEOUT", 0.3)
        monkeypatch.setattr("walacord.config.load", stuck_load)
        began = time.monotonic()
        applied = await supervisor.reload()
        waited = time.monotonic() - began
        supervisor.runtime.request_stop()
    release.set()

    assert applied is False
    assert waited < 5
    assert supervisor.runtime.reload_problems == [
        f"{path}: (file): reading it took more than 0.3 s; check the file system it is on"]


def start_daemon(tmp_path: Path, notify: NotifyRecorder | None,
                 port: int) -> subprocess.Popen[str]:
    path = tmp_path / "walacord.toml"
    path.write_text(
        f"[http]\nlisten = '127.0.0.1:{port}'\n"
        f"[logging]\ndir = '{tmp_path / 'log'}'\nlevel = 'debug'\n"
        f"[lifecycle]\ndrain_timeout = '3s'\n"
        f"[control]\nsocket = '{tmp_path / 'control.sock'}'\n"
        f"[state]\ndir = '{tmp_path / 'state'}'\n"
    )
    env = dict(os.environ)
    env["DATABASE_URL"] = f"postgresql://walacord:{SECRET}@127.0.0.1:1/walacor_integrity"
    env.pop("NOTIFY_SOCKET", None)
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify.path)
        env["WATCHDOG_USEC"] = "1000000"
    return subprocess.Popen(
        [sys.executable, "-m", "walacord", "run", "--config", str(path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_daemon_lifecycle_over_notify_socket(tmp_path: Path,
                                             notify_socket: NotifyRecorder) -> None:
    port = free_port()
    process = start_daemon(tmp_path, notify_socket, port)
    try:
        # READY=1 within 10 s, with a STATUS= line.
        started = time.monotonic()
        notify_socket.wait_for("READY=1", timeout=10)
        assert any(line.startswith("STATUS=") for line in notify_socket.lines())
        assert time.monotonic() - started < 10

        response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert response.status_code == 200

        # WATCHDOG=1 at half of WATCHDOG_USEC: about 2 per second.
        count_before = notify_socket.lines().count("WATCHDOG=1")
        time.sleep(2.0)
        fed = notify_socket.lines().count("WATCHDOG=1") - count_before
        assert 3 <= fed <= 5

        # SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1 again.
        mark = len(notify_socket.poll())
        process.send_signal(signal.SIGHUP)
        notify_socket.wait_for("RELOADING=1", timeout=5, after=mark)
        notify_socket.wait_for("READY=1", timeout=5, after=mark)

        # SIGTERM: STOPPING=1 and exit 0 within the drain bound plus start-up slack.
        stop_sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
        assert process.returncode == 0, stderr
        assert time.monotonic() - stop_sent < 3 + 2
        assert "STOPPING=1" in notify_socket.lines()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert "shutdown.started" in stderr
    assert "shutdown.cancelling" in stderr
    assert SECRET not in stderr
    assert "walacord:***@127.0.0.1" in stderr
    for log_file in (tmp_path / "log").iterdir():
        assert SECRET not in log_file.read_text(), log_file


def test_daemon_without_notify_socket_runs(tmp_path: Path) -> None:
    port = free_port()
    process = start_daemon(tmp_path, None, port)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_restart_required_lists_start_up_settings() -> None:
    from walacord.supervisor import restart_required

    old = config.load(None, {})
    new = config.load(None, {"WALACOR_HOST": "https://walacor.example", "LOG_LEVEL": "debug"})
    assert restart_required(old, new) == ["walacor"]
    assert restart_required(old, old) == []


def test_start_failure_logs_the_error_itself(pg_db: str, tmp_path: Path) -> None:
    import orjson

    from walacord.web import bind

    occupier = bind("127.0.0.1", 0)
    port = occupier.getsockname()[1]
    config = tmp_path / "walacord.toml"
    config.write_text(
        f'[database]\nurl = "{pg_db}"\n'
        f'[http]\nlisten = "127.0.0.1:{port}"\n'
        f'[state]\ndir = "{tmp_path}"\n'
        f'[control]\nsocket = "{tmp_path / "control.sock"}"\n'
        '[logging]\ndir = ""\n'
        '[backup]\nenabled = false\n')
    try:
        result = subprocess.run([sys.executable, "-m", "walacord", "run", "--config",
                                 str(config)], capture_output=True, text=True, timeout=60,
                                check=False)
    finally:
        occupier.close()

    assert result.returncode == 1
    events = [orjson.loads(line) for line in result.stderr.splitlines()
              if line.startswith("{")]
    failed = [event for event in events if event["event"] == "daemon.failed"]
    assert len(failed) == 1
    assert f"cannot listen on 127.0.0.1:{port} ([http] listen)" in failed[0]["error"]
    assert "TaskGroup" not in failed[0]["error"]


@pytest.mark.anyio
async def test_startup_objects_frozen_while_running(notify_socket: NotifyRecorder,
                                                   tmp_path: Path) -> None:
    """Objects alive at readiness are exempt from collections while the daemon runs, so
    a full collection walks only newer ones. After the stop they are collectable again."""
    import gc

    supervisor = Supervisor(private_config(tmp_path), None, components=lambda runtime: [],
                            notifier=Notifier())
    async with anyio.create_task_group() as tg:
        tg.start_soon(supervisor.run)
        await supervisor.runtime.ready.wait()
        assert gc.get_freeze_count() > 1000
        supervisor.runtime.request_stop()
    assert gc.get_freeze_count() == 0


@pytest.mark.anyio
async def test_second_stop_signal_cuts_drain(notify_socket: NotifyRecorder, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """A second SIGTERM or SIGINT ends a drain that waits on a hung dependency, instead
    of the daemon waiting out `drain_timeout` (10 s by default)."""
    supervisor = Supervisor(private_config(tmp_path), None, components=lambda runtime: [],
                            notifier=Notifier())
    draining = anyio.Event()

    async def hung_drain() -> None:
        draining.set()
        await anyio.sleep_forever()

    with caplog.at_level(logging.INFO):
        async with anyio.create_task_group() as tg:
            tg.start_soon(supervisor.run)
            await supervisor.runtime.ready.wait()
            supervisor.runtime.drain_hooks.append(hung_drain)
            os.kill(os.getpid(), signal.SIGTERM)
            await draining.wait()
            second = time.monotonic()
            os.kill(os.getpid(), signal.SIGINT)
        stopped_after = time.monotonic() - second

    events = [record.getMessage() for record in caplog.records]
    assert stopped_after < 2
    assert "shutdown.drain_cut_short" in events
    assert "shutdown.drain_timed_out" not in events


def test_unopenable_log_file_named_at_start(tmp_path: Path) -> None:
    """A log file walacord cannot open is named as the file, not as its directory."""
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    (log_dir / logs.MAIN_FILE).mkdir()  # cannot be opened as a file, even by root
    path = tmp_path / "walacord.toml"
    path.write_text(f"[logging]\ndir = '{log_dir}'\n[http]\nlisten = ''\n"
                    f"[control]\nsocket = '{tmp_path / 'control.sock'}'\n"
                    f"[state]\ndir = '{tmp_path / 'state'}'\n")

    result = subprocess.run([sys.executable, "-m", "walacord", "run", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)

    assert result.returncode == 1
    assert (f"walacord: cannot open log file '{log_dir / logs.MAIN_FILE}': Is a directory; "
            "fix its owner or permissions, or set [logging] dir") in result.stderr


@pytest.mark.anyio
async def test_reload_tests_new_database_settings(pg_db: str, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A reload with a wrong password keeps the working pool. An unreachable server
    does not block a reload, because the old settings may be what is broken."""
    path = tmp_path / "walacord.toml"
    base = (f"[state]\ndir = '{tmp_path / 'state'}'\n[backup]\nenabled = false\n"
            f"[control]\nsocket = '{tmp_path / 'control.sock'}'\n"
            "[logging]\ndir = ''\n[http]\nlisten = ''\n")
    params = conninfo_to_dict(pg_db)
    wrong_password = make_conninfo("", **{**params, "password": "not-the-password"})
    unreachable = make_conninfo("", **{**params, "port": str(free_port())})
    path.write_text(base + f"[database]\nurl = '{pg_db}'\n")
    supervisor = Supervisor(config.load(path, {}), str(path), notifier=Notifier())
    async with anyio.create_task_group() as tg:
        tg.start_soon(supervisor.run)
        await supervisor.runtime.ready.wait()
        pool = supervisor.runtime.components["monitor"].pool

        path.write_text(base + f"[database]\nurl = '{wrong_password}'\n")
        rejected = await supervisor.reload()
        problems = list(supervisor.runtime.reload_problems)
        url_after_rejection = supervisor.runtime.config.database.url
        pool_url_after_rejection = pool.config.url

        path.write_text(base + f"[database]\nurl = '{unreachable}'\n")
        with caplog.at_level(logging.WARNING):
            applied = await supervisor.reload()
        pool_url_after_apply = pool.config.url
        supervisor.runtime.request_stop()

    assert rejected is False
    assert len(problems) == 1
    assert problems[0].startswith("database: a test connection with the new settings failed "
                                  "(auth: ")
    assert "not-the-password" not in problems[0]
    assert url_after_rejection == pg_db
    assert pool_url_after_rejection == pg_db
    assert applied is True
    assert pool_url_after_apply == unreachable
    assert "config.database_unverified" in caplog.messages
