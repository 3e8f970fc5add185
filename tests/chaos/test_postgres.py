"""PostgreSQL fault scenarios against the real daemon, each with its bounds and mode path.

Each test starts walacord against a cluster of its own, waits for mode normal and
injects one fault. It records when the mode left normal (detection), when it was normal
again after the fault was removed (recovery), and the modes in between. The figures go to the
results file before the bounds are checked.

The database probe runs at its defaults (interval 2 s, deadline 1.5 s) unless a test
sets other values. Bounds leave about twice the expected time, because CI runs the suite
on two shared cores.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tests.chaos import faults
from tests.chaos.conftest import cluster_base
from tests.chaos.faultproxy import FaultProxy
from tests.chaos.results import ResultsFile
from tests.chaos.scenario import Bounds, Scenario
from tests.conftest import NotifyRecorder
from walacord.pgcluster import ClusterError, PgCluster

pytestmark = pytest.mark.chaos

StartWalacord = Callable[..., Scenario]

# A crash closes walacord's held connection, which it notices at once. The target is a
# median under 0.5 s over 10 runs, so one run on a shared CI machine gets 1 s.
CRASH_DETECTION_S = 1.0
# From `pg_ctl start` returning to mode normal, with the default hysteresis.
RESTART_RECOVERY_S = 3.0
# A fault that only a timed-out probe run can see: the run's deadline (1.5 s) plus the
# interval (2 s), plus a second failed run at the fast interval, with margin.
TIMEOUT_DETECTION_S = 5.0
# After the fault is removed: up to one interval until the next run, two good runs
# (successes_to_up), the probe's and the mode's minimum dwell of 1 s, with margin.
FAULT_RECOVERY_S = 6.0
# A crash or stop of the server, then a start.
CRASH = Bounds(CRASH_DETECTION_S, RESTART_RECOVERY_S)
# A fault that only a timed-out or failed probe run detects, then its removal.
TIMEOUT = Bounds(TIMEOUT_DETECTION_S, FAULT_RECOVERY_S)
EMERGENCY_PATH = ["normal", "emergency", "normal"]
DEGRADED_PATH = ["normal", "degraded", "normal"]


@pytest.fixture
def cluster(own_pg_cluster: PgCluster) -> PgCluster:
    return own_pg_cluster


def restart_after_kill(cluster: PgCluster, timeout: float = 20.0) -> None:
    """Start the cluster after a SIGKILL, once the orphaned backends have exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            cluster.start(timeout=timeout)
            return
        except ClusterError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_postgres_immediate_stop(cluster: PgCluster, start_walacord: StartWalacord,
                                 chaos_results: ResultsFile) -> None:
    scenario = start_walacord(cluster.url())
    scenario.wait_normal()

    fault = scenario.fault()
    cluster.stop("immediate")
    fault.wait_detected(timeout=10)
    status, _ = scenario.daemon.health()
    cluster.start()
    fault.wait_recovered(timeout=15)

    chaos_results.record(
        "postgres_immediate_stop", description="pg_ctl stop -m immediate, then pg_ctl start",
        expected_path=EMERGENCY_PATH, **fault.measured(CRASH))
    assert status == 503


def test_postgres_fast_restart(cluster: PgCluster, start_walacord: StartWalacord,
                               chaos_results: ResultsFile) -> None:
    scenario = start_walacord(cluster.url())
    scenario.wait_normal()

    fault = scenario.fault()
    cluster.stop("fast")
    fault.wait_detected(timeout=10)
    cluster.start()
    fault.wait_recovered(timeout=15)

    chaos_results.record(
        "postgres_fast_restart",
        description="pg_ctl stop -m fast then start, as `pg_ctl restart` does",
        expected_path=EMERGENCY_PATH, **fault.measured(CRASH))


def test_postgres_postmaster_killed(cluster: PgCluster, start_walacord: StartWalacord,
                                   chaos_results: ResultsFile) -> None:
    scenario = start_walacord(cluster.url())
    scenario.wait_normal()

    fault = scenario.fault()
    pid = faults.kill_postmaster(cluster)
    fault.wait_detected(timeout=10)
    faults.wait_until_gone(pid)
    restart_after_kill(cluster)
    fault.wait_recovered(timeout=15)

    chaos_results.record(
        "postgres_postmaster_killed",
        description="kill -9 of the postmaster; the orphaned backends exit on their own",
        expected_path=EMERGENCY_PATH, **fault.measured(CRASH))


# The scenario daemons run with WATCHDOG_USEC=2000000, so systemd would kill one that
# sent no WATCHDOG=1 for 2 s; walacord pings at half of that.
WATCHDOG_TIMEOUT_S = 2.0


