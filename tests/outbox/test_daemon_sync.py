"""The outbox inside the real daemon: enqueue through walacorctl during an outage, then sync."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import orjson
import pytest

from tests.conftest import WALACOR_USER, daemon_config, running_daemon
from tests.outbox.conftest import ETID, WALACOR_FIELDS, walacor_rows_per_key
from walacord.config import BackupConfig, OutboxConfig, OutboxStatement
from walacord.emulator import Emulator, running_emulator
from walacord.walacor import WalacorClient

WALACORCTL = str(Path(sys.executable).parent / "walacorctl")
OPERATIONS = 10_000


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    async with running_emulator(seed=5, users=dict([WALACOR_USER])) as emulator:
        await emulator.store.create_schema(
            1, {"ETId": ETID, "TableName": "payments", "Fields": WALACOR_FIELDS})
        yield emulator


async def ctl(socket: Path, *args: str) -> dict[str, object]:
    result = await anyio.run_process([WALACORCTL, "--socket", str(socket), "--json", *args],
                                     check=False)
    assert result.returncode == 0, result.stderr.decode()
    document = orjson.loads(result.stdout)
    assert isinstance(document, dict)
    return document


@pytest.mark.slow
@pytest.mark.anyio
async def test_outage_backlog_syncs_exactly_once(tmp_path: Path, pg_db: str,
                                                 emulator: Emulator) -> None:
    operations = tmp_path / "operations.jsonl"
    with operations.open("wb") as handle:
        for index in range(OPERATIONS):
            handle.write(orjson.dumps({"sink": "walacor", "etid": ETID, "key": f"op-{index}",
                                       "data": {"amount": index}}) + b"\n")

    config = daemon_config(tmp_path, pg_db, emulator.url,
                           backup=BackupConfig(enabled=False),
                           outbox=OutboxConfig(sync_interval=1.0))
    socket = Path(config.control.socket)
    emulator.set_faults(status=503)
    async with running_daemon(config):
        # Step 1: enqueue the whole file while every Walacor call returns 503.
        result = await anyio.run_process(
            [WALACORCTL, "--socket", str(socket), "enqueue", "--from-file", str(operations)],
            check=False)
        assert result.returncode == 0, result.stderr.decode()
        stats = await ctl(socket, "outbox", "stats")
        assert stats["accepted"] == OPERATIONS
        assert stats["pending"] + stats["in_flight"] == OPERATIONS
        assert stats["done"] == 0

        # Step 2: clear the fault; the walacor probe recovers and sync drains the backlog.
        emulator.clear_faults()

        async def drained() -> bool:
            return (await ctl(socket, "outbox", "stats"))["done"] == OPERATIONS

        with anyio.fail_after(120):
            while not await drained():  # noqa: ASYNC110 - polls the CLI, no event exists
                await anyio.sleep(0.5)
        final = await ctl(socket, "outbox", "stats")
        assert final["dead"] == 0

    # Step 3: every key is stored in Walacor exactly once.
    async with WalacorClient(emulator.url, username=WALACOR_USER[0],
                             password=WALACOR_USER[1]) as client:
        per_key = await walacor_rows_per_key(client)
    assert len(per_key) == OPERATIONS
    assert set(per_key.values()) == {1}


@pytest.mark.anyio
async def test_postgres_sink_applies_statement(tmp_path: Path, pg_db: str) -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(pg_db, autocommit=True) as conn:
        await conn.execute("CREATE TABLE payments (id text PRIMARY KEY, amount int)")
    statement = OutboxStatement(sql="INSERT INTO payments (id, amount) VALUES "
                                    "(%(id)s, %(amount)s) ON CONFLICT (id) DO NOTHING")
    config = daemon_config(tmp_path, pg_db, backup=BackupConfig(enabled=False),
                           outbox=OutboxConfig(sync_interval=0.5,
                                               statements={"record_payment": statement}))
    socket = Path(config.control.socket)
    async with running_daemon(config):
        for _ in range(2):  # the second enqueue of the same key changes nothing
            result = await anyio.run_process(
                [WALACORCTL, "--socket", str(socket), "enqueue", "--sink", "postgres",
                 "--statement", "record_payment", "--key", "pay-1",
                 "--data", '{"id": "pay-1", "amount": 42}'], check=False)
            assert result.returncode == 0, result.stderr.decode()

        async def applied() -> bool:
            return (await ctl(socket, "outbox", "stats"))["done"] == 1

        with anyio.fail_after(30):
            while not await applied():  # noqa: ASYNC110 - polls the CLI, no event exists
                await anyio.sleep(0.2)

    async with await psycopg.AsyncConnection.connect(pg_db) as conn:
        rows = await (await conn.execute("SELECT id, amount FROM payments")).fetchall()
    assert rows == [("pay-1", 42)]
