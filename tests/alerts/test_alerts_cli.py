"""`walacorctl alerts` against a real `walacord run` daemon."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import walacord_run

WALACORCTL = str(Path(sys.executable).parent / "walacorctl")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Path]:
    with walacord_run(tmp_path) as socket:
        yield socket


def ctl(socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([WALACORCTL, "--socket", str(socket), *args], capture_output=True,
                          text=True, timeout=30, env=dict(os.environ), check=False)


def test_alerts_silence_list_unsilence(daemon: Path) -> None:
    created = ctl(daemon, "--json", "alerts", "silence", 'probe="database"', "--for", "2h",
                  "--reason", "planned maintenance")
    assert created.returncode == 0, created.stderr
    silence_id = orjson.loads(created.stdout)["silence"]["id"]

    listing = ctl(daemon, "--json", "alerts")
    assert listing.returncode == 0, listing.stderr
    silences = orjson.loads(listing.stdout)["silences"]
    assert [s["id"] for s in silences] == [silence_id]
    assert silences[0]["reason"] == "planned maintenance"
    assert silences[0]["createdBy"].startswith(f"uid={os.getuid()} pid=")

    table = ctl(daemon, "alerts")
    assert "planned maintenance" in table.stdout

    ended = ctl(daemon, "alerts", "unsilence", silence_id)
    assert ended.returncode == 0, ended.stderr
    after = orjson.loads(ctl(daemon, "--json", "alerts").stdout)
    assert after["silences"] == []


def test_alerts_table_cuts_long_matchers(daemon: Path) -> None:
    created = ctl(daemon, "alerts", "silence", 'alertname="WalacordProbeDown",event="'
                  + "x" * 5000 + '"', "--for", "1h", "--reason", "r")
    assert created.returncode == 0, created.stderr

    table = ctl(daemon, "alerts")

    assert max(len(line) for line in table.stdout.splitlines()) < 200


def test_alerts_silence_rejects_bad_duration(daemon: Path) -> None:
    result = ctl(daemon, "alerts", "silence", 'probe="database"', "--for", "soon",
                 "--reason", "x")
    assert result.returncode == 1
    assert "invalid duration 'soon'" in result.stderr