class WatchdogListener:
    """Read the notify socket every 20 ms from a thread, so arrival times are exact."""

    def __init__(self, recorder: NotifyRecorder) -> None:
        self.recorder = recorder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog-listener",
                                        daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.recorder.poll()

    def __enter__(self) -> WatchdogListener:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def pings(self, since: float) -> list[float]:
        """Return the arrival times of WATCHDOG=1 messages at or after `since`."""
        return [at for at, message in self.recorder.poll()
                if at >= since and "WATCHDOG=1" in message.splitlines()]


def test_postgres_postmaster_frozen(cluster: PgCluster, start_walacord: StartWalacord,
                                   notify_socket: NotifyRecorder,
                                   chaos_results: ResultsFile) -> None:
    scenario = start_walacord(cluster.url(), notify_socket=notify_socket.path,
                              watchdog_usec=int(WATCHDOG_TIMEOUT_S * 1e6))
    scenario.wait_normal()
    host_before = scenario.probe("host").get("last_run")

    # The database probe must report down within its deadline plus its interval: the
    # application cannot open a connection, even though walacord's pool still works.
    with WatchdogListener(notify_socket) as watchdog:
        fault = scenario.fault()
        with faults.postmaster_frozen(cluster):
            fault.wait_detected()
            # Meanwhile /metrics keeps responding and the host probe keeps running.
            scenario.hold(3.0)
            host_during = scenario.probe("host").get("last_run")
            thawed = scenario.mark()
        pings = watchdog.pings(fault.began)
    fault.wait_recovered()

    chaos_results.record(
        "postgres_postmaster_frozen",
        description="SIGSTOP on the postmaster: open sessions work, new connections hang",
        expected_path=EMERGENCY_PATH, **fault.measured(TIMEOUT),
        notes=f"/metrics max {max(scenario.metrics_latencies) * 1000:.1f} ms while frozen")
    assert host_during != host_before
    assert max(scenario.metrics_latencies) < 0.1
    assert_watchdog_kept_pinging(pings, fault.began, thawed)


def assert_watchdog_kept_pinging(pings: list[float], began: float, ended: float) -> None:
    """Check WATCHDOG=1 kept arriving while the fault lasted, never the timeout apart."""
    during = [at for at in pings if began <= at <= ended]
    assert during, "no WATCHDOG=1 while the fault lasted"
    edges = [began, *during, ended]
    longest = max(later - earlier for earlier, later in itertools.pairwise(edges))
    assert longest < WATCHDOG_TIMEOUT_S, f"the watchdog went quiet for {longest:.2f} s"


def test_postgres_walacord_backends_frozen(cluster: PgCluster, start_walacord: StartWalacord,
                                          notify_socket: NotifyRecorder,
                                          chaos_results: ResultsFile) -> None:
    scenario = start_walacord(cluster.url(), notify_socket=notify_socket.path,
                              watchdog_usec=int(WATCHDOG_TIMEOUT_S * 1e6))
    scenario.wait_normal()
    pids = faults.wait_for_backends(cluster, "walacord")
    host_before = scenario.probe("host").get("last_run")
    recycles_before = scenario.metrics_value("walacord_db_pool_recycles_total")

    # Only walacord's sessions hang: the probe must report down within its deadline
    # plus its interval, then recycle the pool onto fresh backends, which new
    # connections reach, so the daemon may be normal again before the thaw.
    with WatchdogListener(notify_socket) as watchdog:
        fault = scenario.fault()
        with faults.frozen(pids):
            fault.wait_detected()
            recycled = scenario.wait_for_counter("walacord_db_pool_recycles_total",
                                                 recycles_before, since=fault.began,
                                                 timeout=10)
            scenario.hold(2.0)
            host_during = scenario.probe("host").get("last_run")
            thawed = scenario.mark()
        pings = watchdog.pings(fault.began)
    fault.wait_recovered()

    chaos_results.record(
        "postgres_walacord_backends_frozen",
        description=f"SIGSTOP on walacord's {len(pids)} backends; new connections work",
        expected_path=EMERGENCY_PATH, **fault.measured(TIMEOUT),
        notes=f"pool recycled {recycled if recycled is None else round(recycled, 3)} s "
              f"after the freeze; /metrics max "
              f"{max(scenario.metrics_latencies) * 1000:.1f} ms while frozen")
    assert recycled is not None
    assert host_during != host_before
    assert max(scenario.metrics_latencies) < 0.1
    assert_watchdog_kept_pinging(pings, fault.began, thawed)


@pytest.fixture
def proxy(cluster: PgCluster) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", cluster.port) as running:
        yield running


