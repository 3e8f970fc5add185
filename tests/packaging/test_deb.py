"""The Debian package: build, lintian, dpkg -i in a throwaway root, installed commands."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from walacord.pgcluster import PgCluster

REPO = Path(__file__).resolve().parents[2]
CHECK_DEB = REPO / "packaging" / "check-deb"
TOOLS = ("dpkg-deb", "lintian", "unshare", "/usr/bin/python3.11")


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="check-deb mounts an overlay and needs root")
@pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in TOOLS),
    reason=f"check-deb needs {', '.join(TOOLS)} (Debian: dpkg lintian util-linux python3.11)",
)
def test_check_deb_installs_and_runs(pg_cluster: PgCluster) -> None:
    env = {**os.environ, "CHECK_DEB_ADMIN_URL": pg_cluster.url()}

    try:
        result = subprocess.run(
            [str(CHECK_DEB)], capture_output=True, text=True, timeout=600, env=env
        )
        role_exists = pg_cluster.psql("SELECT 1 FROM pg_roles WHERE rolname = 'walacord_deb'")
    finally:
        pg_cluster.psql('DROP DATABASE IF EXISTS "walacord_deb" WITH (FORCE)')
        if pg_cluster.psql("SELECT 1 FROM pg_roles WHERE rolname = 'walacord_deb'"):
            pg_cluster.psql('DROP OWNED BY "walacord_deb"')
            pg_cluster.psql('DROP ROLE "walacord_deb"')

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "check-deb: lintian reported no errors" in output
    assert "/etc/walacord/walacord.toml: valid" in output
    assert "role walacord_deb: created" in output
    assert "setup-database: nothing changed" in output
    assert "check-deb [root]: all checks passed" in output
    assert role_exists == "1"
