"""The built-in alert rules, their dependency table, and a source that reads walacord's metrics.

Each rule is a pure function from observed facts and `[alerts]` thresholds to one or more
`Condition`s, so components can push verdicts (`AlertEngine.observe`) and tests can drive
the rules from tables. `MetricsSource` applies the rules to the samples in walacord's own
Prometheus registry on every evaluation, which ties the alerts to the metrics that
probes, modes, the outbox and backups already export, without importing those modules.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from walacord.alerts.model import Alert, Condition
from walacord.backup.alerts import FAILED_ALERT_OPERATIONS
from walacord.config import AlertsConfig

# Alert names, shared with packaging/prometheus/walacord-rules.yml where a rule exists
# on both sides.
PROBE_DOWN = "WalacordProbeDown"
MODE_NOT_NORMAL = "WalacordModeNotNormal"
SLOW_PROBE = "WalacordProbeSlow"
HOST_RESOURCE = "WalacordHostResource"
OUTBOX_PENDING_TOO_OLD = "WalacordOutboxPendingTooOld"
DEAD_OPERATIONS = "WalacordOutboxDeadOperations"
CONSERVATION_FAILED = "WalacordConservationCheckFailed"
BACKUP_TOO_OLD = "WalacordBackupTooOld"
BACKUP_FAILED = "WalacordBackupFailed"
BACKUP_DAMAGED = "WalacordBackupDamaged"
RECYCLE_BUDGET_EXHAUSTED = "WalacordRecycleBudgetExhausted"
CRITICAL_ERROR = "WalacordCriticalError"
ALERT_NAMES = (PROBE_DOWN, MODE_NOT_NORMAL, SLOW_PROBE, HOST_RESOURCE, OUTBOX_PENDING_TOO_OLD,
               DEAD_OPERATIONS, CONSERVATION_FAILED, BACKUP_TOO_OLD, BACKUP_FAILED,
               BACKUP_DAMAGED, RECYCLE_BUDGET_EXHAUSTED, CRITICAL_ERROR)
# Every label name the rules below give an alert.
LABEL_NAMES = ("alertname", "severity", "probe", "resource", "event")
# The label, besides alertname and severity, that the rules below give every alert of
# these names.
ALERT_LABEL = {PROBE_DOWN: "probe", SLOW_PROBE: "probe", HOST_RESOURCE: "resource",
               CRITICAL_ERROR: "event"}


def probe_down(probe: str, success: bool, config: AlertsConfig, reason: str = "") -> Condition:
    detail = f": {reason}" if reason else ""
    return Condition(
        PROBE_DOWN, active=not success, severity="critical", labels={"probe": probe},
        summary=f"walacord's {probe} probe is failing",
        description=f"The {probe} probe has failed for at least "
                    f"{config.probe_down_for:g}s{detail}.",
        value=0.0 if not success else 1.0, for_seconds=config.probe_down_for,
        checked=True)


def mode_not_normal(mode: str, config: AlertsConfig) -> Condition:
    return Condition(
        MODE_NOT_NORMAL, active=mode != "normal", severity="warning",
        summary=f"walacord is in {mode} mode",
        description=f"walacord has been in {mode} mode instead of normal for at least "
                    f"{config.mode_not_normal_for:g}s.",
        for_seconds=config.mode_not_normal_for)


def slow_probe(probe: str, latency: float, config: AlertsConfig) -> Condition:
    threshold = config.slow_probe_seconds
    return Condition(
        SLOW_PROBE, active=latency > threshold, severity="warning", labels={"probe": probe},
        summary=f"walacord's {probe} probe is slow",
        description=f"The {probe} probe took {latency:.3f}s, above the threshold of "
                    f"{threshold:g}s.",
        value=latency, for_seconds=config.slow_probe_for)


def host_resource(resource: str, level: str, value: float | None,
                  config: AlertsConfig) -> list[Condition]:
    """Return one condition per severity, so warning and critical are separate alerts."""
    reading = "" if value is None else f" ({value:g})"
    return [
        Condition(
            HOST_RESOURCE, active=level == severity, severity=severity,
            labels={"resource": resource},
            summary=f"host {resource} is at {severity} level",
            description=f"The host's {resource} reached the {severity} level{reading}.",
            value=value, for_seconds=config.host_resources_for)
        for severity in ("warning", "critical")
    ]


def outbox_pending_too_old(age: float, config: AlertsConfig) -> Condition:
    threshold = config.outbox_pending_age_seconds
    return Condition(
        OUTBOX_PENDING_TOO_OLD, active=age > threshold, severity="warning",
        summary="the outbox's oldest pending operation is too old",
        description=f"The oldest pending outbox operation is {age:.0f}s old, above the "
                    f"threshold of {threshold:g}s.",
        value=age, for_seconds=config.outbox_pending_age_for)


def dead_operations(count: float, config: AlertsConfig) -> Condition:
    return Condition(
        DEAD_OPERATIONS, active=count > 0, severity="critical",
        summary="the outbox holds dead operations",
        description=f"{count:.0f} outbox operations gave up retrying and need a person. "
                    "Later operations with the same ordering key wait behind them "
                    "(walacord_outbox_blocked_operations). Inspect them with walacorctl "
                    "outbox list --state dead, then retry or drop each.",
        value=count, for_seconds=config.dead_operations_for)


def conservation_failed(failed: bool, config: AlertsConfig, detail: str = "") -> Condition:
    return Condition(
        CONSERVATION_FAILED, active=failed, severity="critical",
        summary="the conservation check failed",
        description=f"The conservation check failed{': ' + detail if detail else ''}.",
        for_seconds=config.conservation_failure_for)


def backup_too_old(age: float, config: AlertsConfig) -> Condition:
    limit = config.backup_max_age
    return Condition(
        BACKUP_TOO_OLD, active=age > limit, severity="warning",
        summary="the last successful backup is too old",
        description=f"The last successful backup finished {age / 3600:.1f}h ago, above the "
                    f"limit of {limit / 3600:g}h.",
        value=age, for_seconds=config.backup_for)


def backup_failed(failed: bool, config: AlertsConfig, detail: str = "") -> Condition:
    return Condition(
        BACKUP_FAILED, active=failed, severity="warning",
        summary="a backup or its verification failed",
        description=f"The last backup or its verification failed{': ' + detail if detail else ''}; "
                    "the alert resolves after the next successful backup.",
        for_seconds=config.backup_for)


def backup_damaged(count: float, config: AlertsConfig) -> Condition:
    return Condition(
        BACKUP_DAMAGED, active=count > 0, severity="warning",
        summary="a stored backup failed its latest check",
        description=f"{count:.0f} stored backups failed their latest checksum, readability "
                    "or drill check, or lost their file or manifest; run walacorctl backup "
                    "list. The alert resolves when they pass a check again or are deleted.",
        value=count, for_seconds=config.backup_for)


def recycle_budget_exhausted(exhausted: bool, config: AlertsConfig,
                             detail: str = "") -> Condition:
    return Condition(
        RECYCLE_BUDGET_EXHAUSTED, active=exhausted, severity="critical",
        summary="the database pool's recycle budget is exhausted",
        description="walacord stopped recycling database connections because the recycle "
                    f"budget is used up{': ' + detail if detail else ''}.",
        for_seconds=config.recycle_budget_for)


def critical_error(event: str, message: str, config: AlertsConfig) -> Condition:
    return Condition(
        CRITICAL_ERROR, active=True, severity="critical", labels={"event": event},
        summary=f"walacord logged a critical error: {event}",
        description=f"{message} The alert resolves after "
                    f"{config.critical_error_resolve_after:g}s without another one.")


# --- dependencies -------------------------------------------------------------------


@dataclass(frozen=True)
class Dependency:
    """While a `cause` alert is pending or firing, `dependent` alerts are logged, not paged.

    `cause_labels` are label values the cause must carry. `same` names labels that must
    be equal on both alerts, e.g. a slow probe depends on the same probe being down.
    """

    dependent: str
    cause: str
    cause_labels: Mapping[str, str] = field(default_factory=dict)
    same: tuple[str, ...] = ()

    def applies(self, dependent: Alert, cause: Alert) -> bool:
        if dependent.alertname != self.dependent or cause.alertname != self.cause:
            return False
        if any(cause.labels.get(k) != v for k, v in self.cause_labels.items()):
            return False
        return all(dependent.labels.get(k) == cause.labels.get(k) for k in self.same)


DATABASE_DOWN = {"probe": "database"}
WALACOR_DOWN = {"probe": "walacor"}

DEPENDENCIES: tuple[Dependency, ...] = (
    # The outbox grows whenever a sink is unreachable; the probe alert names the cause.
    Dependency(OUTBOX_PENDING_TOO_OLD, PROBE_DOWN, DATABASE_DOWN),
    Dependency(OUTBOX_PENDING_TOO_OLD, PROBE_DOWN, WALACOR_DOWN),
    # Any failing probe changes the mode, and the probe alert names the cause.
    Dependency(MODE_NOT_NORMAL, PROBE_DOWN),
    # A probe that fails is not separately slow.
    Dependency(SLOW_PROBE, PROBE_DOWN, same=("probe",)),
    # Without a database, pool recycling and backups fail as a consequence.
    Dependency(RECYCLE_BUDGET_EXHAUSTED, PROBE_DOWN, DATABASE_DOWN),
    Dependency(BACKUP_FAILED, PROBE_DOWN, DATABASE_DOWN),
)


def cause_of(alert: Alert, others: Iterable[Alert],
             dependencies: Iterable[Dependency] = DEPENDENCIES) -> Alert | None:
    """Return a pending or firing alert that `alert` depends on, or None."""
    for other in others:
        if other is alert or other.state == "resolved":
            continue
        if any(dep.applies(alert, other) for dep in dependencies):
            return other
    return None


# --- reading walacord's metrics -----------------------------------------------------


class MetricsSource:
    """Apply the built-in rules to the samples in walacord's registry.

    Metric names are the ones walacord exports (see packaging/prometheus). A metric that
    is absent, because its component is not configured, produces no condition.
    Probe latency is read from a gauge, or from a histogram as the mean over the last
    evaluation interval.

    NOTE: host resources, the conservation check and the recycle budget export no
    metric with an agreed name, so their components must push conditions with
    `AlertService.observe(rules.host_resource(...))` and the like.
    """

    # Every sample name the rules read; evaluation collects only these, not the registry.
    SAMPLES = ("walacord_probe_success", "walacord_probe_duration_seconds",
               "walacord_probe_duration_seconds_sum", "walacord_probe_duration_seconds_count",
               "walacord_mode", "walacord_outbox_oldest_pending_age_seconds",
               "walacord_outbox_dead_operations", "walacord_backup_failures_total",
               "walacord_backup_last_success_timestamp_seconds", "walacord_backups_damaged")

    def __init__(self, registry: CollectorRegistry, config: Callable[[], AlertsConfig],
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self._view = registry.restricted_registry(self.SAMPLES)
        self.config = config
        self.clock = clock
        self.started_at = clock()
        self._histogram_totals: dict[str, tuple[float, float]] = {}
        self._failures_seen: float | None = None
        self._last_success_seen: float | None = None
        self._backup_failed = False

    def __call__(self) -> list[Condition]:
        config = self.config()
        samples = self._samples()
        conditions: list[Condition] = []

        # Step 1: probes, their latency and the mode.
        for labels, value in samples.get("walacord_probe_success", []):
            if "probe" in labels:
                conditions.append(probe_down(labels["probe"], value >= 1, config))
        for probe, latency in self._probe_latencies(samples).items():
            conditions.append(slow_probe(probe, latency, config))
        for labels, value in samples.get("walacord_mode", []):
            if value >= 1 and "mode" in labels:
                conditions.append(mode_not_normal(labels["mode"], config))

        # Step 2: the outbox.
        for _labels, value in samples.get("walacord_outbox_oldest_pending_age_seconds", []):
            conditions.append(outbox_pending_too_old(value, config))
        for _labels, value in samples.get("walacord_outbox_dead_operations", []):
            conditions.append(dead_operations(value, config))

        # Step 3: backups.
        conditions.extend(self._backup_conditions(samples, config))
        return conditions

    def _samples(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in self._view.collect():
            for sample in family.samples:
                samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
        return samples

    def _probe_latencies(self, samples: Mapping[str, list[tuple[dict[str, str], float]]]
                         ) -> dict[str, float]:
        latencies: dict[str, float] = {}
        for labels, value in samples.get("walacord_probe_duration_seconds", []):
            if "probe" in labels:
                latencies[labels["probe"]] = value
        sums = {lb.get("probe", ""): v
                for lb, v in samples.get("walacord_probe_duration_seconds_sum", [])}
        counts = {lb.get("probe", ""): v
                  for lb, v in samples.get("walacord_probe_duration_seconds_count", [])}
        for probe, total in sums.items():
            count = counts.get(probe, 0.0)
            before_total, before_count = self._histogram_totals.get(probe, (0.0, 0.0))
            self._histogram_totals[probe] = (total, count)
            if probe and count > before_count:
                latencies[probe] = (total - before_total) / (count - before_count)
        return latencies

    def _backup_conditions(self, samples: Mapping[str, list[tuple[dict[str, str], float]]],
                           config: AlertsConfig) -> list[Condition]:
        conditions = []
        last_success = next(
            (v for _, v in samples.get("walacord_backup_last_success_timestamp_seconds", [])),
            None)
        if last_success is not None:
            # Zero means no backup has succeeded yet: count the age from walacord's start.
            since = last_success if last_success > 0 else self.started_at
            conditions.append(backup_too_old(max(0.0, self.clock() - since), config))

        failures = sum(v for labels, v in samples.get("walacord_backup_failures_total", [])
                       if labels.get("operation") in FAILED_ALERT_OPERATIONS)
        if "walacord_backup_failures_total" in samples:
            # A success clears the alert before a failure sets it, so a re-check that
            # fails in the same evaluation as the backup before it still fires.
            if last_success is not None and self._last_success_seen is not None \
                    and last_success > self._last_success_seen:
                self._backup_failed = False
            if self._failures_seen is not None and failures > self._failures_seen:
                self._backup_failed = True
            self._failures_seen = failures
            self._last_success_seen = last_success
            conditions.append(backup_failed(self._backup_failed, config))
        for _, damaged in samples.get("walacord_backups_damaged", []):
            conditions.append(backup_damaged(damaged, config))
        return conditions
