"""Fixtures for outbox tests: a running store on a real SQLite file, a PostgreSQL sink."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from prometheus_client import CollectorRegistry
from psycopg_pool import AsyncConnectionPool

from walacord.config import OutboxConfig, OutboxStatement
from walacord.emulator import Emulator, running_emulator
from walacord.metrics import Metrics
from walacord.outbox.model import NewOperation
from walacord.outbox.store import OutboxStore
from walacord.walacor import WalacorClient

INSERT_ROW = OutboxStatement(
    sql="INSERT INTO ledger (key, amount) VALUES (%(key)s, %(amount)s) "
        "ON CONFLICT (key) DO NOTHING")


def walacor_op(key: str, size: int = 0, ordering_key: str | None = None) -> NewOperation:
    payload = b'{"amount":1' + (b',"pad":"' + b"x" * size + b'"' if size else b"") + b"}"
    return NewOperation(key=key, sink="walacor", target="10001", payload=payload,
                        ordering_key=ordering_key)


def ledger_op(key: str, amount: int = 1, ordering_key: str | None = None) -> NewOperation:
    payload = f'{{"key":"{key}","amount":{amount}}}'.encode()
    return NewOperation(key=key, sink="postgres", target="insert_row", payload=payload,
                        ordering_key=ordering_key)


class Alerts(list[tuple[str, str]]):
    """Alert callback that records (name, message) pairs."""

    def __call__(self, name: str, message: str) -> None:
        self.append((name, message))

    def names(self) -> list[str]:
        return [name for name, _ in self]


@pytest.fixture
def alerts() -> Alerts:
    return Alerts()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def outbox_config() -> OutboxConfig:
    return OutboxConfig(retry_initial=0.01, retry_max=0.05, sync_interval=0.2,
                        statements={"insert_row": INSERT_ROW})


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "outbox.db"


StoreOpener = Callable[..., Any]


@pytest.fixture
def open_store(db_path: Path, outbox_config: OutboxConfig, alerts: Alerts,
               metrics: Metrics) -> StoreOpener:
    """Return an async context manager that runs a store until the block ends."""

    @asynccontextmanager
    async def opener(path: Path = db_path, **changes: Any) -> AsyncIterator[OutboxStore]:
        config = dataclasses.replace(outbox_config, **changes)
        store = OutboxStore(path, config, metrics=metrics, on_alert=alerts)
        async with anyio.create_task_group() as tasks:
            await tasks.start(store.run)
            try:
                yield store
            finally:
                tasks.cancel_scope.cancel()

    return opener


@pytest.fixture
async def ledger_pool(pg_db: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    """A pool on a fresh database holding the `ledger` target table."""
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE ledger (key text PRIMARY KEY, amount integer NOT NULL "
                     "CHECK (amount >= 0), applied_at timestamptz DEFAULT clock_timestamp())")
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(pg_db, min_size=1, max_size=8,
                                                         open=False)
    await pool.open(wait=True, timeout=10)
    try:
        yield pool
    finally:
        await pool.close()


async def ledger_rows(pool: AsyncConnectionPool[Any]) -> list[tuple[Any, ...]]:
    async with pool.connection() as conn:
        cursor = await conn.execute("SELECT key, amount FROM ledger ORDER BY applied_at, key")
        return await cursor.fetchall()


ETID = 10001
WALACOR_FIELDS = [
    {"FieldName": "walacord_key", "DataType": "TEXT", "Required": False, "MaxLength": 128},
    {"FieldName": "amount", "DataType": "INTEGER", "Required": False},
    {"FieldName": "pad", "DataType": "TEXT", "Required": False},
]


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    async with running_emulator(seed=11) as emulator:
        await emulator.store.create_schema(
            1, {"ETId": ETID, "TableName": "payments", "Fields": WALACOR_FIELDS})
        yield emulator


@pytest.fixture
async def walacor_client(emulator: Emulator) -> AsyncIterator[WalacorClient]:
    async with WalacorClient(emulator.url, username="admin", password="admin",
                             connect_timeout=1.0, read_timeout=2.0,
                             request_timeout=4.0) as client:
        yield client


async def walacor_rows_per_key(client: WalacorClient) -> Counter[str]:
    """Count stored rows per walacord_key over the whole table, unpaged."""
    result = await client.query(ETID, {}, page_no=0, page_size=0)
    return Counter(str(row.get("walacord_key")) for row in result.rows)
