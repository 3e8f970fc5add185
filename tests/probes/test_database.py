"""The database probe against a real PostgreSQL server."""

from __future__ import annotations

import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.chaos import faults
from tests.conftest import wait_until
from walacord.config import DatabaseConfig, DatabaseProbeConfig
from walacord.dbpool import DatabasePool
from walacord.pgcluster import PgCluster, free_port
from walacord.probes.base import Status
from walacord.probes.database import CrashWatcher, DatabaseProbe, ServerDrop, classify

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def running_probe(url: str, probe_config: DatabaseProbeConfig | None = None,
                        **database: object) -> AsyncIterator[DatabaseProbe]:
    config = DatabaseConfig(url=url, pool_min_size=1, pool_max_size=4, **database)  # type: ignore[arg-type]
    pool = DatabasePool(config)
    settings = probe_config or DatabaseProbeConfig(heartbeat_host="test-host")
    probe = DatabaseProbe(pool, lambda: settings)
    async with anyio.create_task_group() as tg:
        await tg.start(pool.run)
        await tg.start(probe.run)
        yield probe
        tg.cancel_scope.cancel()


async def test_database_probe_healthy(pg_db: str) -> None:
    settings = DatabaseProbeConfig(heartbeat_host="test-host", fresh_connection_every=60)
    async with running_probe(pg_db, settings) as probe:
        first = await probe.check()
        second = await probe.check()
    assert first.status is Status.OK, first.message
    assert first.details["writable"] is True
    assert first.details["fresh_connection"] == "ok"
    assert "fresh_connection" not in second.details
    assert first.details["max_connections"] == 100
    with psycopg.connect(pg_db) as conn:
        row = conn.execute("SELECT counter FROM walacord.heartbeat WHERE host = 'test-host'"
                           ).fetchone()
    assert row == (2,)


async def test_fresh_connection_every_run_at_interval(pg_db: str) -> None:
    # Equal to the interval: every run opens one, even when jitter makes a run early.
    settings = DatabaseProbeConfig(heartbeat_host="test-host", interval=2.0,
                                   fresh_connection_every=2.0)
    async with running_probe(pg_db, settings) as probe:
        first = await probe.check()
        probe._last_fresh = time.monotonic() - 1.8
        second = await probe.check()
    assert first.details["fresh_connection"] == "ok"
    assert second.details["fresh_connection"] == "ok"


async def test_fresh_connection_every_other_run(pg_db: str) -> None:
    settings = DatabaseProbeConfig(heartbeat_host="test-host", interval=1.0,
                                   fresh_connection_every=2.0)
    async with running_probe(pg_db, settings) as probe:
        first = await probe.check()
        probe._last_fresh = time.monotonic() - 1.0
        second = await probe.check()
        probe._last_fresh = time.monotonic() - 2.0
        third = await probe.check()
    assert first.details["fresh_connection"] == "ok"
    assert "fresh_connection" not in second.details
    assert third.details["fresh_connection"] == "ok"


async def test_fresh_login_every_period(pg_db: str) -> None:
    settings = DatabaseProbeConfig(heartbeat_host="test-host", fresh_connection_every=0,
                                   fresh_login_every=60)
    async with running_probe(pg_db, settings) as probe:
        first = await probe.check()
        second = await probe.check()
        probe._last_login = time.monotonic() - 60
        third = await probe.check()
    assert first.details["fresh_login"] is True
    # Between logins, the new connection stops at the authentication request.
    assert second.status is Status.OK, second.message
    assert second.details["fresh_connection"] == "ok"
    assert second.details["fresh_login"] is False
    assert third.details["fresh_login"] is True


async def test_admission_step_passes_on_healthy_server(pg_db: str) -> None:
    async with running_probe(pg_db) as probe:
        outcome = await probe._step(probe._admission_step, 2.0)
    assert outcome.failure is None, outcome.error


async def test_admission_step_over_trust_session(pg_cluster: PgCluster) -> None:
    # Over the socket the cluster trusts its clients, so no authentication request
    # comes and the new connection becomes a full session.
    url = f"host={pg_cluster.socketdir} port={pg_cluster.port} user=postgres dbname=postgres"
    async with running_probe(url) as probe:
        outcome = await probe._step(probe._admission_step, 2.0)
    assert outcome.failure is None, outcome.error


