"""Measure the outbox beside its anchors, in one run, and record the figures.

1. Durable enqueue through the store API (`OutboxStore.enqueue`) with 1, 16 and 64
   concurrent callers, and through the control socket from a separate client process
   with 1 and 16 clients sending single-op, pipelined and batched requests (see
   SOCKET_LOADS), beside raw SQLite: one INSERT per transaction, WAL,
   synchronous=FULL, in the same directory.
2. Drain of a backlog into PostgreSQL beside psycopg `executemany` of the same rows,
   500 per transaction, into a private cluster.
3. Drain of a backlog into the Walacor emulator, run as a subprocess.

    python bench/outbox_bench.py               # full sizes, writes docs/benchmarks.md
    python bench/outbox_bench.py --quick --no-write
    python bench/outbox_bench.py --only postgres --backlog 20000   # one part, printed only
    python bench/outbox_bench.py --only enqueue --socket-load single_sixteen

NOTE: the client process and the daemon share the machine's cores, so on a small
machine the client's CPU time still lowers the socket figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

from walacord.config import OutboxConfig, OutboxStatement
from walacord.outbox.model import NewOperation
from walacord.outbox.sinks import PostgresSink, Sink, WalacorSink
from walacord.outbox.store import OutboxStore
from walacord.outbox.sync import SyncEngine
from walacord.pgcluster import PgCluster, free_port

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[1]
DOC = REPO / "docs" / "benchmarks.md"
START, END = "<!-- outbox:start -->", "<!-- outbox:end -->"
ETID = 10001
STATEMENT = OutboxStatement(sql="INSERT INTO ledger (key, amount) VALUES (%(key)s, "
                                "%(amount)s) ON CONFLICT (key) DO NOTHING")
PARTS = ("enqueue", "postgres", "emulator")
BATCH = int(os.environ.get("OUTBOX_BENCH_BATCH", "500"))
PAYLOAD = b'{"amount":125,"currency":"EUR","account":"DE89370400440532013000"}'


# --- 1. enqueue -----------------------------------------------------------------------


def raw_sqlite_inserts(directory: Path, count: int) -> float:
    """Return inserts per second, one synchronous=FULL WAL transaction each."""
    conn = sqlite3.connect(directory / "raw.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE operations (id INTEGER PRIMARY KEY, key TEXT UNIQUE, "
                 "payload BLOB)")
    started = time.perf_counter()
    for index in range(count):
        conn.execute("BEGIN")
        conn.execute("INSERT INTO operations (key, payload) VALUES (?, ?)",
                     (f"raw-{index}", PAYLOAD))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return count / elapsed


async def store_enqueues(directory: Path, clients: int, per_client: int) -> dict[str, float]:
    """Return acknowledged enqueues per second and operations per commit."""
    store = OutboxStore(directory / "outbox.db", OutboxConfig())
    async with anyio.create_task_group() as tasks:
        await tasks.start(store.run)
        commits_before = store.commits

        async def client(number: int) -> None:
            for index in range(per_client):
                await store.enqueue([NewOperation(f"c{number}-{index}", "walacor", str(ETID),
                                                  PAYLOAD)])

        started = time.perf_counter()
        async with anyio.create_task_group() as clients_group:
            for number in range(clients):
                clients_group.start_soon(client, number)
        elapsed = time.perf_counter() - started
        commits = store.commits - commits_before
        tasks.cancel_scope.cancel()
    total = clients * per_client
    return {"rate": total / elapsed, "per_commit": total / max(1, commits)}


@dataclass(frozen=True)
class SocketLoad:
    """One way to drive enqueues through the control socket.

    `clients` connections each keep `depth` requests in flight (pipelined on the
    connection when above 1), and each request carries `batch` operations (a single
    operation when 1, else an `operations` list).
    """

    label: str
    clients: int
    depth: int
    batch: int
    operations: int  # in total, over all clients

    def describe(self) -> str:
        clients = f"{self.clients} client{'s' if self.clients > 1 else ''}"
        request = "single-op requests" if self.batch == 1 else f"{self.batch}-op batches"
        pipelined = f", {self.depth} pipelined per connection" if self.depth > 1 else ""
        return f"{clients}, {request}{pipelined}"


SOCKET_LOADS = (
    SocketLoad("single_one", clients=1, depth=1, batch=1, operations=3000),
    SocketLoad("single_sixteen", clients=16, depth=1, batch=1, operations=32000),
    SocketLoad("pipelined_sixteen", clients=16, depth=16, batch=1, operations=64000),
    SocketLoad("deep_pipelined_sixteen", clients=16, depth=64, batch=1, operations=64000),
    SocketLoad("batch_one", clients=1, depth=1, batch=100, operations=32000),
    SocketLoad("batch_sixteen", clients=16, depth=1, batch=100, operations=64000),
)


async def client_load(path: str, load: SocketLoad, run: int) -> tuple[float, float]:
    """Drive `load` against the socket at `path`; return the seconds from start to last
    acknowledgement and the CPU seconds this process spent meanwhile.

    Runs in its own process (see `--client-load`), as the application would, so the
    clients' CPU time does not count against the daemon's event loop.
    """
    from walacord.client import AsyncOutboxClient

    per_client = load.operations // load.clients
    requests = per_client // load.batch

    def operation(number: int, index: int) -> dict[str, Any]:
        return {"sink": "walacor", "etid": ETID, "key": f"r{run}-c{number}-{index}",
                "data": {"amount": index, "currency": "EUR",
                         "account": "DE89370400440532013000"}}

    async def requester(connection: AsyncOutboxClient, number: int, lane: int) -> None:
        for request in range(lane, requests, load.depth):
            first = request * load.batch
            if load.batch == 1:
                result = await connection.enqueue(operation(number, first))
                assert result["created"], result
            else:
                results = await connection.enqueue_many(
                    [operation(number, first + i) for i in range(load.batch)])
                assert all(r["created"] for r in results), results[:3]

    async with AsyncExitStack() as stack:
        connections = [await stack.enter_async_context(AsyncOutboxClient(path, timeout=120))
                       for _ in range(load.clients)]
        started, cpu_started = time.perf_counter(), time.process_time()
        async with anyio.create_task_group() as tasks:
            for number, connection in enumerate(connections):
                for lane in range(load.depth):
                    tasks.start_soon(requester, connection, number, lane)
        return time.perf_counter() - started, time.process_time() - cpu_started


async def socket_enqueues(directory: Path, loads: Sequence[SocketLoad]) -> dict[str, Any]:
    """Serve the outbox on a control socket and drive each load from a client process.

    Return, per load label, acknowledged operations per second, operations per commit
    (per fsync) and the daemon process's CPU seconds per operation.
    """
    from prometheus_client import CollectorRegistry

    from walacord.config import Config, ControlConfig, StateConfig
    from walacord.control.server import ControlServer
    from walacord.metrics import Metrics
    from walacord.outbox.control import register_methods
    from walacord.outbox.service import Outbox
    from walacord.runtime import Runtime
    from walacord.systemd import Notifier

    path = str(directory / "control.sock")
    config = Config(state=StateConfig(dir=str(directory)),
                    control=ControlConfig(socket=path, group="", max_connections=256))
    registry = CollectorRegistry()
    runtime = Runtime(config=config, config_path=None, registry=registry,
                      metrics=Metrics(registry), notifier=Notifier({}))
    outbox = Outbox(config, {}, metrics=runtime.metrics)
    register_methods(runtime.methods, outbox)
    server = ControlServer(runtime)
    results: dict[str, Any] = {}
    async with anyio.create_task_group() as tasks:
        for component in (outbox, server):
            runtime.components[component.name] = component
            await tasks.start(component.run)
        runtime.ready.set()
        for run, load in enumerate(loads):
            commits_before = outbox.store.commits
            commit_seconds_before = commit_seconds(registry)
            cpu_before = time.process_time()
            process = await anyio.run_process(
                [sys.executable, str(SCRIPT), "--client-load", path,
                 json.dumps({**dataclasses.asdict(load), "run": run})],
                check=True)
            elapsed, client_cpu = json.loads(process.stdout.decode().strip().splitlines()[-1])
            cpu = time.process_time() - cpu_before
            commits = outbox.store.commits - commits_before
            in_commits = commit_seconds(registry) - commit_seconds_before
            results[load.label] = {"rate": load.operations / elapsed,
                                   "per_commit": load.operations / max(1, commits),
                                   "cpu_us_per_op": cpu / load.operations * 1e6,
                                   "client_cpu_us_per_op": client_cpu / load.operations * 1e6,
                                   "commit_ms": in_commits / max(1, commits) * 1e3,
                                   "commit_share": in_commits / elapsed}
        stats = await outbox.store.stats()
        tasks.cancel_scope.cancel()
    expected = sum(load.operations for load in loads)
    if stats.pending != expected:
        raise RuntimeError(f"outbox contains {stats.pending} pending operations; expected "
                           f"{expected}")
    return results


def commit_seconds(registry: Any) -> float:
    """Return the seconds that the outbox's group commits took so far, from its histogram."""
    total = registry.get_sample_value("walacord_outbox_commit_duration_seconds_sum")
    return float(total or 0.0)


