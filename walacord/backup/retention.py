"""The retention policy: which backups to keep, as a pure function of their dates.

A backup is kept when any rule keeps it:
- it is younger than `keep_days` days;
- it is the chosen backup of one of the `keep_weekly` most recent ISO weeks, or of one
  of the `keep_monthly` most recent calendar months (UTC), counting the current week or
  month as the first. The chosen backup of a period is its newest verified one, or its
  newest one when none there is verified;
- it is the newest verified backup;
- it is the newest backup and every other rule would delete all of them.
Everything else is deleted.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta


@dataclass(frozen=True)
class RetentionPolicy:
    """How long backups are kept; weekly and monthly tiers are off when 0."""

    keep_days: int = 30
    keep_weekly: int = 0
    keep_monthly: int = 0


@dataclass(frozen=True)
class BackupRecord:
    """The facts about one backup that the policy looks at."""

    id: str
    created: datetime
    verified: bool


@dataclass
class RetentionPlan:
    """The policy's decision: why each kept backup stays, and which ones go."""

    keep: dict[str, str] = field(default_factory=dict)
    delete: list[str] = field(default_factory=list)


def plan_retention(backups: Sequence[BackupRecord], policy: RetentionPolicy,
                   now: datetime) -> RetentionPlan:
    """Decide which of `backups` to keep and which to delete at time `now`."""
    plan = RetentionPlan()
    newest_first = sorted(backups, key=lambda b: (b.created, b.id), reverse=True)

    def keep(record: BackupRecord, reason: str) -> None:
        plan.keep.setdefault(record.id, reason)

    cutoff = now - timedelta(days=policy.keep_days)
    for record in newest_first:
        if record.created > cutoff:
            keep(record, f"younger than {policy.keep_days} days")

    this_week = _week_start(now)
    for record in _chosen_per_period(newest_first, lambda b: _week_start(b.created)):
        weeks_back = (this_week - _week_start(record.created)).days // 7
        if 0 <= weeks_back < policy.keep_weekly:
            year, week, _ = record.created.isocalendar()
            keep(record, f"weekly tier: chosen backup of {year}-W{week:02d}")

    for record in _chosen_per_period(newest_first, lambda b: (b.created.year, b.created.month)):
        months_back = _month_index(now) - _month_index(record.created)
        if 0 <= months_back < policy.keep_monthly:
            keep(record, f"monthly tier: chosen backup of {record.created:%Y-%m}")

    newest_verified = next((b for b in newest_first if b.verified), None)
    if newest_verified is not None:
        keep(newest_verified, "newest verified backup")
    if newest_first and not plan.keep:
        keep(newest_first[0], "last remaining backup")

    plan.delete = [b.id for b in reversed(newest_first) if b.id not in plan.keep]
    return plan


def _week_start(moment: datetime) -> datetime:
    monday = moment - timedelta(days=moment.weekday())
    return monday.replace(hour=0, minute=0, second=0, microsecond=0)


def _month_index(moment: datetime) -> int:
    return moment.year * 12 + moment.month - 1


def _chosen_per_period(newest_first: Sequence[BackupRecord],
                       period_of: Callable[[BackupRecord], Hashable]) -> list[BackupRecord]:
    """Return each period's newest verified backup, or its newest when none is verified."""
    chosen: dict[Hashable, BackupRecord] = {}
    for record in newest_first:
        period = period_of(record)
        current = chosen.get(period)
        if current is None or (record.verified and not current.verified):
            chosen[period] = record
    return list(chosen.values())
