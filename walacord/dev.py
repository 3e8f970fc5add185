"""Run walacord in a sandbox: private PostgreSQL, the Walacor emulator and the daemon.

`walacord dev` keeps everything under one directory (default ./.walacord-dev): the
cluster, the emulator's store, the generated config, the logs and the control socket.
It prints the HTTP address and the socket path, then shows a live one-line status
until Ctrl-C, which stops the daemon, the emulator and PostgreSQL.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import anyio
import orjson

from walacord.config import DEFAULT_HTTP_PORT, split_listen
from walacord.pgcluster import ClusterError, PgCluster, find_pg_bindir, free_port
from walacord.statelock import StateDirLock, StateDirLocked

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from walacord.emulator import Emulator
    from walacord.supervisor import Supervisor

log = logging.getLogger(__name__)

DEFAULT_DIR = ".walacord-dev"
EMULATOR_USER = ("dev", "dev-password")
STATUS_EVERY = 0.5

# The sandbox's outbox sinks, as in the README's outbox example: Walacor records of
# envelope type DEV_ETID, and PostgreSQL rows written by the statement DEV_STATEMENT.
DEV_ETID = 10001
DEV_ETID_TABLE = "payments"
DEV_ETID_FIELDS = [
    {"FieldName": "walacord_key", "DataType": "TEXT", "Required": True, "MaxLength": 128},
    {"FieldName": "amount", "DataType": "INTEGER", "Required": True},
]
DEV_TABLE = "payments"
DEV_TABLE_SQL = f"""CREATE TABLE IF NOT EXISTS {DEV_TABLE} (
    key text PRIMARY KEY,
    amount integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now())"""
DEV_STATEMENT = "record_payment"
DEV_STATEMENT_SQL = (f"INSERT INTO {DEV_TABLE} (key, amount) VALUES (%(key)s, %(amount)s) "
                     "ON CONFLICT (key) DO NOTHING")
# Deadline for creating the sandbox's table and envelope type, in seconds.
SETUP_TIMEOUT = 30.0
# Seconds that `pg_ctl stop -m fast` may take before PostgreSQL is killed with SIGKILL.
PG_STOP_TIMEOUT = 30.0
# Seconds to wait for the daemon after its drain_timeout before it is cancelled.
DAEMON_STOP_MARGIN = 10.0

# The sandbox handles these for its whole run and passes SIGHUP and SIGUSR1 on to the
# daemon. The first SIGTERM or SIGINT stops the sandbox, and a second one ends the
# daemon's drain.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SANDBOX_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP, signal.SIGUSR1)


@dataclass
class Sandbox:
    """Handles a scenario needs: the cluster, the emulator and the running daemon."""

    directory: Path
    cluster: PgCluster
    emulator: Emulator
    supervisor: Supervisor
    out: TextIO
    # Steps of a scenario that failed: a mode not reached, or an outbox check missed.
    failures: int = 0

    @property
    def monitor(self) -> Any:
        return self.supervisor.runtime.components.get("monitor")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from walacord.scenarios import SCENARIOS

    parser.add_argument("--dir", default=DEFAULT_DIR, metavar="DIR",
                        help="sandbox directory, reused across runs (default %(default)s)")
    parser.add_argument("--http", default="", metavar="HOST:PORT",
                        help=f"HTTP listen address (default: 127.0.0.1:{DEFAULT_HTTP_PORT}, "
                             "or a free port when that one is taken); port 0 picks a free "
                             "port")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), metavar="NAME",
                        help="run a scripted story, print its timeline, then stop "
                             f"(one of: {', '.join(sorted(SCENARIOS))})")


def _default_listen() -> str:
    """Return walacord's usual address when it is free, so the README's URLs work as
    written, else a free loopback port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", DEFAULT_HTTP_PORT))
        except OSError:
            return f"127.0.0.1:{free_port()}"
    return f"127.0.0.1:{DEFAULT_HTTP_PORT}"


def _listen_address(requested: str) -> str:
    """Return the sandbox's HTTP address: the default when none was given, and a free
    port in place of port 0, because the banner and the config need the real port."""
    if not requested:
        return _default_listen()
    host, _, port = requested.rpartition(":")
    if port != "0" or not host:
        return requested  # the config check names anything else that is wrong
    bare = host.strip("[]")
    with socket.socket(socket.AF_INET6 if ":" in bare else socket.AF_INET) as probe:
        try:
            probe.bind((bare, 0))
        except OSError:
            return requested
        return f"{host}:{probe.getsockname()[1]}"


