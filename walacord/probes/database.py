"""The database probe: pooled and fresh-connection checks, a write check, server figures,
and a held connection that sees a server close at once.

Each step runs through an `Abandoner` with its own share of the run's deadline, so a
pooled connection stuck on a frozen backend cannot hide whether a brand-new
connection works. A connection whose step was abandoned is closed, never put back.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import anyio
import psycopg
from anyio.abc import TaskStatus
from psycopg import AsyncConnection, pq
from psycopg_pool import PoolClosed, PoolTimeout

from walacord.config import DatabaseProbeConfig
from walacord.dbpool import DatabasePool
from walacord.probes.base import Abandoner, ProbeResult, Status

log = logging.getLogger(__name__)

HEARTBEAT_DDL = """
CREATE SCHEMA IF NOT EXISTS walacord;
CREATE TABLE IF NOT EXISTS walacord.heartbeat (
    host text PRIMARY KEY,
    beat_at timestamptz NOT NULL,
    counter bigint NOT NULL DEFAULT 0
)
"""
HEARTBEAT_WRITE = """
INSERT INTO walacord.heartbeat (host, beat_at, counter) VALUES (%s, now(), 1)
ON CONFLICT (host) DO UPDATE SET beat_at = now(), counter = walacord.heartbeat.counter + 1
"""
# One round trip for every server figure; pg_locks.waitstart needs PostgreSQL 14.
FIGURES = """
SELECT
  current_setting('max_connections')::int,
  (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'),
  (SELECT coalesce(extract(epoch FROM max(now() - state_change)), 0)
     FROM pg_stat_activity WHERE state LIKE 'idle in transaction%%'),
  (SELECT coalesce(extract(epoch FROM max(now() - query_start)), 0)
     FROM pg_stat_activity
     WHERE state = 'active' AND backend_type = 'client backend' AND pid <> pg_backend_pid()),
  (SELECT coalesce(extract(epoch FROM max(now() - waitstart)), 0)
     FROM pg_locks WHERE NOT granted),
  (SELECT coalesce(array_agg(DISTINCT b), '{}') FROM pg_locks l,
          unnest(pg_blocking_pids(l.pid)) AS b
     WHERE NOT l.granted AND now() - l.waitstart > make_interval(secs => %s))
"""

# SQLSTATE -> reason class.
SQLSTATE_REASONS = {
    "25006": "read_only",          # read_only_sql_transaction
    "53100": "disk_full",
    "55P03": "lock_timeout",       # lock_not_available
    "57014": "statement_timeout",  # query_canceled
    "57P01": "connection_lost",    # admin_shutdown
    "57P02": "connection_lost",    # crash_shutdown
    "57P03": "shutting_down",      # cannot_connect_now
    "53300": "too_many_connections",
    "28P01": "auth",
    "28000": "auth",
    "3D000": "config",             # invalid_catalog_name: the database does not exist
    "42501": "privilege",
}
# libpq's messages for a connection option it rejects before connecting, such as
# 'invalid sslmode value: "bogus"' or 'invalid port number: "99999"' (libpq 18's
# English texts), and psycopg's for connect_timeout. They carry no SQLSTATE.
INVALID_OPTION = re.compile(
    r'invalid (?:"?\w+"? value|integer value|port number|ssl protocol version range)'
    r"|weak sslmode|require_auth method|bad value for connect_timeout")
# New-connection failures that prove the server cannot serve right now.
DEFINITIVE_FAILURES = frozenset({"refused", "shutting_down"})
# libpq's require_auth (libpq 16 and later) lets a new connection stop at the server's
# authentication request. With "none", libpq fails with this text when the server
# requests any authentication (libpq's English message, checked with libpq 18).
ADMISSION_STOP = 'authentication method requirement "none" failed'
REQUIRE_AUTH_LIBPQ = 160000
# Failure reasons that a new pool can fix, mapped to the recycle trigger they name.
RECYCLE_TRIGGERS = {
    "checkout_timeout": "checkout_timeout",
    "connection_lost": "broken_connections",
    "read_only": "read_only",
    "lock_timeout": "lockup",
    "lockup": "lockup",
    # Sessions keep the role they logged in as. After the role is dropped and created
    # again, only new sessions get the new role's grants.
    "privilege": "privilege",
    "timeout": "checkout_timeout",
}


async def _select_one_and_close(conn: AsyncConnection[Any]) -> None:
    """Run SELECT 1 on a new connection, then close it, even when cancelled."""
    try:
        await conn.execute("SELECT 1")
    finally:
        with anyio.CancelScope(shield=True):
            await conn.close()


def classify(exc: BaseException) -> str:
    """Return the reason class of a psycopg or pool error."""
    if isinstance(exc, PoolTimeout):
        return "checkout_timeout"
    if isinstance(exc, PoolClosed):
        return "pool_closed"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, psycopg.Error):
        sqlstate = getattr(exc, "sqlstate", None)
        text = str(exc).lower()
        # 57P03 also means "starting up" and "not yet accepting connections"; only a
        # shutdown is a reason to let go of the pool.
        if sqlstate in SQLSTATE_REASONS and not (sqlstate == "57P03" and "shutting" not in text):
            return SQLSTATE_REASONS[sqlstate]
        if sqlstate is None and INVALID_OPTION.search(text):
            return "config"
        for needle, reason in (
            ("starting up", "starting_up"),
            ("not yet accepting connections", "starting_up"),
            ("connection refused", "refused"),
            ("no such file or directory", "refused"),
            ("timeout expired", "timeout"),
            ("could not translate host name", "dns"),
            ("name or service not known", "dns"),
            ("password authentication failed", "auth"),
            # libpq's own message when the server requests a password and none is set.
            ("no password supplied", "auth"),
            ("too many clients already", "too_many_connections"),
            ("remaining connection slots are reserved", "too_many_connections"),
            ("shutting down", "shutting_down"),
            ("read-only", "read_only"),
            ("hot standby", "read_only"),
            ("the connection is closed", "connection_lost"),
            ("server closed the connection", "connection_lost"),
            ("consuming input failed", "connection_lost"),
            ("connection lost", "connection_lost"),
            ("terminating connection", "connection_lost"),
            ("no connection to the server", "connection_lost"),
        ):
            if needle in text:
                return reason
        if isinstance(exc, psycopg.OperationalError):
            return "connection_lost"
        return "error"
    return "error"


def describe(exc: BaseException) -> str:
    """Return the first line of an error, which never contains the connection string."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


@dataclass
class StepOutcome:
    """Outcome of one step: the reason class of its failure (None when it passed)."""

    failure: str | None = None
    error: str = ""
    latency: float = 0.0
    write_failure: str | None = None
    write_error: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    # For a new connection: whether it logged in, rather than stopping at the
    # server's authentication request.
    login: bool = False


class DatabaseProbe:
    """Checks PostgreSQL through the pool and on fresh connections."""

    name = "database"

    def __init__(self, pool: DatabasePool, settings: Callable[[], DatabaseProbeConfig]) -> None:
        self.pool = pool
        self._settings = settings
        self.abandoner = Abandoner()
        self._last_fresh = -float("inf")
        self._last_login = -float("inf")
        self._fresh_failed = False
        self._schema_ready_generation = 0
        self._checkout_timeout = 1.0
        self._server_drop: ServerDrop | None = None

    def settings(self) -> DatabaseProbeConfig:
        return self._settings()

    def configured(self) -> bool:
        return True

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self.abandoner.run(task_status=task_status)

    def note_server_drop(self, drop: ServerDrop | None) -> None:
        """Store what the crash watcher saw, for the next run only. None clears it."""
        self._server_drop = drop

    # --- one run ----------------------------------------------------------------

    async def check(self) -> ProbeResult:
        settings = self.settings()
        step_deadline = settings.timeout * 0.45

        # Step 1: the server figures and the write check on a pooled connection.
        self._checkout_timeout = min(self.pool.config.checkout_timeout, step_deadline * 0.8)
        drop, self._server_drop = self._server_drop, None
        pooled = await self._step(self._pooled_step, step_deadline)

        # The server sent the held connection a message that only a server going down
        # sends, and the pooled connection is lost too, so skip the new connection.
        # During an immediate stop a new connection often fails with a bare close,
        # which is not definitive, and a second run to confirm costs a fast interval.
        if (pooled.failure == "connection_lost" and drop is not None and drop.server_stopping
                and time.monotonic() - drop.at <= settings.timeout):
            return self._server_stopping_verdict(pooled, drop)

        # Step 2: a brand-new connection, when due or when this run or the last showed
        # trouble. Most routine ones stop at the server's authentication request.
        fresh: StepOutcome | None = None
        now = time.monotonic()
        login_needed = self._login_needed(pooled, settings)
        if login_needed or self._due(self._last_fresh, settings.fresh_connection_every, now):
            self._last_fresh = now
            fresh = await self._fresh(login_needed, settings, now, step_deadline)
            self._fresh_failed = fresh.failure is not None

        return self._verdict(pooled, fresh, settings)

    def _login_needed(self, pooled: StepOutcome, settings: DatabaseProbeConfig) -> bool:
        """Return whether this run found trouble, so it must open a new connection and log in.

        Trouble is a failed pooled step or write check, or a failed new connection on
        the last try. So is a connection count at its warning threshold, because that is
        how max_connections exhaustion begins.
        """
        if pooled.failure is not None or pooled.write_failure is not None:
            return True
        if self._fresh_failed:
            return True
        figures = pooled.figures
        return bool(figures) and (figures["connections"] / max(1, figures["max_connections"])
                                  >= settings.connections_warning)

    def _due(self, last: float, every: float, now: float) -> bool:
        # Due on the run nearest to `every` after `last`, so jittered runs at an interval
        # equal to `every` each do it.
        return now - last >= every - self.settings().interval / 2

    async def _fresh(self, login_needed: bool, settings: DatabaseProbeConfig, now: float,
                     deadline: float) -> StepOutcome:
        """Open a new connection: a full login, or up to the authentication request.

        The SCRAM handshake of a login is most of the probe's CPU, so a routine run logs
        in every `fresh_login_every` only. The other runs stop once the server requests
        authentication. By then the postmaster has forked a backend, which found a free
        slot below max_connections and saw no shutdown. A frozen postmaster, exhausted
        connections and a server going down all fail before that point, as they do for
        a login. A rejected password or a dropped database do not, so those wait for the
        next login.
        """
        login = (login_needed or pq.version() < REQUIRE_AUTH_LIBPQ
                 or self._due(self._last_login, settings.fresh_login_every, now))
        if not login:
            admitted = await self._step(self._admission_step, deadline)
            # A failure other than a timeout may be libpq's stop message in another
            # language, so a login settles it.
            if admitted.failure is None or admitted.failure == "timeout":
                return admitted
        self._last_login = now
        outcome = await self._step(self._fresh_step, deadline)
        outcome.login = True
        return outcome

    async def _step(self, function: Callable[[], Any], deadline: float) -> StepOutcome:
        limit = self.settings().max_abandoned
        if self.abandoner.outstanding >= limit:
            # Calls on a frozen server pile up; stop adding to them until they unwind.
            return StepOutcome("timeout", f"{self.abandoner.outstanding} earlier calls are "
                               "still blocked past their deadline")
        began = time.monotonic()
        try:
            outcome: StepOutcome = await self.abandoner.call(function, deadline)
        except TimeoutError:
            return StepOutcome("timeout", f"no answer within {deadline:.3g}s",
                               time.monotonic() - began)
        except Exception as exc:
            return StepOutcome(classify(exc), describe(exc), time.monotonic() - began)
        outcome.latency = time.monotonic() - began
        return outcome

    async def _pooled_step(self) -> StepOutcome:
        pool = self.pool.pool
        if pool.closed:
            return StepOutcome("pool_closed", "the pool is closed while the server shuts down")
        settings = self.settings()
        conn = await pool.getconn(timeout=self._checkout_timeout)
        discard = True
        try:
            # The figures query is the read check too: it fails as a SELECT 1 would when
            # the session cannot run queries, and one round trip fewer saves CPU.
            outcome = StepOutcome(figures=await self._figures(conn, settings))
            try:
                await self._write_heartbeat(conn, settings)
            except psycopg.Error as exc:
                if classify(exc) == "connection_lost":
                    raise
                outcome.write_failure = classify(exc)
                outcome.write_error = describe(exc)
            discard = conn.broken
            return outcome
        finally:
            # Shielded: a cancelled step must still hand the connection back, closed.
            with anyio.CancelScope(shield=True):
                if discard:
                    await conn.close()
                await pool.putconn(conn)

    async def _write_heartbeat(self, conn: AsyncConnection[Any],
                               settings: DatabaseProbeConfig) -> None:
        if self._schema_ready_generation != self.pool.generation:
            cursor = await conn.execute("SELECT to_regclass('walacord.heartbeat')")
            row = await cursor.fetchone()
            if row is None or row[0] is None:
                await conn.execute(HEARTBEAT_DDL)
            self._schema_ready_generation = self.pool.generation
        host = settings.heartbeat_host or socket.gethostname()
        try:
            await conn.execute(HEARTBEAT_WRITE, (host,))
        except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
            # Dropped, or lost in crash recovery when the server runs without
            # synchronous_commit: create it again and write once more.
            await conn.execute(HEARTBEAT_DDL)
            await conn.execute(HEARTBEAT_WRITE, (host,))

    async def _figures(self, conn: AsyncConnection[Any],
                       settings: DatabaseProbeConfig) -> dict[str, Any]:
        cursor = await conn.execute(FIGURES, (settings.lock_wait_critical,))
        row = await cursor.fetchone()
        assert row is not None
        return {"max_connections": int(row[0]), "connections": int(row[1]),
                "idle_in_transaction_seconds": float(row[2]),
                "longest_query_seconds": float(row[3]),
                "lock_wait_seconds": float(row[4]), "blocking_pids": list(row[5])}

    async def _fresh_step(self) -> StepOutcome:
        await _select_one_and_close(await self.pool.connect())
        return StepOutcome()

    async def _admission_step(self) -> StepOutcome:
        try:
            conn = await self.pool.connect(require_auth="none")
        except psycopg.OperationalError as exc:
            if exc.sqlstate is None and ADMISSION_STOP in str(exc):
                return StepOutcome()
            raise
        # The server requested no authentication (trust), so this is a full session.
        await _select_one_and_close(conn)
        return StepOutcome()

    # --- verdict ----------------------------------------------------------------

    def _verdict(self, pooled: StepOutcome, fresh: StepOutcome | None,
                 settings: DatabaseProbeConfig) -> ProbeResult:
        details: dict[str, Any] = {
            "pool": self.pool.connections(),
            "select_latency_seconds": round(pooled.latency, 6),
            "writable": pooled.failure is None and pooled.write_failure is None,
            "reachable": pooled.failure is None or (fresh is not None and fresh.failure is None),
            **pooled.figures,
        }
        if fresh is not None:
            details["fresh_connection"] = (
                "ok" if fresh.failure is None else f"{fresh.failure}: {fresh.error}")
            details["fresh_latency_seconds"] = round(fresh.latency, 6)
            details["fresh_login"] = fresh.login

        # Failures, most telling first.
        if pooled.failure is not None:
            fresh_ok = fresh is not None and fresh.failure is None
            if fresh_ok:
                reason = pooled.failure
                message = (f"the pooled connection failed ({pooled.failure}: {pooled.error}) "
                           "while a new connection works")
                details["recycle"] = RECYCLE_TRIGGERS.get(pooled.failure)
            else:
                assert fresh is not None
                reason = fresh.failure or pooled.failure
                message = f"cannot connect ({reason}: {fresh.error or pooled.error})"
                # Both the pooled and a new connection failed, and the new one was
                # refused or rejected with "shutting down", so no streak is needed.
                details["definitive"] = fresh.failure in DEFINITIVE_FAILURES
            if reason == "shutting_down" or pooled.failure == "pool_closed":
                details["release"] = reason == "shutting_down"
            return ProbeResult(Status.CRITICAL, reason, message, details=details)
        if pooled.write_failure is not None:
            details["recycle"] = RECYCLE_TRIGGERS.get(pooled.write_failure)
            return ProbeResult(Status.CRITICAL, pooled.write_failure,
                               f"the write check failed ({pooled.write_error}) while "
                               "queries pass", details=details)
        if fresh is not None and fresh.failure is not None:
            if fresh.failure == "shutting_down":
                details["release"] = True
                return ProbeResult(Status.CRITICAL, "shutting_down",
                                   f"the server is shutting down ({fresh.error})", details=details)
            # The pool's sessions still work, but no new session can start. The cause is a
            # frozen or overloaded postmaster, or max_connections reached.
            return ProbeResult(Status.CRITICAL, fresh.failure,
                               f"a new connection fails ({fresh.failure}: {fresh.error}) "
                               "while pooled connections work", details=details)
        return self._figures_verdict(pooled.figures, details, settings)

    def _server_stopping_verdict(self, pooled: StepOutcome, drop: ServerDrop) -> ProbeResult:
        details: dict[str, Any] = {
            "pool": self.pool.connections(),
            "select_latency_seconds": round(pooled.latency, 6),
            "writable": False,
            "reachable": False,
            "server_message": f"{drop.sqlstate} {drop.severity}: {drop.message}",
            "definitive": True,
        }
        return ProbeResult(
            Status.CRITICAL, "connection_lost",
            f"the server is going down: it closed the held connection with "
            f"SQLSTATE {drop.sqlstate} ({drop.message}), and the pooled connection "
            f"failed ({pooled.error})", details=details)

    def _figures_verdict(self, figures: dict[str, Any], details: dict[str, Any],
                         settings: DatabaseProbeConfig) -> ProbeResult:
        critical: list[tuple[str, str]] = []
        warning: list[tuple[str, str]] = []
        used = figures["connections"] / max(1, figures["max_connections"])
        checks = (
            ("connections", used, settings.connections_warning, settings.connections_critical,
             f"{figures['connections']} of {figures['max_connections']} connections in use"),
            ("idle_in_transaction", figures["idle_in_transaction_seconds"],
             settings.idle_in_transaction_warning, settings.idle_in_transaction_critical,
             f"a session idle in transaction for {figures['idle_in_transaction_seconds']:.0f}s"),
            ("lockup", figures["lock_wait_seconds"], settings.lock_wait_warning,
             settings.lock_wait_critical,
             f"a lock wait of {figures['lock_wait_seconds']:.0f}s, blocked by pids "
             f"{figures['blocking_pids']}"),
            ("long_query", figures["longest_query_seconds"], settings.long_query_warning,
             settings.long_query_critical,
             f"a query running for {figures['longest_query_seconds']:.0f}s"),
        )
        for reason, value, warn_at, critical_at, text in checks:
            if value >= critical_at:
                critical.append((reason, text))
            elif value >= warn_at:
                warning.append((reason, text))

        pool = details["pool"]
        if pool["waiting"] > 0 or (pool["size"] >= self.pool.config.pool_max_size
                                   and pool["idle"] == 0):
            warning.append(("pool_saturated", f"the pool is saturated ({pool['used']} used, "
                            f"{pool['waiting']} waiting)"))

        # Past a critical threshold is still a warning here: PostgreSQL takes writes, and
        # the write check fails on its own (lock_timeout) when walacord is stuck behind
        # the lockup, which is what recycles the pool.
        if critical:
            return ProbeResult(Status.WARNING, critical[0][0],
                               "; ".join(text for _, text in critical + warning),
                               details=details)
        if warning:
            return ProbeResult(Status.WARNING, warning[0][0],
                               "; ".join(text for _, text in warning), details=details)
        return ProbeResult(Status.OK, "ok", "queries and the write check pass",
                           details=details)


@dataclass(frozen=True)
class ServerDrop:
    """The server's last message on the held connection before it closed, if any."""

    at: float  # time.monotonic()
    sqlstate: str | None
    severity: str | None  # not localized: "FATAL", "WARNING", ...
    message: str

    @property
    def server_stopping(self) -> bool:
        """True when only a server going down sends this message.

        The idle LISTEN connection receives the server's last message as a notice.
        On PostgreSQL 15, an immediate stop sends 57P01 at WARNING, and the crash of
        another server process sends 57P02. 57P03 means the server rejects sessions.
        pg_terminate_backend() and a fast shutdown both send 57P01 at FATAL. So that
        message does not prove that the server is down, and neither does a close with
        no message at all, which an idle timeout in a proxy also causes.
        """
        if self.sqlstate in ("57P02", "57P03"):
            return True
        return self.sqlstate == "57P01" and self.severity == "WARNING"


class CrashWatcher:
    """Holds one LISTEN connection and calls `on_change` the moment the server drops it.

    The connection waits for notifications on its socket, so a server that exits,
    restarts or kills the session makes the socket readable at once. The watcher then
    reconnects with a short backoff and calls `on_change` again when the server is back.
    `last_drop` stores what the server sent before the drop that `on_change` reports.
    """

    name = "database-watch"
    BACKOFF_MIN = 0.05
    BACKOFF_MAX = 0.5
    BACKOFF_REJECTED = 30.0

    def __init__(self, pool: DatabasePool, on_change: Callable[[str], None],
                 connect_timeout: Callable[[], float]) -> None:
        self.pool = pool
        self.on_change = on_change
        self.connect_timeout = connect_timeout
        self.connected = False
        self.drops = 0
        self.last_drop: ServerDrop | None = None
        self._held: anyio.CancelScope | None = None
        # Set by pause(): the event that resume() sets, and the one set once the held
        # connection is closed.
        self._resumed: anyio.Event | None = None
        self._closed = anyio.Event()
        self._closed.set()

    def release(self) -> None:
        """Close the held connection now; the watcher then reconnects with backoff."""
        if self._held is not None:
            self._held.cancel()

    async def pause(self) -> None:
        """Close the held connection and open none until resume(); return once closed."""
        if self._resumed is None:
            self._resumed = anyio.Event()
        self.release()
        await self._closed.wait()

    def resume(self) -> None:
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        backoff = self.BACKOFF_MIN
        while True:
            while self._resumed is not None:
                await self._resumed.wait()
            self._closed = anyio.Event()
            try:
                with anyio.fail_after(self.connect_timeout()):
                    conn = await self.pool.connect()
                    await conn.execute("LISTEN walacord_watch")
            except (psycopg.Error, TimeoutError, OSError) as exc:
                self._closed.set()
                if self._resumed is not None:
                    continue  # paused meanwhile: wait for resume(), then connect

                # A server that is down comes back soon, so retry fast; a rejected login
                # or a missing database needs a person, so do not flood the server log.
                rejected = classify(exc) in ("auth", "config", "privilege")
                await anyio.sleep(self.BACKOFF_REJECTED if rejected else backoff)
                backoff = min(self.BACKOFF_MAX, backoff * 2)
                continue

            backoff = self.BACKOFF_MIN
            if not self.connected and self.drops:
                self.on_change("server_back")
            self.connected = True
            notices: list[ServerDrop] = []
            conn.add_notice_handler(partial(_keep_notice, notices))
            try:
                with anyio.CancelScope() as self._held:
                    if self._resumed is not None:
                        # Paused while connecting: close this connection at once.
                        self._held.cancel()
                    await _wait_until_closed(conn)
                if self._held.cancel_called:
                    self.connected = False
                    self.drops += 1
            except psycopg.Error as exc:
                self.connected = False
                self.drops += 1
                self.last_drop = _last_word(exc, notices)
                log.info("database.connection_dropped", extra={"fields": {
                    "reason": classify(exc), "error": describe(exc),
                    "sqlstate": self.last_drop.sqlstate,
                    "server_message": self.last_drop.message}})
                self.on_change("connection_dropped")
            finally:
                self._held = None
                with anyio.CancelScope(shield=True):
                    await conn.close()
                self._closed.set()


async def _wait_until_closed(conn: AsyncConnection[Any]) -> None:
    """Read what the server sends on an idle connection until psycopg raises for the close.

    `conn.notifies()` without a timeout wakes every 0.1 s (psycopg 3.3 waits in slices
    of its 0.1 s interval), which costs ten event-loop rounds a second. This waits for
    the socket to become readable, so it wakes only when the server sends something.
    `notifies(timeout=0)` then reads what arrived: notices go to the notice handlers,
    and a closed socket raises `psycopg.OperationalError`.
    """
    while True:
        await anyio.wait_readable(conn.pgconn.socket)
        async for _ in conn.notifies(timeout=0):
            pass


def _server_drop(diag: psycopg.errors.Diagnostic) -> ServerDrop:
    # Read the fields at once: a notice's Diagnostic is empty after its handler returns.
    return ServerDrop(time.monotonic(), diag.sqlstate, diag.severity_nonlocalized,
                      diag.message_primary or "")


def _keep_notice(notices: list[ServerDrop], diag: psycopg.errors.Diagnostic) -> None:
    # Only the latest notice matters, so the list never grows past one item.
    notices[:] = [_server_drop(diag)]


def _last_word(exc: psycopg.Error, notices: list[ServerDrop]) -> ServerDrop:
    # An error in reply to a command carries the server's message itself. An idle
    # connection gets it as a notice just before the socket closes, and psycopg then
    # raises a bare "server closed the connection unexpectedly".
    if exc.sqlstate:
        return _server_drop(exc.diag)
    if notices:
        return replace(notices[-1], at=time.monotonic())
    return ServerDrop(time.monotonic(), None, None, "")
