"""Shared fixtures: a real PostgreSQL cluster started for the test session."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from walacord.pgcluster import PgCluster


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One PostgreSQL server shared by the whole session; tests make their own databases."""
    base = Path(tempfile.mkdtemp(prefix="walacord-pg-"))
    cluster = PgCluster(base)
    cluster.init()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_db(pg_cluster: PgCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database on the shared cluster; yields its superuser URL."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[:50].lower()
    pg_cluster.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    pg_cluster.psql(f'CREATE DATABASE "{name}"')
    try:
        yield pg_cluster.url(name)
    finally:
        pg_cluster.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def own_pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgCluster]:
    """A cluster of the test's own, for tests that stop, kill or freeze the server."""
    base = tmp_path_factory.mktemp("pg")
    cluster = PgCluster(base)
    cluster.init()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()