def write_config(directory: Path, cluster: PgCluster, emulator_url: str, listen: str) -> Path:
    """Write the sandbox's walacord.toml and return its path."""
    path = directory / "walacord.toml"
    document = f"""# Generated by `walacord dev`; rewritten on every run.
environment = "dev"

[database]
url = {_toml(cluster.url("postgres"))}
pool_min_size = 2
pool_max_size = 10

[walacor]
url = {_toml(emulator_url)}
username = {_toml(EMULATOR_USER[0])}
password = {_toml(EMULATOR_USER[1])}

[http]
listen = {_toml(listen)}

[control]
socket = {_toml(str(directory / "control.sock"))}
group = ""

[state]
dir = {_toml(str(directory / "state"))}

[logging]
dir = {_toml(str(directory / "logs"))}
level = "info"

[outbox.statements.{DEV_STATEMENT}]
sql = {_toml(DEV_STATEMENT_SQL)}
"""
    path.write_text(document)
    return path


def _toml(value: str) -> str:
    return orjson.dumps(value).decode()


def command(args: argparse.Namespace) -> int:
    directory = Path(args.dir).resolve()
    if args.http:
        # Checked before PostgreSQL starts. Port 0 requests a free port.
        host, _, port = args.http.rpartition(":")
        try:
            split_listen(f"{host}:1" if port == "0" else args.http)
        except ValueError as exc:
            print(f"walacord dev: --http: {exc}", file=sys.stderr)
            return 2
    try:
        bindir = find_pg_bindir()
    except ClusterError as exc:
        print(f"walacord dev: {exc}", file=sys.stderr)
        return 1
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "state").mkdir(exist_ok=True)
    except OSError as exc:
        print(f"walacord dev: cannot create {directory}: {exc.strerror}; choose another "
              "--dir", file=sys.stderr)
        return 1
    # SIGTERM and SIGINT stay blocked until SandboxRun has its handler in place, so a
    # signal from here on always runs the stop steps instead of ending the process.
    # Nothing may start a process while they are blocked, because a child inherits the
    # blocked set.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    sandbox_lock = StateDirLock(directory)
    try:
        return _run_locked(directory, bindir, args, sandbox_lock)
    except KeyboardInterrupt:
        return 130
    finally:
        sandbox_lock.release()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _run_locked(directory: Path, bindir: Path, args: argparse.Namespace,
                sandbox_lock: StateDirLock) -> int:
    # A second sandbox on the same directory would stop the first one's PostgreSQL and
    # rewrite its config before the daemon's own lock stopped it, so check first.
    try:
        sandbox_lock.acquire()
    except StateDirLocked as exc:
        holder = f" (pid {exc.holder})" if exc.holder else ""
        print(f"walacord dev: another walacord dev{holder} is using {directory}; stop it "
              "with Ctrl-C in its terminal, or pass another --dir", file=sys.stderr)
        return 1
    if os.geteuid() == 0:
        # initdb refuses root, so PostgreSQL runs as an unprivileged user, which must be
        # able to enter every directory above its data directory.
        directory.chmod(0o755)
        blocked = [p for p in directory.parents if not p.stat().st_mode & 0o001]
        if blocked:
            print(f"walacord dev: running as root, PostgreSQL runs as user nobody, which "
                  f"cannot enter {blocked[0]}; use a --dir under /tmp or run walacord dev "
                  "as a normal user", file=sys.stderr)
            return 1

    with open(os.devnull, "w") as devnull:
        return anyio.run(_run_sandbox, directory, bindir, args, devnull, backend="asyncio")


async def _run_sandbox(directory: Path, bindir: Path, args: argparse.Namespace,
                       devnull: TextIO) -> int:
    # Made here, because its cancel scope and event belong to the running event loop.
    return await SandboxRun(directory, bindir, args, devnull).run()


