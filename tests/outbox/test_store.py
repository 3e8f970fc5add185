"""OutboxStore against real SQLite files."""

from __future__ import annotations

import dataclasses
import gc
import os
import sqlite3
import time
import weakref
from pathlib import Path

import aiosqlite
import anyio
import pytest

from tests.outbox.conftest import Alerts, StoreOpener, ledger_op, walacor_op
from walacord.config import OutboxConfig
from walacord.errors import (
    OutboxConflict,
    OutboxError,
    OutboxFull,
    OutboxNotFound,
    OutboxRequestTooLarge,
    OutboxStarting,
)
from walacord.metrics import Metrics
from walacord.outbox.model import State
from walacord.outbox.queries import Outcome, execute_in_order
from walacord.outbox.store import OutboxStore

pytestmark = pytest.mark.anyio


async def test_enqueue_survives_reopen(open_store: StoreOpener) -> None:
    async with open_store() as store:
        results = await store.enqueue([walacor_op("a"), walacor_op("b")])
    assert [r.created for r in results] == [True, True]

    async with open_store() as store:
        stored = await store.list()
        stats = await store.stats()
    assert [op.key for op in stored] == ["a", "b"]
    assert stored[0].id < stored[1].id
    assert stats.accepted == 2
    assert stats.pending == 2


async def test_enqueue_uses_wal_and_full_sync(open_store: StoreOpener, db_path: Path) -> None:
    async with open_store() as store:
        await store.enqueue([walacor_op("a")])
        db = store._writer()
        journal = await db.execute_fetchall("PRAGMA journal_mode")
        synchronous = await db.execute_fetchall("PRAGMA synchronous")
    assert next(iter(journal))[0] == "wal"
    assert next(iter(synchronous))[0] == 2  # FULL


async def test_enqueue_duplicate_key_returns_existing(open_store: StoreOpener) -> None:
    async with open_store() as store:
        first = await store.enqueue([walacor_op("same")])
        second = await store.enqueue([walacor_op("same")])
        within = await store.enqueue([walacor_op("twice"), walacor_op("twice")])
        stats = await store.stats()
    assert second[0].created is False
    assert second[0].operation.id == first[0].operation.id
    assert second[0].operation.payload == first[0].operation.payload
    assert [r.created for r in within] == [True, False]
    assert within[0].operation.id == within[1].operation.id
    assert stats.accepted == 2


async def test_enqueue_conflicting_key_rejects(open_store: StoreOpener) -> None:
    async with open_store() as store:
        await store.enqueue([walacor_op("stored")])
        with pytest.raises(OutboxConflict) as payload:
            await store.enqueue([walacor_op("fresh"), walacor_op("stored", size=10)])
        with pytest.raises(OutboxConflict) as sink:
            await store.enqueue([ledger_op("stored")])
        with pytest.raises(OutboxConflict) as ordering:
            await store.enqueue([dataclasses.replace(walacor_op("stored"), ordering_key="a")])
        with pytest.raises(OutboxConflict) as within:
            await store.enqueue([walacor_op("twice"), walacor_op("twice", size=5)])
        shared = await store.enqueue_each([[walacor_op("other-1")],
                                           [walacor_op("stored", size=3),
                                            walacor_op("other-2")]])
        keys = [op.key for op in await store.list()]
        stats = await store.check_conservation()

    assert "key 'stored' is already stored" in str(payload.value)
    assert "different payload" in str(payload.value)
    assert "different sink, target and payload" in str(sink.value)
    assert "different ordering key" in str(ordering.value)
    assert "key 'twice' appears more than once in this request" in str(within.value)
    assert isinstance(shared[0], list)
    assert isinstance(shared[1], OutboxConflict)
    assert keys == ["stored", "other-1"]
    assert stats.accepted == 2
    assert stats.conserved