def run_client_load(path: str, spec: str) -> None:
    fields = json.loads(spec)
    run = fields.pop("run")
    print(json.dumps(anyio.run(client_load, path, SocketLoad(**fields), run)))


def bench_enqueue(base: Path, quick: bool, labels: Sequence[str] | None = None
                  ) -> dict[str, Any]:
    """Run the enqueue anchors and the socket loads named in `labels` (None: all)."""
    count = 500 if quick else 3000
    scale = 8 if quick else 1
    loads = [dataclasses.replace(load, operations=load.operations // scale)
             for load in SOCKET_LOADS if labels is None or load.label in labels]
    results: dict[str, Any] = {}
    # Interleave the runs so that a change in disk load hits all of them alike.
    for label, run in (("raw", lambda d: raw_sqlite_inserts(d, count)),
                       ("one", lambda d: anyio.run(store_enqueues, d, 1, count)),
                       ("sixteen", lambda d: anyio.run(store_enqueues, d, 16, count)),
                       ("sixty_four", lambda d: anyio.run(store_enqueues, d, 64,
                                                          count // 4)),
                       ("socket", lambda d: anyio.run(socket_enqueues, d, loads))):
        directory = Path(tempfile.mkdtemp(dir=base))
        try:
            results[label] = run(directory)
        finally:
            shutil.rmtree(directory)
    results["socket_loads"] = [dataclasses.asdict(load) for load in loads]
    return results


# --- 2. drain into PostgreSQL --------------------------------------------------------


def raw_executemany(url: str, rows: list[dict[str, Any]]) -> tuple[float, float]:
    """Return rows per second and this process's CPU seconds per row."""
    with psycopg.connect(url) as conn:
        started, cpu_started = time.perf_counter(), time.process_time()
        for start in range(0, len(rows), 500):
            with conn.transaction(), conn.cursor() as cursor:
                cursor.executemany(STATEMENT.sql.replace("ledger", "ledger_raw"),
                                   rows[start:start + 500])
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return len(rows) / elapsed, cpu / len(rows)


async def fill(store: OutboxStore, operations: list[NewOperation]) -> None:
    for start in range(0, len(operations), 1000):
        await store.enqueue(operations[start:start + 1000])


async def drain(directory: Path, sink_name: str, sink: Sink,
                operations: list[NewOperation], config: OutboxConfig) -> tuple[float, float]:
    """Enqueue `operations`, then drain them into `sink`; return operations per second
    and this process's CPU seconds per operation during the drain."""
    store = OutboxStore(directory / "outbox.db", config)
    async with anyio.create_task_group() as tasks:
        await tasks.start(store.run)
        await fill(store, operations)
        engine = SyncEngine(store, {sink_name: sink}, config)
        started = time.perf_counter()
        cpu_started = time.process_time()
        while True:
            report = await engine.run_pass(forced=True)
            stats = await store.stats()
            if stats.pending == 0 and stats.in_flight == 0:
                break
            if report.applied == 0:
                await anyio.sleep(0.05)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        print(f"drain into {sink_name}: {elapsed:.2f}s wall, {cpu:.2f}s CPU of this process",
              file=sys.stderr)
        tasks.cancel_scope.cancel()
    if stats.done != len(operations) or stats.dead:
        raise RuntimeError(f"drain into {sink_name} incomplete: {stats}")
    return len(operations) / elapsed, cpu / len(operations)


async def outbox_into_postgres(directory: Path, url: str, count: int) -> tuple[float, float]:
    config = OutboxConfig(statements={"insert_row": STATEMENT}, sync_batch_max=BATCH)
    operations = [NewOperation(f"row-{i}", "postgres", "insert_row",
                               f'{{"key":"row-{i}","amount":{i}}}'.encode())
                  for i in range(count)]
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(url, min_size=2, max_size=4,
                                                         open=False)
    await pool.open(wait=True, timeout=30)
    try:
        sink = PostgresSink(pool, config.statements, timeout=60)
        return await drain(directory, "postgres", sink, operations, config)
    finally:
        await pool.close()


def bench_postgres(base: Path, count: int, rounds: int) -> dict[str, Any]:
    """Drain `count` rows both ways `rounds` times, alternating which goes first, on
    emptied tables each round, and return the medians and the per-round ratios.

    On the 2-core reference machine the ratio of a single round varied by 0.2 from run
    to run, so the target is checked against the median of the rounds."""
    cluster = PgCluster(Path(tempfile.mkdtemp(dir=base)))
    cluster.init()
    cluster.start()
    try:
        url = cluster.url("postgres")
        with psycopg.connect(url, autocommit=True) as conn:
            for table in ("ledger", "ledger_raw"):
                conn.execute(f"CREATE TABLE {table} (key text PRIMARY KEY, amount integer)")
        rows = [{"key": f"row-{i}", "amount": i} for i in range(count)]
        measured: list[dict[str, float]] = []
        for number in range(rounds):
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("TRUNCATE ledger, ledger_raw")
                conn.execute("CHECKPOINT")
            figures: dict[str, float] = {}
            for side in (("raw", "outbox") if number % 2 == 0 else ("outbox", "raw")):
                if side == "raw":
                    figures["raw"], figures["raw_cpu"] = raw_executemany(url, rows)
                    continue
                directory = Path(tempfile.mkdtemp(dir=base))
                try:
                    figures["outbox"], figures["outbox_cpu"] = anyio.run(
                        outbox_into_postgres, directory, url, count)
                finally:
                    shutil.rmtree(directory)
            with psycopg.connect(url) as conn:
                stored = conn.execute("SELECT count(*) FROM ledger").fetchone()
            if not stored or stored[0] != count:
                raise RuntimeError(f"ledger contains {stored} rows; expected {count}")
            figures["ratio"] = figures["outbox"] / figures["raw"]
            print(f"postgres round {number + 1}/{rounds}: executemany {figures['raw']:,.0f} "
                  f"rows/s, outbox {figures['outbox']:,.0f} rows/s, ratio "
                  f"{figures['ratio']:.2f}", file=sys.stderr)
            measured.append(figures)

        def median(key: str) -> float:
            return statistics.median(figures[key] for figures in measured)

        return {"raw": median("raw"), "outbox": median("outbox"), "count": count,
                "raw_cpu_us": median("raw_cpu") * 1e6,
                "outbox_cpu_us": median("outbox_cpu") * 1e6,
                "ratio": median("ratio"), "rounds": rounds,
                "ratios": [figures["ratio"] for figures in measured],
                "server": cluster.bindir.parent.name}
    finally:
        cluster.destroy()


# --- 3. drain into the emulator ------------------------------------------------------


async def outbox_into_emulator(directory: Path, url: str, count: int) -> tuple[float, float]:
    from walacord.walacor import WalacorClient

    async with WalacorClient(url, username="admin", password="admin",
                             request_timeout=60.0, read_timeout=60.0) as client:
        operations = [NewOperation(f"w-{i}", "walacor", str(ETID),
                                   f'{{"amount":{i}}}'.encode()) for i in range(count)]
        config = OutboxConfig(sync_batch_max=500)
        return await drain(directory, "walacor", WalacorSink(client, timeout=60), operations,
                           config)


def bench_emulator(base: Path, count: int) -> dict[str, Any]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "walacord", "emulator", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        anyio.run(_wait_and_create_schema, url)
        directory = Path(tempfile.mkdtemp(dir=base))
        try:
            rate, _ = anyio.run(outbox_into_emulator, directory, url, count)
            return {"outbox": rate, "count": count}
        finally:
            shutil.rmtree(directory)
    finally:
        process.terminate()
        process.wait(timeout=10)


async def _wait_and_create_schema(url: str) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url + "/api", timeout=10.0) as http:
        with anyio.fail_after(20):
            while True:
                try:
                    login = await http.post("/auth/login",
                                            json={"userName": "admin", "password": "admin"})
                    break
                except httpx.TransportError:
                    await anyio.sleep(0.1)
        token = login.json()["api_token"]
        schema = {"ETId": 50, "SV": 1, "Schema": {"ETId": ETID, "TableName": "bench",
                  "Fields": [{"FieldName": "walacord_key", "DataType": "TEXT"},
                             {"FieldName": "amount", "DataType": "INTEGER"}]}}
        response = await http.post("/schemas/", json=schema, headers={"Authorization": token})
        response.raise_for_status()


# --- report ----------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python "
            f"{platform.python_version()}, SQLite {sqlite3.sqlite_version}")


def render(results: dict[str, Any], command: str) -> str:
    enqueue, pg, emu = results["enqueue"], results.get("postgres"), results.get("emulator")
    raw = enqueue["raw"]
    lines = [
        START,
        "## Outbox",
        "",
        f"Machine: {machine()}. State directory on `{results['filesystem']}`.",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).",
        "All figures come from the same run on a 2-core machine that other work shares, "
        "so absolute rates vary from run to run. Across runs on 2026-12-04, raw SQLite "
        "ranged from 1,400 to 6,500 inserts/s and executemany from 32,000 to 67,000 "
        "rows/s. Compare ratios within one run.",
        "",
        "Durable enqueue through the store API (`OutboxStore.enqueue`, callers in the "
        "store's own event loop), beside raw SQLite in the same directory:",
        "",
        "| what | ops/s | vs raw SQLite | ops per fsync |",
        "|---|---:|---:|---:|",
        f"| raw SQLite, one synchronous=FULL WAL transaction per insert | {raw:,.0f} | 1.00 "
        "| 1 |",
    ]
    for label, clients in (("one", 1), ("sixteen", 16), ("sixty_four", 64)):
        figures = enqueue[label]
        lines.append(f"| outbox via store API, {clients} client{'s' if clients > 1 else ''} | "
                     f"{figures['rate']:,.0f} | {figures['rate'] / raw:.2f} | "
                     f"{figures['per_commit']:.1f} |")
    lines += [
        "",
        "Durable enqueue through the control socket: the outbox and the control server in "
        "the benchmark's process, the clients (`walacord.client.AsyncOutboxClient`, one "
        "connection each) in a separate process, as an application would be. An "
        "operation counts once its acknowledgement arrived, and every acknowledgement "
        "is sent after the commit (synchronous=FULL) that stored it. Target: 20,000 "
        "acknowledged ops/s with 16 clients.",
        "",
        "| clients and requests | ops/s | vs raw SQLite | ops per fsync | time per commit "
        "| commits' share of the run | daemon CPU per op | client CPU per op "
        "| meets 20,000/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    loads = {load["label"]: load for load in enqueue["socket_loads"]}
    for label, figures in enqueue["socket"].items():
        load = SocketLoad(**loads[label])
        verdict = "yes" if figures["rate"] >= 20_000 else "no"
        if load.clients < 16:
            verdict = "n/a"  # the target is set for 16 clients
        lines.append(f"| {load.describe()} | {figures['rate']:,.0f} | "
                     f"{figures['rate'] / raw:.2f} | {figures['per_commit']:.1f} | "
                     f"{figures['commit_ms']:.2f} ms | {figures['commit_share']:.0%} | "
                     f"{figures['cpu_us_per_op']:.0f} µs | "
                     f"{figures['client_cpu_us_per_op']:.0f} µs | {verdict} |")
    lines += [
        "",
        "Daemon CPU per op is the CPU time of the benchmark's process (event loop and "
        "SQLite thread) divided by the operations, client CPU per op the same for the "
        "client process; both share the machine's 2 cores. Without pipelining each "
        "client has one request in flight, so a commit carries at most one operation "
        "per client and every request pays a full round of system calls and event-loop "
        "work. Pipelined enqueues on one connection are served together by one call to "
        "the store, so they share a commit and most of that work, and batched requests "
        "share it among their operations.",
        "",
        "Time per commit runs from the writer taking a batch to SQLite returning from "
        "its fsync: building the rows, the hand-off to SQLite's thread and back, and the "
        "INSERT with its commit. Commits' share of the run is the time inside commits "
        "divided by the run's wall time. Single-op clients wait for their answer before "
        "they send again, so commits and the rest of each cycle take turns: the answers, "
        "the clients' next requests and reading them. The disk waits during that rest, "
        "and the event loop waits during the commit.",
    ]
    sixteen = enqueue["socket"].get("single_sixteen")
    if sixteen is not None:
        cycle_ms = sixteen["per_commit"] / sixteen["rate"] * 1e3
        lines += [
            "",
            f"With 16 single-op clients one cycle took {cycle_ms:.2f} ms for "
            f"{sixteen['per_commit']:.1f} operations, {sixteen['commit_ms']:.2f} ms of it "
            "in the commit. 20,000 ops/s with 16 operations per commit needs a cycle of "
            "0.80 ms or less.",
        ]
    if pg:
        busy = pg["outbox_cpu_us"] * pg["outbox"] / 1e6
        ratios = ", ".join(f"{ratio:.2f}" for ratio in pg["ratios"])
        lines += [
            "",
            f"Drain of a {pg['count']:,}-operation backlog into PostgreSQL "
            f"({pg['server']}, private cluster on loopback), {pg['rounds']} rounds that "
            "alternate which side goes first, on emptied tables each round; medians:",
            "",
            "| what | rows/s | vs executemany | wall time per row | CPU per row |",
            "|---|---:|---:|---:|---:|",
            f"| psycopg executemany, 500 rows per transaction | {pg['raw']:,.0f} | 1.00 | "
            f"{1e6 / pg['raw']:.0f} µs | {pg['raw_cpu_us']:.0f} µs |",
            f"| outbox drain | {pg['outbox']:,.0f} | {pg['ratio']:.2f} | "
            f"{1e6 / pg['outbox']:.0f} µs | {pg['outbox_cpu_us']:.0f} µs |",
            "",
            f"The ratio of each round, in order: {ratios}. The ratio column is their "
            "median. The ratio of a single round varies by as much as 0.2 between runs "
            "on this shared machine.",
            "",
            "Target: the drain reaches at least 0.80 of executemany; the median "
            f"{'meets' if pg['ratio'] >= 0.8 else 'does not meet'} it. The "
            "drain reads each round of up to 500 operations from SQLite with one "
            "`SELECT` and keeps the claim in memory. It applies the round in one "
            "PostgreSQL transaction sent as one libpq pipeline (one Bind/Execute per row "
            "and a single Sync, where `executemany` flushes the socket for every row), "
            "and marks it done in the transaction of the next claim. So SQLite writes each "
            "row once, and no commit waits for an fsync, because a replay of an "
            "idempotent statement is harmless. "
            "CPU per row is the CPU time of the benchmark's process (the PostgreSQL "
            "server runs apart) divided by the rows. At the median figures the drain's "
            f"process used {busy:.0%} of one core over the drain's wall time, its event "
            "loop and SQLite's thread together.",
        ]
    if emu:
        lines += [
            "",
            f"Drain of a {emu['count']:,}-operation backlog into the Walacor emulator "
            f"(subprocess on loopback): {emu['outbox']:,.0f} records/s. Target: 5,000; "
            f"this run {'meets' if emu['outbox'] >= 5000 else 'does not meet'} it.",
        ]
    lines.append(END)
    return "\n".join(lines)


def write_doc(block: str) -> None:
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if START in text and END in text:
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1]
        text = before + block + after
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--dir", default=str(REPO / "bench" / "results"),
                        help="directory for the SQLite files and the PostgreSQL cluster")
    parser.add_argument("--backlog", type=int, default=100_000,
                        help="operations in the PostgreSQL drain backlog")
    parser.add_argument("--emulator-backlog", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=10,
                        help="rounds of the PostgreSQL drain and its anchor (default 10)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--only", choices=PARTS, action="append",
                        help="run only this part (repeatable); implies --no-write, "
                             "because the page needs every part")
    parser.add_argument("--socket-load", choices=[load.label for load in SOCKET_LOADS],
                        action="append",
                        help="run only this control-socket load in the enqueue part "
                             "(repeatable); implies --no-write")
    parser.add_argument("--client-load", nargs=2, metavar=("SOCKET", "LOAD"),
                        help=argparse.SUPPRESS)  # internal: one socket client process
    args = parser.parse_args()
    if args.client_load:
        run_client_load(*args.client_load)
        return 0

    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give at least 1")
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    backlog = 5000 if args.quick else args.backlog
    emulator_backlog = 2000 if args.quick else args.emulator_backlog
    filesystem = subprocess.run(["df", "-T", str(base)], capture_output=True, text=True,
                                check=False).stdout.splitlines()[-1].split()[1]
    parts = args.only or PARTS
    results: dict[str, Any] = {"filesystem": filesystem}
    if "enqueue" in parts:
        results["enqueue"] = bench_enqueue(base, args.quick, args.socket_load)
    if "postgres" in parts:
        results["postgres"] = bench_postgres(base, backlog, 2 if args.quick else args.rounds)
    if "emulator" in parts:
        results["emulator"] = bench_emulator(base, emulator_backlog)
    print(json.dumps(results, indent=2))
    if args.only or args.socket_load:
        return 0

    command = "python bench/outbox_bench.py" + (" --quick" if args.quick else "")
    block = render(results, command)
    print(block)
    if not args.no_write:
        write_doc(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
