"""The signal, filesystem and replica fault sources against real PostgreSQL."""

from __future__ import annotations

import errno
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tests.chaos import faults
from tests.chaos.conftest import cluster_base
from walacord.pgcluster import ClusterError, PgCluster

pytestmark = pytest.mark.chaos


def test_frozen_backend_holds_query_until_continued(pg_cluster: PgCluster) -> None:
    url = make_conninfo(pg_cluster.url(), application_name="chaos-freeze")
    with psycopg.connect(url, autocommit=True) as conn:
        pids = faults.wait_for_backends(pg_cluster, "chaos-freeze")
        assert pids == [conn.info.backend_pid]

        with ThreadPoolExecutor(1) as pool, faults.frozen(pids):
            pending = pool.submit(lambda: conn.execute("SELECT 7").fetchone())
            with pytest.raises(FutureTimeout):
                pending.result(timeout=0.5)
        assert pending.result(timeout=5.0) == (7,)


def test_frozen_postmaster_blocks_new_connections_only(own_pg_cluster: PgCluster) -> None:
    with psycopg.connect(own_pg_cluster.url(), autocommit=True) as held:
        with faults.postmaster_frozen(own_pg_cluster):
            # A running backend keeps serving its session while the postmaster is stopped.
            assert held.execute("SELECT 1").fetchone() == (1,)
            began = time.monotonic()
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(make_conninfo(own_pg_cluster.url(), connect_timeout="1"))
            assert time.monotonic() - began >= 0.9

        with psycopg.connect(own_pg_cluster.url(), connect_timeout=5) as fresh:
            assert fresh.execute("SELECT 1").fetchone() == (1,)


def test_kill_postmaster_breaks_sessions_and_restarts(own_pg_cluster: PgCluster) -> None:
    held = psycopg.connect(own_pg_cluster.url(), autocommit=True)
    try:
        pid = faults.kill_postmaster(own_pg_cluster)
        faults.wait_until_gone(pid)
        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT 1")
    finally:
        held.close()

    # Orphaned backends exit on their own once they see the postmaster is gone; until
    # then the old shared memory is in use and start-up is refused.
    deadline = time.monotonic() + 20
    while True:
        try:
            own_pg_cluster.start(timeout=20)
            break
        except ClusterError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with psycopg.connect(own_pg_cluster.url()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_small_filesystem_fills_and_frees(tmp_path: Path) -> None:
    with faults.SmallFilesystem(tmp_path / "small", size_bytes=2 * 1024 * 1024) as disk:
        assert disk.kind in ("tmpfs", "loop")
        assert shutil.disk_usage(disk.mountpoint).total <= 4 * 1024 * 1024

        disk.fill()
        with pytest.raises(OSError) as raised, open(disk.mountpoint / "more", "wb") as handle:
            handle.write(b"x" * 65536)
            handle.flush()
        assert raised.value.errno == errno.ENOSPC

        disk.free_space()
        (disk.mountpoint / "after").write_bytes(b"x" * 65536)

    assert not any(line.split()[1] == str(tmp_path / "small")
                   for line in Path("/proc/mounts").read_text().splitlines())


@pytest.fixture
def replica(own_pg_cluster: PgCluster) -> Iterator[PgCluster]:
    standby = faults.make_replica(own_pg_cluster, cluster_base("walacord-chaos-replica-"))
    try:
        yield standby
    finally:
        standby.destroy()


def test_multi_host_url_follows_promoted_replica(own_pg_cluster: PgCluster,
                                                 replica: PgCluster) -> None:
    url = faults.multi_host_url([own_pg_cluster, replica])
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.info.port == own_pg_cluster.port
        conn.execute("CREATE TABLE failover_marker (id int)")
        conn.execute("INSERT INTO failover_marker VALUES (1)")
    assert replica.psql("SELECT pg_is_in_recovery()") == "t"

    own_pg_cluster.stop("fast")
    # A standby is not read-write, so with the primary gone the URL finds no server.
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(make_conninfo(url, connect_timeout="2"))

    faults.promote(replica)
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.info.port == replica.port
        conn.execute("INSERT INTO failover_marker VALUES (2)")
        rows = conn.execute("SELECT id FROM failover_marker ORDER BY id").fetchall()
    assert rows == [(1,), (2,)]