@pytest.mark.parametrize("moment", ["idle", "mid_query"])
def test_postgres_port_blackholed(moment: str, cluster: PgCluster, proxy: FaultProxy,
                                  start_walacord: StartWalacord,
                                  chaos_results: ResultsFile) -> None:
    url = make_conninfo(cluster.url(), port=str(proxy.port))
    scenario = start_walacord(url)
    scenario.wait_normal()

    fault = scenario.fault()
    if moment == "idle":
        proxy.blackhole()
    else:
        proxy.arm_blackhole()
    fault.wait_detected()
    scenario.hold(2.0)
    proxy.passthrough()
    fault.wait_recovered()

    chaos_results.record(
        f"postgres_port_blackholed_{moment}",
        description=f"the proxy stops forwarding ({moment.replace('_', '-')}) and keeps "
                    "every socket open",
        expected_path=EMERGENCY_PATH, **fault.measured(TIMEOUT))
    assert max(scenario.metrics_latencies) < 0.1


def test_postgres_port_slow(cluster: PgCluster, proxy: FaultProxy,
                            start_walacord: StartWalacord,
                            chaos_results: ResultsFile) -> None:
    # A run makes about ten round trips within its 1.5 s deadline: the server figures,
    # the write check and a fresh connection's handshake. So a delay that makes one
    # query slower than the default slow_after of 0.5 s makes the whole run time out.
    # Here slow_after is 0.08 s and each chunk waits 50 ms, so the figures query takes
    # about 0.1 s: slow, while the run still ends within its deadline.
    url = make_conninfo(cluster.url(), port=str(proxy.port))
    scenario = start_walacord(url, settings={"probes.database": {"slow_after": 0.08}})
    scenario.wait_normal()

    fault = scenario.fault()
    proxy.latency(50)
    fault.wait_detected()
    scenario.hold(2.0)
    proxy.passthrough()
    fault.wait_recovered()

    chaos_results.record(
        "postgres_port_slow",
        description="the proxy delays every chunk by 50 ms; slow_after is 0.08 s",
        expected_path=DEGRADED_PATH, **fault.measured(TIMEOUT))


def test_postgres_read_only_toggled(cluster: PgCluster, start_walacord: StartWalacord,
                                   chaos_results: ResultsFile) -> None:
    scenario = start_walacord(cluster.url())
    scenario.wait_normal()
    recycles_before = scenario.metrics_value("walacord_db_pool_recycles_total")

    fault = scenario.fault()
    cluster.psql("ALTER SYSTEM SET default_transaction_read_only = on")
    cluster.reload()
    fault.wait_detected()
    database = scenario.probe("database")
    recycled = scenario.wait_for_counter("walacord_db_pool_recycles_total", recycles_before,
                                         since=fault.began, timeout=10)
    cluster.psql("ALTER SYSTEM RESET default_transaction_read_only")
    cluster.reload()
    fault.wait_recovered()

    chaos_results.record(
        "postgres_read_only_toggled",
        description="default_transaction_read_only = on with a reload, then reset",
        expected_path=EMERGENCY_PATH, **fault.measured(TIMEOUT),
        notes=f"pool recycled {recycled if recycled is None else round(recycled, 3)} s "
              "after the reload")
    # Queries still pass: the probe reaches the server and only the write fails.
    assert database.get("details", {}).get("reachable") is True
    assert database.get("details", {}).get("writable") is False
    assert recycled is not None


def hold_every_slot(cluster: PgCluster, hogs: list[psycopg.Connection],
                    releasing: threading.Event) -> None:
    """Open connections until `releasing` is set, retrying every 20 ms when all are used."""
    while not releasing.is_set():
        try:
            hogs.append(psycopg.connect(cluster.url(), connect_timeout=5))
        except psycopg.OperationalError as exc:
            assert "too many clients" in str(exc)
            releasing.wait(0.02)


def test_postgres_max_connections_exhausted(start_walacord: StartWalacord,
                                           chaos_results: ResultsFile) -> None:
    base = cluster_base("walacord-chaos-pg-small-")
    small = PgCluster(base, settings={"max_connections": "30",
                                      "superuser_reserved_connections": "0"})
    small.init()
    small.start()
    hogs: list[psycopg.Connection] = []
    releasing = threading.Event()
    try:
        scenario = start_walacord(small.url(), settings={
            "database": {"pool_min_size": 5, "pool_max_size": 10}})
        scenario.wait_normal()

        # No new session can start, so the application cannot write: like a frozen
        # postmaster, that is emergency even though walacord's own pool still works.
        # The other client keeps retrying, as a connection storm does, so a slot that
        # walacord's fresh-connection check frees is taken again at once.
        fault = scenario.fault()
        storm = threading.Thread(target=hold_every_slot, args=(small, hogs, releasing))
        storm.start()
        # The connection count crosses its warning threshold first, so the mode may
        # pass through degraded; detection is the time to emergency.
        fault.wait_detected(accept="emergency")
        scenario.hold(1.0)

        releasing.set()
        storm.join(10)
        for conn in hogs:
            conn.close()
        fault.wait_recovered()
        measured = fault.measured(TIMEOUT)
    finally:
        releasing.set()
        for conn in hogs:
            conn.close()
        small.destroy()

    chaos_results.record(
        "postgres_max_connections_exhausted",
        description=f"another client holds every free slot ({len(hogs)} connections)",
        expected_path=EMERGENCY_PATH, **measured,
        # The connection count is above its warning threshold for a probe run or two
        # while the other client's sessions open and again while they close.
        also_accepted=[["normal", "degraded", "emergency", "normal"],
                       ["normal", "emergency", "degraded", "normal"],
                       ["normal", "degraded", "emergency", "degraded", "normal"]])


