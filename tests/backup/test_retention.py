"""The retention policy, as a pure function and applied to backdated manifests."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from walacord.backup import BackupManager
from walacord.backup.manifest import CheckResult, Manifest, format_time, write_manifest
from walacord.backup.retention import BackupRecord, RetentionPolicy, plan_retention

ManagerFactory = Callable[..., BackupManager]

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)  # a Friday


def daily(days: int, unverified: frozenset[int] = frozenset()) -> list[BackupRecord]:
    """One backup per day at 02:30, `days` days back from NOW; ids are `d<age>`."""
    return [BackupRecord(f"d{age}", (NOW - timedelta(days=age)).replace(hour=2, minute=30),
                         age not in unverified) for age in range(days)]


def test_plan_keeps_days_window() -> None:
    plan = plan_retention(daily(40), RetentionPolicy(keep_days=30), NOW)

    assert sorted(plan.keep, key=lambda i: int(i[1:])) == [f"d{age}" for age in range(30)]
    assert plan.delete == [f"d{age}" for age in range(39, 29, -1)]


def test_plan_weekly_tier_keeps_newest_per_week() -> None:
    plan = plan_retention(daily(60), RetentionPolicy(keep_days=7, keep_weekly=4), NOW)

    weekly = {i for i, reason in plan.keep.items() if reason.startswith("weekly")}
    # NOW is Friday 2026-12-04: the newest backups of the three earlier weeks are the
    # Sundays 11-29 (d5), 11-22 (d12) and 11-15 (d19). This week's d0 and d5 are
    # younger than 7 days, and the first rule that keeps a backup names the reason.
    assert weekly == {"d12", "d19"}
    assert plan.keep["d5"] == "younger than 7 days"
    assert set(plan.keep) == {f"d{age}" for age in range(7)} | {"d12", "d19"}


def test_plan_monthly_tier_keeps_newest_per_month() -> None:
    plan = plan_retention(daily(130), RetentionPolicy(keep_days=3, keep_monthly=4), NOW)

    monthly = {i for i, reason in plan.keep.items() if reason.startswith("monthly")}
    # Newest of Nov (d4, 11-30), Oct (d34, 10-31), Sep (d65, 09-30); December's is d0.
    assert monthly == {"d4", "d34", "d65"}
    assert set(plan.keep) == {"d0", "d1", "d2", "d4", "d34", "d65"}


def test_plan_tier_prefers_verified_backup() -> None:
    records = daily(20, unverified=frozenset({12}))
    plan = plan_retention(records, RetentionPolicy(keep_days=7, keep_weekly=3), NOW)

    assert "d12" not in plan.keep
    assert plan.keep["d13"].startswith("weekly tier")


def test_plan_keeps_newest_verified_when_old() -> None:
    records = daily(45, unverified=frozenset(range(40)))
    plan = plan_retention(records, RetentionPolicy(keep_days=30), NOW)

    assert plan.keep["d40"] == "newest verified backup"
    assert "d41" in plan.delete
    assert "d35" in plan.delete


def test_plan_keeps_last_remaining_backup() -> None:
    records = [BackupRecord("old", NOW - timedelta(days=400), False),
               BackupRecord("older", NOW - timedelta(days=500), False)]
    plan = plan_retention(records, RetentionPolicy(keep_days=30), NOW)

    assert plan.keep == {"old": "last remaining backup"}
    assert plan.delete == ["older"]


def test_plan_empty_directory() -> None:
    plan = plan_retention([], RetentionPolicy(), NOW)

    assert plan.keep == {}
    assert plan.delete == []


def backdated(directory: Path, age_days: int, verified: bool) -> Manifest:
    """Write a manifest finished `age_days` ago and a small file beside it."""
    finished = datetime.now(UTC) - timedelta(days=age_days)
    backup = f"db__host__{finished:%Y%m%dT%H%M%SZ}"
    check = CheckResult(ok=verified, at=format_time(finished))
    manifest = Manifest(
        id=backup, file=f"{backup}.dump", format="custom", database="db", server_host="host",
        server_version="15", pg_dump_version="15", started_at=format_time(finished),
        finished_at=format_time(finished), duration_seconds=1.0, size_bytes=4,
        sha256="0" * 64, table_count=1, row_counts={}, lock_wait_timeout_seconds=30.0,
        list_check=check, checksum_check=check)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / manifest.file).write_bytes(b"PGDM")
    write_manifest(directory, manifest)
    return manifest


@pytest.mark.anyio
async def test_apply_retention_deletes_backdated(make_manager: ManagerFactory, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    manager = make_manager(keep_days=30)
    directory = manager.directory
    verified_old = backdated(directory, 45, verified=True)
    older_verified = backdated(directory, 50, verified=True)
    recent = [backdated(directory, age, verified=False) for age in (1, 10, 29)]
    expired = [backdated(directory, age, verified=False) for age in (31, 40)]
    caplog.set_level(logging.INFO)

    plan = await manager.apply_retention()

    remaining_ids = {m.id for m in await manager.list()}
    assert remaining_ids == {m.id for m in recent} | {verified_old.id}
    assert plan.keep[verified_old.id] == "newest verified backup"
    for deleted_manifest in [*expired, older_verified]:
        assert not (directory / deleted_manifest.file).exists()
        assert not (directory / f"{deleted_manifest.id}.json").exists()
    deleted = [r for r in caplog.records if r.getMessage() == "backup.deleted"]
    assert sorted(r.fields["id"] for r in deleted) == sorted(  # type: ignore[attr-defined]
        m.id for m in [*expired, older_verified])
    assert manager.metrics.backup_deleted._value.get() == 3
    assert manager.metrics.backup_count._value.get() == 4


@pytest.mark.anyio
async def test_apply_retention_keeps_only_backup(make_manager: ManagerFactory) -> None:
    manager = make_manager(keep_days=1)
    only = backdated(manager.directory, 90, verified=False)

    plan = await manager.apply_retention()

    assert plan.delete == []
    assert (manager.directory / only.file).exists()
