"""SyncEngine with the real PostgreSQL sink and the Walacor emulator."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from tests.outbox.conftest import (
    INSERT_ROW,
    StoreOpener,
    ledger_op,
    ledger_rows,
    walacor_op,
    walacor_rows_per_key,
)
from walacord.config import OutboxConfig, OutboxStatement
from walacord.emulator import Emulator
from walacord.emulator.faults import FaultSpec
from walacord.metrics import Metrics
from walacord.outbox.model import NewOperation, Operation, State
from walacord.outbox.queries import Outcome
from walacord.outbox.sinks import PostgresSink, Sink, WalacorSink
from walacord.outbox.store import OutboxStore
from walacord.outbox.sync import Ramp, SyncEngine, retry_delay
from walacord.walacor import WalacorClient

pytestmark = pytest.mark.anyio
SUBMIT = "/api/envelopes/submit"


def postgres_sink(pool: AsyncConnectionPool[Any]) -> PostgresSink:
    return PostgresSink(pool, {"insert_row": INSERT_ROW}, timeout=10)


class RecordingEngine(SyncEngine):
    """SyncEngine that records the size of every round it applies."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rounds: list[int] = []
        self.round_started = anyio.Event()

    async def _apply_round(self, sink: Sink, operations: list[Operation]) -> list[Outcome]:
        self.rounds.append(len(operations))
        self.round_started.set()
        return await super()._apply_round(sink, operations)


async def drain(engine: SyncEngine, store: OutboxStore, passes: int = 50) -> None:
    """Run passes until nothing is pending, waiting for retries that fall due."""
    for _ in range(passes):
        await engine.run_pass(forced=True)
        stats = await store.stats()
        if stats.pending == 0 and stats.in_flight == 0:
            return
        await anyio.sleep(0.05)
    raise AssertionError(f"outbox did not drain: {await store.stats()}")


async def test_postgres_sink_applies_exactly_once(
        open_store: StoreOpener, ledger_pool: AsyncConnectionPool[Any],
        outbox_config: OutboxConfig, db_path: Path) -> None:
    keys = [f"row-{i}" for i in range(200)]
    async with open_store() as store:
        await store.enqueue([ledger_op(key, amount=i) for i, key in enumerate(keys)])
        engine = SyncEngine(store, {"postgres": postgres_sink(ledger_pool)}, outbox_config)
        await drain(engine, store)

    # A crash after PostgreSQL committed but before SQLite marked the operations
    # done leaves them in flight: they replay, and the idempotent statement holds.
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE operations SET state = 'in_flight' WHERE key LIKE 'row-1%'")
    async with open_store() as store:
        engine = SyncEngine(store, {"postgres": postgres_sink(ledger_pool)}, outbox_config)
        await drain(engine, store)
        stats = await store.check_conservation()

    rows = await ledger_rows(ledger_pool)
    assert sorted(key for key, _ in rows) == sorted(keys)
    assert len(rows) == len(set(rows))
    assert (stats.accepted, stats.done, stats.pending) == (200, 200, 0)
    assert stats.conserved


async def test_postgres_sink_keeps_ordering_key_order(
        open_store: StoreOpener, ledger_pool: AsyncConnectionPool[Any],
        outbox_config: OutboxConfig) -> None:
    operations = []
    for i in range(30):
        operations.append(ledger_op(f"chain-{i:02}", ordering_key="account-7"))
        operations.append(ledger_op(f"free-{i:02}"))
    async with open_store(sync_batch_min=4) as store:
        await store.enqueue(operations)
        engine = SyncEngine(store, {"postgres": postgres_sink(ledger_pool)},
                            store.config)
        await drain(engine, store)

    applied = [key for key, _ in await ledger_rows(ledger_pool) if key.startswith("chain")]
    assert applied == [f"chain-{i:02}" for i in range(30)]


async def test_postgres_sink_passes_operation_key(
        open_store: StoreOpener, ledger_pool: AsyncConnectionPool[Any]) -> None:
    without_key = NewOperation(key="p1", sink="postgres", target="insert_row",
                               payload=b'{"amount":5}')
    async with open_store() as store:
        await store.enqueue([without_key, ledger_op("p2", amount=7)])
        engine = SyncEngine(store, {"postgres": postgres_sink(ledger_pool)}, store.config)
        await drain(engine, store)
        stats = await store.check_conservation()

    assert sorted(await ledger_rows(ledger_pool)) == [("p1", 5), ("p2", 7)]
    assert (stats.done, stats.dead) == (2, 0)


