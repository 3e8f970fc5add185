"""The backup schedule: daily start times, missed runs, drills, re-checks and age alerts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from tests.backup.conftest import fifo_in_place_of, overwrite_two_bytes
from walacord.backup import BackupAlert, BackupManager
from walacord.backup.alerts import BACKUP_FAILED, BACKUP_STALE
from walacord.backup.manifest import Manifest, format_time, write_manifest
from walacord.backup.scheduler import (
    BackupScheduler,
    backup_missed,
    jitter_seconds,
    last_good_drill,
    next_daily_run,
)

ManagerFactory = Callable[..., BackupManager]

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


async def poll_until(condition: Callable[[], bool]) -> None:
    while True:
        if condition():
            return
        await anyio.sleep(0.05)


def test_next_daily_run_later_today() -> None:
    start = next_daily_run(NOW, "14:30", 0, "db")

    assert start == datetime(2026, 12, 4, 14, 30, tzinfo=UTC)


def test_next_daily_run_tomorrow_when_passed() -> None:
    start = next_daily_run(NOW, "02:30", 0, "db")

    assert start == datetime(2026, 12, 5, 2, 30, tzinfo=UTC)


def test_next_daily_run_adds_bounded_jitter() -> None:
    start = next_daily_run(NOW, "14:30", 1800, "db")
    base = datetime(2026, 12, 4, 14, 30, tzinfo=UTC)

    assert base <= start < base + timedelta(seconds=1800)
    assert start == base + timedelta(seconds=jitter_seconds("db", NOW.replace(hour=0), 1800))


def test_jitter_same_for_every_host() -> None:
    day = NOW.replace(hour=0)

    assert jitter_seconds("pg1/ledger", day, 3600) == jitter_seconds("pg1/ledger", day, 3600)
    assert jitter_seconds("pg1/ledger", day, 3600) != jitter_seconds("pg1/other", day, 3600)
    assert jitter_seconds("pg1/ledger", day, 0) == 0


def test_backup_missed_cases() -> None:
    assert backup_missed(None, NOW, 86400)
    assert backup_missed(NOW - timedelta(hours=25), NOW, 86400)
    assert not backup_missed(NOW - timedelta(hours=23), NOW, 86400)


@pytest.mark.anyio
async def test_scheduler_runs_missed_backup_at_startup(make_manager: ManagerFactory) -> None:
    manager = make_manager()
    scheduler = BackupScheduler(manager)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            await group.start(scheduler.run)
            await poll_until(lambda: manager.metrics.backup_last_drill._value.get() > 0)
            group.cancel_scope.cancel()

    manifests = await manager.list()
    assert len(manifests) == 1
    assert manifests[0].drill is not None and manifests[0].drill.ok


@pytest.mark.anyio
async def test_scheduler_skips_startup_run_after_recent_backup(
        make_manager: ManagerFactory) -> None:
    manager = make_manager()
    assert await manager.take() is not None
    hour_ahead = (datetime.now(UTC) + timedelta(hours=1)).strftime("%H:%M")
    scheduler = BackupScheduler(make_manager(daily_at=hour_ahead, jitter=0))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            await group.start(scheduler.run)
            await anyio.sleep(1.0)
            group.cancel_scope.cancel()

    assert len(await manager.list()) == 1


@pytest.mark.anyio
async def test_scheduler_removes_partial_files(make_manager: ManagerFactory) -> None:
    manager = make_manager()
    manager.directory.mkdir(parents=True)
    leftover = manager.directory / ".db__host__20260101T000000Z.dump.partial"
    leftover.write_bytes(b"PGDMP half")
    hour_ahead = (datetime.now(UTC) + timedelta(hours=1)).strftime("%H:%M")
    scheduler = BackupScheduler(make_manager(daily_at=hour_ahead))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            await group.start(scheduler.run)
            group.cancel_scope.cancel()

    assert not leftover.exists()


@pytest.mark.anyio
async def test_staleness_alert_fires_and_resolves(make_manager: ManagerFactory,
                                                  alerts: list[BackupAlert]) -> None:
    manager = make_manager(max_age=3600)
    assert await manager.take() is not None
    assert not await manager.check_staleness()
    assert manager.last_success is not None

    manager.last_success -= timedelta(hours=2)
    assert await manager.check_staleness()
    assert await manager.check_staleness()
    assert await manager.take() is not None
    assert not await manager.check_staleness()

    stale = [a for a in alerts if a.name == BACKUP_STALE]
    assert [a.firing for a in stale] == [True, False]
    assert stale[0].fields["age_seconds"] > 7000


@pytest.mark.anyio
async def test_staleness_counts_peer_backup(make_manager: ManagerFactory, seeded_db: str,
                                            alerts: list[BackupAlert]) -> None:
    """A host that lost the lock to a peer does not report the database stale."""
    import psycopg

    from walacord.backup.manager import BACKUP_LOCK_KEY

    manager = make_manager(max_age=3600)
    assert await manager.take() is not None
    assert manager.last_success is not None
    manager.last_success -= timedelta(hours=2)
    with psycopg.connect(seeded_db, autocommit=True) as peer:
        peer.execute("SELECT pg_advisory_lock(%s)", (BACKUP_LOCK_KEY,))
        assert await manager.take() is None

    assert not await manager.check_staleness()
    assert alerts == []


@pytest.mark.anyio
async def test_scheduler_retries_failed_backup(make_manager: ManagerFactory, seeded_db: str,
                                               alerts: list[BackupAlert]) -> None:
    import psycopg

    hour_ahead = (datetime.now(UTC) + timedelta(hours=1)).strftime("%H:%M")
    manager = make_manager(daily_at=hour_ahead, jitter=0, retry_interval=1.0,
                           lock_wait_timeout=0.2)
    failures = manager.metrics.backup_failures.labels(operation="dump")
    scheduler = BackupScheduler(manager)

    with psycopg.connect(seeded_db) as holder:
        holder.execute("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                await group.start(scheduler.run)
                await poll_until(lambda: failures._value.get() >= 2)
                holder.rollback()
                await poll_until(lambda: manager.last_success is not None)
                group.cancel_scope.cancel()

    assert failures._value.get() == 2
    assert len(await manager.list()) == 1
    assert [a.firing for a in alerts if a.name == "backup_failed"][-1] is False


def test_scheduler_for_runtime_uses_registry(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from walacord.config import BackupConfig, Config
    from walacord.metrics import Metrics
    from walacord.runtime import Runtime
    from walacord.systemd import Notifier

    registry = CollectorRegistry()
    config = Config(backup=BackupConfig(dir=str(tmp_path)))
    runtime = Runtime(config=config, config_path=None, registry=registry,
                      metrics=Metrics(registry), notifier=Notifier())

    scheduler = BackupScheduler.for_runtime(runtime)

    assert scheduler.name == "backup"
    assert scheduler.manager.metrics is runtime.metrics
    assert scheduler.manager.directory == tmp_path
    assert registry.get_sample_value("walacord_backup_failures_total",
                                     {"operation": "dump"}) == 0


@pytest.mark.anyio
async def test_drain_hook_waits_for_backup(tmp_path: Path, seeded_db: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    import logging

    import psycopg
    from prometheus_client import CollectorRegistry

    from walacord.config import BackupConfig, Config
    from walacord.metrics import Metrics
    from walacord.runtime import Runtime
    from walacord.systemd import Notifier

    caplog.set_level(logging.INFO)
    registry = CollectorRegistry()
    config = Config(backup=BackupConfig(dir=str(tmp_path), url=seeded_db,
                                        lock_wait_timeout=20.0))
    runtime = Runtime(config=config, config_path=None, registry=registry,
                      metrics=Metrics(registry), notifier=Notifier())
    scheduler = BackupScheduler.for_runtime(runtime)
    manager = scheduler.manager
    assert len(runtime.drain_hooks) == 1
    drained = anyio.Event()
    results = []

    async def take() -> None:
        results.append(await manager.take())

    async def drain() -> None:
        await runtime.drain_hooks[0]()
        drained.set()

    with anyio.fail_after(30):
        await drain()  # with no backup running the hook returns at once
        drained = anyio.Event()

        # A table lock held by another session keeps pg_dump waiting, so the backup
        # is still running when the drain starts.
        with psycopg.connect(seeded_db) as blocker:
            blocker.execute("LOCK TABLE ledger IN ACCESS EXCLUSIVE MODE")
            async with anyio.create_task_group() as group:
                group.start_soon(take)
                await poll_until(lambda: manager.backup_running)
                group.start_soon(drain)
                await anyio.sleep(0.5)
                assert not drained.is_set(), "the drain did not wait for the backup"
                blocker.rollback()
                await drained.wait()

    assert results[0] is not None, "the backup was not finished"
    assert len(await manager.list()) == 1
    events = [r.getMessage() for r in caplog.records]
    assert events.count("backup.drain_waiting") == 1
    assert "backup.drain_finished" in events


def age_last_check(manager: BackupManager, manifest: Manifest, days: int) -> None:
    assert manifest.checksum_check is not None
    manifest.checksum_check.at = format_time(datetime.now(UTC) - timedelta(days=days))
    write_manifest(manager.directory, manifest)


@pytest.mark.anyio
async def test_cycle_rechecks_backups_checked_long_ago(make_manager: ManagerFactory,
                                                       alerts: list[BackupAlert],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    manager = make_manager(recheck_interval=7 * 86400.0)
    damaged, intact, recent = [await manager.take() for _ in range(3)]
    assert damaged is not None
    assert intact is not None
    assert recent is not None
    age_last_check(manager, damaged, days=8)
    age_last_check(manager, intact, days=8)
    overwrite_two_bytes(manager.path_of(damaged), damaged.size_bytes // 2)
    recent_check = (await manager.read(recent.id)).checksum_check
    caplog.set_level(logging.INFO)

    assert await BackupScheduler(manager).run_cycle("test")

    after = {m.id: m for m in await manager.list()}
    assert not after[damaged.id].verified
    assert after[damaged.id].checksum_check.error.startswith("sha256 is ")  # type: ignore[union-attr]
    assert after[intact.id].verified
    assert after[intact.id].checksum_check.at > format_time(  # type: ignore[union-attr]
        datetime.now(UTC) - timedelta(minutes=5))
    assert after[recent.id].checksum_check == recent_check
    assert manager.metrics.backup_damaged._value.get() == 1
    assert [a.name for a in alerts if a.firing] == [BACKUP_FAILED]
    finished = [r for r in caplog.records if r.getMessage() == "backup.recheck_finished"]
    assert finished[-1].fields == {  # type: ignore[attr-defined]
        "checked": 2, "failed": [damaged.id], "recheck_interval_seconds": 7 * 86400.0}


@pytest.mark.anyio
async def test_recheck_off_at_zero(make_manager: ManagerFactory) -> None:
    manager = make_manager(recheck_interval=0.0)
    backup = await manager.take()
    assert backup is not None
    age_last_check(manager, backup, days=400)
    aged = (await manager.read(backup.id)).checksum_check

    assert await BackupScheduler(manager).recheck_stored() == []
    assert (await manager.read(backup.id)).checksum_check == aged


@pytest.mark.anyio
async def test_damaged_gauge_counts_lost_files(make_manager: ManagerFactory) -> None:
    manager = make_manager()
    first = await manager.take()
    assert first is not None
    assert manager.metrics.backup_damaged._value.get() == 0

    manager.path_of(first).unlink()
    await manager.list()
    lost_dump = manager.metrics.backup_damaged._value.get()
    (manager.directory / "db__host__20260101T000000Z.json").write_text("{broken")
    await manager.list()
    broken_manifest = manager.metrics.backup_damaged._value.get()

    assert lost_dump == 1
    assert broken_manifest == 2


@pytest.mark.anyio
async def test_recheck_fifo_fails_at_once(make_manager: ManagerFactory,
                                          caplog: pytest.LogCaptureFixture) -> None:
    manager = make_manager(recheck_interval=7 * 86400.0)
    backup = await manager.take()
    assert backup is not None
    age_last_check(manager, backup, days=8)
    caplog.set_level(logging.INFO)

    with fifo_in_place_of(manager.path_of(backup)), anyio.fail_after(5):
        failed = await BackupScheduler(manager).recheck_stored()
        listed_damaged = manager.metrics.backup_damaged._value.get()

    assert failed == [backup.id]
    assert listed_damaged == 1
    not_run = [r for r in caplog.records if r.getMessage() == "backup.recheck_not_run"]
    assert "is a FIFO, not a regular file" in not_run[0].fields["error"]  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_failed_backup_still_rechecks(make_manager: ManagerFactory,
                                            caplog: pytest.LogCaptureFixture) -> None:
    manager = make_manager(recheck_interval=7 * 86400.0)
    stored = await manager.take()
    assert stored is not None
    age_last_check(manager, stored, days=8)
    overwrite_two_bytes(manager.path_of(stored), stored.size_bytes // 2)
    # Same backup directory, but a server that refuses connections, so the backup fails.
    broken = make_manager(url="postgresql://walacord@127.0.0.1:1/gone",
                          recheck_interval=7 * 86400.0)
    caplog.set_level(logging.INFO)

    assert not await BackupScheduler(broken).run_cycle("test")

    assert not (await manager.read(stored.id)).verified
    assert broken.metrics.backup_damaged._value.get() == 1


@pytest.mark.anyio
async def test_age_watch_rescans_directory(make_manager: ManagerFactory) -> None:
    manager = make_manager(check_interval=0.1)
    backup = await manager.take()
    assert backup is not None
    scheduler = BackupScheduler(manager)
    manager.path_of(backup).unlink()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(scheduler._watch_age)
            await poll_until(lambda: manager.metrics.backup_damaged._value.get() == 1)
            group.cancel_scope.cancel()


@pytest.mark.anyio
async def test_last_good_drill_skips_stale_drill(make_manager: ManagerFactory) -> None:
    manager = make_manager()
    backup = await manager.take()
    assert backup is not None
    drilled = await manager.drill(backup.id)
    assert drilled.drill is not None and drilled.drill.ok
    assert last_good_drill(await manager.list()) == datetime.fromisoformat(drilled.drill.at)

    path = manager.path_of(backup)
    overwrite_two_bytes(path, path.stat().st_size // 2)
    checked = await manager.verify(backup.id)

    assert checked.checksum_check is not None and not checked.checksum_check.ok
    assert last_good_drill(await manager.list()) is None