async def test_admission_step_fails_on_exhausted_connections() -> None:
    # The server checks for a free connection slot before authentication, so a new
    # connection that stops at the authentication request still reports it.
    base = Path(tempfile.mkdtemp(prefix="walacord-pg-small-"))
    small = PgCluster(base, settings={"max_connections": "6",
                                      "superuser_reserved_connections": "0"})
    small.init()
    small.start()
    hogs: list[psycopg.Connection[Any]] = []
    try:
        async with running_probe(small.url()) as probe:
            before = await probe._step(probe._admission_step, 2.0)
            while True:
                try:
                    hogs.append(psycopg.connect(small.url(), connect_timeout=5))
                except psycopg.OperationalError:
                    break
            exhausted = await probe._step(probe._admission_step, 2.0)
    finally:
        for conn in hogs:
            conn.close()
        small.destroy()
    assert before.failure is None, before.error
    assert exhausted.failure is not None
    assert "too many clients" in exhausted.error


async def test_fresh_connection_when_connections_high(pg_db: str) -> None:
    # A count at connections_warning may be max_connections running out, which only a
    # new connection shows, so every run opens one.
    settings = DatabaseProbeConfig(heartbeat_host="test-host", fresh_connection_every=60,
                                   connections_warning=0.0, connections_critical=1.0)
    async with running_probe(pg_db, settings) as probe:
        first = await probe.check()
        second = await probe.check()
    assert first.details["fresh_connection"] == "ok"
    assert second.details["fresh_connection"] == "ok"


async def test_fresh_connection_after_failure(own_pg_cluster: PgCluster) -> None:
    settings = DatabaseProbeConfig(heartbeat_host="test-host", fresh_connection_every=60,
                                   timeout=1.0)
    async with running_probe(own_pg_cluster.url(), settings) as probe:
        await probe.check()
        probe._last_fresh = -float("inf")
        # A frozen postmaster accepts no new session while the pooled one works.
        with faults.postmaster_frozen(own_pg_cluster):
            frozen = await probe.check()
        thawed = await probe.check()
        later = await probe.check()
    assert frozen.status is Status.CRITICAL
    assert frozen.reason == "timeout"
    assert thawed.status is Status.OK, thawed.message
    assert thawed.details["fresh_connection"] == "ok"
    assert "fresh_connection" not in later.details


async def test_database_probe_refused() -> None:
    url = f"postgresql://nobody:pw@127.0.0.1:{free_port()}/postgres"
    async with running_probe(url) as probe:
        result = await probe.check()
    assert result.status is Status.CRITICAL
    assert result.reason == "refused"
    assert "pw" not in result.message


async def test_database_probe_wrong_password(pg_cluster: PgCluster) -> None:
    async with running_probe(pg_cluster.url(password="wrong-pw")) as probe:
        result = await probe.check()
    assert result.reason == "auth"
    assert "wrong-pw" not in result.message


async def test_database_probe_multi_host_read_write(pg_cluster: PgCluster, pg_db: str) -> None:
    params = conninfo_to_dict(pg_db)
    dead = free_port()
    url = (f"postgresql://{params['user']}:{params['password']}@127.0.0.1:{dead},"
           f"127.0.0.1:{pg_cluster.port}/{params['dbname']}?target_session_attrs=read-write")
    async with running_probe(url) as probe:
        result = await probe.check()
    assert result.status is Status.OK, result.message


async def test_database_probe_idle_in_transaction(pg_db: str) -> None:
    settings = DatabaseProbeConfig(idle_in_transaction_warning=0.2,
                                   idle_in_transaction_critical=600)
    with psycopg.connect(pg_db) as other:
        other.execute("SELECT 1")  # psycopg opens a transaction and leaves it idle
        await anyio.sleep(0.3)
        async with running_probe(pg_db, settings) as probe:
            result = await probe.check()
    assert result.status is Status.WARNING
    assert result.reason == "idle_in_transaction"
    assert result.details["idle_in_transaction_seconds"] >= 0.2


async def test_database_probe_lock_timeout(pg_db: str) -> None:
    async with running_probe(pg_db, lock_timeout=0.2) as probe:
        await probe.check()  # creates the heartbeat table
        with psycopg.connect(pg_db) as other:
            other.execute("LOCK TABLE walacord.heartbeat IN ACCESS EXCLUSIVE MODE")
            result = await probe.check()
    assert result.status is Status.CRITICAL
    assert result.reason == "lock_timeout"
    assert result.details["recycle"] == "lockup"
    assert result.details["writable"] is False


async def test_database_probe_read_only(own_pg_cluster: PgCluster) -> None:
    async with running_probe(own_pg_cluster.url()) as probe:
        before = await probe.check()
        own_pg_cluster.psql("ALTER SYSTEM SET default_transaction_read_only = on")
        own_pg_cluster.reload()
        await anyio.sleep(0.3)
        after = await probe.check()
    assert before.status is Status.OK
    assert after.status is Status.CRITICAL
    assert after.reason == "read_only"
    assert "queries pass" in after.message
    assert after.details["recycle"] == "read_only"