async def test_permanent_error_goes_dead(
        open_store: StoreOpener, ledger_pool: AsyncConnectionPool[Any]) -> None:
    async with open_store(dead_after_attempts=2) as store:
        good = [ledger_op(f"good-{i}") for i in range(9)]
        await store.enqueue([*good[:4], ledger_op("negative", amount=-1), *good[4:]])
        engine = SyncEngine(store, {"postgres": postgres_sink(ledger_pool)}, store.config)
        await drain(engine, store)
        dead = await store.list(states=[State.DEAD])
        stats = await store.check_conservation()

    assert [op.key for op in dead] == ["negative"]
    assert dead[0].attempts == 2
    assert dead[0].last_error is not None and "23514" in dead[0].last_error
    assert len(await ledger_rows(ledger_pool)) == 9
    assert (stats.done, stats.dead, stats.pending) == (9, 1, 0)


async def test_blocked_key_does_not_wake_at_once(
        open_store: StoreOpener, ledger_pool: AsyncConnectionPool[Any]) -> None:
    """Operations that are due but wait behind a dead one of their ordering key must not
    make the engine start pass after pass at once."""
    async with open_store(dead_after_attempts=1, sync_interval=30.0) as store:
        await store.enqueue([ledger_op("first", amount=-1, ordering_key="k")])
        engine = SyncEngine(store, {"postgres": postgres_sink(ledger_pool)}, store.config)
        await engine.run_pass(forced=True)
        # Enqueued after the failure, so these are due now, not waiting out a backoff.
        await store.enqueue([ledger_op(f"later-{i}", ordering_key="k") for i in range(3)])
        await engine.run_pass(forced=True)
        sleep = await engine._sleep_for()
        dead = await store.list(states=[State.DEAD])

    assert [op.key for op in dead] == ["first"]
    assert sleep == pytest.approx(30.0, abs=1.0)


async def test_read_only_database_is_transient(
        ledger_pool: AsyncConnectionPool[Any]) -> None:
    """A standby or a database set read-only rejects writes until that ends, so the
    operations must wait instead of going dead."""
    sink = postgres_sink(ledger_pool)
    async with ledger_pool.connection() as conn:
        await conn.execute("SET TRANSACTION READ ONLY")
        with pytest.raises(psycopg.Error) as caught:
            await conn.execute("INSERT INTO ledger (key, amount) VALUES ('ro', 1)")
        await conn.rollback()
    error = caught.value

    failure = sink.classify(error)
    assert error.sqlstate == "25006"
    assert failure.permanent is False


async def test_unsendable_value_goes_dead_alone(
        open_store: StoreOpener, ledger_pool: AsyncConnectionPool[Any], metrics: Metrics
) -> None:
    """A value that psycopg rejects (a NUL in text, which enqueue now rejects but an
    older walacord stored) fails only its own operation, as a statement error. The
    operations batched with it are applied at their first attempt."""
    unsendable = NewOperation(key="nul\0", sink="postgres", target="insert_row",
                              payload=b'{"amount":1}')
    async with open_store(dead_after_attempts=2) as store:
        good = [ledger_op(f"good-{i}") for i in range(6)]
        await store.enqueue([*good[:3], unsendable, *good[3:]])
        engine = SyncEngine(store, {"postgres": postgres_sink(ledger_pool)}, store.config,
                            metrics=metrics)
        await drain(engine, store)
        dead = await store.list(states=[State.DEAD])
        done = await store.list(states=[State.DONE])

    assert [op.key for op in dead] == ["nul\0"]
    assert dead[0].last_error is not None
    assert dead[0].last_error.startswith("statement: "), dead[0].last_error
    assert "NUL" in dead[0].last_error
    assert {op.attempts for op in done} == {1}
    assert len(await ledger_rows(ledger_pool)) == 6
    errors = metrics.registry.get_sample_value(
        "walacord_outbox_sync_errors_total", {"sink": "postgres", "reason": "connection"})
    assert not errors


