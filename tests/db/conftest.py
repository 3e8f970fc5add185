"""Names for the role and database a test creates on the shared cluster, dropped after it."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from db_names import Names

from walacord.pgcluster import PgCluster

_counter = itertools.count()


def drop_role(cluster: PgCluster, role: str) -> None:
    exists = cluster.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{role}'")
    if exists:
        cluster.psql(f'DROP OWNED BY "{role}"')
        cluster.psql(f'DROP ROLE "{role}"')


@pytest.fixture
def names(pg_cluster: PgCluster) -> Iterator[Names]:
    serial = next(_counter)
    created = Names(role=f"wr_{serial}", database=f"wd_{serial}", extra_roles=[])
    try:
        yield created
    finally:
        pg_cluster.psql(f'DROP DATABASE IF EXISTS "{created.database}" WITH (FORCE)')
        for role in [created.role, *created.extra_roles]:
            drop_role(pg_cluster, role)


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "database-password"
    path.write_text("s3cret-Role-pw\n")
    path.chmod(0o600)
    return path
