"""The `alerts.*` control handlers against a running alerts component."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from walacord.alerts import rules
from walacord.alerts.control import handlers, silence_as_caller
from walacord.alerts.model import parse_rfc3339
from walacord.alerts.service import AlertService
from walacord.alerts.store import AlertStore
from walacord.control.registry import Call, Peer
from walacord.errors import ControlError

from .conftest import make_runtime

pytestmark = pytest.mark.anyio


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[AlertService]:
    runtime = make_runtime(tmp_path, evaluation_interval=0.05, probe_down_for=0.0)
    alert_service = AlertService(runtime)
    async with anyio.create_task_group() as tg:
        await tg.start(alert_service.run)
        yield alert_service
        tg.cancel_scope.cancel()


async def settle(service: AlertService) -> None:
    await service.evaluate_once()


async def test_control_silence_moves_alert_to_silenced(service: AlertService,
                                                       tmp_path: Path) -> None:
    methods = handlers(service)
    config = service.runtime.config.alerts
    service.observe(rules.probe_down("walacor", False, config))
    service.observe(rules.probe_down("database", False, config))

    created = await methods["alerts.silence"]({
        "matcher": 'probe="walacor"', "duration": "2h", "reason": "vendor maintenance"})
    await settle(service)
    listing = await methods["alerts.list"]({})

    silence = created["silence"]
    assert created["warnings"] == []
    assert silence["matchers"] == ['probe="walacor"']
    assert silence["reason"] == "vendor maintenance"
    assert [a["labels"]["probe"] for a in listing["silenced"]] == ["walacor"]
    assert [a["labels"]["probe"] for a in listing["active"]] == ["database"]
    assert [s["id"] for s in listing["silences"]] == [silence["id"]]
    store = await AlertStore.open(tmp_path / "alerts.db", 5.0)
    try:
        assert [s.id for s in await store.silences(0)] == [silence["id"]]
    finally:
        await store.close()


async def test_control_unsilence_ends_silence(service: AlertService) -> None:
    methods = handlers(service)
    service.observe(rules.probe_down("walacor", False, service.runtime.config.alerts))
    created = await methods["alerts.silence"]({
        "matcher": "alertname=WalacordProbeDown", "duration": 600, "reason": "testing"})

    result = await methods["alerts.unsilence"]({"id": created["silence"]["id"]})
    await settle(service)
    listing = await methods["alerts.list"]({})

    assert result == {"expired": created["silence"]["id"]}
    assert listing["silenced"] == []
    assert listing["silences"] == []
    assert [a["labels"]["probe"] for a in listing["active"]] == ["walacor"]


@pytest.mark.parametrize(("params", "message"), [
    ({"duration": "1h", "reason": "r"}, "missing or empty 'matcher'"),
    ({"matcher": "probe=x", "duration": "1h"}, "missing or empty 'reason'"),
    ({"matcher": "probe=x", "duration": "soon", "reason": "r"},
     "invalid duration 'soon': a duration is a number of seconds, such as 90 or 1.5e3"),
    ({"matcher": "probe=x", "duration": "1e400", "reason": "r"},
     "invalid duration '1e400': a duration must be a finite number of seconds"),
    ({"matcher": "probe=x", "duration": 0, "reason": "r"}, r"invalid duration 0 \(0s\)"),
    ({"matcher": "probe=x", "duration": "0", "reason": "r"},
     r"invalid duration '0' \(0s\): it must be above 0"),
    ({"matcher": "probe=x", "duration": "-1h", "reason": "r"},
     r"invalid duration '-1h' \(-3600s\): it must be above 0"),
    ({"matcher": "probe=x", "duration": "99999999h", "reason": "r"},
     r"invalid duration '99999999h' \(359999996400s\): it must be above 0 and at most 366d$"),
    ({"matcher": "probe=x", "duration": 1e308, "reason": "r"},
     r"invalid duration 1e\+308: it must be above 0 and at most 366d$"),
    ({"matcher": "probe", "duration": "1h", "reason": "r"}, "invalid matcher"),
    ({"matcher": "probe=x", "duration": "1h", "reason": "x" * 100_000},
     "invalid reason: 100000 characters, over the limit of 1000"),
    ({"matcher": "probe=x", "duration": "1h", "reason": "planned \x1b[2J\x1b[H"},
     r"invalid reason: control character '\\x1b' \(U\+001B\) at position 8"),
    ({"matcher": "probe=" + "x" * 100_000, "duration": "1h", "reason": "r"},
     "invalid matcher: 100006 characters, over the limit of 1000"),
    ({"matcher": 'alertname="a\nb"', "duration": "1h", "reason": "r"},
     r"invalid matcher: control character '\\n' \(U\+000A\) at position 12"),
    ({"matcher": 'probe="database\u200b"', "duration": "1h", "reason": "r"},
     r"invalid matcher: invisible character U\+200B \(ZERO WIDTH SPACE\) at position 15"),
    ({"matcher": "probe=x", "duration": "1h", "reason": "db \u202eniam"},
     r"invalid reason: control character '\\u202e' \(U\+202E\) at position 3"),
])
async def test_control_silence_rejects_invalid_params(
        service: AlertService, params: dict[str, object], message: str) -> None:
    with pytest.raises(ControlError, match=message) as caught:
        await handlers(service)["alerts.silence"](params)

    assert caught.value.code == -32602


async def test_control_silence_exponent_duration(service: AlertService) -> None:
    created = await handlers(service)["alerts.silence"]({
        "matcher": "probe=x", "duration": "1.5e3", "reason": "r"})

    silence = created["silence"]
    seconds = parse_rfc3339(silence["endsAt"]) - parse_rfc3339(silence["startsAt"])
    assert seconds == pytest.approx(1500.0, abs=0.01)


@pytest.mark.parametrize(("extra", "named"), [
    ({"comment": "x"}, "comment"),
    ({"createdBy": "x", "endsAt": "2030-01-01T00:00:00Z"}, "createdBy, endsAt"),
    ({"created_by": "someone else"}, "created_by"),
])
async def test_control_silence_rejects_unknown_params(
        service: AlertService, extra: dict[str, object], named: str) -> None:
    params = {"matcher": "probe=walacor", "duration": "1h", "reason": "r", **extra}
    silence = silence_as_caller(service)

    with pytest.raises(ControlError) as caught:
        await silence(params, Call("alerts.silence", 1, Peer(pid=1, uid=0, gid=0)))

    assert caught.value.code == -32602
    assert caught.value.message == (f"unknown param(s) {named} for alerts.silence; "
                                    "accepted: duration, matcher, reason")
    assert caught.value.data == {"method": "alerts.silence"}
    assert service.listing()["silences"] == []


@pytest.mark.parametrize(("method", "params", "message"), [
    ("alerts.list", {"state": "firing"}, "unknown param(s) state for alerts.list; "
                                         "accepted: (none)"),
    ("alerts.unsilence", {"id": "abc", "force": True},
     "unknown param(s) force for alerts.unsilence; accepted: id"),
])
async def test_control_alerts_rejects_unknown_params(
        service: AlertService, method: str, params: dict[str, object], message: str) -> None:
    with pytest.raises(ControlError) as caught:
        await handlers(service)[method](params)

    assert caught.value.code == -32602
    assert caught.value.message == message


async def test_control_silence_records_peer(service: AlertService) -> None:
    params = {"matcher": "probe=walacor", "duration": "1h", "reason": "r"}

    created = await silence_as_caller(service)(
        params, Call("alerts.silence", 1, Peer(pid=42, uid=1000, gid=1000)))

    assert created["silence"]["createdBy"] == "uid=1000 pid=42"


@pytest.mark.parametrize(("matcher", "warning"), [
    ('prob="walacor"', "walacord's alerts have no label 'prob'; they have alertname, "
                       "severity, probe, resource, event"),
    ("alertname=WalacordProbDown", "walacord has no alert named 'WalacordProbDown'"),
    ('alertname="WalacordProbeDown",probe="databse"',
     "walacord has no probe 'databse'; it has database, walacor, api, host"),
    ('resource="cpu"', "walacord has no resource 'cpu'; it has disk, memory, swap"),
])
async def test_control_silence_warns_of_unknown_names(service: AlertService, matcher: str,
                                                      warning: str) -> None:
    created = await handlers(service)["alerts.silence"]({
        "matcher": matcher, "duration": "1h", "reason": "maintenance"})

    assert len(created["warnings"]) == 1
    assert created["warnings"][0].startswith(warning)


@pytest.mark.parametrize(("matcher", "warned"), [
    ('probe=""', True),
    ('probe!="walacor"', True),
    ('probe=~".*"', True),
    ('probe="walacor"', False),
    ('alertname="WalacordProbeDown",probe!="walacor"', False),
])
async def test_control_silence_warns_of_wide_matchers(service: AlertService, matcher: str,
                                                      warned: bool) -> None:
    created = await handlers(service)["alerts.silence"]({
        "matcher": matcher, "duration": "1h", "reason": "maintenance"})
    wide = [w for w in created["warnings"] if "matches every alert without a 'probe' "
                                              "label" in w]

    assert bool(wide) is warned


@pytest.mark.parametrize(("matcher", "everything"), [
    ('alertname=~".*"', True),
    ('alertname!~"x"', True),
    ('alertname=~"Walacord.*"', True),
    ('alertname="WalacordProbeDown"', False),
    # An empty value matches only alerts without the label, and some alerts carry it.
    ('probe=""', False),
    ('event=""', False),
    ('severity=~"warning|critical"', True),
    ('severity="warning"', False),
    ('probe!="nonexistent"', True),
    ('event!~"outbox\\..*"', False),
])
async def test_control_silence_warns_when_all_match(service: AlertService, matcher: str,
                                                     everything: bool) -> None:
    created = await handlers(service)["alerts.silence"]({
        "matcher": matcher, "duration": "1h", "reason": "maintenance"})
    warned = any("matches every alert walacord raises" in w for w in created["warnings"])

    assert warned is everything


@pytest.mark.parametrize(("matcher", "pair"), [
    ('alertname="WalacordProbeDown",alertname="WalacordProbeSlow"',
     'alertname="WalacordProbeDown" and alertname="WalacordProbeSlow"'),
    ('alertname="WalacordProbeDown",probe="walacor",probe!="walacor"',
     'probe="walacor" and probe!="walacor"'),
    ('alertname="WalacordProbeDown",probe="walacor",probe=~"data.*"',
     'probe="walacor" and probe=~"data.*"'),
    ('alertname="WalacordProbeDown",probe!~"wal.*",probe="walacor"',
     'probe!~"wal.*" and probe="walacor"'),
    ('alertname="WalacordProbeDown",probe=~"wal.*",probe!~"wal.*"',
     'probe=~"wal.*" and probe!~"wal.*"'),
    ('alertname="WalacordProbeDown",probe=~"walacor",probe!="walacor"',
     'probe=~"walacor" and probe!="walacor"'),
    ('alertname="WalacordProbeDown",event="",event!=""', 'event="" and event!=""'),
    # Without alertname, probe!="walacor" alone would be warned of as too wide.
    ('probe="walacor",probe!="walacor"', 'probe="walacor" and probe!="walacor"'),
])
async def test_control_silence_warns_of_contradiction(service: AlertService, matcher: str,
                                                      pair: str) -> None:
    created = await handlers(service)["alerts.silence"]({
        "matcher": matcher, "duration": "1h", "reason": "maintenance"})

    assert created["warnings"] == [f"{pair} contradict each other, so this silence matches "
                                   "no alert. Remove one of them"]


@pytest.mark.parametrize("matcher", [
    'alertname="WalacordProbeDown",probe="walacor",probe=~"wal.*"',
    'alertname="WalacordProbeDown",probe!="walacor",probe!="database"',
    'alertname="WalacordProbeDown",probe="walacor",probe="walacor"',
    'alertname="WalacordProbeDown",probe=~"wal.*",probe!~"data.*"',
])
async def test_control_silence_consistent_not_warned(service: AlertService,
                                                     matcher: str) -> None:
    created = await handlers(service)["alerts.silence"]({
        "matcher": matcher, "duration": "1h", "reason": "maintenance"})

    assert created["warnings"] == []


async def test_control_unsilence_unknown_id(service: AlertService) -> None:
    with pytest.raises(ControlError, match="not found"):
        await handlers(service)["alerts.unsilence"]({"id": "nope"})


async def test_control_unsilence_shortens_long_id(service: AlertService) -> None:
    with pytest.raises(ControlError) as caught:
        await handlers(service)["alerts.unsilence"]({"id": "a" * 5000})

    assert f"silence '{'a' * 57}...' not found" in caught.value.message
    assert len(caught.value.message) < 200
