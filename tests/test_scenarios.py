"""The outage scenario's checks at the sinks, against a real emulator and PostgreSQL."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from tests.outbox.test_control import serving_outbox
from walacord.config import Config, OutboxConfig, OutboxStatement
from walacord.dev import (
    DEV_ETID,
    DEV_ETID_FIELDS,
    DEV_ETID_TABLE,
    DEV_STATEMENT,
    DEV_STATEMENT_SQL,
    DEV_TABLE,
    DEV_TABLE_SQL,
    EMULATOR_USER,
)
from walacord.emulator import running_emulator
from walacord.outbox.service import build_sinks
from walacord.scenarios import (
    OPERATIONS_PER_SINK,
    Batch,
    Timeline,
    check_postgres,
    check_walacor,
    enqueue_operations,
    wait_drained,
)
from walacord.walacor.client import WalacorClient

# Short timer and retries, so a drain takes well under a second.
OUTBOX_CONFIG = OutboxConfig(retry_initial=0.01, retry_max=0.05, sync_interval=0.2,
                             statements={DEV_STATEMENT: OutboxStatement(sql=DEV_STATEMENT_SQL)})


@pytest.mark.anyio
async def test_wait_drained_fails_at_bound(tmp_path: Path) -> None:
    out = io.StringIO()
    timeline = Timeline(out)
    # No sinks, so nothing is ever applied.
    async with serving_outbox(tmp_path, OUTBOX_CONFIG, {}) as (path, _):
        batch = await enqueue_operations(timeline, path)
        drained = await wait_drained(timeline, path, batch, limit=0.5)

    operations = 2 * OPERATIONS_PER_SINK
    assert drained is False
    assert timeline.failures == 1
    assert f"outbox accepted {operations} operations" in out.getvalue()
    assert f"pending {operations}, in flight 0" in out.getvalue()
    assert (f"FAILED: outbox not drained after 0.5s: applied 0 of {operations}, "
            f"pending {operations}") in out.getvalue()


@pytest.mark.anyio
async def test_outage_steps_drain_into_sinks(tmp_path: Path, pg_db: str) -> None:
    user, password = EMULATOR_USER
    out = io.StringIO()
    timeline = Timeline(out)
    async with await psycopg.AsyncConnection.connect(pg_db, autocommit=True) as conn:
        await conn.execute(DEV_TABLE_SQL)
    async with (
        running_emulator(users={user: password}) as emulator,
        WalacorClient(emulator.url, username=user, password=password) as walacor,
        AsyncConnectionPool[Any](pg_db, min_size=1, max_size=2, open=False) as pool,
    ):
        await walacor.create_schema(DEV_ETID, DEV_ETID_TABLE, DEV_ETID_FIELDS)
        sinks = build_sinks(Config(outbox=OUTBOX_CONFIG), walacor=walacor, pool=pool)
        async with serving_outbox(tmp_path, OUTBOX_CONFIG, sinks) as (path, _):
            batch = await enqueue_operations(timeline, path)
            drained = await wait_drained(timeline, path, batch, limit=10)
        await check_walacor(timeline, emulator.url, batch)
        await check_postgres(timeline, pg_db, batch)

    operations = 2 * OPERATIONS_PER_SINK
    assert drained is True, out.getvalue()
    assert timeline.failures == 0, out.getvalue()
    assert len(batch.walacor_keys) == OPERATIONS_PER_SINK
    assert len(batch.postgres_keys) == OPERATIONS_PER_SINK
    assert f"applied {operations} of {operations}, pending 0" in out.getvalue()
    assert out.getvalue().count(f"{OPERATIONS_PER_SINK} of {OPERATIONS_PER_SINK} keys "
                                "stored exactly once") == 2


@pytest.mark.anyio
async def test_check_walacor_counts_missing_and_duplicated() -> None:
    user, password = EMULATOR_USER
    out = io.StringIO()
    timeline = Timeline(out)
    batch = Batch(walacor_keys=["once", "twice", "missing"])
    async with (
        running_emulator(users={user: password}) as emulator,
        WalacorClient(emulator.url, username=user, password=password) as client,
    ):
        await client.create_schema(DEV_ETID, DEV_ETID_TABLE, DEV_ETID_FIELDS)
        # A plain submit is not idempotent, so the second "twice" is a second record.
        await client.submit(DEV_ETID, [{"walacord_key": "once", "amount": 1},
                                       {"walacord_key": "twice", "amount": 2}])
        await client.submit(DEV_ETID, [{"walacord_key": "twice", "amount": 2}])

        await check_walacor(timeline, emulator.url, batch)

    assert timeline.failures == 1
    assert "FAILED: Walacor ETId 10001: 1 of 3 keys stored exactly once" in out.getvalue()
    assert "(1 missing, 1 duplicated)" in out.getvalue()


@pytest.mark.anyio
async def test_check_walacor_passes_when_each_key_once() -> None:
    user, password = EMULATOR_USER
    out = io.StringIO()
    timeline = Timeline(out)
    batch = Batch(walacor_keys=["a", "b"])
    async with (
        running_emulator(users={user: password}) as emulator,
        WalacorClient(emulator.url, username=user, password=password) as client,
    ):
        await client.create_schema(DEV_ETID, DEV_ETID_TABLE, DEV_ETID_FIELDS)
        await client.submit(DEV_ETID, [{"walacord_key": "a", "amount": 1},
                                       {"walacord_key": "b", "amount": 2}])

        await check_walacor(timeline, emulator.url, batch)

    assert timeline.failures == 0, out.getvalue()
    assert "2 of 2 keys stored exactly once (0 missing, 0 duplicated)" in out.getvalue()


@pytest.mark.anyio
async def test_check_postgres_counts_missing_and_duplicated(pg_db: str) -> None:
    # Without the sandbox's primary key, so that a key can be stored twice.
    async with await psycopg.AsyncConnection.connect(pg_db, autocommit=True) as conn:
        await conn.execute(f"CREATE TABLE {DEV_TABLE} (key text, amount integer)")
        await conn.execute(f"INSERT INTO {DEV_TABLE} VALUES ('once', 1), ('twice', 2), "
                           "('twice', 2), ('other', 3)")
    out = io.StringIO()
    timeline = Timeline(out)
    batch = Batch(postgres_keys=["once", "twice", "missing"])

    await check_postgres(timeline, pg_db, batch)

    assert timeline.failures == 1
    assert "FAILED: PostgreSQL table payments: 1 of 3 keys stored exactly once" in (
        out.getvalue())
    assert "(1 missing, 1 duplicated)" in out.getvalue()


@pytest.mark.anyio
async def test_check_postgres_reports_missing_table(pg_db: str) -> None:
    out = io.StringIO()
    timeline = Timeline(out)

    await check_postgres(timeline, pg_db, Batch(postgres_keys=["a"]))

    assert timeline.failures == 1
    assert "FAILED: cannot count rows in table payments" in out.getvalue()