class SandboxRun:
    """One run of `walacord dev`: start PostgreSQL, the emulator and the daemon in that
    order, then stop whichever of them started.

    The first SIGTERM or SIGINT cancels `foreground`, which covers start-up and then the
    scenario or the wait for the daemon, so a signal at any moment leads to the stop
    steps. A signal is how a running sandbox is meant to stop, so that exits 0, but a
    signal during start-up or a scenario exits with 128 plus the signal number.
    """

    def __init__(self, directory: Path, bindir: Path, args: argparse.Namespace,
                 devnull: TextIO) -> None:
        self.directory = directory
        self.args = args
        self.devnull = devnull
        self.out = sys.stdout
        self.cluster, self.existing = _cluster(directory, bindir)
        self.foreground = anyio.CancelScope()
        self.signum: int | None = None
        self.supervisor: Supervisor | None = None
        self.daemon_scope = anyio.CancelScope()
        self.daemon_done = anyio.Event()
        # Set once the banner is printed without a scenario. A signal after that is
        # the normal way to stop.
        self.serving = False

    async def run(self) -> int:
        from walacord import logs

        with anyio.open_signal_receiver(*SANDBOX_SIGNALS) as signals:
            # A signal that arrived while blocked is delivered now, to this receiver.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            async with anyio.create_task_group() as watcher:
                watcher.start_soon(self._watch_signals, signals)
                try:
                    status = await self._run_parts()
                finally:
                    # Step 5: stop PostgreSQL whatever happened above, so nothing is left
                    # running.
                    with anyio.CancelScope(shield=True):
                        _say(self.out, "\nstopping PostgreSQL ...")
                        stopped = await anyio.to_thread.run_sync(_stop_cluster, self.cluster)
                        logs.shutdown()
                    watcher.cancel_scope.cancel()

        cause = "" if self.signum is None else f" by {signal.Signals(self.signum).name}"
        _say(self.out, f"sandbox stopped{cause}; run `walacord dev` again to resume where "
                       "you left off")
        if not stopped:
            return 1
        if self.signum is not None and not self.serving:
            return 128 + self.signum
        return status

    async def _watch_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if signum in STOP_SIGNALS and self.signum is not None:
                # A second stop signal ends the daemon's drain at once, as it does for
                # `walacord run`.
                if self.supervisor is not None:
                    _say(self.out, f"{signal.Signals(signum).name} received again: ending "
                                   "the daemon's drain")
                    self.supervisor.handle_signal(signum)
                continue
            # The daemon logs each signal and requests its own stop on SIGTERM or SIGINT.
            if self.supervisor is not None:
                self.supervisor.handle_signal(signum)
            if signum in STOP_SIGNALS:
                self.signum = signum
                _say(self.out, f"\n{signal.Signals(signum).name} received: stopping the "
                               "sandbox ...")
                self.foreground.cancel()

    async def _run_parts(self) -> int:
        """Run steps 1 to 4 in `foreground`, then stop the daemon and the emulator."""
        status = 0
        async with anyio.create_task_group() as tg:
            with self.foreground:
                status = await self._start_and_wait(tg)
            if self.signum is not None and self.args.scenario and self.supervisor:
                _say(self.out, f"{self.args.scenario} scenario interrupted, so the steps "
                               "after the last one printed did not run")
            await self._stop_daemon()
            tg.cancel_scope.cancel()
        return status

    async def _start_and_wait(self, tg: TaskGroup) -> int:
        """Start each part, then wait for the daemon to stop or run the scenario.

        Return 1 when a part failed to start or a scenario step failed, else 0.
        """
        # Imported here so `walacord --help` does not load the daemon and the emulator.
        from walacord import config as config_module
        from walacord import logs
        from walacord.emulator import Emulator
        from walacord.errors import ConfigError, WalacorError
        from walacord.supervisor import Supervisor

        cluster = self.cluster
        out = self.out

        # Step 1: PostgreSQL, created on the first run and reused after.
        print(f"PostgreSQL  starting in {cluster.base} ...", file=out, flush=True)
        try:
            await _start_cluster(cluster, self.existing)
        except ClusterError as exc:
            print(f"walacord dev: {exc}", file=sys.stderr)
            return 1

        # Step 2: the emulator, in this process.
        emulator = Emulator(users={EMULATOR_USER[0]: EMULATOR_USER[1]},
                            state_path=str(self.directory / "emulator.sqlite3"))
        emulator_url = await tg.start(_serve_emulator, emulator)
        try:
            await _create_sink_targets(cluster, emulator_url)
        except (ClusterError, WalacorError, TimeoutError) as exc:
            print(f"walacord dev: cannot create the outbox's table and envelope type: "
                  f"{exc}", file=sys.stderr)
            return 1

        # Step 3: the config, validated as the daemon would.
        listen = _listen_address(self.args.http)
        config_path = write_config(self.directory, cluster, emulator_url, listen)
        try:
            cfg = config_module.load(config_path)
        except ConfigError as exc:
            print(f"walacord dev: generated config is invalid:\n{exc}", file=sys.stderr)
            return 1
        # The terminal shows the status line; the JSON logs go to the files only.
        logs.setup(cfg.logging.level, cfg.logging.dir, queue_size=cfg.logging.queue_size,
                   repeat_window=cfg.logging.repeat_window, secrets=cfg.secrets(),
                   stream=self.devnull)

        # Step 4: the daemon, in the foreground of this process.
        supervisor = Supervisor(cfg, str(config_path), handle_signals=False)
        self.supervisor = supervisor
        tg.start_soon(self._run_daemon, supervisor)
        with anyio.move_on_after(cfg.lifecycle.start_timeout + 5):
            await supervisor.runtime.ready.wait()
        sandbox = Sandbox(self.directory, cluster, emulator, supervisor, out)
        _print_banner(sandbox, listen, emulator_url, config_path)

        if not self.args.scenario:
            # A story prints its own timeline with every mode change; the live
            # status line would interleave with it.
            tg.start_soon(_status_line, sandbox)
            self.serving = True
            await self.daemon_done.wait()
            return 0

        from walacord.scenarios import SCENARIOS

        await SCENARIOS[self.args.scenario](sandbox)
        return 1 if sandbox.failures else 0

    async def _run_daemon(self, supervisor: Supervisor) -> None:
        try:
            with self.daemon_scope:
                await supervisor.run()
        finally:
            self.daemon_done.set()

    async def _stop_daemon(self) -> None:
        """Ask a ready daemon to drain and stop, and cancel one that is still starting
        or that outlives its drain bound."""
        if self.supervisor is None:
            return
        runtime = self.supervisor.runtime
        if runtime.ready.is_set():
            runtime.request_stop()
            with anyio.move_on_after(runtime.config.lifecycle.drain_timeout
                                     + DAEMON_STOP_MARGIN):
                await self.daemon_done.wait()
        self.daemon_scope.cancel()
        await self.daemon_done.wait()