async def test_conflict_never_commits_rejected_rows(open_store: StoreOpener, db_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    async def crash(*args: object, **kwargs: object) -> set[str]:
        raise sqlite3.OperationalError("stand-in for a crash before the rows are withdrawn")

    async with open_store() as store:
        await store.enqueue([walacor_op("stored")])
        monkeypatch.setattr(store, "_withdraw", crash)
        with pytest.raises(OutboxError):
            await store.enqueue([walacor_op("fresh"), walacor_op("stored", size=10)])
        with sqlite3.connect(db_path) as conn:
            keys = [row[0] for row in conn.execute("SELECT key FROM operations ORDER BY id")]
        stats = await store.check_conservation()

    # The conflicting request's new key was never committed, not even for a moment.
    assert keys == ["stored"]
    assert stats.accepted == 1
    assert stats.conserved


async def test_stop_before_commit_reports_error(open_store: StoreOpener) -> None:
    outcomes: list[object] = []

    async def enqueue(store: OutboxStore) -> None:
        try:
            outcomes.append(await store.enqueue([walacor_op("late")]))
        except OutboxError as exc:
            outcomes.append(exc)

    async with anyio.create_task_group() as callers:
        async with open_store() as store:
            # A sync round holds the write lock, so the writer waits for it when the
            # store stops.
            await store.write_lock.acquire()
            callers.start_soon(enqueue, store)
            await anyio.sleep(0.2)
        store.write_lock.release()

    assert len(outcomes) == 1
    assert isinstance(outcomes[0], OutboxError)
    assert "stopped before it stored" in str(outcomes[0])


async def test_enqueue_before_open_raises_starting(db_path: Path,
                                                   outbox_config: OutboxConfig) -> None:
    store = OutboxStore(db_path, outbox_config)

    with pytest.raises(OutboxStarting, match="walacord is starting") as enqueued:
        await store.enqueue([walacor_op("early")])
    with pytest.raises(OutboxStarting):
        await store.check_conservation()

    assert "retry in a moment" in str(enqueued.value)
    assert store.starting


async def test_enqueue_after_stop_raises_not_running(open_store: StoreOpener) -> None:
    async with open_store() as store:
        pass

    with pytest.raises(OutboxError, match="the outbox store is not running") as caught:
        await store.enqueue([walacor_op("late")])

    assert not isinstance(caught.value, OutboxStarting)
    assert not store.starting


async def test_enqueue_concurrent_shares_commits(open_store: StoreOpener) -> None:
    async with open_store() as store:
        commits_before = store.commits
        results: list[int] = []

        async def client(index: int) -> None:
            for round_ in range(10):
                done = await store.enqueue([walacor_op(f"c{index}-{round_}")])
                results.append(done[0].operation.id)

        async with anyio.create_task_group() as tasks:
            for index in range(32):
                tasks.start_soon(client, index)
        commits = store.commits - commits_before
        stats = await store.stats()

    assert len(set(results)) == 320
    assert stats.accepted == 320
    assert commits < 320 / 4, f"{commits} commits for 320 concurrent enqueues"


async def test_commit_duration_observed_per_commit(open_store: StoreOpener,
                                                   metrics: Metrics) -> None:
    async with open_store() as store:
        commits_before = store.commits
        await store.enqueue([walacor_op("timed-1"), walacor_op("timed-2")])
        await store.enqueue([walacor_op("timed-3")])
        commits = store.commits - commits_before

    name = "walacord_outbox_commit_duration_seconds"
    count = metrics.registry.get_sample_value(f"{name}_count")
    total = metrics.registry.get_sample_value(f"{name}_sum")
    assert commits == 2
    assert count == commits
    assert total is not None and 0 < total < 10


async def test_submit_frees_callback_at_once(open_store: StoreOpener) -> None:
    class Callback:
        def __init__(self) -> None:
            self.called = anyio.Event()

        def __call__(self, outcome: object) -> None:
            self.called.set()

    # With the cyclic collector off, only reference counting can free the callback.
    # A reference cycle through the submission would keep it alive.
    gc.disable()
    try:
        async with open_store() as store:
            callback = Callback()
            called = callback.called
            freed = weakref.ref(callback)
            store.submit_each([[walacor_op("a")]], callback)
            del callback
            with anyio.fail_after(10):
                await called.wait()
            assert freed() is None
    finally:
        gc.enable()


async def test_commit_delay_joins_returning_callers(open_store: StoreOpener) -> None:
    async with open_store(commit_delay=5.0) as store:
        # One commit of four requests makes the next commit expect four callers.
        await store.enqueue_each([[walacor_op(f"first-{i}")] for i in range(4)])
        commits_before = store.commits
        started = anyio.current_time()

        async def caller(index: int) -> None:
            await anyio.sleep(0.01 * index)
            await store.enqueue([walacor_op(f"again-{index}")])

        async with anyio.create_task_group() as callers:
            for index in range(4):
                callers.start_soon(caller, index)
        elapsed = anyio.current_time() - started
        commits = store.commits - commits_before

    assert commits == 1
    # The fourth caller ended the wait, long before commit_delay passed.
    assert elapsed < 2.5


async def test_commit_delay_ends_at_deadline(open_store: StoreOpener) -> None:
    async with open_store(commit_delay=1.0) as store:
        await store.enqueue_each([[walacor_op(f"first-{i}")] for i in range(4)])
        started = anyio.current_time()
        await store.enqueue([walacor_op("alone-1")])
        waited = anyio.current_time() - started
        # The last commit carried only this caller, so the next one does not wait.
        started = anyio.current_time()
        await store.enqueue([walacor_op("alone-2")])
        alone = anyio.current_time() - started

    assert 0.9 <= waited < 5.0
    assert alone < 0.5


async def test_enqueue_expires_after_idle_time(open_store: StoreOpener) -> None:
    # The commit delay keeps the next commit waiting 5 s, past the 0.5 s write timeout.
    async with open_store(commit_delay=5.0, write_timeout=0.5) as store:
        await store.enqueue_each([[walacor_op(f"first-{i}")] for i in range(4)])
        await anyio.sleep(1.0)  # nothing waits now, so the expiry task sleeps
        started = anyio.current_time()
        with pytest.raises(TimeoutError, match=r"enqueue not committed within 0\.5s"):
            await store.enqueue([walacor_op("held")])
        waited = anyio.current_time() - started

    assert 0.4 <= waited < 2.0


async def test_enqueue_full_by_count_rejects(open_store: StoreOpener, alerts: Alerts,
                                             metrics: Metrics) -> None:
    async with open_store(max_operations=3) as store:
        await store.enqueue([walacor_op("a"), walacor_op("b")])
        with pytest.raises(OutboxFull, match="outbox is full"):
            await store.enqueue([walacor_op("c"), walacor_op("d")])
        full_before = store.full
        await store.enqueue([walacor_op("c")])
        full_after = store.full
        duplicate = await store.enqueue([walacor_op("a")])
        with pytest.raises(OutboxFull):
            await store.enqueue([walacor_op("e")])
        stats = await store.stats()

    assert full_before is False
    assert full_after is True
    assert duplicate[0].created is False
    assert stats.accepted == 3
    assert alerts.names() == ["outbox_full"]
    assert metrics.outbox_rejected.labels(reason="OutboxFull")._value.get() == 2


async def test_request_larger_than_limits_is_not_full(open_store: StoreOpener,
                                                      alerts: Alerts) -> None:
    """A request that even an empty outbox cannot hold is rejected as too large, without
    the full alert or the emergency mode that a real backlog gets."""
    async with open_store(max_operations=3, max_bytes=4096) as store:
        with pytest.raises(OutboxRequestTooLarge) as by_count:
            await store.enqueue([walacor_op(f"k{i}") for i in range(4)])
        with pytest.raises(OutboxRequestTooLarge) as by_bytes:
            await store.enqueue([walacor_op("big", size=5000)])
        full = store.full
        await store.enqueue([walacor_op(f"k{i}") for i in range(3)])
        stats = await store.stats()

    assert str(by_count.value).startswith(
        "this request has 4 new operations with ")
    assert ("more than the outbox holds in all (limits 3 operations and 4096 bytes: "
            "outbox.max_operations, outbox.max_bytes); nothing was accepted. Split it "
            "into smaller requests, or raise those limits") in str(by_count.value)
    assert str(by_bytes.value).startswith("this request has 1 new operation with 50")
    assert str(by_bytes.value).endswith("Raise outbox.max_bytes, or shrink the payload")
    assert not full
    assert alerts.names() == []
    assert stats.accepted == 3


async def test_enqueue_full_by_bytes_rejects(open_store: StoreOpener) -> None:
    async with open_store(max_bytes=2048) as store:
        await store.enqueue([walacor_op("a", size=1500)])
        with pytest.raises(OutboxFull):
            await store.enqueue([walacor_op("b", size=1000)])
        await store.enqueue([walacor_op("c", size=100)])
        keys = [op.key for op in await store.list()]
    assert keys == ["a", "c"]


async def test_full_store_accepts_again_after_sync(open_store: StoreOpener) -> None:
    async with open_store(max_operations=2) as store:
        await store.enqueue([walacor_op("a"), walacor_op("b")])
        assert store.full
        claimed = await store.claim("walacor", 10, time.time())
        await store.record([Outcome(op, State.DONE, receipt={"eid": "e"}) for op in claimed])
        assert not store.full
        await store.enqueue([walacor_op("c")])
        stats = await store.stats()
    assert (stats.accepted, stats.done, stats.pending) == (3, 2, 1)


async def test_open_moves_damaged_database_aside(open_store: StoreOpener, db_path: Path,
                                                 alerts: Alerts) -> None:
    async with open_store() as store:
        await store.enqueue([walacor_op(f"k{i}", size=500) for i in range(200)])
    original = await anyio.Path(db_path).read_bytes()
    damaged = bytearray(original)
    damaged[4096 * 2:4096 * 4] = os.urandom(4096 * 2)
    await anyio.Path(db_path).write_bytes(bytes(damaged))

    async with open_store() as store:
        stats = await store.stats()
        moved = store.moved_aside

    assert moved is not None
    assert await anyio.Path(moved).read_bytes() == bytes(damaged)
    assert stats.accepted == 0
    assert alerts.names() == ["outbox_corrupt"]
    assert str(moved) in alerts[0][1]


async def test_open_moves_non_database_aside(open_store: StoreOpener, db_path: Path,
                                            alerts: Alerts) -> None:
    await anyio.Path(db_path.parent).mkdir(parents=True)
    await anyio.Path(db_path).write_bytes(b"this is not an SQLite file" * 200)
    async with open_store() as store:
        moved = store.moved_aside
        await store.enqueue([walacor_op("fresh")])
    assert moved is not None and moved.exists()
    assert moved.name.startswith("outbox.db.damaged-")
    assert alerts.names() == ["outbox_corrupt"]


async def test_open_rejects_newer_schema(open_store: StoreOpener, db_path: Path,
                                         outbox_config: OutboxConfig) -> None:
    async with open_store():
        pass
    with sqlite3.connect(db_path) as conn:
        conn.execute("PRAGMA user_version = 99")
    store = OutboxStore(db_path, outbox_config)
    with pytest.raises(OutboxError, match="schema version 99 is newer"):
        await store.open()
    assert store._db is None


async def test_open_resets_in_flight_to_pending(open_store: StoreOpener) -> None:
    async with open_store() as store:
        await store.enqueue([walacor_op("a"), walacor_op("b")])
        claimed = await store.claim("walacor", 1, time.time())
    assert [op.key for op in claimed] == ["a"]

    async with open_store() as store:
        states = {op.key: op.state for op in await store.list()}
        stats = await store.check_conservation()
    assert states == {"a": State.PENDING, "b": State.PENDING}
    assert stats.conserved


async def test_compact_keeps_counts_conserved(open_store: StoreOpener, metrics: Metrics
                                              ) -> None:
    async with open_store(retention=0) as store:
        await store.enqueue([walacor_op(f"k{i}") for i in range(10)])
        claimed = await store.claim("walacor", 6, time.time())
        await store.record([Outcome(op, State.DONE, receipt={"eid": "e"}) for op in claimed])
        deleted = await store.compact(now=time.time() + 1)
        stats = await store.check_conservation()
        rows = await store.list()
    assert deleted == 6
    assert len(rows) == 4
    assert (stats.accepted, stats.done, stats.pending) == (10, 6, 4)
    assert metrics.outbox_conservation_ok._value.get() == 1


async def test_conservation_detects_lost_row(open_store: StoreOpener, alerts: Alerts,
                                             metrics: Metrics) -> None:
    async with open_store() as store:
        await store.enqueue([walacor_op("a"), walacor_op("b")])
        await store._writer().execute("DELETE FROM operations WHERE key = 'a'")
        stats = await store.check_conservation()
    assert not stats.conserved
    assert alerts.names() == ["outbox_conservation"]
    assert metrics.outbox_conservation_ok._value.get() == 0
    assert metrics.outbox_conservation_failures._value.get() == 1


async def test_drop_and_retry(open_store: StoreOpener) -> None:
    async with open_store() as store:
        results = await store.enqueue([walacor_op("a"), walacor_op("b")])
        first, second = (r.operation for r in results)
        claimed = await store.claim("walacor", 1, time.time())
        await store.record([Outcome(claimed[0], State.DEAD, error="validation: bad")])
        assert (await store.get(first.id)).state is State.DEAD
        assert await store.retry(all_dead=True) == 1
        retried = await store.get(first.id)
        dropped = await store.drop(second.id, reason="test")
        with pytest.raises(OutboxNotFound):
            await store.get(second.id)
        stats = await store.check_conservation()
    assert retried.state is State.PENDING
    assert retried.attempts == 0
    assert dropped.key == "b"
    assert (stats.accepted, stats.pending, stats.dropped) == (2, 1, 1)
    assert stats.conserved


async def test_claim_keeps_ordering_key_order(open_store: StoreOpener) -> None:
    async with open_store() as store:
        await store.enqueue([walacor_op("x1", ordering_key="x"), walacor_op("free"),
                             walacor_op("x2", ordering_key="x")])
        first = await store.claim("walacor", 1, time.time())
        blocked = await store.claim("walacor", 10, time.time())
        await store.record([Outcome(first[0], State.PENDING, error="down",
                                    next_attempt_at=0.0)])
        both = await store.claim("walacor", 10, time.time())
    assert [op.key for op in first] == ["x1"]
    assert [op.key for op in blocked] == ["free"]
    assert [op.key for op in both] == ["x1", "x2"]


async def test_blocked_behind_dead_operations(open_store: StoreOpener, db_path: Path,
                                             metrics: Metrics) -> None:
    # (key, ordering key, state). Neither a1, which comes before the first dead
    # operation of its key, nor b1, which has nothing after it, counts. The postgres
    # operation a3 is blocked by walacor operations.
    layout = [("a1", "a", "pending"), ("a2", "a", "dead"), ("a3", "a", "pending"),
              ("a4", "a", "dead"), ("a5", "a", "pending"), ("b1", "b", "dead"),
              ("c1", None, "pending"), ("d1", "d", "dead"), ("d2", "d", "pending"),
              ("e1", "e", "pending")]
    async with open_store() as store:
        results = await store.enqueue([
            ledger_op(key, ordering_key=ordering) if key == "a3"
            else walacor_op(key, ordering_key=ordering) for key, ordering, _ in layout])
        ids = {r.operation.key: r.operation.id for r in results}
        with sqlite3.connect(db_path) as db:
            db.executemany("UPDATE operations SET state = ? WHERE key = ?",
                           [(state, key) for key, _, state in layout])
        stats = await store.check_conservation()
        blockers = await store.blockers(limit=2)
        waiting = await store.waits_behind(await store.list())
        for_a5 = await store.waits_behind([await store.get(ids["a5"])])
    assert stats.blocked == 3
    assert stats.conserved
    assert stats.to_json(time.time())["blocked"] == 3
    assert metrics.registry.get_sample_value("walacord_outbox_blocked_operations") == 3
    assert (blockers.count, blockers.blocked) == (3, 3)
    assert blockers.ids == [ids["a2"], ids["a4"]]
    assert waiting == {ids["a3"]: ids["a2"], ids["a5"]: ids["a2"], ids["d2"]: ids["d1"]}
    assert for_a5 == {ids["a5"]: ids["a2"]}


async def test_claim_puts_waiting_operations_back(open_store: StoreOpener) -> None:
    async with open_store() as store:
        await store.enqueue([walacor_op("x1", ordering_key="x"),
                             walacor_op("x2", ordering_key="x")])
        first = await store.claim("walacor", 1, time.time())
        blocked = await store.claim("walacor", 10, time.time())
        states = {op.key: op.state for op in await store.list()}
        stats = await store.check_conservation()
    assert [op.key for op in first] == ["x1"]
    assert blocked == []
    assert states == {"x1": State.IN_FLIGHT, "x2": State.PENDING}
    assert stats.conserved


async def test_claim_records_outcomes_first(open_store: StoreOpener) -> None:
    async with open_store() as store:
        await store.enqueue([walacor_op("x1", ordering_key="x"),
                             walacor_op("x2", ordering_key="x")])
        first = await store.claim("walacor", 1, time.time())
        outcomes = [Outcome(first[0], State.DONE, receipt={"eid": "e1"})]
        second = await store.claim("walacor", 10, time.time(), record=outcomes)
        stored = await store.get(first[0].id)
        stats = await store.check_conservation()
    assert [op.key for op in second] == ["x2"]
    assert outcomes == []
    assert stored.state is State.DONE
    assert stored.receipt == {"eid": "e1"}
    assert (stats.done, stats.in_flight, stats.pending) == (1, 1, 0)
    assert stats.conserved


async def test_record_mixed_outcomes(open_store: StoreOpener) -> None:
    """Each outcome differs from the one before it in one field, and each row still
    gets its own values."""
    async with open_store() as store:
        await store.enqueue([walacor_op(f"k{i}") for i in range(8)])
        ops = await store.claim("walacor", 10, time.time())
        batch = {"batch": 3}
        later = time.time() + 3600
        await store.record([
            Outcome(ops[0], State.DONE, receipt=batch),
            Outcome(ops[1], State.DONE, receipt=batch),
            Outcome(ops[2], State.DONE, receipt={"batch": 4}),
            Outcome(ops[3], State.PENDING, error="down", next_attempt_at=later),
            Outcome(ops[4], State.PENDING, error="down", next_attempt_at=later,
                    attempted=False),
            Outcome(ops[5], State.PENDING, error="down", next_attempt_at=later + 1,
                    attempted=False),
            Outcome(ops[6], State.DEAD, error="down", next_attempt_at=later + 1,
                    attempted=False),
            Outcome(ops[7], State.DEAD, error="bad", next_attempt_at=later + 1,
                    attempted=False),
        ])
        stored = [await store.get(op.id) for op in ops]
        stats = await store.check_conservation()
    assert [op.state for op in stored] == [State.DONE] * 3 + [State.PENDING] * 3 + [
        State.DEAD] * 2
    assert [op.attempts for op in stored] == [1, 1, 1, 1, 0, 0, 0, 0]
    assert [op.receipt for op in stored[:3]] == [batch, batch, {"batch": 4}]
    assert [op.next_attempt_at for op in stored[3:6]] == [later, later, later + 1]
    assert [op.last_error for op in stored[5:]] == ["down", "down", "bad"]
    assert (stats.done, stats.pending, stats.dead, stats.in_flight) == (3, 3, 2, 0)
    assert stats.conserved


async def test_execute_in_order_runs_all(tmp_path: Path) -> None:
    """A failed statement raises its error after the later statements ran."""
    async with aiosqlite.connect(tmp_path / "order.db", isolation_level=None) as db:
        await db.execute("CREATE TABLE t (v INTEGER NOT NULL)")
        with pytest.raises(sqlite3.IntegrityError):
            await execute_in_order(db, [
                ("BEGIN IMMEDIATE", ()),
                ("INSERT INTO t (v) VALUES (1)", ()),
                ("INSERT INTO t (v) VALUES (NULL)", ()),
                ("SELECT no_such_column FROM t", ()),
                ("INSERT INTO t (v) VALUES (2)", ()),
                ("COMMIT", ())])
        in_transaction = db.in_transaction
        rows = await execute_in_order(db, [("SELECT v FROM t ORDER BY v", ()),
                                           ("SELECT count(*) FROM t", ())])
    assert not in_transaction
    assert rows == [[(1,), (2,)], [(2,)]]


async def test_compact_truncates_wal(open_store: StoreOpener, db_path: Path) -> None:
    wal = anyio.Path(f"{db_path}-wal")
    async with open_store(retention=0) as store:
        for batch in range(20):
            await store.enqueue([walacor_op(f"w{batch}-{i}", size=1000) for i in range(50)])
        grown = (await wal.stat()).st_size
        claimed = await store.claim("walacor", 1000, time.time())
        await store.record([Outcome(op, State.DONE, receipt={"eid": "e"}) for op in claimed])
        await store.compact(now=time.time() + 1)
        after = (await wal.stat()).st_size
        stats = await store.check_conservation()
    assert grown > 1_000_000
    assert after == 0
    assert (stats.accepted, stats.done) == (1000, 1000)


async def test_writes_after_compact_commit(open_store: StoreOpener) -> None:
    async with open_store(retention=0) as store:
        await store.enqueue([walacor_op(f"c{i}") for i in range(4)])
        claimed = await store.claim("walacor", 2, time.time())
        await store.record([Outcome(op, State.DONE, receipt={"eid": "e"}) for op in claimed])
        await store.compact(now=time.time() + 1)
        # The checkpoint's result row must not keep a statement open on the shared
        # writer connection: COMMIT then fails with "SQL statements in progress".
        claimed = await store.claim("walacor", 2, time.time())
        await store.record([Outcome(op, State.DONE, receipt={"eid": "e"}) for op in claimed])
        stats = await store.check_conservation()
    assert [op.key for op in claimed] == ["c2", "c3"]
    assert (stats.done, stats.pending) == (4, 0)


def stored_states(db_path: Path) -> dict[str, str]:
    """Return each key's state as stored in the database file."""
    with sqlite3.connect(db_path) as db:
        return dict(db.execute("SELECT key, state FROM operations"))


async def test_memory_claim_reads_in_flight(
        open_store: StoreOpener, db_path: Path) -> None:
    async with open_store() as store:
        results = await store.enqueue([ledger_op("a"), ledger_op("b"), ledger_op("c")])
        ids = {r.operation.key: r.operation.id for r in results}
        claimed = await store.claim("postgres", 2, time.time(), durable=False)
        on_disk = stored_states(db_path)
        states = {op.key: op.state for op in await store.list()}
        in_flight = [op.key for op in await store.list(states=[State.IN_FLIGHT])]
        pending = [op.key for op in await store.list(states=[State.PENDING])]
        both = [op.key for op in await store.list(states=[State.PENDING, State.IN_FLIGHT])]
        by_id = await store.get(ids["a"])
        by_key = await store.get_by_key("b")
        stats = await store.check_conservation()
        rest = await store.claim("postgres", 10, time.time(), durable=False)
        with pytest.raises(OutboxError, match="in_flight"):
            await store.drop(ids["a"], reason="test")
        retried = await store.retry([ids["a"]])
    assert [op.key for op in claimed] == ["a", "b"]
    assert on_disk == {"a": "pending", "b": "pending", "c": "pending"}
    assert states == {"a": State.IN_FLIGHT, "b": State.IN_FLIGHT, "c": State.PENDING}
    assert (in_flight, pending, both) == (["a", "b"], ["c"], ["a", "b", "c"])
    assert (by_id.state, by_key.state) == (State.IN_FLIGHT, State.IN_FLIGHT)
    assert (stats.pending, stats.in_flight) == (1, 2)
    assert stats.conserved
    assert [op.key for op in rest] == ["c"]
    assert retried == 0


async def test_memory_claim_ends_with_outcome(open_store: StoreOpener,
                                                 db_path: Path) -> None:
    async with open_store() as store:
        await store.enqueue([ledger_op("a"), ledger_op("b"), ledger_op("c")])
        first = await store.claim("postgres", 2, time.time(), durable=False)
        later = time.time() + 3600
        outcomes = [Outcome(first[0], State.DONE),
                    Outcome(first[1], State.PENDING, error="down", next_attempt_at=later)]
        second = await store.claim("postgres", 10, time.time(), record=outcomes,
                                   durable=False)
        due = await store.next_due("postgres")
        stats = await store.check_conservation()
        await store.record([Outcome(second[0], State.DEAD, error="bad")])
        claims_after = set(store.memory_claims)
        stored = {op.key: op for op in await store.list()}
        final = await store.check_conservation()
    assert [op.key for op in second] == ["c"]
    assert outcomes == []
    # The claimed operation c is due now but already claimed, so b's retry comes next.
    assert due == later
    assert (stats.done, stats.pending, stats.in_flight) == (1, 1, 1)
    assert claims_after == set()
    assert {key: op.state for key, op in stored.items()} == {
        "a": State.DONE, "b": State.PENDING, "c": State.DEAD}
    assert [stored[key].attempts for key in "abc"] == [1, 1, 1]
    assert stored_states(db_path) == {"a": "done", "b": "pending", "c": "dead"}
    assert (final.done, final.pending, final.in_flight, final.dead) == (1, 1, 0, 1)
    assert final.conserved


async def test_memory_claim_keeps_order(open_store: StoreOpener) -> None:
    async with open_store() as store:
        await store.enqueue([ledger_op("x1", ordering_key="x"), ledger_op("free"),
                             ledger_op("x2", ordering_key="x")])
        first = await store.claim("postgres", 1, time.time(), durable=False)
        waiting = await store.claim("postgres", 10, time.time(), durable=False)
        states = {op.key: op.state for op in await store.list()}
        then = await store.claim("postgres", 10, time.time(), durable=False,
                                 record=[Outcome(first[0], State.DONE),
                                         Outcome(waiting[0], State.DONE)])
    assert [op.key for op in first] == ["x1"]
    assert [op.key for op in waiting] == ["free"]
    assert states == {"x1": State.IN_FLIGHT, "free": State.IN_FLIGHT, "x2": State.PENDING}
    assert [op.key for op in then] == ["x2"]


async def test_memory_claim_lost_at_restart(open_store: StoreOpener) -> None:
    """A crash loses a claim kept in memory: the operations are pending again and the
    attempt does not count, which is harmless for an idempotent statement."""
    async with open_store() as store:
        await store.enqueue([ledger_op("a")])
        await store.claim("postgres", 1, time.time(), durable=False)

    async with open_store() as store:
        operation = await store.get_by_key("a")
        stats = await store.check_conservation()
        again = await store.claim("postgres", 1, time.time(), durable=False)
    assert (operation.state, operation.attempts) == (State.PENDING, 0)
    assert (stats.pending, stats.in_flight) == (1, 0)
    assert [op.key for op in again] == ["a"]


@pytest.mark.parametrize("durable", [True, False])
async def test_claim_skips_blocked_key(open_store: StoreOpener, durable: bool) -> None:
    """Operations waiting behind a dead one of their ordering key do not fill the
    claim's window, so the rest of the sink goes on."""
    async with open_store() as store:
        await store.enqueue([ledger_op("k0", ordering_key="k")])
        first = await store.claim("postgres", 1, time.time(), durable=durable)
        await store.record([Outcome(first[0], State.DEAD, error="bad")])
        await store.enqueue([ledger_op(f"k{i}", ordering_key="k") for i in range(1, 6)]
                            + [ledger_op("free0"), ledger_op("free1")])
        claimed = await store.claim("postgres", 2, time.time(), durable=durable)
        states = {op.key: op.state for op in await store.list()}
        stats = await store.check_conservation()

    assert [op.key for op in claimed] == ["free0", "free1"]
    assert {key for key, state in states.items() if state is State.IN_FLIGHT} == {
        "free0", "free1"}
    assert states["k1"] is State.PENDING
    assert stats.conserved
