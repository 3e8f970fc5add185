"""The alert engine, driven with explicit monotonic and wall times."""

from __future__ import annotations

import dataclasses

import pytest

from walacord.alerts import rules
from walacord.alerts.engine import AlertEngine, Notification
from walacord.alerts.model import Condition, Silence, parse_matchers
from walacord.config import AlertsConfig

WALL = 1_800_000_000.0


class Feed:
    """A condition source the test controls: `active` contains the conditions of this tick."""

    def __init__(self) -> None:
        self.active: list[Condition] = []

    def __call__(self) -> list[Condition]:
        return list(self.active)


def make_engine(**overrides: object) -> tuple[AlertEngine, Feed, AlertsConfig]:
    config = dataclasses.replace(AlertsConfig(), **overrides)  # type: ignore[arg-type]
    engine = AlertEngine(lambda: config, now=0.0)
    feed = Feed()
    engine.add_source(feed)
    return engine, feed, config


def run(engine: AlertEngine, start: float, stop: float, step: float = 1.0
        ) -> list[Notification]:
    """Evaluate at every `step` from `start` to `stop` inclusive; return all notifications."""
    out = []
    t = start
    while t <= stop + 1e-9:
        out += engine.evaluate(t, WALL + t)
        t += step
    return out


def kinds(notifications: list[Notification]) -> list[tuple[str, str, bool]]:
    return [(n.kind, n.alert["labels"]["alertname"], n.page) for n in notifications]


def test_engine_fires_after_for_duration_once() -> None:
    engine, feed, config = make_engine(probe_down_for=5.0)
    feed.active = [rules.probe_down("database", False, config, "connection refused")]

    before = run(engine, 0, 4)
    after = run(engine, 5, 30)

    assert before == []
    assert kinds(after) == [("firing", rules.PROBE_DOWN, True)]
    alert = after[0].alert
    assert alert["labels"] == {"alertname": rules.PROBE_DOWN, "severity": "critical",
                               "probe": "database"}
    assert "connection refused" in alert["annotations"]["description"]
    assert alert["startsAt"] == "2027-01-15T08:00:00.000Z"
    assert alert["endsAt"] is None


def test_engine_resolves_once_with_ends_at() -> None:
    engine, feed, config = make_engine(probe_down_for=0.0)
    feed.active = [rules.probe_down("database", False, config)]
    run(engine, 0, 10)
    feed.active = []

    out = run(engine, 11, 40)

    assert kinds(out) == [("resolved", rules.PROBE_DOWN, True)]
    assert out[0].alert["endsAt"] == "2027-01-15T08:00:11.000Z"
    assert engine.alerts == {}
    assert [a.fingerprint for a in engine.recent] == [out[0].fingerprint]


def test_engine_drops_pending_alert_silently() -> None:
    engine, feed, config = make_engine(probe_down_for=10.0)
    feed.active = [rules.probe_down("database", False, config)]
    run(engine, 0, 5)
    feed.active = []

    assert run(engine, 6, 20) == []
    assert list(engine.recent) == []


def test_engine_repeats_on_interval_not_tick() -> None:
    engine, feed, config = make_engine(probe_down_for=0.0, repeat_interval=60.0)
    feed.active = [rules.probe_down("walacor", False, config)]

    out = run(engine, 0, 130)

    assert kinds(out) == [("firing", rules.PROBE_DOWN, True),
                          ("repeated", rules.PROBE_DOWN, True),
                          ("repeated", rules.PROBE_DOWN, True)]


def test_engine_fingerprint_stable_across_ticks() -> None:
    engine, feed, config = make_engine(probe_down_for=0.0)
    feed.active = [rules.probe_down("database", False, config, "first reason")]
    first = run(engine, 0, 0)
    feed.active = [rules.probe_down("database", False, config, "second reason")]
    run(engine, 1, 5)
    feed.active = []
    resolved = run(engine, 6, 6)

    assert first[0].fingerprint == resolved[0].fingerprint
    assert "second reason" in resolved[0].alert["annotations"]["description"]


