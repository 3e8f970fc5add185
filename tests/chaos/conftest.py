"""Fixtures for fault-injection scenarios: private clusters and the results recorder."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.results import ResultsFile, default_path
from walacord.pgcluster import PgCluster


def cluster_base(prefix: str) -> Path:
    """Return a fresh directory the unprivileged server user can enter.

    pytest's tmp_path sits under a 0700 directory owned by root, which the `nobody`
    user that runs PostgreSQL under root cannot traverse, so clusters live in /tmp.
    """
    return Path(tempfile.mkdtemp(prefix=prefix))


@pytest.fixture
def own_pg_cluster() -> Iterator[PgCluster]:
    """A cluster of the test's own, for tests that stop, kill or freeze the server."""
    base = cluster_base("walacord-chaos-pg-")
    cluster = PgCluster(base)
    cluster.init()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def chaos_results(tmp_path_factory: pytest.TempPathFactory) -> ResultsFile:
    """The session's results file; `record()` writes a scenario and checks its bounds."""
    return ResultsFile(default_path(tmp_path_factory.getbasetemp()))
