"""walacord's configuration: the TOML schema, environment overrides and `check-config`.

Values come from, in rising precedence: defaults, the TOML file, systemd credentials in
`$CREDENTIALS_DIRECTORY`, and the environment. The whole result is validated once, at
load; a `ConfigError` lists every problem with the file, key, value and fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import grp
import ipaddress
import os
import re
import shutil
import stat
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from walacord.control.socketfile import socket_path_problem
from walacord.errors import ConfigError, ConfigProblem
from walacord.logs import redact
from walacord.settings import Decoder, Duration, PathSetting, setting
from walacord.sqlcheck import (
    has_several_statements,
    idempotency_problem,
    placeholder_problem,
)

# NOTE: 9877 was chosen from the 9100-9999 exporter range; check it against the
# Prometheus wiki's default port allocations page before registering it there.
DEFAULT_HTTP_PORT = 9877
# Far above any real configuration. The limit keeps a path to /dev/zero or a runaway
# generator from filling the daemon's memory.
MAX_CONFIG_BYTES = 1024 * 1024
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# Characters that no host name or port may contain: spaces and delimiters.
_BAD_HOST_CHARACTER = re.compile(r"[ <>\"{}|\\^`%]")


def program_problem(program: str) -> str | None:
    """Return why `program`, the first word of a hook or command argv, cannot run, or
    None when it can. A name without a slash is looked up in walacord's PATH, which the
    commands inherit."""
    if "/" not in program:
        if shutil.which(program) is None:
            return (f"program {program!r} is not in PATH ({os.environ.get('PATH', '')}); "
                    "give its absolute path")
        return None
    path = Path(program)
    if not path.is_absolute():
        return (f"program {program!r} is a relative path, which depends on the directory "
                "walacord starts in (/ under systemd); give its absolute path")
    if not path.is_file():
        problem = "is not a file" if path.exists() else "does not exist"
        return f"program {program!r} {problem}; give the path of an executable file"
    if not os.access(path, os.X_OK):
        return f"program {program!r} is not executable; run chmod +x on it"
    return None


def http_url_problem(url: str) -> str | None:
    """Return why `url` is not a usable http:// or https:// URL, or None when it is.

    httpx, which makes the requests, has the last word: a URL it rejects would fail
    every request, so it is rejected here, where check-config and a reload see it.
    """
    if not url.lower().startswith(("http://", "https://")):
        return "it must start with http:// or https://"
    control = re.search(r"[\x00-\x1f\x7f]", url)
    if control is not None:
        return (f"it contains the control character {control.group()!r} at position "
                f"{control.start() + 1}; remove it")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not 0-65535
    except ValueError as exc:
        if "IPv6" in str(exc):
            return f"{exc}; write an IPv6 address in brackets, as in http://[::1]:8080/PATH"
        return f"{exc}; give a port from 1 to 65535, as in http://HOST:8080/PATH"
    if not parts.hostname:
        return "it has no host name; write it as http://HOST:PORT/PATH"
    host_and_port = parts.netloc.rpartition("@")[2]  # without user:password@
    # An IPv6 zone such as [fe80::1%25eth0] may contain a percent sign.
    bad = _BAD_HOST_CHARACTER.search(re.sub(r"\[[^\]]*\]", "", host_and_port))
    if bad is not None:
        return (f"its host part {host_and_port!r} contains {bad.group()!r}, which a host name "
                "cannot contain")
    if port == 0:
        return "port 0 is not a port a server listens on; give the real port"
    import httpx  # here, so that walacorctl's start-up does not pay for it

    try:
        httpx.URL(url)
    except httpx.InvalidURL as exc:
        return f"httpx rejects it: {exc}"
    return None



# Connection parameters whose values libpq checks only when it connects, with the
# values it accepts, case-sensitive (pqConnectOptions2 in PostgreSQL's
# src/interfaces/libpq/fe-connect.c). conninfo_to_dict rejects a parameter that the
# installed libpq does not know, such as load_balance_hosts before libpq 16.
LIBPQ_CHOICES: dict[str, tuple[str, ...]] = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "target_session_attrs": ("any", "read-write", "read-only", "primary", "standby",
                             "prefer-standby"),
    "load_balance_hosts": ("disable", "random"),
    "channel_binding": ("disable", "prefer", "require"),
    "gssencmode": ("disable", "prefer", "require"),
    "sslcertmode": ("disable", "allow", "require"),
    "sslnegotiation": ("postgres", "direct"),
}
# Parameters that libpq, or psycopg for connect_timeout, reads as integers on connect.
LIBPQ_INTEGERS = ("connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval",
                  "keepalives_count", "tcp_user_timeout")
_LIBPQ_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*")


def conninfo_problems(url: str) -> list[str]:
    """Return why libpq would reject the connection string `url`; empty when it would not.

    conninfo_to_dict checks the syntax and the parameter names. The values in
    LIBPQ_CHOICES, the integers and the ports are checked only when libpq connects, so
    they are checked here as well. No message contains the password.
    """
    try:
        params = conninfo_to_dict(url)
    except Exception as exc:  # psycopg raises ProgrammingError with the parse error
        return [f"invalid libpq connection string: {redact_dsn_error(str(exc), url)}; use "
                "postgresql://USER@HOST:PORT/DB"]

    problems = []
    for name, choices in LIBPQ_CHOICES.items():
        value = params.get(name)
        if value is not None and value not in choices:
            problems.append(f"invalid {name} value {value!r}; use one of {', '.join(choices)}")
    for name in LIBPQ_INTEGERS:
        value = params.get(name)
        if value is not None and not _LIBPQ_INTEGER.fullmatch(str(value)):
            problems.append(f"invalid {name} value {value!r}; use a whole number")
    # A multi-host string has one port per host. An empty one means libpq's default.
    for port in str(params.get("port") or "").split(","):
        if port.strip() and not (_LIBPQ_INTEGER.fullmatch(port) and 1 <= int(port) <= 65535):
            problems.append(f"invalid port {port!r}; use a port from 1 to 65535")

    # Combinations that libpq rejects. Without sslmode in the string, libpq takes it
    # from PGSSLMODE, which is not checked here.
    sslmode = params.get("sslmode")
    if (params.get("sslnegotiation") == "direct"
            and sslmode in ("disable", "allow", "prefer")):
        problems.append(f"sslnegotiation=direct needs sslmode require, verify-ca or "
                        f"verify-full, not {sslmode!r}")
    if params.get("sslrootcert") == "system" and sslmode not in (None, "verify-full"):
        problems.append(f"sslrootcert=system needs sslmode verify-full, not {sslmode!r}")
    return problems


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = setting("postgresql://walacord@localhost:5432/walacor_integrity", secret=True,
                       help="libpq URL or key=value string; multi-host URLs work")
    password: str = setting("", secret=True, help="used when the URL carries no password")
    pool_min_size: int = setting(10, min=0, max=1000)
    pool_max_size: int = setting(30, min=1, max=1000)
    connect_timeout: Duration = setting(5.0, min=1, max=300)
    checkout_timeout: Duration = setting(2.0, min=0.05, max=300)
    statement_timeout: Duration = setting(30.0, min=0.1, max=86400)
    lock_timeout: Duration = setting(5.0, min=0.1, max=86400)
    idle_in_transaction_session_timeout: Duration = setting(60.0, min=1, max=86400)
    tcp_user_timeout: Duration = setting(10.0, min=1, max=3600)
    keepalives_idle: Duration = setting(10.0, min=1, max=3600)
    keepalives_interval: Duration = setting(5.0, min=1, max=3600)
    keepalives_count: int = setting(3, min=1, max=100)
    application_name: str = "walacord"

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.pool_min_size > self.pool_max_size:
            problems.append(("pool_min_size", f"{self.pool_min_size} is larger than "
                             f"pool_max_size {self.pool_max_size}; lower it or raise the max"))
        problems += [("url", problem) for problem in conninfo_problems(self.url)]
        return problems

    def conninfo(self) -> str:
        """Return the libpq string with the password and client-side timeouts merged in."""
        params = conninfo_to_dict(self.url)
        if self.password and "password" not in params:
            params["password"] = self.password
        params.setdefault("connect_timeout", str(max(1, int(self.connect_timeout))))
        params.setdefault("application_name", self.application_name)
        params.setdefault("keepalives", "1")
        params.setdefault("keepalives_idle", str(int(self.keepalives_idle)))
        params.setdefault("keepalives_interval", str(int(self.keepalives_interval)))
        params.setdefault("keepalives_count", str(self.keepalives_count))
        params.setdefault("tcp_user_timeout", str(int(self.tcp_user_timeout * 1000)))
        options = (
            f"-c statement_timeout={int(self.statement_timeout * 1000)} "
            f"-c lock_timeout={int(self.lock_timeout * 1000)} "
            f"-c idle_in_transaction_session_timeout="
            f"{int(self.idle_in_transaction_session_timeout * 1000)}"
        )
        params["options"] = f"{params.get('options') or ''} {options}".strip()
        return make_conninfo("", **params)

    def dsn_password(self) -> str:
        return str(conninfo_to_dict(self.url).get("password") or self.password or "")


@dataclass(frozen=True)
class WalacorConfig:
    url: str = setting("", help="base URL, with or without the trailing /api; empty disables")
    username: str = ""
    password: str = setting("", secret=True)
    ca_bundle: PathSetting = setting("", help="PEM file of CAs to trust instead of the "
                                     "system store")
    connect_timeout: Duration = setting(5.0, min=0.05, max=300)
    read_timeout: Duration = setting(10.0, min=0.05, max=3600)
    request_timeout: Duration = setting(30.0, min=0.1, max=3600)
    key_field: str = setting("walacord_key", help="record field holding the idempotency key")

    def check(self) -> list[tuple[str, str]]:
        problems = []
        problem = http_url_problem(self.url) if self.url else None
        if problem is not None:
            problems.append(("url", f"invalid URL {self.url!r}: {problem}"))
        if self.request_timeout < self.connect_timeout:
            problems.append(("request_timeout", f"{self.request_timeout:g}s is shorter than "
                             f"connect_timeout {self.connect_timeout:g}s; raise it"))
        if self.ca_bundle and not Path(self.ca_bundle).is_file():
            problems.append(("ca_bundle", f"file {self.ca_bundle!r} not found"))
        return problems


@dataclass(frozen=True)
class HttpConfig:
    listen: str = setting(f"127.0.0.1:{DEFAULT_HTTP_PORT}",
                          help="HOST:PORT for /metrics and /api/health; empty disables")

    def check(self) -> list[tuple[str, str]]:
        if not self.listen:
            return []
        try:
            split_listen(self.listen)
        except ValueError as exc:
            return [("listen", str(exc))]
        return []


@dataclass(frozen=True)
class ControlConfig:
    socket: PathSetting = setting("/run/walacord/control.sock",
                                  help="Unix socket path; empty disables")
    group: str = setting("walacord", help="group allowed to use the socket besides root")
    max_request_bytes: int = setting(1024 * 1024, min=1024, max=64 * 1024 * 1024)
    idle_timeout: Duration = setting(60.0, min=0.1, max=86400,
                                     help="a connection with no request for this long is closed")
    max_connections: int = setting(
        64, min=1, max=10000,
        help="open connections; at the limit the longest-idle one is closed to admit a new "
             "client, and only when all are busy is the new client rejected")
    request_timeout: Duration = setting(10.0, min=0.1, max=3600,
                                        help="time from a request's first byte to its newline")
    write_timeout: Duration = setting(10.0, min=0.1, max=3600,
                                      help="a client that reads no response for this long is "
                                           "disconnected")
    call_timeout: Duration = setting(30.0, min=0.1, max=86400,
                                     help="default deadline of one method call; long methods "
                                          "such as backups set their own")

    def check(self) -> list[tuple[str, str]]:
        problem = socket_path_problem(self.socket) if self.socket else None
        if problem is not None:
            return [("socket", f"{problem}; choose a shorter path, such as "
                               "/run/walacord/control.sock")]
        return []


@dataclass(frozen=True)
class StateConfig:
    dir: PathSetting = setting("/var/lib/walacord", help="directory for the outbox, the "
                               "alert state and the lock")

    def check(self) -> list[tuple[str, str]]:
        path = Path(self.dir)
        if path.exists() and not path.is_dir():
            return [("dir", f"{self.dir!r} exists but is not a directory; point it at a "
                            "directory walacord's user can write")]
        return []


@dataclass(frozen=True)
class LoggingConfig:
    dir: PathSetting = setting("/var/log/walacord",
                               help="directory for the log files; empty disables")
    level: str = setting("info", choices=LOG_LEVELS)
    queue_size: int = setting(10000, min=100, max=10_000_000)
    repeat_window: Duration = setting(60.0, min=1, max=86400,
                                      help="identical failures are summarised once per window")
    performance_interval: Duration = setting(60.0, min=1, max=86400,
                                             help="how often probe timings go to "
                                                  "performance.log")


@dataclass(frozen=True)
class LifecycleConfig:
    drain_timeout: Duration = setting(10.0, min=0.1, max=3600,
                                      help="how long SIGTERM waits for work to finish")
    start_timeout: Duration = setting(60.0, min=1, max=3600)
    component_stall: Duration = setting(30.0, min=1, max=3600,
                                        help="a component silent this long stops the watchdog")


# --- probes, modes and repair ----------------------------------------------------


@dataclass(frozen=True)
class ProbeSettings:
    """Schedule and hysteresis shared by every probe."""

    enabled: bool = True
    interval: Duration = setting(5.0, min=0.05, max=3600, help="time between runs")
    timeout: Duration = setting(2.0, min=0.01, max=600,
                                help="hard deadline of one run; must be below interval")
    jitter: float = setting(0.1, min=0, max=0.5,
                            help="each wait is interval * (1 +- jitter), as a fraction")
    failures_to_down: int = setting(2, min=1, max=100,
                                    help="consecutive failed runs before the probe is down")
    successes_to_up: int = setting(2, min=1, max=100,
                                   help="consecutive good runs before the probe is up")
    min_dwell: Duration = setting(1.0, min=0, max=3600,
                                  help="minimum time down before the probe can be up again")
    fast_interval: Duration = setting(0.1, min=0.01, max=600,
                                      help="interval while a change of state is suspected "
                                           "or just happened")
    fast_window: Duration = setting(10.0, min=0, max=3600,
                                    help="how long fast re-probing lasts after a change")
    flap_window: Duration = setting(300.0, min=1, max=86400)
    flap_threshold: int = setting(6, min=2, max=1000,
                                  help="changes of state within flap_window that mark "
                                       "the probe as flapping")
    flap_hold: Duration = setting(60.0, min=0, max=86400,
                                  help="a flapping probe needs this long of good runs to be up")
    slow_after: Duration = setting(1.0, min=0.001, max=600,
                                   help="a run slower than this is a warning")

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.timeout >= self.interval:
            problems.append(("timeout", f"{self.timeout:g}s is not shorter than interval "
                             f"{self.interval:g}s; lower the timeout or raise the interval"))
        if self.fast_interval > self.interval:
            problems.append(("fast_interval", f"{self.fast_interval:g}s is longer than "
                             f"interval {self.interval:g}s; lower it"))
        return problems


@dataclass(frozen=True)
class DatabaseProbeConfig(ProbeSettings):
    interval: Duration = setting(2.0, min=0.05, max=3600)
    timeout: Duration = setting(1.5, min=0.01, max=600)
    slow_after: Duration = setting(0.5, min=0.001, max=600)
    fresh_connection_every: Duration = setting(
        2.0, min=0, max=86400,
        help="how often a run also opens a brand-new connection, which is what detects "
             "a frozen postmaster; 0 means every run. Runs that see trouble always do")
    fresh_login_every: Duration = setting(
        30.0, min=0, max=86400,
        help="how often that new connection also logs in and runs SELECT 1; the others "
             "stop at the server's authentication request, which shows that the server "
             "admits a session without the SCRAM handshake's CPU. 0 means every time. "
             "Runs that see trouble always log in, and so does a libpq before 16")
    crash_watch: bool = setting(True, help="hold a LISTEN connection that sees a server "
                                           "close at once")
    heartbeat_host: str = setting("", help="row key of the write check; empty uses the "
                                           "host name")
    connections_warning: float = setting(0.8, min=0, max=1,
                                         help="fraction of max_connections in use")
    connections_critical: float = setting(0.95, min=0, max=1)
    idle_in_transaction_warning: Duration = setting(60.0, min=0, max=86400)
    idle_in_transaction_critical: Duration = setting(600.0, min=0, max=86400)
    lock_wait_warning: Duration = setting(10.0, min=0, max=86400)
    lock_wait_critical: Duration = setting(60.0, min=0, max=86400,
                                           help="a lock wait this long counts as a lockup")
    long_query_warning: Duration = setting(300.0, min=0, max=86400)
    long_query_critical: Duration = setting(3600.0, min=0, max=86400)
    max_abandoned: int = setting(4, min=1, max=100,
                                 help="timed-out calls still unwinding before runs "
                                      "stop starting new ones")

    def check(self) -> list[tuple[str, str]]:
        problems = super().check()
        pairs = (("connections", self.connections_warning, self.connections_critical),
                 ("idle_in_transaction", self.idle_in_transaction_warning,
                  self.idle_in_transaction_critical),
                 ("lock_wait", self.lock_wait_warning, self.lock_wait_critical),
                 ("long_query", self.long_query_warning, self.long_query_critical))
        for name, warning, critical in pairs:
            if warning > critical:
                problems.append((f"{name}_warning", f"{warning:g} is above "
                                 f"{name}_critical {critical:g}; lower it"))
        return problems


@dataclass(frozen=True)
class WalacorProbeConfig(ProbeSettings):
    interval: Duration = setting(15.0, min=0.05, max=3600)
    timeout: Duration = setting(10.0, min=0.01, max=600)
    slow_after: Duration = setting(2.0, min=0.001, max=600)
    fast_interval: Duration = setting(1.0, min=0.01, max=600)
    tls_expiry_warning_days: int = setting(14, min=0, max=3650)


@dataclass(frozen=True)
class HttpCheckConfig:
    url: str = setting("", help="http:// or https:// URL to GET")
    expect_status: int = setting(200, min=100, max=599)
    body_contains: str = setting("", help="text the response body must contain; "
                                          "empty skips the check")
    slow_after: Duration = setting(1.0, min=0.001, max=600)


@dataclass(frozen=True)
class ApiProbeConfig(ProbeSettings):
    interval: Duration = setting(10.0, min=0.05, max=3600)
    timeout: Duration = setting(5.0, min=0.01, max=600)
    fast_interval: Duration = setting(1.0, min=0.01, max=600)
    checks: list[HttpCheckConfig] = setting(
        default_factory=list,
        help="HTTP checks of the application; empty means not configured")

    def check(self) -> list[tuple[str, str]]:
        problems = super().check()
        for index, item in enumerate(self.checks):
            problem = http_url_problem(item.url)
            if problem is not None:
                problems.append((f"checks[{index}].url", f"invalid URL {item.url!r}: {problem}"))
        return problems


@dataclass(frozen=True)
class HostProbeConfig(ProbeSettings):
    interval: Duration = setting(10.0, min=0.05, max=3600)
    timeout: Duration = setting(5.0, min=0.01, max=600)
    fast_interval: Duration = setting(1.0, min=0.01, max=600)
    disk_warning_percent: float = setting(20.0, min=0, max=100,
                                          help="free space or inodes below this is a warning")
    disk_critical_percent: float = setting(10.0, min=0, max=100)
    memory_warning_percent: float = setting(80.0, min=0, max=100,
                                            help="memory used above this is a warning")
    memory_critical_percent: float = setting(90.0, min=0, max=100)
    swap_warning_percent: float = setting(50.0, min=0, max=100)
    fd_warning_percent: float = setting(80.0, min=0, max=100,
                                        help="walacord's open files against its limit")
    fd_critical_percent: float = setting(95.0, min=0, max=100)
    load_warning_per_cpu: float = setting(2.0, min=0, max=1000)
    clock_jump: Duration = setting(5.0, min=0.1, max=86400,
                                   help="wall clock moving this much against the monotonic "
                                        "clock is a clock jump")
    dirs: list[PathSetting] = setting(
        default_factory=list, help="more directories to watch besides state and log dirs")

    def check(self) -> list[tuple[str, str]]:
        problems = super().check()
        if self.disk_critical_percent > self.disk_warning_percent:
            problems.append(("disk_critical_percent", "is above disk_warning_percent; "
                             "critical means less free space than warning"))
        if self.memory_warning_percent > self.memory_critical_percent:
            problems.append(("memory_warning_percent", "is above memory_critical_percent; "
                             "lower it"))
        if self.fd_warning_percent > self.fd_critical_percent:
            problems.append(("fd_warning_percent", "is above fd_critical_percent; lower it"))
        return problems


@dataclass(frozen=True)
class ProbesConfig:
    database: DatabaseProbeConfig = dataclasses.field(default_factory=DatabaseProbeConfig)
    walacor: WalacorProbeConfig = dataclasses.field(default_factory=WalacorProbeConfig)
    api: ApiProbeConfig = dataclasses.field(default_factory=ApiProbeConfig)
    host: HostProbeConfig = dataclasses.field(default_factory=HostProbeConfig)

    def check(self) -> list[tuple[str, str]]:
        problems = []
        for field in dataclasses.fields(self):
            for key, message in getattr(self, field.name).check():
                problems.append((f"{field.name}.{key}", message))
        return problems


MODE_NAMES = ("normal", "degraded", "emergency", "offline")
PROBE_NAMES = ("database", "walacor", "api", "host")


@dataclass(frozen=True)
class ModesConfig:
    min_dwell: Duration = setting(1.0, min=0, max=3600,
                                  help="a mode lasts at least this long before a better "
                                       "one replaces it")
    walacor_down: str = setting("degraded", choices=("degraded", "emergency"),
                                help="mode when Walacor is down and PostgreSQL is fine")
    ignore_probes: list[str] = setting(default_factory=list,
                                       help="probes whose state never changes the mode")
    hooks: list[list[str]] = setting(
        default_factory=list,
        help="argv lists run on every mode change, with WALACORD_MODE_FROM, "
             "WALACORD_MODE_TO and WALACORD_MODE_REASON in the environment",
        example=[["/usr/local/bin/notify", "--mode"]])
    hook_timeout: Duration = setting(10.0, min=0.1, max=3600)
    override_max_ttl: Duration = setting(86400.0, min=1, max=30 * 86400)

    def check(self) -> list[tuple[str, str]]:
        problems = []
        for name in self.ignore_probes:
            if name not in PROBE_NAMES:
                problems.append(("ignore_probes", f"unknown probe {name!r}; "
                                 f"use one of {', '.join(PROBE_NAMES)}"))
        for index, argv in enumerate(self.hooks):
            if not argv:
                problems.append((f"hooks[{index}]", "empty command; write an argv list "
                                 "such as [\"/usr/local/bin/notify\", \"mode\"]"))
            elif (problem := program_problem(argv[0])) is not None:
                problems.append((f"hooks[{index}]", problem))
        return problems


@dataclass(frozen=True)
class RepairConfig:
    recycle_budget_per_hour: int = setting(6, min=0, max=1000,
                                           help="pool recycles allowed in any hour")
    restart_command: list[str] = setting(
        default_factory=list,
        help="argv run when the application API stays down, e.g. "
             "[\"systemctl\", \"restart\", \"walacor-integrity\"]; empty disables",
        example=["systemctl", "restart", "walacor-integrity"])
    restart_after: Duration = setting(30.0, min=0, max=86400,
                                      help="how long the API probe stays down first")
    restart_timeout: Duration = setting(60.0, min=0.1, max=3600)
    restart_budget: int = setting(3, min=0, max=1000,
                                  help="restarts allowed within restart_window")
    restart_window: Duration = setting(3600.0, min=1, max=7 * 86400)

    def check(self) -> list[tuple[str, str]]:
        if not self.restart_command:
            return []
        program = self.restart_command[0]
        if not program:
            return [("restart_command", "empty program name; write an argv list such as "
                     "[\"systemctl\", \"restart\", \"walacor-integrity\"]")]
        problem = program_problem(program)
        return [] if problem is None else [("restart_command", problem)]


# --- outbox -------------------------------------------------------------------------

@dataclass(frozen=True)
class OutboxStatement:
    sql: str = setting("", help="SQL with %(name)s placeholders filled from the payload")
    idempotent: bool = setting(False, help="set true to vouch for a statement that has no "
                               "ON CONFLICT or MERGE but is idempotent, such as an "
                               "UPDATE that sets absolute values")


@dataclass(frozen=True)
class OutboxConfig:
    max_operations: int = setting(1_000_000, min=1, max=1_000_000_000,
                                  help="undelivered operations kept before enqueue is rejected")
    max_bytes: int = setting(1024**3, min=1024, max=1024**4,
                             help="payload bytes of undelivered operations before rejecting")
    max_operation_bytes: int = setting(1024 * 1024, min=64, max=64 * 1024 * 1024)
    max_batch: int = setting(2000, min=1, max=100_000,
                             help="operations committed together in one transaction")
    commit_delay: Duration = setting(
        0.0003, min=0, max=0.1,
        help="maximum wait of a group commit for the callers that the previous commit "
             "acknowledged, counted from those acknowledgements; 0 turns the wait off")
    open_timeout: Duration = setting(600.0, min=1, max=86400,
                                     help="deadline for the start-up integrity check")
    write_timeout: Duration = setting(30.0, min=0.1, max=3600,
                                      help="deadline for an enqueue to become durable")
    retention: Duration = setting(7 * 86400.0, min=0, max=3650 * 86400,
                                  help="how long done operations are kept before compaction")
    compact_interval: Duration = setting(300.0, min=1, max=86400)
    wal_max_bytes: int = setting(64 * 1024 * 1024, min=1024 * 1024, max=1024**4,
                                 help="WAL size kept after a checkpoint")
    sync_interval: Duration = setting(30.0, min=0.1, max=86400,
                                      help="period of the timer that starts a sync pass")
    sync_concurrency: int = setting(16, min=1, max=1000)
    sync_batch_min: int = setting(10, min=1, max=100_000,
                                  help="batch size right after an outage")
    sync_batch_max: int = setting(500, min=1, max=100_000)
    sync_error_ratio: float = setting(0.1, min=0, max=1,
                                      help="failed share of a batch above which it shrinks")
    apply_timeout: Duration = setting(30.0, min=0.1, max=3600,
                                      help="deadline for one sink call")
    retry_initial: Duration = setting(1.0, min=0.01, max=3600)
    retry_max: Duration = setting(300.0, min=0.01, max=86400)
    dead_after_attempts: int = setting(5, min=1, max=1000,
                                       help="attempts a permanently failing operation gets")
    statements: dict[str, OutboxStatement] = setting(default_factory=dict)

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.sync_batch_min > self.sync_batch_max:
            problems.append(("sync_batch_min", f"{self.sync_batch_min} is larger than "
                             f"sync_batch_max {self.sync_batch_max}; lower it"))
        for name, statement in self.statements.items():
            key = f"statements.{name}.sql"
            if not statement.sql.strip():
                problems.append((key, "missing SQL; write sql = \"INSERT ... ON CONFLICT "
                                 "DO NOTHING\""))
            elif (problem := placeholder_problem(statement.sql)) is not None:
                problems.append((key, problem))
            elif has_several_statements(statement.sql):
                problems.append((key, "contains more than one SQL statement, so ON CONFLICT "
                                 "in one cannot make the others idempotent. Use one "
                                 "INSERT ... ON CONFLICT statement per name"))
            elif not statement.idempotent and (
                    problem := idempotency_problem(statement.sql)) is not None:
                problems.append((key, f"statement does not look idempotent: {problem}. "
                                 "Change it, or set idempotent = true if it is idempotent "
                                 "by design"))
        return problems


# --- backups -------------------------------------------------------------------------

BACKUP_FORMATS = ("custom", "plain-gzip")


@dataclass(frozen=True)
class BackupConfig:
    enabled: bool = setting(True, help="take scheduled backups and drills")
    dir: PathSetting = setting("", help="directory for dumps and manifests; empty means "
                            "<[state] dir>/backups")
    url: str = setting("", secret=True,
                       help="libpq URL of the database to back up; empty uses [database] url")
    format: str = setting("custom", choices=BACKUP_FORMATS,
                          help="custom: pg_dump -Fc; plain-gzip: plain SQL piped through gzip")
    compression_level: int = setting(6, min=0, max=9, help="0-9, passed to pg_dump -Z or gzip")
    daily_at: str = setting("02:30", help="UTC time of day HH:MM for the daily backup")
    jitter: Duration = setting(1800.0, min=0, max=43200,
                               help="maximum delay after daily_at; every host picks the same one")
    drill_interval: Duration = setting(7 * 86400.0, min=3600, max=365 * 86400,
                                       help="how often a restore drill runs")
    recheck_interval: Duration = setting(
        7 * 86400.0, min=0, max=365 * 86400,
        help="re-check each stored backup's checksum and readability once it was last "
             "checked this long ago; 0 turns the re-check off")
    retry_interval: Duration = setting(3600.0, min=1, max=86400,
                                       help="wait before retrying a failed scheduled backup")
    max_age: Duration = setting(26 * 3600.0, min=3600, max=365 * 86400,
                                help="alert when the last good backup is older than this")
    keep_days: int = setting(30, min=1, max=3650, help="keep every backup this many days")
    keep_weekly: int = setting(0, min=0, max=520,
                               help="also keep the newest backup of each of this many weeks")
    keep_monthly: int = setting(0, min=0, max=240,
                                help="also keep the newest backup of each of this many months")
    drill_tables: int = setting(10, min=1, max=1000,
                                help="largest tables whose row counts a drill compares")
    lock_wait_timeout: Duration = setting(30.0, min=0.1, max=86400,
                                          help="pg_dump gives up when a table lock takes longer")
    dump_timeout: Duration = setting(6 * 3600.0, min=1, max=7 * 86400)
    verify_timeout: Duration = setting(3600.0, min=1, max=7 * 86400)
    drill_timeout: Duration = setting(6 * 3600.0, min=1, max=7 * 86400)
    restore_timeout: Duration = setting(12 * 3600.0, min=1, max=7 * 86400)
    query_timeout: Duration = setting(30.0, min=0.1, max=3600)
    check_interval: Duration = setting(300.0, min=1, max=86400,
                                       help="how often the backup age is checked for alerts")
    pg_bindir: PathSetting = setting("", help="directory with pg_dump and pg_restore; "
                                                "empty finds one")

    def check(self) -> list[tuple[str, str]]:
        problems = []
        try:
            parse_daily_at(self.daily_at)
        except ValueError as exc:
            problems.append(("daily_at", str(exc)))
        if self.url:
            problems += [("url", problem) for problem in conninfo_problems(self.url)]
        return problems


def parse_daily_at(text: str) -> tuple[int, int]:
    """Return (hour, minute) from "HH:MM"; raise ValueError naming the value."""
    hour, sep, minute = text.partition(":")
    if (sep and hour.isdigit() and minute.isdigit() and len(minute) == 2
            and 0 <= int(hour) < 24 and 0 <= int(minute) < 60):
        return int(hour), int(minute)
    raise ValueError(f"invalid time {text!r}: write HH:MM in UTC, e.g. \"02:30\"")


# --- alerts ---------------------------------------------------------------------


@dataclass(frozen=True)
class AlertsConfig:
    alertmanager_url: str = setting("", help="Alertmanager base URL, e.g. http://127.0.0.1:9093; "
                                    "empty disables the Alertmanager sink")
    alertmanager_timeout: Duration = setting(5.0, min=0.1, max=300,
                                             help="deadline of one POST /api/v2/alerts")
    evaluation_interval: Duration = setting(1.0, min=0.1, max=3600,
                                            help="how often the alert rules are evaluated")
    repeat_interval: Duration = setting(3600.0, min=1, max=7 * 86400,
                                        help="a firing alert is sent again after this long")
    rate_limit: int = setting(30, min=1, max=100_000,
                              help="max firing notifications sent per rate_limit_window")
    rate_limit_window: Duration = setting(60.0, min=1, max=86400)
    store_timeout: Duration = setting(5.0, min=0.1, max=300,
                                      help="deadline of one read or write of alerts.db")
    queue_max_rows: int = setting(10_000, min=100, max=10_000_000,
                                  help="undelivered notifications kept; the oldest go first")
    retry_initial: Duration = setting(1.0, min=0.01, max=3600,
                                      help="first delay after a failed delivery; doubles per "
                                           "failure, with jitter")
    retry_max: Duration = setting(60.0, min=0.1, max=86400)
    restore_grace: Duration = setting(60.0, min=0, max=86400,
                                      help="after a restart, how long an alert that was "
                                           "firing waits for its condition before it "
                                           "resolves")
    recent_limit: int = setting(100, min=1, max=100_000,
                                help="resolved alerts kept for `walacorctl alerts`")
    hooks: list[list[str]] = setting(default_factory=list,
                                     help="commands run per notification, each an argv list; "
                                          "no shell. The alert JSON is on stdin and in "
                                          "$WALACORD_ALERT",
                                     example=[["/usr/local/bin/page", "--team", "db"]])
    hook_timeout: Duration = setting(10.0, min=0.1, max=3600)

    # Built-in rules: each has a threshold (where it needs one) and a `for` duration the
    # condition must hold before the alert fires.
    probe_down_for: Duration = setting(5.0, min=0, max=86400)
    mode_not_normal_for: Duration = setting(30.0, min=0, max=86400)
    slow_probe_seconds: Duration = setting(1.0, min=0.001, max=3600,
                                           help="probe latency above which it counts as slow")
    slow_probe_for: Duration = setting(60.0, min=0, max=86400)
    host_resources_for: Duration = setting(60.0, min=0, max=86400)
    outbox_pending_age_seconds: Duration = setting(300.0, min=1, max=30 * 86400,
                                                   help="age of the oldest pending outbox "
                                                        "operation that raises an alert")
    outbox_pending_age_for: Duration = setting(0.0, min=0, max=86400)
    dead_operations_for: Duration = setting(0.0, min=0, max=86400)
    conservation_failure_for: Duration = setting(0.0, min=0, max=86400)
    backup_max_age: Duration = setting(26 * 3600.0, min=60, max=365 * 86400,
                                       help="time since the last successful backup that "
                                            "raises an alert")
    backup_for: Duration = setting(0.0, min=0, max=86400)
    recycle_budget_for: Duration = setting(0.0, min=0, max=86400)
    critical_error_resolve_after: Duration = setting(900.0, min=1, max=7 * 86400,
                                                     help="a critical-error alert resolves "
                                                          "after this long without another")

    def check(self) -> list[tuple[str, str]]:
        problems = []
        problem = http_url_problem(self.alertmanager_url) if self.alertmanager_url else None
        if problem is not None:
            problems.append(("alertmanager_url",
                             f"invalid URL {self.alertmanager_url!r}: {problem}"))
        if self.retry_max < self.retry_initial:
            problems.append(("retry_max", f"{self.retry_max:g}s is shorter than retry_initial "
                             f"{self.retry_initial:g}s; raise it"))
        for index, argv in enumerate(self.hooks):
            if not argv or not argv[0]:
                problems.append((f"hooks[{index}]", "empty command; write an argv list such "
                                 "as [\"/usr/local/bin/page\", \"--team\", \"db\"]"))
            elif (problem := program_problem(argv[0])) is not None:
                problems.append((f"hooks[{index}]", problem))
        return problems


@dataclass(frozen=True)
class Config:
    environment: str = setting("production", help="free text shown in status and logs")
    database: DatabaseConfig = dataclasses.field(default_factory=DatabaseConfig)
    walacor: WalacorConfig = dataclasses.field(default_factory=WalacorConfig)
    http: HttpConfig = dataclasses.field(default_factory=HttpConfig)
    control: ControlConfig = dataclasses.field(default_factory=ControlConfig)
    state: StateConfig = dataclasses.field(default_factory=StateConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    lifecycle: LifecycleConfig = dataclasses.field(default_factory=LifecycleConfig)
    probes: ProbesConfig = dataclasses.field(default_factory=ProbesConfig)
    modes: ModesConfig = dataclasses.field(default_factory=ModesConfig)
    repair: RepairConfig = dataclasses.field(default_factory=RepairConfig)
    outbox: OutboxConfig = dataclasses.field(default_factory=OutboxConfig)
    backup: BackupConfig = dataclasses.field(default_factory=BackupConfig)
    alerts: AlertsConfig = dataclasses.field(default_factory=AlertsConfig)

    source: str = dataclasses.field(default="(defaults)", compare=False,
                                    metadata={"internal": True})

    def secrets(self) -> list[str]:
        """Return every secret value, so logs and endpoints can redact them."""
        values = [self.database.password, self.walacor.password]
        try:
            values.append(self.database.dsn_password())
            if self.backup.url:
                values.append(str(conninfo_to_dict(self.backup.url).get("password") or ""))
        except Exception:  # an unparsable URL was already reported by check()
            pass
        return [v for v in values if v]


# --- loading --------------------------------------------------------------------

ENV_OVERRIDES = {
    "DATABASE_URL": ("database", "url"),
    "WALACOR_HOST": ("walacor", "url"),
    "WALACOR_USERNAME": ("walacor", "username"),
    "WALACOR_PASSWORD": ("walacor", "password"),
    "LOG_LEVEL": ("logging", "level"),
    "ENVIRONMENT": (None, "environment"),
}
CREDENTIALS = {
    "database-password": ("database", "password"),
    "database-url": ("database", "url"),
    "walacor-password": ("walacor", "password"),
}
TRUE_WORDS = ("1", "true", "yes", "on")


def _has_settings(document: dict[str, Any]) -> bool:
    """Return True when `document` sets at least one value, not only empty tables."""
    return any(not isinstance(value, dict) or _has_settings(value)
               for value in document.values())


def _read_config_file(path: str | os.PathLike[str], source: str) -> bytes:
    """Return the bytes of the regular file at `path`, at most MAX_CONFIG_BYTES of them."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        kind = ("a directory" if stat.S_ISDIR(info.st_mode) else
                "not a regular file, and a FIFO, device or socket can block or never end")
        raise ConfigError([ConfigProblem(source, "(file)",
            f"{kind}; point --config at a TOML file")])
    with open(path, "rb") as handle:
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([ConfigProblem(source, "(file)",
            f"larger than {MAX_CONFIG_BYTES // 1024} KiB, far more than any walacord "
            "configuration; check that --config names the right file")])
    return data