async def test_engine_ramps_up_after_outage(
        open_store: StoreOpener, ledger_pool: AsyncConnectionPool[Any]) -> None:
    async with open_store(sync_batch_min=5, sync_batch_max=80) as store:
        await store.enqueue([ledger_op(f"k{i}") for i in range(400)])
        engine = RecordingEngine(store, {"postgres": postgres_sink(ledger_pool)},
                                 store.config)
        engine.sink_unhealthy("postgres")
        skipped = await engine.run_pass()
        engine.sink_healthy("postgres")
        report = await engine.run_pass()

    assert skipped.applied == 0
    assert report.applied == 400
    assert engine.rounds[:5] == [5, 10, 20, 40, 80]
    assert max(engine.rounds) == 80


@pytest.mark.parametrize(("outcomes", "size", "threshold"), [
    ([(10, 0)], 20, 80),
    ([(10, 0), (20, 0), (40, 0)], 80, 80),
    ([(10, 0), (15, 5)], 10, 10),
    ([(10, 0), (15, 5), (10, 0)], 20, 10),
    ([(0, 10), (0, 10)], 10, 10),
    ([(0, 0)], 10, 80),
])
def test_ramp_aimd(outcomes: list[tuple[int, int]], size: int, threshold: int) -> None:
    ramp = Ramp(minimum=10, maximum=80, error_ratio=0.1)
    for applied, failed in outcomes:
        ramp.update(applied, failed)
    assert (ramp.size, ramp.threshold) == (size, threshold)


def test_retry_delay_grows_and_honours_retry_after() -> None:
    config = OutboxConfig(retry_initial=1.0, retry_max=60.0)
    first = retry_delay(1, config, None)
    fourth = retry_delay(4, config, None)
    capped = retry_delay(30, config, None)
    requested = retry_delay(1, config, 30.0)
    assert 1.0 <= first <= 2.0
    assert 8.0 <= fourth <= 9.0
    assert capped == 60.0
    assert 30.0 <= requested <= 31.0


async def test_walacor_sink_syncs_after_503(
        open_store: StoreOpener, emulator: Emulator, walacor_client: WalacorClient) -> None:
    keys = [f"pay-{i}" for i in range(300)]
    emulator.set_faults(status=503, path=SUBMIT)
    async with open_store() as store:
        await store.enqueue([walacor_op(key) for key in keys])
        engine = SyncEngine(store, {"walacor": WalacorSink(walacor_client, timeout=10)},
                            store.config)
        failed = await engine.run_pass()
        during = await store.stats()

        emulator.clear_faults()
        engine.sink_healthy("walacor")
        await drain(engine, store)
        stats = await store.check_conservation()
        operation = (await store.list(limit=1))[0]

    assert failed.applied == 0
    assert during.pending == 300
    assert (stats.done, stats.pending, stats.dead) == (300, 0, 0)
    assert stats.conserved
    assert operation.receipt is not None and operation.receipt["uid"]
    counts = await walacor_rows_per_key(walacor_client)
    assert {key: counts[key] for key in keys} == dict.fromkeys(keys, 1)


async def test_walacor_sink_no_duplicates_when_answers_drop(
        open_store: StoreOpener, emulator: Emulator, walacor_client: WalacorClient) -> None:
    keys = [f"drop-{i}" for i in range(60)]
    emulator.set_faults(mode="drop_after_commit", path=SUBMIT, ratio=0.5)
    async with open_store(sync_batch_min=3, sync_batch_max=12) as store:
        await store.enqueue([walacor_op(key) for key in keys])
        engine = SyncEngine(store, {"walacor": WalacorSink(walacor_client, timeout=10)},
                            store.config)
        await drain(engine, store, passes=200)
        emulator.clear_faults()
        stats = await store.check_conservation()

    counts = await walacor_rows_per_key(walacor_client)
    assert Counter({key: counts[key] for key in keys}) == Counter(dict.fromkeys(keys, 1))
    assert stats.done == 60