def test_postgres_table_lock_held(cluster: PgCluster, start_walacord: StartWalacord,
                                 chaos_results: ResultsFile) -> None:
    cluster.psql("CREATE TABLE ledger (id int PRIMARY KEY)")
    holder = psycopg.connect(cluster.url())
    waiter = psycopg.connect(cluster.url(), autocommit=True)
    blocked = threading.Thread(target=lambda: waiter.execute("SELECT count(*) FROM ledger"))

    try:
        # Lock waits count as a lockup after 2 s here, not the default 60 s, to stay short.
        scenario = start_walacord(cluster.url(), settings={"probes.database": {
            "lock_wait_warning": 1.0, "lock_wait_critical": 2.0}})
        scenario.wait_normal()
        fault = scenario.fault()
        holder.execute("LOCK TABLE ledger IN ACCESS EXCLUSIVE MODE")
        blocked.start()
        fault.wait_detected(timeout=20)
        holder.rollback()
        fault.wait_recovered()
        blocked.join(10)
    finally:
        holder.close()
        if blocked.ident is not None:
            blocked.join(10)
        waiter.close()

    # The lock only counts from when the waiter queued, so allow the lockup threshold.
    chaos_results.record(
        "postgres_table_lock_held",
        description="one session holds ACCESS EXCLUSIVE on a table another session reads",
        expected_path=DEGRADED_PATH,
        **fault.measured(Bounds(2.0 + TIMEOUT_DETECTION_S, FAULT_RECOVERY_S)))


def test_postgres_smart_shutdown(cluster: PgCluster, start_walacord: StartWalacord,
                                chaos_results: ResultsFile) -> None:
    scenario = start_walacord(cluster.url())
    scenario.wait_normal()

    # A smart shutdown waits for every session to end, so it completes only once
    # walacord has seen "shutting down" (SQLSTATE 57P03) and closed its pool.
    fault = scenario.fault()
    cluster.stop("smart", timeout=30)
    shutdown_s = scenario.mark() - fault.began
    detection = fault.wait_detected(timeout=5)
    cluster.start()
    fault.wait_recovered(timeout=15)

    # Detection is when the server is down and walacord has left normal, whichever is
    # later: a walacord that kept its pool open would hold the shutdown until timeout.
    fault.detection = None if detection is None else max(shutdown_s, detection)
    chaos_results.record(
        "postgres_smart_shutdown",
        description="pg_ctl stop -m smart, which waits for walacord to close its pool",
        expected_path=EMERGENCY_PATH,
        **fault.measured(Bounds(TIMEOUT_DETECTION_S, RESTART_RECOVERY_S)),
        notes=f"the smart shutdown took {shutdown_s:.2f} s")


def test_postgres_replica_promoted(cluster: PgCluster, start_walacord: StartWalacord,
                                  chaos_results: ResultsFile) -> None:
    replica = faults.make_replica(cluster, cluster_base("walacord-chaos-replica-"))
    try:
        scenario = start_walacord(faults.multi_host_url([cluster, replica]))
        scenario.wait_normal()

        fault = scenario.fault()
        cluster.stop("immediate")
        fault.wait_detected(timeout=10)
        faults.promote(replica)
        fault.wait_recovered()
        measured = fault.measured(CRASH)
        assert replica.psql("SELECT count(*) FROM walacord.heartbeat") != "0"
    finally:
        replica.destroy()

    chaos_results.record(
        "postgres_replica_promoted",
        description="primary stopped, standby promoted; the URL lists both with "
                    "target_session_attrs=read-write",
        expected_path=EMERGENCY_PATH, **measured,
        # NOTE: degraded may appear on the way down or back, as in the max_connections
        # scenario; the cause here was not traced.
        also_accepted=[["normal", "degraded", "emergency", "normal"],
                       ["normal", "emergency", "degraded", "normal"],
                       ["normal", "degraded", "emergency", "degraded", "normal"]])
