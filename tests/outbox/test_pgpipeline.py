"""The pipelined batch execution behind the PostgreSQL sink, against a real server."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg
import pytest
from psycopg import errors
from psycopg.adapt import PyFormat
from psycopg_pool import AsyncConnectionPool

from tests.outbox.conftest import INSERT_ROW, ledger_rows
from walacord.outbox.pgpipeline import compile_statement, execute_batch

pytestmark = pytest.mark.anyio


def test_compile_numbers_names_in_order() -> None:
    compiled = compile_statement(
        "UPDATE t SET a = %(a)s, b = %(b)b, pct = '5%%' WHERE a <> %(a)s AND c = %(c)t")

    assert compiled.sql == "UPDATE t SET a = $1, b = $2, pct = '5%' WHERE a <> $1 AND c = $3"
    assert compiled.names == ("a", "b", "c")
    assert compiled.formats == (PyFormat.AUTO, PyFormat.BINARY, PyFormat.TEXT)


@pytest.mark.parametrize("sql", ["INSERT INTO t VALUES (%s)",
                                 "INSERT INTO t VALUES (%(a)s, %(a)b)"])
def test_compile_rejects_ambiguous_placeholders(sql: str) -> None:
    with pytest.raises(psycopg.ProgrammingError):
        compile_statement(sql)


async def test_batch_inserts_rows_of_changing_types(
        ledger_pool: AsyncConnectionPool[Any]) -> None:
    # psycopg dumps small ints as int2 and larger ones as int4, and each change of
    # type prepares the statement again.
    amounts = [1, 40_000, 2, 3, 2**31 - 1, 4]
    rows = [{"key": f"k{i}", "amount": amount} for i, amount in enumerate(amounts)]
    async with ledger_pool.connection() as conn:
        await execute_batch(conn, [(compile_statement(INSERT_ROW.sql), rows)])
        assert conn.info.transaction_status is psycopg.pq.TransactionStatus.IDLE

    stored = dict(await ledger_rows(ledger_pool))
    assert stored == {row["key"]: row["amount"] for row in rows}


async def test_batch_error_stores_nothing(ledger_pool: AsyncConnectionPool[Any]) -> None:
    rows = [{"key": "good-1", "amount": 1}, {"key": "bad", "amount": -1},
            {"key": "good-2", "amount": 2}]
    async with ledger_pool.connection() as conn:
        with pytest.raises(errors.CheckViolation) as caught:
            await execute_batch(conn, [(compile_statement(INSERT_ROW.sql), rows)])
        assert caught.value.sqlstate == "23514"
        # The connection is rolled back and usable again.
        assert conn.info.transaction_status is psycopg.pq.TransactionStatus.IDLE
        await execute_batch(conn, [(compile_statement(INSERT_ROW.sql), [rows[0]])])

    assert await ledger_rows(ledger_pool) == [("good-1", 1)]


async def test_batch_missing_parameter_sends_nothing(
        ledger_pool: AsyncConnectionPool[Any]) -> None:
    async with ledger_pool.connection() as conn:
        with pytest.raises(psycopg.ProgrammingError, match="amount"):
            await execute_batch(conn, [(compile_statement(INSERT_ROW.sql),
                                        [{"key": "a", "amount": 1}, {"key": "b"}])])
        assert not conn.closed
        assert conn.info.transaction_status is psycopg.pq.TransactionStatus.IDLE

    assert await ledger_rows(ledger_pool) == []


async def test_batch_runs_several_statements(ledger_pool: AsyncConnectionPool[Any]) -> None:
    bump = compile_statement("UPDATE ledger SET amount = amount + %(by)s WHERE key = %(key)s")
    async with ledger_pool.connection() as conn:
        await execute_batch(conn, [
            (compile_statement(INSERT_ROW.sql), [{"key": "a", "amount": 1}]),
            (bump, [{"key": "a", "by": 10}, {"key": "a", "by": 100}])])

    assert await ledger_rows(ledger_pool) == [("a", 111)]


async def test_batch_cancelled_closes_connection(
        ledger_pool: AsyncConnectionPool[Any]) -> None:
    slow = compile_statement("SELECT pg_sleep(%(seconds)s)")
    async with ledger_pool.connection() as conn:
        with anyio.move_on_after(0.2):
            await execute_batch(conn, [(slow, [{"seconds": 5}])])
        assert conn.closed

    async with ledger_pool.connection() as conn:
        await conn.execute("SELECT 1")


async def test_batch_large_enough_to_fill_socket_buffers(
        ledger_pool: AsyncConnectionPool[Any]) -> None:
    # About 10 MB of parameters, more than one write to the socket takes, so the
    # helper waits for the socket and reads results between writes.
    rows = [{"key": f"wide-{i:05}-" + "x" * 1000, "amount": i} for i in range(10_000)]
    async with ledger_pool.connection() as conn:
        await execute_batch(conn, [(compile_statement(INSERT_ROW.sql), rows)])

    assert len(await ledger_rows(ledger_pool)) == len(rows)