def load(path: str | os.PathLike[str] | None, environ: dict[str, str] | None = None, *,
         reload: bool = False) -> Config:
    """Read, merge and validate the configuration; raise ConfigError with every problem.

    With `reload`, for a daemon that is running, a file with no settings is an error too,
    because it would put every setting back to its default.
    """
    environ = dict(os.environ if environ is None else environ)
    source = str(path) if path else "(defaults)"
    document: dict[str, Any] = {}
    if path:
        try:
            document = tomllib.loads(_read_config_file(path, source).decode("utf-8"))
        except FileNotFoundError:
            fix = ("restore it; the running daemon keeps its current configuration" if reload
                   else "pass --config PATH or set WALACORD_CONFIG")
            raise ConfigError([ConfigProblem(source, "(file)",
                f"file not found; {fix}")]) from None
        except PermissionError:
            raise ConfigError([ConfigProblem(source, "(file)",
                "permission denied; make it readable by walacord's user")]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([ConfigProblem(source, "(syntax)", f"invalid TOML: {exc}")]) from None
        except RecursionError:
            # tomllib parses nested arrays and tables recursively.
            raise ConfigError([ConfigProblem(source, "(syntax)",
                "values nested too deeply for the TOML parser; no walacord setting nests "
                "more than a few levels")]) from None
        except UnicodeDecodeError as exc:
            raise ConfigError([ConfigProblem(source, "(file)",
                f"not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8")]) from None
        except OSError as exc:
            raise ConfigError([ConfigProblem(source, "(file)",
                f"cannot read it: {exc.strerror}; pass --config with a TOML file")]) from None
        if reload and not _has_settings(document):
            raise ConfigError([ConfigProblem(source, "(file)",
                "the file contains no settings, so a reload would reset every setting to "
                "its default; an empty file or bare table headers are most often a "
                "truncated write. Restore the file and reload again")])

    decoder = Decoder(source)
    _apply_credentials(document, environ, decoder)
    _apply_environment(document, environ, decoder)
    config = decoder.decode(Config, document)
    config = dataclasses.replace(config, source=source)
    _cross_check(config, decoder)
    if decoder.problems:
        raise ConfigError(decoder.problems)
    return config


def _set(document: dict[str, Any], section: str | None, key: str, value: object) -> None:
    table = document if section is None else document.setdefault(section, {})
    if isinstance(table, dict):
        table.pop(f"{key}_file", None)
        table[key] = value


def _apply_credentials(document: dict[str, Any], environ: dict[str, str],
                       decoder: Decoder) -> None:
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return
    for name, (section, key) in CREDENTIALS.items():
        path = Path(directory) / name
        if path.exists():
            try:
                _set(document, section, key, path.read_text().strip())
                decoder.origins[f"{section}.{key}"] = f"credential {path}"
            except OSError as exc:
                decoder.problem(f"{section}.{key}", f"cannot read credential {path}: "
                                f"{exc.strerror}")


def _apply_environment(document: dict[str, Any], environ: dict[str, str],
                       decoder: Decoder) -> None:
    for variable, (section, key) in ENV_OVERRIDES.items():
        file_variable = f"{variable}_FILE"
        if environ.get(file_variable):
            try:
                _set(document, section, key, Path(environ[file_variable]).read_text().strip())
            except OSError as exc:
                decoder.problem(file_variable, f"cannot read {environ[file_variable]!r}: "
                                f"{exc.strerror}")
        elif environ.get(variable):
            value = environ[variable]
            _set(document, section, key, value.lower() if variable == "LOG_LEVEL" else value)
        else:
            continue
        full_key = f"{section}.{key}" if section else key
        decoder.origins[full_key] = f"environment {variable}"

    if environ.get("DEBUG", "").lower() in TRUE_WORDS:
        _set(document, "logging", "level", "debug")
        decoder.origins["logging.level"] = "environment DEBUG"


def _cross_check(config: Config, decoder: Decoder) -> None:
    for field in dataclasses.fields(config):
        section = getattr(config, field.name)
        check = getattr(section, "check", None)
        if check is None:
            continue
        for key, message in check():
            decoder.problem(f"{field.name}.{key}", message)


def split_listen(listen: str) -> tuple[str, int]:
    """Split "HOST:PORT" (or "[v6]:PORT"); raise ValueError naming the value."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid address {listen!r}: write HOST:PORT, e.g. "
                         f"127.0.0.1:{DEFAULT_HTTP_PORT}")
    host = host.strip("[]")
    problem = listen_host_problem(host)
    if problem is not None:
        raise ValueError(f"invalid address {listen!r}: {problem}")
    return host, int(port)


# A host name label: 1 to 63 letters, digits, underscores and hyphens, with no hyphen
# at either end.
_HOST_LABEL = re.compile(r"(?!-)[\w-]{1,63}(?<!-)")


def listen_host_problem(host: str) -> str | None:
    """Return why `host` cannot be the host of [http] listen, or None when it may be.

    An IP address must be valid. A name is checked only for its form: resolving it at
    load would be slow with a dead DNS server, and under systemd the network may not be
    up yet. A name that does not resolve fails `walacord run` with its own message.
    """
    if host == "*":
        return ("'*' is not a host; use 0.0.0.0 for every IPv4 address or [::] for every "
                "IPv6 address")
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if ":" in host:
        return f"{host!r} is not a valid IPv6 address; write one in brackets, such as [::1]"
    labels = host.removesuffix(".").split(".")
    # A name whose last label is all digits is taken as an IPv4 address, because every
    # top-level domain contains letters. getaddrinfo would take short forms such as
    # 127.1 too, which are rejected because few readers know that this means 127.0.0.1.
    if re.fullmatch(r"[0-9]+", labels[-1]):
        return (f"{host!r} is not a valid IPv4 address; write four numbers from 0 to 255, "
                "such as 127.0.0.1")
    if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        return (f"{host!r} is not a valid host name; write an IP address such as 127.0.0.1, "
                "or a name of letters, digits and hyphens such as metrics.example.internal")
    return None


_URL_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://(?P<userinfo>[^/?#]*)@")
_KV_PASSWORD = re.compile(r"password\s*=\s*(?P<value>'(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact_dsn_error(message: str, dsn: str) -> str:
    """Return libpq's parse error for `dsn` with every password candidate replaced.

    The parser quotes the token it rejects, which may be the password itself or the
    whole URL, so the password is cut out by its position in the DSN, not by name.
    """
    candidates: list[str] = []
    match = _URL_USERINFO.match(dsn)
    if match and ":" in match.group("userinfo"):
        # Everything after the first colon up to the last @, because an invalid
        # password may itself contain @ or %.
        candidates.append(match.group("userinfo").split(":", 1)[1])
    candidates += [m.group("value").strip("'") for m in _KV_PASSWORD.finditer(dsn)]
    for candidate in sorted(filter(None, candidates), key=len, reverse=True):
        message = message.replace(candidate, "***")
        message = message.replace(unquote(candidate), "***")
    return redact(" ".join(message.split()))


# --- `walacord check-config` --------------------------------------------------------


def host_warnings(config: Config) -> list[tuple[str, str]]:
    """Return (key, message) for settings that this host does not support fully.

    They are warnings, not load errors, because walacord starts with them: a missing
    [control] group only narrows who may use the socket, as the daemon logs at start
    (control.group_missing). The group database may be served over the network (LDAP,
    sssd), so load() does not read it, and a check on a build host without the group
    should not fail.
    """
    warnings = []
    control = config.control
    if control.socket and control.group:
        try:
            grp.getgrnam(control.group)
        except KeyError:
            warnings.append(("control.group", (
                f"group {control.group!r} not found on this host; walacord starts, but only "
                "root and walacord's user can use the control socket. Create the group "
                f"(groupadd {control.group}), or set [control] group to an existing group, "
                "or to \"\" to admit only root and walacord's user")))
    return warnings


def command(args: argparse.Namespace) -> int:
    path = args.path or args.config
    try:
        config = load(path)
    except ConfigError as exc:
        print(f"walacord: configuration {path} is invalid:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    warnings = host_warnings(config)
    for key, message in warnings:
        print(f"walacord: warning: {key}: {message}", file=sys.stderr)
    plural = "" if len(warnings) == 1 else "s"
    warned = f"; {len(warnings)} warning{plural} on standard error" if warnings else ""
    empty = False
    if path:
        # load() has read and parsed this regular file already, so this read is safe.
        with open(path, "rb") as handle:
            empty = not _has_settings(tomllib.load(handle))
    if empty:
        # A running walacord rejects a reload of such a file, so check-config explains it.
        print(f"{config.source}: valid, but it sets nothing: every setting is its default, "
              f"and a running walacord rejects a reload of a file with no settings{warned}")
        return 0
    print(f"{config.source}: valid{warned}")
    return 0