def test_engine_rate_cap_defers_pages() -> None:
    engine, feed, config = make_engine(probe_down_for=0.0, rate_limit=2,
                                       rate_limit_window=10.0)
    feed.active = [rules.probe_down(f"p{i}", False, config) for i in range(4)]

    first = engine.evaluate(0.0, WALL)
    later = run(engine, 1, 10)

    assert [n.page for n in first] == [True, True, False, False]
    assert engine.rate_limited == 2
    # Deferred alerts are paged once the bucket refills: 2 per 10 s is one per 5 s.
    assert [n.kind for n in later] == ["paged", "paged"]
    assert all(a.paged for a in engine.alerts.values())


def test_engine_resolve_bypasses_rate_cap() -> None:
    engine, feed, config = make_engine(probe_down_for=0.0, rate_limit=1,
                                       rate_limit_window=3600.0)
    feed.active = [rules.probe_down("database", False, config)]
    engine.evaluate(0.0, WALL)
    feed.active = []

    out = engine.evaluate(1.0, WALL + 1)

    assert kinds(out) == [("resolved", rules.PROBE_DOWN, True)]


def test_engine_suppresses_outbox_while_database_down() -> None:
    engine, feed, config = make_engine(probe_down_for=5.0, outbox_pending_age_seconds=60.0,
                                       outbox_pending_age_for=0.0)
    database_down = rules.probe_down("database", False, config)
    outbox_old = rules.outbox_pending_too_old(120.0, config)
    feed.active = [database_down, outbox_old]

    # The outbox alert fires first, but its cause is already pending: not paged.
    out = run(engine, 0, 10)

    assert kinds(out) == [("firing", rules.OUTBOX_PENDING_TOO_OLD, False),
                          ("firing", rules.PROBE_DOWN, True)]
    assert out[0].alert["heldBy"] == f"depends on {rules.PROBE_DOWN}{{probe=database}}"
    assert engine.counts() == {"pending": 0, "firing": 1, "suppressed": 1, "silenced": 0}

    # The database comes back but the outbox is still old: now it is paged.
    feed.active = [outbox_old]
    out = run(engine, 11, 11)

    assert kinds(out) == [("resolved", rules.PROBE_DOWN, True),
                          ("paged", rules.OUTBOX_PENDING_TOO_OLD, True)]


def test_engine_suppressed_alert_resolves_unpaged() -> None:
    engine, feed, config = make_engine(probe_down_for=0.0, mode_not_normal_for=0.0)
    feed.active = [rules.probe_down("database", False, config),
                   rules.mode_not_normal("emergency", config)]
    run(engine, 0, 5)
    feed.active = []

    out = run(engine, 6, 6)

    assert sorted(kinds(out)) == [("resolved", rules.MODE_NOT_NORMAL, False),
                                  ("resolved", rules.PROBE_DOWN, True)]


def test_engine_silence_holds_page_until_expiry() -> None:
    engine, feed, config = make_engine(probe_down_for=0.0)
    engine.silences = [Silence.create(parse_matchers("probe=walacor"), 10.0, "maintenance",
                                      now=WALL)]
    feed.active = [rules.probe_down("walacor", False, config),
                   rules.probe_down("database", False, config)]

    first = engine.evaluate(0.0, WALL)
    listing = engine.listing(WALL)
    later = run(engine, 1, 12)

    assert sorted((n.alert["labels"]["probe"], n.page) for n in first) == [
        ("database", True), ("walacor", False)]
    assert [a["labels"]["probe"] for a in listing["silenced"]] == ["walacor"]
    assert [a["labels"]["probe"] for a in listing["active"]] == ["database"]
    assert [(n.kind, n.alert["labels"]["probe"]) for n in later] == [("paged", "walacor")]