def _say(out: TextIO, text: str) -> None:
    """Print to the terminal; a closed pipe (`| tee` stopped by the same Ctrl-C) is ignored,
    so it can never skip stopping PostgreSQL."""
    try:
        print(text, file=out, flush=True)
    except (BrokenPipeError, ValueError, OSError):
        pass


async def _create_sink_targets(cluster: PgCluster, emulator_url: str) -> None:
    """Create the table that DEV_STATEMENT writes to and the envelope type DEV_ETID.

    Both steps are idempotent, so a reused sandbox keeps its rows and records.
    """
    from walacord.walacor.client import WalacorClient

    with anyio.fail_after(SETUP_TIMEOUT):
        await anyio.to_thread.run_sync(
            lambda: cluster.psql(DEV_TABLE_SQL), abandon_on_cancel=True)
        async with WalacorClient(emulator_url, username=EMULATOR_USER[0],
                                 password=EMULATOR_USER[1]) as client:
            await client.create_schema(DEV_ETID, DEV_ETID_TABLE, DEV_ETID_FIELDS)


def _cluster(directory: Path, bindir: Path) -> tuple[PgCluster, bool]:
    """Return the sandbox's cluster and whether its data directory already exists."""
    base = directory / "pg"
    port_file = directory / "pg.port"
    if (base / "data" / "PG_VERSION").exists() and port_file.exists():
        return PgCluster(base, port=int(port_file.read_text()), bindir=bindir), True
    return PgCluster(base, bindir=bindir), False