async def test_walacor_retry_after_lost_response(
        open_store: StoreOpener, emulator: Emulator, walacor_client: WalacorClient) -> None:
    """`outbox retry` sets attempts back to 0. The next submit must still look the key
    up, because the failed one was stored before its response was lost."""
    # The submit is stored and its response lost, and the lookup that follows fails, so
    # the outcome stays unknown and the operation pending.
    emulator.set_faults([FaultSpec(mode="drop_after_commit", path=SUBMIT, count=1),
                         FaultSpec(status=503, path="/api/query")])
    async with open_store() as store:
        [result] = await store.enqueue([walacor_op("lost-response")])
        engine = SyncEngine(store, {"walacor": WalacorSink(walacor_client, timeout=10)},
                            store.config)
        await engine.run_pass(forced=True)
        emulator.clear_faults()
        failed = await store.get(result.operation.id)
        retried = await store.retry([result.operation.id])
        await drain(engine, store)
        done = await store.get(result.operation.id)

    counts = await walacor_rows_per_key(walacor_client)
    assert (failed.state, failed.attempts) == (State.PENDING, 1)
    assert retried == 1
    assert done.state is State.DONE
    assert counts["lost-response"] == 1


async def test_walacor_sink_honours_retry_after(
        open_store: StoreOpener, emulator: Emulator, walacor_client: WalacorClient) -> None:
    emulator.set_faults(status=429, retry_after=30, path=SUBMIT)
    async with open_store(retry_max=300.0) as store:
        await store.enqueue([walacor_op("slow-down")])
        engine = SyncEngine(store, {"walacor": WalacorSink(walacor_client, timeout=10)},
                            store.config)
        before = time.time()
        await engine.run_pass()
        operation = (await store.list())[0]

    assert operation.state is State.PENDING
    assert operation.next_attempt_at >= before + 30
    assert operation.last_error is not None and operation.last_error.startswith("rate_limited")


async def test_walacor_validation_error_goes_dead(
        open_store: StoreOpener, emulator: Emulator, walacor_client: WalacorClient) -> None:
    emulator.set_faults(status=400, path=SUBMIT)
    async with open_store(dead_after_attempts=3) as store:
        await store.enqueue([walacor_op("rejected")])
        engine = SyncEngine(store, {"walacor": WalacorSink(walacor_client, timeout=10)},
                            store.config)
        await drain(engine, store)
        operation = (await store.list())[0]

    assert operation.state is State.DEAD
    assert operation.attempts == 3
    assert operation.last_error is not None and operation.last_error.startswith("validation")


async def test_sync_now_runs_pass(open_store: StoreOpener, metrics: Metrics,
                                  ledger_pool: AsyncConnectionPool[Any]) -> None:
    async with open_store(sync_interval=3600.0) as store:
        engine = SyncEngine(store, {"postgres": postgres_sink(ledger_pool)}, store.config)
        async with anyio.create_task_group() as tasks:
            await tasks.start(engine.run)
            await store.enqueue([ledger_op(f"now-{i}") for i in range(7)])
            with anyio.fail_after(10):
                report = await engine.sync_now()
            tasks.cancel_scope.cancel()
    assert report.applied == 7
    assert report.by_sink == {"postgres": 7}
    assert metrics.outbox_enqueued._value.get() == 7
    assert metrics.outbox_synced.labels(sink="postgres")._value.get() == 7
    assert metrics.outbox_pending._value.get() == 0
    assert metrics.outbox_accepted._value.get() == 7
    assert metrics.outbox_conservation_ok._value.get() == 1


async def test_drain_finishes_running_round(
        open_store: StoreOpener, emulator: Emulator, walacor_client: WalacorClient) -> None:
    emulator.set_faults(latency_ms=1000, path=SUBMIT)
    async with open_store(sync_batch_min=5, sync_batch_max=5, sync_interval=3600.0) as store:
        engine = RecordingEngine(store, {"walacor": WalacorSink(walacor_client, timeout=10)},
                                 store.config)
        async with anyio.create_task_group() as tasks:
            await tasks.start(engine.run)
            await store.enqueue([walacor_op(f"drain-{i}") for i in range(30)])
            engine.wake()
            with anyio.fail_after(10):
                await engine.round_started.wait()
                await engine.drain()
            drained = await store.stats()
            rounds = len(engine.rounds)
            engine.wake()
            await anyio.sleep(0.3)
            tasks.cancel_scope.cancel()
        after = await store.stats()

    # The round in progress was applied and stored; no round started after drain().
    assert drained.in_flight == 0
    assert drained.done == 5 * rounds
    assert drained.pending == 30 - 5 * rounds
    assert len(engine.rounds) == rounds
    assert after.pending == drained.pending
    counts = await walacor_rows_per_key(walacor_client)
    assert sum(counts.get(f"drain-{i}", 0) for i in range(30)) == drained.done