def test_engine_pushed_condition_expires_after_hold() -> None:
    engine, _feed, config = make_engine()
    engine.observe(rules.critical_error("component.crashed", "boom.", config), now=0.0,
                   hold=30.0)

    fired = engine.evaluate(0.0, WALL)
    quiet = run(engine, 1, 29)
    resolved = engine.evaluate(30.0, WALL + 30)

    assert kinds(fired) == [("firing", rules.CRITICAL_ERROR, True)]
    assert quiet == []
    assert kinds(resolved) == [("resolved", rules.CRITICAL_ERROR, True)]


def test_engine_pushed_inactive_resolves() -> None:
    engine, _feed, config = make_engine(conservation_failure_for=0.0)
    engine.observe(rules.conservation_failed(True, config, "sum differs"), now=0.0)
    engine.evaluate(0.0, WALL)
    engine.observe(rules.conservation_failed(False, config), now=1.0)

    out = engine.evaluate(1.0, WALL + 1)

    assert kinds(out) == [("resolved", rules.CONSERVATION_FAILED, True)]


def test_engine_broken_source_keeps_previous_verdicts() -> None:
    engine, feed, config = make_engine(probe_down_for=0.0)
    feed.active = [rules.probe_down("database", False, config)]
    engine.evaluate(0.0, WALL)
    calls = {"n": 0}

    def broken() -> list[Condition]:
        calls["n"] += 1
        raise RuntimeError("registry unavailable")

    engine.sources = [broken]

    out = run(engine, 1, 5)

    assert out == []
    assert engine.source_errors == 5
    assert calls["n"] == 5


@pytest.mark.parametrize(("level", "firing"), [
    ("ok", []), ("warning", ["warning"]), ("critical", ["critical"]),
])
def test_engine_host_resource_levels(level: str, firing: list[str]) -> None:
    engine, feed, config = make_engine(host_resources_for=0.0)
    feed.active = rules.host_resource("disk", level, 0.93, config)

    out = engine.evaluate(0.0, WALL)

    assert [n.alert["labels"]["severity"] for n in out] == firing


def restored_engine(grace: float) -> tuple[AlertEngine, Feed, AlertsConfig, Condition]:
    """Fire an alert in one engine and restore it into a fresh one at time 100."""
    first, feed, config = make_engine(probe_down_for=0.0)
    down = rules.probe_down("database", False, config)
    feed.active = [down]
    first.evaluate(0.0, WALL)
    documents = first.firing_documents()

    engine, feed, config = make_engine(probe_down_for=5.0)
    engine.restore(documents, now=100.0, grace=grace)
    return engine, feed, config, down


def test_engine_restored_alert_resolves_after_grace() -> None:
    engine, _feed, _config, down = restored_engine(grace=10.0)

    quiet = run(engine, 100, 109)
    resolved = engine.evaluate(110.0, WALL + 110)

    assert quiet == []
    assert kinds(resolved) == [("resolved", rules.PROBE_DOWN, True)]
    assert resolved[0].fingerprint == down.fingerprint
    assert resolved[0].alert["startsAt"] == "2027-01-15T08:00:00.000Z"


def test_engine_restored_alert_resolves_on_probe_success() -> None:
    engine, feed, config, down = restored_engine(grace=60.0)
    feed.active = [rules.probe_down("database", True, config)]

    resolved = engine.evaluate(101.0, WALL + 101)

    assert kinds(resolved) == [("resolved", rules.PROBE_DOWN, True)]
    assert down.fingerprint not in engine.alerts


def test_engine_restored_alert_waits_for_unchecked_verdict() -> None:
    engine, feed, config, down = restored_engine(grace=60.0)
    # An inactive verdict that no check produced, such as "no dead operations" before
    # the outbox was read, does not end the grace.
    feed.active = [dataclasses.replace(rules.probe_down("database", True, config),
                                       checked=False)]

    quiet = run(engine, 101, 159)

    assert quiet == []
    assert down.fingerprint in engine.alerts


def test_engine_restored_alert_not_fired_again() -> None:
    engine, feed, _config, down = restored_engine(grace=10.0)
    feed.active = [down]

    out = run(engine, 100, 200)

    assert out == []
    assert engine.alerts[down.fingerprint].state == "firing"
    assert engine.alerts[down.fingerprint].restored_until is None
