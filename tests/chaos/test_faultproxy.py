"""The fault proxy against a real PostgreSQL server, through psycopg."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tests.chaos.faultproxy import FaultProxy, Mode
from walacord.pgcluster import PgCluster

pytestmark = pytest.mark.chaos


@pytest.fixture
def proxy(pg_cluster: PgCluster) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", pg_cluster.port) as running:
        yield running


def proxied_url(cluster: PgCluster, proxy: FaultProxy, **params: str) -> str:
    return make_conninfo(cluster.url(), port=str(proxy.port), **params)


def round_trip(conn: psycopg.Connection) -> float:
    began = time.monotonic()
    conn.execute("SELECT 1").fetchone()
    return time.monotonic() - began


def test_proxy_pass_forwards_queries(pg_cluster: PgCluster, proxy: FaultProxy) -> None:
    with psycopg.connect(proxied_url(pg_cluster, proxy), autocommit=True) as conn:
        row = conn.execute("SELECT current_setting('port')::int").fetchone()

    assert row == (pg_cluster.port,)
    assert proxy.stats.accepted == 1
    assert proxy.stats.bytes_forwarded > 0


def test_proxy_blackhole_holds_query_until_pass(pg_cluster: PgCluster,
                                                proxy: FaultProxy) -> None:
    conn = psycopg.connect(proxied_url(pg_cluster, proxy), autocommit=True)
    try:
        proxy.blackhole()
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(lambda: conn.execute("SELECT 42").fetchone())
            with pytest.raises(FutureTimeout):
                pending.result(timeout=1.0)
            assert not conn.closed

            proxy.passthrough()
            assert pending.result(timeout=5.0) == (42,)
    finally:
        conn.close()


def test_proxy_armed_blackhole_holds_response(pg_cluster: PgCluster,
                                              proxy: FaultProxy) -> None:
    conn = psycopg.connect(proxied_url(pg_cluster, proxy), autocommit=True)
    try:
        proxy.arm_blackhole()
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                lambda: conn.execute("SELECT count(*) FROM pg_stat_activity").fetchone())
            with pytest.raises(FutureTimeout):
                pending.result(timeout=1.0)
            assert proxy.mode.name == "blackhole"
            # The request reached the server: the query ran and only its result is held.
            assert "count(*) FROM pg_stat_activity" in pg_cluster.psql(
                "SELECT string_agg(query, ';') FROM pg_stat_activity "
                "WHERE backend_type = 'client backend'")

            proxy.passthrough()
            row = pending.result(timeout=5.0)
            assert row is not None
    finally:
        conn.close()


def test_proxy_blackhole_times_out_new_connection(pg_cluster: PgCluster,
                                                  proxy: FaultProxy) -> None:
    proxy.blackhole()
    began = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxied_url(pg_cluster, proxy, connect_timeout="1"))
    elapsed = time.monotonic() - began

    assert 0.9 <= elapsed < 5.0
    assert proxy.stats.accepted >= 1


def test_proxy_reset_fails_open_connection_at_once(pg_cluster: PgCluster,
                                                   proxy: FaultProxy) -> None:
    conn = psycopg.connect(proxied_url(pg_cluster, proxy), autocommit=True)
    try:
        proxy.reset()
        began = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        elapsed = time.monotonic() - began
    finally:
        conn.close()

    assert elapsed < 0.5
    assert proxy.stats.reset == 1


def test_proxy_reset_rejects_new_connections(pg_cluster: PgCluster, proxy: FaultProxy) -> None:
    proxy.reset()
    began = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxied_url(pg_cluster, proxy, connect_timeout="5"))

    assert time.monotonic() - began < 0.5
    proxy.passthrough()
    with psycopg.connect(proxied_url(pg_cluster, proxy)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_proxy_latency_delays_each_round_trip(pg_cluster: PgCluster,
                                              proxy: FaultProxy) -> None:
    with psycopg.connect(proxied_url(pg_cluster, proxy), autocommit=True) as conn:
        baseline = min(round_trip(conn) for _ in range(3))
        proxy.latency(100)
        delayed = min(round_trip(conn) for _ in range(3))

    # A query is one chunk each way, so one round trip crosses the delay twice.
    assert delayed - baseline >= 0.19
    assert delayed < 1.0


def test_proxy_bandwidth_limits_throughput(pg_cluster: PgCluster, proxy: FaultProxy) -> None:
    size = 40_000
    with psycopg.connect(proxied_url(pg_cluster, proxy), autocommit=True) as conn:
        proxy.bandwidth(40_000)
        began = time.monotonic()
        row = conn.execute("SELECT repeat('x', %s)", (size,)).fetchone()
        elapsed = time.monotonic() - began

    assert row is not None
    assert len(row[0]) == size
    assert 0.8 <= elapsed < 3.0


def test_proxy_mode_rejects_invalid_parameters() -> None:
    with pytest.raises(ValueError, match="invalid proxy mode"):
        Mode("drop")
    with pytest.raises(ValueError, match="latency_ms"):
        Mode("latency")
    with pytest.raises(ValueError, match="bytes_per_second"):
        Mode("bandwidth", bytes_per_second=0)


def test_proxy_command_line_switches_modes(pg_cluster: PgCluster) -> None:
    script = Path(__file__).with_name("faultproxy.py")
    process = subprocess.Popen(
        [sys.executable, str(script), "--target", f"127.0.0.1:{pg_cluster.port}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        first = process.stdout.readline().split()
        assert first[0] == "listening"
        url = make_conninfo(pg_cluster.url(), port=first[1])
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)

            process.stdin.write("reset\n")
            process.stdin.flush()
            assert process.stdout.readline().strip() == "mode reset"
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
    finally:
        process.stdin.close()
        process.wait(timeout=10)

    assert process.returncode == 0
