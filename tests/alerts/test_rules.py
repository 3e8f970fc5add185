"""Built-in rules, the dependency table and the source that reads walacord's registry."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from walacord.alerts import rules
from walacord.alerts.model import Alert, Condition
from walacord.config import AlertsConfig

CONFIG = AlertsConfig()


def alert_from(condition: Condition, state: str = "firing") -> Alert:
    alert = Alert(condition.fingerprint, condition.full_labels(), {}, 0.0, 0.0, 0.0)
    alert.state = state  # type: ignore[assignment]
    return alert


DATABASE_DOWN = rules.probe_down("database", False, CONFIG)
WALACOR_DOWN = rules.probe_down("walacor", False, CONFIG)
HTTP_DOWN = rules.probe_down("http", False, CONFIG)

# (dependent, cause, suppressed?) — the whole table, written out so a change to
# DEPENDENCIES shows up here.
DEPENDENCY_CASES = [
    (rules.outbox_pending_too_old(900, CONFIG), DATABASE_DOWN, True),
    (rules.outbox_pending_too_old(900, CONFIG), WALACOR_DOWN, True),
    (rules.outbox_pending_too_old(900, CONFIG), HTTP_DOWN, False),
    (rules.mode_not_normal("emergency", CONFIG), DATABASE_DOWN, True),
    (rules.mode_not_normal("offline", CONFIG), WALACOR_DOWN, True),
    (rules.slow_probe("database", 3.0, CONFIG), DATABASE_DOWN, True),
    (rules.slow_probe("walacor", 3.0, CONFIG), DATABASE_DOWN, False),
    (rules.recycle_budget_exhausted(True, CONFIG), DATABASE_DOWN, True),
    (rules.recycle_budget_exhausted(True, CONFIG), WALACOR_DOWN, False),
    (rules.backup_failed(True, CONFIG), DATABASE_DOWN, True),
    (rules.backup_too_old(10**6, CONFIG), DATABASE_DOWN, False),
    (rules.dead_operations(3, CONFIG), DATABASE_DOWN, False),
    (rules.conservation_failed(True, CONFIG), DATABASE_DOWN, False),
    (rules.critical_error("x.y", "boom.", CONFIG), DATABASE_DOWN, False),
    (DATABASE_DOWN, WALACOR_DOWN, False),
]


@pytest.mark.parametrize(("dependent", "cause", "suppressed"), DEPENDENCY_CASES,
                         ids=[f"{d.alertname}-{c.labels.get('probe')}"
                              for d, c, _ in DEPENDENCY_CASES])
def test_dependencies_table(dependent: Condition, cause: Condition, suppressed: bool) -> None:
    found = rules.cause_of(alert_from(dependent), [alert_from(cause)])

    assert (found is not None) is suppressed


def test_dependencies_pending_cause_counts() -> None:
    outbox = alert_from(rules.outbox_pending_too_old(900, CONFIG))

    assert rules.cause_of(outbox, [alert_from(DATABASE_DOWN, "pending")]) is not None
    assert rules.cause_of(outbox, [alert_from(DATABASE_DOWN, "resolved")]) is None


@pytest.mark.parametrize(("condition", "active"), [
    (rules.probe_down("database", True, CONFIG), False),
    (rules.probe_down("database", False, CONFIG), True),
    (rules.mode_not_normal("normal", CONFIG), False),
    (rules.mode_not_normal("degraded", CONFIG), True),
    (rules.slow_probe("database", CONFIG.slow_probe_seconds, CONFIG), False),
    (rules.slow_probe("database", CONFIG.slow_probe_seconds + 0.01, CONFIG), True),
    (rules.outbox_pending_too_old(CONFIG.outbox_pending_age_seconds, CONFIG), False),
    (rules.outbox_pending_too_old(CONFIG.outbox_pending_age_seconds + 1, CONFIG), True),
    (rules.dead_operations(0, CONFIG), False),
    (rules.dead_operations(1, CONFIG), True),
    (rules.backup_too_old(CONFIG.backup_max_age, CONFIG), False),
    (rules.backup_too_old(CONFIG.backup_max_age + 1, CONFIG), True),
])
def test_rules_thresholds(condition: Condition, active: bool) -> None:
    assert condition.active is active


def test_rules_probe_alert_carries_probe_label() -> None:
    condition = rules.probe_down("walacor", False, CONFIG, "HTTP 503")

    assert condition.full_labels() == {"alertname": "WalacordProbeDown",
                                       "severity": "critical", "probe": "walacor"}
    assert condition.for_seconds == CONFIG.probe_down_for
    assert "HTTP 503" in condition.description


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def active_names(conditions: list[Condition]) -> list[tuple[str, str]]:
    return sorted((c.alertname, c.labels.get("probe", "")) for c in conditions if c.active)


def test_metrics_source_reads_probes_mode_outbox() -> None:
    registry = CollectorRegistry()
    success = Gauge("walacord_probe_success", "", ["probe"], registry=registry)
    mode = Gauge("walacord_mode", "", ["mode"], registry=registry)
    oldest = Gauge("walacord_outbox_oldest_pending_age_seconds", "", registry=registry)
    dead = Gauge("walacord_outbox_dead_operations", "", registry=registry)
    source = rules.MetricsSource(registry, lambda: CONFIG)
    success.labels(probe="database").set(0)
    success.labels(probe="walacor").set(1)
    mode.labels(mode="normal").set(0)
    mode.labels(mode="emergency").set(1)
    oldest.set(CONFIG.outbox_pending_age_seconds + 5)
    dead.set(0)

    conditions = source()

    assert active_names(conditions) == [
        ("WalacordModeNotNormal", ""), ("WalacordOutboxPendingTooOld", ""),
        ("WalacordProbeDown", "database")]
    assert [c.labels["probe"] for c in conditions if c.alertname == "WalacordProbeDown"] \
        == ["database", "walacor"]


def test_metrics_source_histogram_latency_per_interval() -> None:
    registry = CollectorRegistry()
    duration = Histogram("walacord_probe_duration_seconds", "", ["probe"], registry=registry)
    source = rules.MetricsSource(registry, lambda: CONFIG)
    for _ in range(10):
        duration.labels(probe="database").observe(0.01)
    first = source()
    duration.labels(probe="database").observe(5.0)
    second = source()
    third = source()

    assert active_names(first) == []
    assert active_names(second) == [("WalacordProbeSlow", "database")]
    # No new observation: the latency verdict is withheld, so the alert would resolve.
    assert active_names(third) == []


def test_metrics_source_backup_age_and_failure() -> None:
    registry = CollectorRegistry()
    last = Gauge("walacord_backup_last_success_timestamp_seconds", "", registry=registry)
    failures = Counter("walacord_backup_failures", "", ["operation"], registry=registry)
    failures.labels(operation="dump")
    clock = Clock(1_000_000.0)
    source = rules.MetricsSource(registry, lambda: CONFIG, clock=clock)
    last.set(clock.now - 3600)

    healthy = source()
    failures.labels(operation="dump").inc()
    failed = source()
    clock.now += CONFIG.backup_max_age
    stale = source()
    last.set(clock.now)
    recovered = source()

    assert active_names(healthy) == []
    assert active_names(failed) == [("WalacordBackupFailed", "")]
    assert active_names(stale) == [("WalacordBackupFailed", ""), ("WalacordBackupTooOld", "")]
    assert active_names(recovered) == []


def test_metrics_source_restore_failure_no_alert() -> None:
    registry = CollectorRegistry()
    Gauge("walacord_backup_last_success_timestamp_seconds", "", registry=registry).set(
        time.time())
    failures = Counter("walacord_backup_failures", "", ["operation"], registry=registry)
    for operation in ("dump", "verify", "drill", "restore"):
        failures.labels(operation=operation)
    source = rules.MetricsSource(registry, lambda: CONFIG)
    source()

    failures.labels(operation="restore").inc()
    failures.labels(operation="drill").inc()
    after_restore = source()
    failures.labels(operation="verify").inc()
    after_verify = source()

    assert active_names(after_restore) == []
    assert active_names(after_verify) == [("WalacordBackupFailed", "")]


def test_metrics_source_recheck_failure_with_success() -> None:
    registry = CollectorRegistry()
    last = Gauge("walacord_backup_last_success_timestamp_seconds", "", registry=registry)
    failures = Counter("walacord_backup_failures", "", ["operation"], registry=registry)
    damaged = Gauge("walacord_backups_damaged", "", registry=registry)
    failures.labels(operation="verify")
    clock = Clock(1_000_000.0)
    source = rules.MetricsSource(registry, lambda: CONFIG, clock=clock)
    last.set(clock.now - 3600)
    source()

    # A backup succeeds, and a re-check of an older one fails, before the next evaluation.
    last.set(clock.now)
    failures.labels(operation="verify").inc()
    damaged.set(1)
    both = source()
    last.set(clock.now + 86400)
    next_backup = source()
    damaged.set(0)
    deleted = source()

    assert active_names(both) == [("WalacordBackupDamaged", ""), ("WalacordBackupFailed", "")]
    assert active_names(next_backup) == [("WalacordBackupDamaged", "")]
    assert active_names(deleted) == []


def test_metrics_source_absent_metrics_raise_nothing() -> None:
    source = rules.MetricsSource(CollectorRegistry(), lambda: CONFIG)

    assert source() == []


def test_metrics_source_samples_complete() -> None:
    # MetricsSource collects only SAMPLES; a rule that reads another name would see
    # nothing and never fire.
    import inspect
    import re

    from walacord.alerts.rules import MetricsSource

    source = inspect.getsource(MetricsSource)
    read = set(re.findall(r'samples\.get\("([a-z_]+)"', source))
    assert read
    assert read <= set(MetricsSource.SAMPLES)
