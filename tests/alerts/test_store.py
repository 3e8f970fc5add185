"""alerts.db: the delivery queue and silences in a real SQLite file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from walacord.alerts.model import Silence, parse_matchers
from walacord.alerts.store import AlertStore

pytestmark = pytest.mark.anyio


async def test_store_pragmas_wal_and_full_sync(tmp_path: Path) -> None:
    store = await AlertStore.open(tmp_path / "alerts.db", 5.0)
    try:
        journal = await (await store.db.execute("PRAGMA journal_mode")).fetchone()
        synchronous = await (await store.db.execute("PRAGMA synchronous")).fetchone()
    finally:
        await store.close()

    assert journal == ("wal",)
    assert synchronous == (2,)  # FULL


async def test_store_queue_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "alerts.db"
    store = await AlertStore.open(path, 5.0)
    await store.enqueue([("alertmanager", "fp1", "firing", {"n": 1}),
                         ("hook0", "fp1", "firing", {"n": 1}),
                         ("alertmanager", "fp1", "resolved", {"n": 2})], max_rows=100)
    await store.close()

    reopened = await AlertStore.open(path, 5.0)
    try:
        rows = await reopened.pending("alertmanager", 10)
        await reopened.record_failure([rows[0].id], "connection refused")
        failed = await reopened.pending("alertmanager", 10)
        await reopened.delete([rows[0].id])
        remaining = await reopened.pending("alertmanager", 10)
        total = await reopened.count()
    finally:
        await reopened.close()

    assert [(r.kind, r.payload) for r in rows] == [("firing", {"n": 1}), ("resolved", {"n": 2})]
    assert failed[0].attempts == 1
    assert [r.kind for r in remaining] == ["resolved"]
    assert total == 2


async def test_store_trims_oldest_beyond_max(tmp_path: Path) -> None:
    store = await AlertStore.open(tmp_path / "alerts.db", 5.0)
    try:
        cut = await store.enqueue([("alertmanager", f"fp{i}", "firing", {}) for i in range(5)],
                                  max_rows=3)
        rows = await store.pending("alertmanager", 10)
    finally:
        await store.close()

    assert cut == 2
    assert [r.fingerprint for r in rows] == ["fp2", "fp3", "fp4"]


async def test_store_drops_rows_of_removed_sinks(tmp_path: Path) -> None:
    store = await AlertStore.open(tmp_path / "alerts.db", 5.0)
    try:
        await store.enqueue([("alertmanager", "a", "firing", {}), ("hook0", "a", "firing", {})],
                            max_rows=100)
        dropped = await store.drop_other_sinks(["hook0"])
        left = await store.count()
    finally:
        await store.close()

    assert dropped == 1
    assert left == 1


async def test_store_silences_durable_and_expirable(tmp_path: Path) -> None:
    path = tmp_path / "alerts.db"
    now = 1_800_000_000.0
    silence = Silence.create(parse_matchers('alertname="WalacordProbeDown",probe=~"data.*"'),
                             3600, "planned failover", now, "ops")
    store = await AlertStore.open(path, 5.0)
    await store.add_silence(silence)
    await store.close()

    store = await AlertStore.open(path, 5.0)
    try:
        loaded = await store.silences(now + 10)
        expired = await store.expire_silence(silence.id, now + 20)
        again = await store.expire_silence(silence.id, now + 30)
        after = await store.silences(now + 30)
    finally:
        await store.close()

    assert loaded == [silence]
    assert expired is True
    assert again is False
    assert after == []


async def test_store_skips_silence_re2_rejects(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    # Versions that matched with Python's re stored patterns that RE2 rejects.
    path = tmp_path / "alerts.db"
    now = 1_800_000_000.0
    valid = Silence.create(parse_matchers('probe="walacor"'), 3600, "vendor", now)
    store = await AlertStore.open(path, 5.0)
    await store.add_silence(valid)
    await store.close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO silences (id, matchers, starts_at, ends_at, reason, created_by) "
                   "VALUES ('old', ?, ?, ?, 'lookahead', '')",
                   ('[{"name": "probe", "op": "=~", "value": "(?!walacor).*"}]', now, now + 3600))

    store = await AlertStore.open(path, 5.0)
    try:
        with caplog.at_level("WARNING", logger="walacord.alerts.store"):
            loaded = await store.silences(now + 10)
    finally:
        await store.close()

    assert loaded == [valid]
    skipped = [r for r in caplog.records if r.getMessage() == "alerts.silence_skipped"]
    assert len(skipped) == 1
    assert skipped[0].fields["silence"] == "old"  # type: ignore[attr-defined]
    assert "RE2 syntax" in skipped[0].fields["error"]  # type: ignore[attr-defined]


async def test_store_file_passes_integrity_check(tmp_path: Path) -> None:
    path = tmp_path / "alerts.db"
    store = await AlertStore.open(path, 5.0)
    await store.enqueue([("alertmanager", "fp", "firing", {"x": "y"})], max_rows=10)
    await store.close()

    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


async def test_store_replace_firing_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "alerts.db"
    store = await AlertStore.open(path, 5.0)
    await store.replace_firing([{"fingerprint": "a", "n": 1}, {"fingerprint": "b", "n": 2}])
    await store.replace_firing([{"fingerprint": "b", "n": 3}])
    await store.close()

    reopened = await AlertStore.open(path, 5.0)
    try:
        firing = await reopened.firing()
    finally:
        await reopened.close()

    assert firing == [{"fingerprint": "b", "n": 3}]
