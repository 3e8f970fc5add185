"""A process that enqueues and syncs outbox operations until a test kills it.

It prints one line per event on stdout, flushed at once, so the test that kills it
reads which keys were acknowledged before the SIGKILL:

    start conserved=1 accepted=N
    ack KEY
    drained

Run: python -m tests.outbox.worker --db PATH [--pg URL] [--walacor URL] --prefix P

With `--socket PATH` it serves the outbox on a control socket instead, and its clients
pipeline single-op enqueues through `AsyncOutboxClient` connections. The database is
then `outbox.db` in the directory of `--db`.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
from prometheus_client import CollectorRegistry
from psycopg_pool import AsyncConnectionPool

from walacord.client import AsyncOutboxClient
from walacord.config import Config, ControlConfig, OutboxConfig, OutboxStatement, StateConfig
from walacord.control.server import ControlServer
from walacord.metrics import Metrics
from walacord.outbox.control import register_methods
from walacord.outbox.model import NewOperation
from walacord.outbox.service import Outbox
from walacord.outbox.sinks import PostgresSink, Sink, WalacorSink
from walacord.outbox.store import OutboxStore
from walacord.outbox.sync import SyncEngine
from walacord.runtime import Runtime
from walacord.systemd import Notifier
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


async def pipeline_forever(connection: AsyncOutboxClient, prefix: str, client: int,
                           lane: int, depth: int) -> None:
    for index in range(lane, 1_000_000, depth):
        key = f"{prefix}-{client}-{index}"
        await connection.enqueue({"sink": "walacor", "etid": ETID, "key": key,
                                  "data": {"amount": index}})
        say(f"ack {key}")


async def serve_socket(args: argparse.Namespace) -> None:
    """Serve the outbox on `args.socket` and enqueue through it until killed."""
    state = Path(args.db).parent
    config = Config(state=StateConfig(dir=str(state)),
                    control=ControlConfig(socket=args.socket, group=""),
                    outbox=OutboxConfig(sync_interval=3600.0))
    registry = CollectorRegistry()
    runtime = Runtime(config=config, config_path=None, registry=registry,
                      metrics=Metrics(registry), notifier=Notifier({}))
    outbox = Outbox(config, {}, metrics=runtime.metrics)
    register_methods(runtime.methods, outbox)
    server = ControlServer(runtime)
    async with anyio.create_task_group() as tasks:
        for component in (outbox, server):
            runtime.components[component.name] = component
            await tasks.start(component.run)
        runtime.ready.set()
        stats = await outbox.store.check_conservation()
        say(f"start conserved={int(stats.conserved)} accepted={stats.accepted}")

        async with AsyncExitStack() as stack:
            connections = [
                await stack.enter_async_context(AsyncOutboxClient(args.socket, timeout=30))
                for _ in range(args.clients)]
            async with anyio.create_task_group() as clients:
                for number, connection in enumerate(connections):
                    for lane in range(args.depth):
                        clients.start_soon(pipeline_forever, connection, args.prefix, number,
                                           lane, args.depth)


async def main(args: argparse.Namespace) -> None:
    if args.socket:
        await serve_socket(args)
        return

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
    parser.add_argument("--socket", default="", help="serve and enqueue through this socket")
    parser.add_argument("--depth", type=int, default=8,
                        help="pipelined requests per connection (with --socket)")
    anyio.run(main, parser.parse_args())