# Statements that a migration has not caught up with yet: a missing table, a missing
# column and a missing schema.
AWAITING_MIGRATION = {
    "insert_audit": OutboxStatement(
        sql="INSERT INTO audit_log (key, note) VALUES (%(key)s, %(note)s) "
            "ON CONFLICT (key) DO NOTHING"),
    "insert_region": OutboxStatement(
        sql="INSERT INTO ledger (key, amount, region) VALUES (%(key)s, 1, %(region)s) "
            "ON CONFLICT (key) DO NOTHING"),
    "insert_invoice": OutboxStatement(
        sql="INSERT INTO billing.invoices (key) VALUES (%(key)s) ON CONFLICT (key) DO NOTHING"),
}
MIGRATION_SQL = """
CREATE TABLE audit_log (key text PRIMARY KEY, note text);
ALTER TABLE ledger ADD COLUMN region text;
CREATE SCHEMA billing;
CREATE TABLE billing.invoices (key text PRIMARY KEY);
"""


async def test_missing_table_waits_for_migration(
        open_store: StoreOpener, ledger_pool: AsyncConnectionPool[Any], metrics: Metrics,
        caplog: pytest.LogCaptureFixture) -> None:
    statements = {"insert_row": INSERT_ROW, **AWAITING_MIGRATION}
    sink = PostgresSink(ledger_pool, statements, timeout=10)
    waiting = [
        NewOperation(key="audit-1", sink="postgres", target="insert_audit",
                     payload=b'{"note": "deploy"}'),
        NewOperation(key="region-1", sink="postgres", target="insert_region",
                     payload=b'{"region": "eu"}'),
        NewOperation(key="invoice-1", sink="postgres", target="insert_invoice",
                     payload=b"{}"),
    ]
    good = [ledger_op(f"good-{i}") for i in range(4)]
    caplog.set_level(logging.WARNING, logger="walacord.outbox")
    async with open_store(dead_after_attempts=2) as store:
        await store.enqueue([good[0], *waiting, *good[1:]])
        engine = SyncEngine(store, {"postgres": sink}, store.config, metrics=metrics)
        # More passes than dead_after_attempts, each after the retry backoff.
        for _ in range(5):
            await engine.run_pass(forced=True)
            await anyio.sleep(store.config.retry_max + store.config.retry_initial)
        before = {op.key: op for op in await store.list(states=[State.PENDING])}
        dead_before = (await store.stats()).dead

        async with ledger_pool.connection() as conn:
            await conn.execute(MIGRATION_SQL)
        await drain(engine, store)
        stats = await store.check_conservation()

    assert dead_before == 0
    assert sorted(before) == ["audit-1", "invoice-1", "region-1"]
    assert all(op.attempts >= 3 for op in before.values()), before
    assert (before["audit-1"].last_error or "").startswith(
        'sqlstate 42P01: relation "audit_log" does not exist')
    assert (before["region-1"].last_error or "").startswith(
        'sqlstate 42703: column "region" of relation "ledger" does not exist')
    assert (before["invoice-1"].last_error or "").startswith(
        'sqlstate 42P01: relation "billing.invoices" does not exist')
    errors = metrics.outbox_sync_errors
    assert errors.labels(sink="postgres", reason="sqlstate 42P01")._value.get() >= 6
    assert errors.labels(sink="postgres", reason="sqlstate 42703")._value.get() >= 3
    waits = [r for r in caplog.records if r.getMessage() == "outbox.waiting_for_schema"]
    assert waits, [r.getMessage() for r in caplog.records]
    assert waits[0].levelno == logging.WARNING
    assert (stats.done, stats.dead, stats.pending) == (7, 0, 0)
    assert sorted(key for key, _ in await ledger_rows(ledger_pool)) == [
        "good-0", "good-1", "good-2", "good-3", "region-1"]
