"""A private PostgreSQL cluster made with initdb and pg_ctl, for `walacord dev` and tests.

initdb refuses to run as root, so when the caller is root every server command runs
as an unprivileged user (`nobody` by default) through setpriv, and the cluster's
directory is handed to that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from walacord.errors import WalacordError

INSTALL_HINT = (
    "install the PostgreSQL server binaries (Debian: apt-get install postgresql), "
    "or put the directory holding initdb and pg_ctl on PATH"
)


class ClusterError(WalacordError):
    """A private PostgreSQL cluster could not be created, started or stopped."""


def find_pg_bindir() -> Path:
    """Return the directory that contains initdb and pg_ctl, newest major version first."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent

    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    for candidate in candidates:
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)

    raise ClusterError(f"initdb and pg_ctl not found: {INSTALL_HINT}")


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class PgCluster:
    """One throwaway cluster listening on 127.0.0.1:`port` and a socket in `base`/run."""

    base: Path
    port: int = 0
    superuser: str = "postgres"
    password: str = "postgres-test-pw"
    run_as: str = "nobody"
    settings: dict[str, str] = field(default_factory=dict)
    bindir: Path = field(default_factory=find_pg_bindir)

    def __post_init__(self) -> None:
        self.base = Path(self.base).resolve()
        if not self.port:
            self.port = free_port()

    # --- paths and URLs ---------------------------------------------------------

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def socketdir(self) -> Path:
        return self.base / "run"

    @property
    def logfile(self) -> Path:
        return self.base / "postgres.log"

    def url(self, dbname: str = "postgres", user: str | None = None,
            password: str | None = None) -> str:
        """Return a libpq URL for `user` (the superuser by default) over TCP."""
        user = user or self.superuser
        if password is None and user == self.superuser:
            password = self.password
        auth = f"{user}:{password}@" if password else f"{user}@"
        return f"postgresql://{auth}127.0.0.1:{self.port}/{dbname}"

    # --- process control --------------------------------------------------------

    def _needs_drop(self) -> bool:
        return os.geteuid() == 0

    def _command(self, name: str, *args: str) -> list[str]:
        argv = [str(self.bindir / name), *args]
        if self._needs_drop():
            entry = pwd.getpwnam(self.run_as)
            argv = [
                "setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
                "--clear-groups", "--", *argv,
            ]
        return argv

    def _run(self, name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C.UTF-8"
        # In a session of its own, a command does not get the terminal's Ctrl-C, which
        # would kill initdb or pg_ctl halfway. The caller decides what to stop.
        result = subprocess.run(
            self._command(name, *args), capture_output=True, text=True,
            timeout=timeout, env=env, cwd=str(self.base), start_new_session=True,
        )
        if result.returncode != 0:
            raise ClusterError(
                f"{name} {' '.join(args)} failed with exit {result.returncode}: "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result

    def init(self) -> None:
        """Create the data directory with password authentication over TCP."""
        self.base.mkdir(parents=True, exist_ok=True)
        self.socketdir.mkdir(exist_ok=True)
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._needs_drop():
            entry = pwd.getpwnam(self.run_as)
            for path in (self.base, self.socketdir, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        os.chmod(pwfile, 0o600)

        self._run(
            "initdb", "-D", str(self.datadir), "-U", self.superuser,
            f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
            "--encoding=UTF8", "--no-sync",
        )
        pwfile.unlink()

        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socketdir}'",
            # Without fsync a commit is safe from a process crash, not from an OS
            # crash, which a scratch cluster does not need to survive. A commit must
            # still write its WAL before it returns: with synchronous_commit off, an
            # immediate stop loses the last commits, and a test would count rows that
            # walacord applied as lost.
            "fsync": "off",
            "synchronous_commit": "on",
            "full_page_writes": "off",
            "max_connections": "100",
            "shared_buffers": "32MB",
            "log_min_messages": "warning",
            # A client that stops during its login (a probe cancelled at shutdown)
            # holds a backend that blocks DROP DATABASE until this timeout; 60 s is
            # PostgreSQL's default.
            "authentication_timeout": "'10s'",
            **self.settings,
        }
        with open(self.datadir / "postgresql.conf", "a") as handle:
            for key, value in conf.items():
                handle.write(f"{key} = {value}\n")

    def start(self, timeout: float = 60) -> None:
        """Start the server and wait until it accepts connections."""
        self._run(
            "pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-w",
            "-t", str(int(timeout)), "start", timeout=timeout + 10,
        )

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        """Stop the server with pg_ctl's `mode`: smart, fast or immediate."""
        self._run(
            "pg_ctl", "-D", str(self.datadir), "-m", mode, "-w",
            "-t", str(int(timeout)), "stop", timeout=timeout + 10,
        )

    def reload(self) -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "reload")

    def is_running(self) -> bool:
        result = subprocess.run(
            self._command("pg_ctl", "-D", str(self.datadir), "status"),
            capture_output=True, text=True, timeout=30, start_new_session=True,
        )
        return result.returncode == 0

    def postmaster_pid(self) -> int:
        """Return the postmaster's pid from postmaster.pid."""
        first_line = (self.datadir / "postmaster.pid").read_text().splitlines()[0]
        return int(first_line)

    def signal_postmaster(self, signum: int) -> None:
        os.kill(self.postmaster_pid(), signum)

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run `sql` through psql over the private socket and return its output."""
        result = self._run(
            "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", str(self.socketdir), "-p", str(self.port), "-U", self.superuser,
            "-d", dbname, "-c", sql,
        )
        return result.stdout.strip()

    def destroy(self) -> None:
        """Stop the server however it is and remove its directory."""
        try:
            if (self.datadir / "postmaster.pid").exists():
                try:
                    self.signal_postmaster(signal.SIGCONT)
                except (ProcessLookupError, ValueError, OSError):
                    pass
                self.stop("immediate", timeout=30)
        except (ClusterError, subprocess.TimeoutExpired):
            self._kill_leftovers()
        shutil.rmtree(self.base, ignore_errors=True)

    def kill(self, timeout: float = 5.0) -> bool:
        """Kill the server with SIGKILL, wait up to `timeout` seconds for the postmaster
        to exit, and return whether it did.

        A zombie counts as exited, because it has released its port, memory and files.
        `pg_ctl status` (PostgreSQL 15) reports a zombie postmaster as running, and
        where init reaps orphans slowly, a killed postmaster can stay a zombie for over
        a second.
        """
        try:
            pid = self.postmaster_pid()
        except (OSError, ValueError, IndexError):
            return True
        self._kill_leftovers()
        deadline = time.monotonic() + timeout
        while not process_exited(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def _kill_leftovers(self) -> None:
        try:
            pid = self.postmaster_pid()
        except (OSError, ValueError, IndexError):
            return
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        time.sleep(0.2)


def process_exited(pid: int) -> bool:
    """Return whether process `pid` has exited, counting a zombie as exited (Linux only,
    because it reads /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    # The state follows the command name, which is in brackets and may contain spaces.
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")