async def test_database_probe_privilege_lost(own_pg_cluster: PgCluster) -> None:
    async with running_probe(own_pg_cluster.url()) as probe:
        assert (await probe.check()).status is Status.OK  # creates walacord.heartbeat
    own_pg_cluster.psql("CREATE ROLE prober LOGIN PASSWORD 'prober-pw'; "
                        "GRANT USAGE ON SCHEMA walacord TO prober; "
                        "GRANT SELECT, INSERT, UPDATE ON walacord.heartbeat TO prober")
    async with running_probe(own_pg_cluster.url(user="prober", password="prober-pw")) as probe:
        before = await probe.check()
        own_pg_cluster.psql("REVOKE INSERT, UPDATE ON walacord.heartbeat FROM prober")
        after = await probe.check()
    assert before.status is Status.OK
    assert after.status is Status.CRITICAL
    assert after.reason == "privilege"
    assert after.details["recycle"] == "privilege"


async def test_crash_watcher_sees_immediate_stop(own_pg_cluster: PgCluster) -> None:
    pool = DatabasePool(DatabaseConfig(url=own_pg_cluster.url()))
    events: list[tuple[str, float]] = []
    watcher = CrashWatcher(pool, lambda event: events.append((event, time.monotonic())),
                           lambda: 2.0)
    async with anyio.create_task_group() as tg:
        await tg.start(watcher.run)
        await wait_until(lambda: watcher.connected, 5)
        await anyio.to_thread.run_sync(lambda: own_pg_cluster.stop("immediate"))
        stopped = time.monotonic()
        await wait_until(lambda: events, 5, step=0.002)
        await anyio.to_thread.run_sync(own_pg_cluster.start)
        await wait_until(lambda: len(events) >= 2, 10)
        tg.cancel_scope.cancel()
    assert events[0][0] == "connection_dropped"
    # pg_ctl returns after the server is gone, so the drop is seen before that.
    assert events[0][1] - stopped < 0.1
    assert events[1][0] == "server_back"



async def watched_drop(probe: DatabaseProbe, drop_server: Callable[[], object]) -> ServerDrop:
    """Hold a LISTEN connection, run `drop_server` in a thread, and return the drop seen."""
    events: list[str] = []
    watcher = CrashWatcher(probe.pool, events.append, lambda: 2.0)
    async with anyio.create_task_group() as tg:
        await tg.start(watcher.run)
        await wait_until(lambda: watcher.connected, 5)
        await anyio.to_thread.run_sync(drop_server)
        await wait_until(lambda: events, 5, step=0.002)
        tg.cancel_scope.cancel()
    assert events[0] == "connection_dropped"
    assert watcher.last_drop is not None
    return watcher.last_drop


async def test_database_probe_immediate_stop(own_pg_cluster: PgCluster) -> None:
    async with running_probe(own_pg_cluster.url()) as probe:
        before = await probe.check()
        drop = await watched_drop(probe, lambda: own_pg_cluster.stop("immediate"))
        probe.note_server_drop(drop)
        began = time.monotonic()
        result = await probe.check()
        took = time.monotonic() - began
        own_pg_cluster.start()
    assert before.status is Status.OK
    assert drop.sqlstate == "57P01"
    assert drop.severity == "WARNING"
    assert drop.server_stopping
    assert result.status is Status.CRITICAL
    assert result.reason == "connection_lost"
    assert result.details["definitive"] is True
    assert "fresh_connection" not in result.details
    assert "57P01" in result.message
    assert took < 0.1


