"""The Alertmanager and hook sinks against real loopback servers and real processes."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

import orjson
import pytest

from tests.conftest import kill_leftovers, live_pids
from walacord.alerts.sinks import AlertmanagerSink, HookSink
from walacord.alerts.store import Delivery
from walacord.errors import AlertDeliveryError
from walacord.pgcluster import free_port
from walacord.processes import group_members

from .conftest import Receiver

pytestmark = pytest.mark.anyio

FIRING = {
    "fingerprint": "abc", "status": "firing",
    "labels": {"alertname": "WalacordProbeDown", "severity": "critical", "probe": "database"},
    "annotations": {"summary": "s", "description": "d"},
    "startsAt": "2027-01-15T08:00:00.000Z", "endsAt": None,
}
RESOLVED = {**FIRING, "status": "resolved", "endsAt": "2027-01-15T08:05:00.000Z"}


def delivery(payload: dict[str, object], kind: str = "firing", row: int = 1) -> Delivery:
    return Delivery(row, "alertmanager", "abc", kind, payload, 0)


async def test_alertmanager_sink_posts_v2_alerts(receiver: Receiver) -> None:
    await receiver.start()
    sink = AlertmanagerSink(receiver.url, 5.0, repeat_interval=600.0)
    sent_at = time.time()
    try:
        await sink.deliver([delivery(FIRING)])
        await sink.deliver([delivery(RESOLVED, "resolved")])
    finally:
        await sink.aclose()

    firing, resolved = receiver.alerts()
    assert firing["labels"]["probe"] == "database"
    assert firing["startsAt"] == FIRING["startsAt"]
    # A firing alert carries an endsAt in the future, so Alertmanager keeps it open
    # for three repeat intervals after the last send.
    ends_at = datetime.fromisoformat(firing["endsAt"]).timestamp()
    assert sent_at + 1800 - 0.001 <= ends_at <= time.time() + 1800
    assert resolved["endsAt"] == RESOLVED["endsAt"]


async def test_alertmanager_sink_unreachable_raises_transient() -> None:
    sink = AlertmanagerSink(f"http://127.0.0.1:{free_port()}", 2.0, repeat_interval=600.0)
    try:
        with pytest.raises(AlertDeliveryError) as caught:
            await sink.deliver([delivery(FIRING)])
    finally:
        await sink.aclose()

    assert caught.value.permanent is False


@pytest.mark.parametrize(("status", "permanent"), [(503, False), (400, True)])
async def test_alertmanager_sink_error_status(receiver: Receiver, status: int,
                                              permanent: bool) -> None:
    receiver.status = status
    await receiver.start()
    sink = AlertmanagerSink(receiver.url, 5.0, repeat_interval=600.0)
    try:
        with pytest.raises(AlertDeliveryError, match=str(status)) as caught:
            await sink.deliver([delivery(FIRING)])
    finally:
        await sink.aclose()

    assert caught.value.permanent is permanent


async def test_hook_sink_passes_json_on_stdin_and_env(tmp_path: Path) -> None:
    out = tmp_path / "hook.out"
    script = (
        "import os, sys; data = sys.stdin.read(); "
        f"open({str(out)!r}, 'w').write(data + '\\n' + os.environ['WALACORD_ALERT'])"
    )
    sink = HookSink(0, [sys.executable, "-c", script], timeout=10.0)

    await sink.deliver([delivery(FIRING)])

    stdin_line, env_line = out.read_text().splitlines()
    assert orjson.loads(stdin_line) == {"kind": "firing", **FIRING}
    assert orjson.loads(env_line) == orjson.loads(stdin_line)


async def test_hook_sink_withholds_walacord_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "env.json"
    monkeypatch.setenv("DATABASE_URL", "postgresql://walacord:hunter2@db/app")
    script = f"import json, os; open({str(out)!r}, 'w').write(json.dumps(dict(os.environ)))"
    sink = HookSink(0, [sys.executable, "-c", script], timeout=10.0)

    await sink.deliver([delivery(FIRING)])

    env = orjson.loads(out.read_text())
    assert "DATABASE_URL" not in env
    assert env["PATH"]
    assert env["WALACORD_ALERT_KIND"] == "firing"


async def test_hook_sink_nonzero_exit_fails(tmp_path: Path) -> None:
    sink = HookSink(0, [sys.executable, "-c", "import sys; sys.exit('pager down')"], 10.0)

    with pytest.raises(AlertDeliveryError, match="exited with 1: pager down"):
        await sink.deliver([delivery(FIRING)])


async def test_hook_sink_timeout_fails() -> None:
    sink = HookSink(0, [sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)

    with pytest.raises(AlertDeliveryError, match="timed out"):
        await sink.deliver([delivery(FIRING)])


async def test_hook_sink_timeout_kills_grandchild(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    script = f"echo $$ > {pid_file}; sleep 100 & echo $! >> {pid_file}; exec sleep 100"
    sink = HookSink(0, ["/bin/sh", "-c", script], timeout=0.5)
    pids: list[int] = []
    try:
        with pytest.raises(AlertDeliveryError, match="timed out"):
            await sink.deliver([delivery(FIRING)])
        pids = [int(word) for word in pid_file.read_text().split()]

        assert len(pids) == 2
        assert live_pids(pids) == []
        assert group_members(pids[0]) == []
    finally:
        kill_leftovers(pids)


async def test_hook_sink_missing_command_fails(tmp_path: Path) -> None:
    sink = HookSink(0, [str(tmp_path / "no-such-hook")], timeout=5.0)

    with pytest.raises(AlertDeliveryError, match="could not start"):
        await sink.deliver([delivery(FIRING)])