async def _start_cluster(cluster: PgCluster, existing: bool) -> None:
    """Create the cluster on the first run, then start it.

    A cancelled caller still waits for the initdb or pg_ctl step under way, because
    anyio does not abandon the worker thread. A cancellation takes effect between the
    steps, so the stop step that follows finds every server that started.
    """
    if not existing:
        await anyio.to_thread.run_sync(_init_cluster, cluster)
    await anyio.to_thread.run_sync(_start_if_stopped, cluster)


def _init_cluster(cluster: PgCluster) -> None:
    # A half-made directory from an interrupted first run is started over.
    shutil.rmtree(cluster.base, ignore_errors=True)
    cluster.init()
    (cluster.base.parent / "pg.port").write_text(str(cluster.port))


def _start_if_stopped(cluster: PgCluster) -> None:
    if not cluster.is_running():
        cluster.start()


def _stop_cluster(cluster: PgCluster, timeout: float = PG_STOP_TIMEOUT) -> bool:
    """Stop the cluster with `pg_ctl stop -m fast`, or with SIGKILL when that fails.

    Return False when SIGKILL was needed, and print to stderr what happened.
    """
    try:
        if cluster.is_running():
            cluster.stop("fast", timeout=timeout)
        return True
    except (ClusterError, subprocess.TimeoutExpired) as exc:
        print(f"walacord dev: stopping PostgreSQL failed: {exc}; killing it with SIGKILL",
              file=sys.stderr)

    if not cluster.kill():
        print(f"walacord dev: PostgreSQL still runs after SIGKILL; its PID is the first "
              f"line of {cluster.datadir / 'postmaster.pid'}", file=sys.stderr)
    else:
        print(f"walacord dev: PostgreSQL was killed with SIGKILL; its next start recovers "
              f"from the write-ahead log, and {cluster.logfile} may say why it did not "
              "stop", file=sys.stderr)
    return False


async def _serve_emulator(emulator: Emulator, *,
                          task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED
                          ) -> None:
    await emulator.run(host="127.0.0.1", port=free_port(), task_status=task_status)


def _print_banner(sandbox: Sandbox, listen: str, emulator_url: str, config_path: Path) -> None:
    cfg = sandbox.supervisor.runtime.config
    lines = [
        "",
        f"walacord dev sandbox in {sandbox.directory}",
        f"  health     http://{listen}/api/health",
        f"  metrics    http://{listen}/metrics",
        f"  control    {cfg.control.socket}",
        f"  config     {config_path}",
        f"  logs       {cfg.logging.dir}",
        f"  postgres   {sandbox.cluster.url('postgres', password='')} (password in the config)",
        f"  walacor    {emulator_url} (emulator, user {EMULATOR_USER[0]})",
        f"  outbox     walacor ETId {DEV_ETID}; postgres statement {DEV_STATEMENT} "
        f"(table {DEV_TABLE})",
        "Press Ctrl-C to stop everything.",
        "",
    ]
    print("\n".join(lines), file=sandbox.out, flush=True)


def status_line(monitor: Any, latency: bool = True) -> str:
    """Return the one-line summary: mode, then each probe's state and latency."""
    status = monitor.status()
    parts = [f"mode {status['mode']}"]
    for name, probe in status["probes"].items():
        text = f"{name} {probe['state']}"
        if latency and probe["latency_seconds"] is not None and probe["configured"]:
            text += f" {probe['latency_seconds'] * 1000:.0f}ms"
        parts.append(text)
    return " | ".join(parts)


async def _status_line(sandbox: Sandbox) -> None:
    out = sandbox.out
    tty = out.isatty()
    erase = "\r\x1b[K" if tty else ""
    seen = 0
    last_line = ""
    while True:
        monitor = sandbox.monitor
        if monitor is not None:
            # Each transition on its own line, with the reason it had at that moment.
            history = list(monitor.modes.history)
            total = monitor.modes.transitions
            for change in history[len(history) - min(len(history), total - seen):]:
                print(f"{erase}{change['at'][11:19]} mode {change['from']} -> {change['to']}: "
                      f"{change['reason']}", file=out, flush=True)
            seen = total

            # A terminal line is redrawn in place; a pipe gets a line per change of state.
            line = status_line(monitor, latency=tty)
            if tty:
                print(f"{erase}{line}", end="", file=out, flush=True)
            elif line != last_line:
                print(line, file=out, flush=True)
            last_line = line
        await anyio.sleep(STATUS_EVERY)