async def test_database_probe_terminated_backends(pg_db: str) -> None:
    def terminate_walacord_backends() -> None:
        with psycopg.connect(pg_db, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()")

    async with running_probe(pg_db) as probe:
        await probe.check()
        drop = await watched_drop(probe, terminate_walacord_backends)
        probe.note_server_drop(drop)
        result = await probe.check()
    # The server is up and a new connection works, so the probe requests a pool recycle.
    assert drop.sqlstate == "57P01"
    assert drop.severity == "FATAL"
    assert not drop.server_stopping
    assert result.status is Status.CRITICAL
    assert result.reason == "connection_lost"
    assert result.details["fresh_connection"] == "ok"
    assert result.details["recycle"] == "broken_connections"
    assert not result.details.get("definitive")


DROPS = [
    ("57P01", "WARNING", True),   # immediate stop, measured on PostgreSQL 15
    ("57P02", "WARNING", True),   # crash of another server process
    ("57P03", "FATAL", True),     # cannot_connect_now
    ("57P01", "FATAL", False),    # pg_terminate_backend() or a fast shutdown
    (None, None, False),          # closed with no message
]


@pytest.mark.parametrize(("sqlstate", "severity", "stopping"), DROPS)
def test_server_drop_stopping(sqlstate: str | None, severity: str | None,
                              stopping: bool) -> None:
    drop = ServerDrop(0.0, sqlstate, severity, "x")
    assert drop.server_stopping is stopping


CLASSES = [
    (psycopg.errors.ReadOnlySqlTransaction("x"), "read_only"),
    (psycopg.errors.LockNotAvailable("x"), "lock_timeout"),
    (psycopg.errors.DiskFull("x"), "disk_full"),
    (psycopg.errors.CannotConnectNow("the database system is shutting down"), "shutting_down"),
    (psycopg.OperationalError("connection failed: Connection refused"), "refused"),
    (psycopg.OperationalError("consuming input failed: server closed the connection "
                              "unexpectedly"), "connection_lost"),
    (TimeoutError(), "timeout"),
    # libpq's texts for failures at connect, which carry no SQLSTATE in psycopg.
    (psycopg.OperationalError('connection failed: connection to server at "127.0.0.1", '
                              "port 5432 failed: fe_sendauth: no password supplied"), "auth"),
    (psycopg.OperationalError('connection failed: connection to server at "127.0.0.1", '
                              "port 5432 failed: FATAL:  sorry, too many clients already"),
     "too_many_connections"),
]


@pytest.mark.parametrize(("error", "reason"), CLASSES,
                         ids=[f"{r}-{i}" for i, (_, r) in enumerate(CLASSES)])
def test_classify_errors(error: BaseException, reason: str) -> None:
    assert classify(error) == reason


@pytest.mark.parametrize("options", ["sslmode=bogus", "require_auth=bogus",
                                     "port=abc", "port=99999",
                                     "connect_timeout=often",
                                     "sslmode=prefer sslnegotiation=direct"])
def test_classify_invalid_option_as_config(options: str) -> None:
    """libpq rejects such an option only when it connects, with no SQLSTATE. The
    connection string is wrong, so no pool recycle or reconnect can help."""
    with tempfile.TemporaryDirectory() as directory, pytest.raises(psycopg.Error) as caught:
        # A directory without a socket: libpq checks the options and then fails to
        # connect without reaching any server.
        psycopg.connect(f"host={directory} {options}")

    assert classify(caught.value) == "config", str(caught.value)


def test_classify_starting_up_is_not_shutdown() -> None:
    error = psycopg.errors.CannotConnectNow("FATAL:  the database system is starting up")
    assert classify(error) == "starting_up"


def _sessions(pg_db: str) -> int:
    database = pg_db.rsplit("/", 1)[1]
    with psycopg.connect(pg_db, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                           "AND pid <> pg_backend_pid()", (database,)).fetchone()
    assert row is not None
    return int(row[0])


async def test_paused_pool_and_watcher_hold_no_session(pg_db: str) -> None:
    """While paused, the pool and the crash watch keep no session and open none; after
    resume both connect again."""
    pool = DatabasePool(DatabaseConfig(url=pg_db, pool_min_size=2, pool_max_size=4))
    watcher = CrashWatcher(pool, lambda event: None, lambda: 2.0)
    async with anyio.create_task_group() as tg:
        await tg.start(pool.run)
        await tg.start(watcher.run)
        await wait_until(lambda: watcher.connected and pool.connections()["size"] == 2, 10)

        await watcher.pause()
        await pool.pause("restore")
        await anyio.sleep(0.5)  # the watcher's reconnect backoff is at most 0.5 s
        assert await anyio.to_thread.run_sync(_sessions, pg_db) == 0
        with pytest.raises(psycopg.OperationalError, match="restore"):
            await pool.connect()

        await pool.resume()
        watcher.resume()
        await wait_until(lambda: watcher.connected and pool.connections()["size"] == 2, 10)
        assert await anyio.to_thread.run_sync(_sessions, pg_db) == 3
        tg.cancel_scope.cancel()


async def test_stopped_pool_does_not_reopen(pg_db: str) -> None:
    """A resume that comes after the daemon stopped the pool, as from a restore that
    shutdown cancels, opens nothing that would keep the process alive."""
    pool = DatabasePool(DatabaseConfig(url=pg_db, pool_min_size=1, pool_max_size=2))
    async with anyio.create_task_group() as tg:
        await tg.start(pool.run)
        await pool.pause("restore")
        tg.cancel_scope.cancel()
    try:
        await pool.resume()
        await pool.recycle()
        assert pool.pool.closed
    finally:
        # An open pool's workers would keep the test's event loop from ending.
        with anyio.move_on_after(5):
            for left in (pool.pool, *pool.closing):
                await left.close(timeout=1)
