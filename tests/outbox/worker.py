"""A process that enqueues and syncs outbox operations until a test kills it.

It prints one line per event on stdout, flushed at once, so the test that kills it
reads which keys were acknowledged before the SIGKILL:

    start conserved=1 accepted=N
    ack KEY
    drained

Run: python -m tests.outbox.worker --db PATH [--pg URL] [--walacor URL] --prefix P
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import anyio
from psycopg_pool import AsyncConnectionPool

from walacord.config import OutboxConfig, OutboxStatement
from walacord.outbox.model import NewOperation
from walacord.outbox.sinks import PostgresSink, Sink, WalacorSink
from walacord.outbox.store import OutboxStore
from walacord.outbox.sync import SyncEngine
from walacord.walacor import WalacorClient

ETID = 10001
STATEMENTS = {"insert_row": OutboxStatement(
    sql="INSERT INTO ledger (key, amount) VALUES (%(key)s, %(amount)s) "
        "ON CONFLICT (key) DO NOTHING")}


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def operation(key: str, sinks: list[str], index: int) -> NewOperation:
    sink = sinks[index % len(sinks)] if sinks else "walacor"
    if sink == "postgres":
        return NewOperation(key=key, sink="postgres", target="insert_row",
                            payload=f'{{"key":"{key}","amount":{index}}}'.encode())
    return NewOperation(key=key, sink="walacor", target=str(ETID),
                        payload=f'{{"amount":{index}}}'.encode())


async def enqueue_forever(store: OutboxStore, prefix: str, client: int, count: int,
                          sinks: list[str]) -> None:
    for index in range(count):
        key = f"{prefix}-{client}-{index}"
        await store.enqueue([operation(key, sinks, index)])
        say(f"ack {key}")


async def main(args: argparse.Namespace) -> None:
    config = OutboxConfig(sync_interval=0.05, retry_initial=0.02, retry_max=0.2,
                          sync_batch_min=4, sync_batch_max=64, statements=STATEMENTS)
    store = OutboxStore(args.db, config)
    async with anyio.create_task_group() as tasks:
        await tasks.start(store.run)
        stats = await store.check_conservation()
        say(f"start conserved={int(stats.conserved)} accepted={stats.accepted}")

        sinks: dict[str, Sink] = {}
        pool: AsyncConnectionPool[Any] | None = None
        client: WalacorClient | None = None
        if args.pg:
            pool = AsyncConnectionPool(args.pg, min_size=1, max_size=4, open=False)
            await pool.open(wait=True, timeout=10)
            sinks["postgres"] = PostgresSink(pool, STATEMENTS, timeout=5)
        if args.walacor:
            client = WalacorClient(args.walacor, username="admin", password="admin",
                                   connect_timeout=1.0, read_timeout=2.0, request_timeout=4.0)
            await client.__aenter__()
            sinks["walacor"] = WalacorSink(client, timeout=10)
        if sinks:
            await tasks.start(SyncEngine(store, sinks, config).run)

        async with anyio.create_task_group() as clients:
            for number in range(args.clients):
                clients.start_soon(enqueue_forever, store, args.prefix, number, args.count,
                                   sorted(sinks))

        if args.drain:
            while True:
                stats = await store.stats()
                if stats.pending == 0 and stats.in_flight == 0:
                    break
                await anyio.sleep(0.05)
            say(f"drained dead={stats.dead}")
        tasks.cancel_scope.cancel()
    if client is not None:
        await client.__aexit__(None, None, None)
    if pool is not None:
        await pool.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--pg", default="")
    parser.add_argument("--walacor", default="")
    parser.add_argument("--prefix", default="op")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--drain", action="store_true")
    anyio.run(main, parser.parse_args())
