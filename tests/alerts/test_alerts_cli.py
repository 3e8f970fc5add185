"""`walacorctl alerts` against a real `walacord run` daemon."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import walacord_run
from walacord.alerts.model import parse_rfc3339
from walacord.alerts.store import SCHEMA
from walacord.control.client import ControlClient
from walacord.errors import ControlError
from walacord.terminal import CONTROL_CHARACTERS

WALACORCTL = str(Path(sys.executable).parent / "walacorctl")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Path]:
    with walacord_run(tmp_path) as socket:
        yield socket


def ctl(socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([WALACORCTL, "--socket", str(socket), *args], capture_output=True,
                          text=True, timeout=30, env=dict(os.environ), check=False)


def control_characters(output: str) -> list[str]:
    """Return the control characters in `output` other than its line feeds."""
    return CONTROL_CHARACTERS.findall(output.replace("\n", ""))


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
                  + "x" * 900 + '"', "--for", "1h", "--reason", "r")
    assert created.returncode == 0, created.stderr

    table = ctl(daemon, "alerts")

    assert max(len(line) for line in table.stdout.splitlines()) < 200


def test_alerts_silence_rejects_bad_duration(daemon: Path) -> None:
    result = ctl(daemon, "alerts", "silence", 'probe="database"', "--for", "soon",
                 "--reason", "x")
    assert result.returncode == 2
    assert "argument --for: invalid duration 'soon'" in result.stderr


def test_alerts_silence_exponent_duration(daemon: Path) -> None:
    created = ctl(daemon, "--json", "alerts", "silence", 'probe="database"', "--for", "1e3",
                  "--reason", "x")
    assert created.returncode == 0, created.stderr
    silence = orjson.loads(created.stdout)["silence"]
    seconds = parse_rfc3339(silence["endsAt"]) - parse_rfc3339(silence["startsAt"])
    assert seconds == pytest.approx(1000.0, abs=0.01)


def test_alerts_table_escapes_stored_text(tmp_path: Path) -> None:
    # Versions before the reason checks stored whatever a client sent.
    state = tmp_path / "state"
    state.mkdir()
    now = time.time()
    with sqlite3.connect(state / "alerts.db") as db:
        db.executescript(SCHEMA)
        db.execute("INSERT INTO silences (id, matchers, starts_at, ends_at, reason, created_by) "
                   "VALUES ('old', ?, ?, ?, ?, '')",
                   (orjson.dumps([{"name": "event", "op": "=", "value": "x\x1b]0;title\x07"}]),
                    now, now + 3600, "planned \x1b[2J\x1b[H\x9b31m\u202eok"))

    with walacord_run(tmp_path) as socket:
        table = ctl(socket, "alerts")

    assert table.returncode == 0, table.stderr
    assert control_characters(table.stdout) == []
    assert "planned \\x1b[2J\\x1b[H\\x9b31m\\u202eok" in table.stdout
    assert 'event="x\\x1b]0;title\\x07"' in table.stdout


def test_silence_rejects_matcher_control_characters(daemon: Path) -> None:
    created = ctl(daemon, "alerts", "silence", 'probe!="\x1b[31mred"', "--for", "1h",
                  "--reason", "maintenance")

    assert created.returncode == 1
    assert "invalid matcher: control character '\\x1b' (U+001B) at position 8" \
        in created.stderr
    assert control_characters(created.stderr) == []
    # The daemon has no database, so probe alerts may be pending by now; the rejected
    # silence must not have been stored.
    listing = ctl(daemon, "--json", "alerts")
    assert listing.returncode == 0, listing.stderr
    assert orjson.loads(listing.stdout)["silences"] == []


def test_alerts_silence_rejects_unknown_param(daemon: Path) -> None:
    with ControlClient(str(daemon), timeout=10) as client:
        with pytest.raises(ControlError) as caught:
            client.call("alerts.silence", {"matcher": 'probe="database"', "duration": "1h",
                                           "reason": "r", "comment": "ignored before"})
        listing = client.call("alerts.list")

    assert caught.value.code == -32602
    assert "unknown param(s) comment for alerts.silence" in caught.value.message
    assert listing["silences"] == []
