"""Scripted stories for `walacord dev --scenario NAME`, printed as a timeline.

Each story drives the sandbox's own PostgreSQL and emulator and waits, with a bound,
for the mode the daemon should reach. A step that runs out of time is printed as a
failure and the story goes on, so one run shows every step. SIGTERM or SIGINT cancels
the story at its current step, because walacord dev runs it in a cancel scope that the
signal cancels.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

import anyio
import psycopg

from walacord.client import AsyncOutboxClient, postgres_operation, walacor_operation
from walacord.dev import DEV_ETID, DEV_STATEMENT, DEV_TABLE, EMULATOR_USER
from walacord.errors import WalacordError

if TYPE_CHECKING:
    from walacord.dev import Sandbox

# Maximum wait for each expected mode, in seconds.
STEP_LIMIT = 30.0
# Maximum wait for the outbox to apply every enqueued operation after both sinks
# recover, in seconds.
DRAIN_LIMIT = 60.0
# Deadline of one control request and of each check at a sink, in seconds.
REQUEST_LIMIT = 10.0
DRAIN_POLL_INTERVAL = 0.2
# Operations the story enqueues for each sink.
OPERATIONS_PER_SINK = 20


class Timeline:
    """Steps printed to `out` with the seconds since the story began, and a count of
    failed steps."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.began = time.monotonic()
        self.failures = 0

    def say(self, text: str) -> None:
        erase = "\r\x1b[K" if self.out.isatty() else ""
        print(f"{erase}  +{time.monotonic() - self.began:6.2f}s  {text}",
              file=self.out, flush=True)

    def fail(self, text: str) -> None:
        self.failures += 1
        self.say(f"FAILED: {text}")

    async def expect(self, monitor: Any, mode: str, limit: float = STEP_LIMIT) -> None:
        began = time.monotonic()
        with anyio.move_on_after(limit):
            while monitor.modes.mode.value != mode:
                await monitor.modes.wait_changed()
        took = time.monotonic() - began
        if monitor.modes.mode.value == mode:
            self.say(f"mode {mode} after {took:.2f}s (bound {limit:g}s): "
                     f"{monitor.modes.reason}")
        else:
            self.fail(f"mode still {monitor.modes.mode.value}, not {mode}, after "
                      f"{limit:g}s: {monitor.modes.reason}")


@dataclass
class Batch:
    """Operations the story enqueued, and the outbox counts just before it did."""

    walacor_keys: list[str] = field(default_factory=list)
    postgres_keys: list[str] = field(default_factory=list)
    done_before: int = 0
    dead_before: int = 0

    @property
    def accepted(self) -> int:
        return len(self.walacor_keys) + len(self.postgres_keys)


def _operations(run: str) -> list[dict[str, Any]]:
    """Build payments for both sinks; keys carry `run` so a reused sandbox never
    mistakes an earlier run's rows for this one's."""
    operations = []
    for index in range(OPERATIONS_PER_SINK):
        amount = 100 + index
        key = f"outage-{run}-walacor-{index:03d}"
        operations.append(walacor_operation(DEV_ETID, key=key, data={"amount": amount}))
        key = f"outage-{run}-postgres-{index:03d}"
        operations.append(postgres_operation(DEV_STATEMENT, key=key,
                                             params={"key": key, "amount": amount}))
    return operations


async def enqueue_operations(timeline: Timeline, socket_path: str) -> Batch:
    """Enqueue payments one at a time through the control socket, as an application
    would, and print how many were accepted and how many are pending."""
    batch = Batch()
    operations = _operations(uuid.uuid4().hex[:8])
    timeline.say(f"enqueuing {len(operations)} operations ({OPERATIONS_PER_SINK} Walacor "
                 f"records of ETId {DEV_ETID}, {OPERATIONS_PER_SINK} PostgreSQL rows through "
                 f"{DEV_STATEMENT}) over the control socket")
    began = time.monotonic()
    try:
        async with AsyncOutboxClient(socket_path, timeout=REQUEST_LIMIT) as client:
            before = await client.stats()
            batch.done_before, batch.dead_before = before["done"], before["dead"]
            for operation in operations:
                await client.enqueue(operation)
                keys = batch.walacor_keys if operation["sink"] == "walacor" else (
                    batch.postgres_keys)
                keys.append(operation["key"])
            stats = await client.stats()
    except (WalacordError, OSError, TimeoutError) as exc:
        timeline.fail(f"enqueue stopped after {batch.accepted} of {len(operations)} "
                      f"operations: {exc}")
        return batch

    took = time.monotonic() - began
    timeline.say(f"outbox accepted {batch.accepted} operations in {took:.2f}s; "
                 f"pending {stats['pending']}, in flight {stats['in_flight']}")
    return batch


async def wait_drained(timeline: Timeline, socket_path: str, batch: Batch,
                       limit: float = DRAIN_LIMIT, *, recovered_at: float | None = None
                       ) -> bool:
    """Wait up to `limit` seconds until nothing is pending or in flight, then check that
    every enqueued operation is done and none went dead.

    Return whether both conditions are met. `recovered_at`, a time.monotonic() value,
    adds the drain time counted from when the sinks came back.
    """
    timeline.say(f"waiting for the outbox to apply {batch.accepted} operations")
    began = time.monotonic()
    stats: dict[str, Any] = {}
    try:
        async with AsyncOutboxClient(socket_path, timeout=REQUEST_LIMIT) as client:
            with anyio.move_on_after(limit):
                while True:
                    stats = await client.stats()
                    if stats["pending"] == 0 and stats["in_flight"] == 0:
                        break
                    await anyio.sleep(DRAIN_POLL_INTERVAL)
    except (WalacordError, OSError, TimeoutError) as exc:
        timeline.fail(f"cannot read the outbox counts: {exc}")
        return False

    took = time.monotonic() - began
    applied = stats.get("done", batch.done_before) - batch.done_before
    dead = stats.get("dead", batch.dead_before) - batch.dead_before
    counts = (f"applied {applied} of {batch.accepted}, pending {stats.get('pending')}, "
              f"in flight {stats.get('in_flight')}, dead {dead}")
    if stats.get("pending") != 0 or stats.get("in_flight") != 0:
        timeline.fail(f"outbox not drained after {limit:g}s: {counts}")
        return False
    if applied != batch.accepted or dead:
        timeline.fail(f"outbox drained in {took:.2f}s but {counts}; see "
                      "`walacorctl outbox list --state dead`")
        return False
    since = "" if recovered_at is None else (
        f" ({time.monotonic() - recovered_at:.2f}s after the sinks came back)")
    timeline.say(f"outbox drained in {took:.2f}s (bound {limit:g}s){since}: {counts}")
    return True


def _verdict(sink: str, rows: dict[str, int], took: float) -> tuple[bool, str]:
    missing = sum(1 for count in rows.values() if count == 0)
    duplicated = sum(1 for count in rows.values() if count > 1)
    once = len(rows) - missing - duplicated
    text = (f"{sink}: {once} of {len(rows)} keys stored exactly once ({missing} missing, "
            f"{duplicated} duplicated), checked in {took:.2f}s")
    return not missing and not duplicated, text


async def check_walacor(timeline: Timeline, emulator_url: str, batch: Batch) -> None:
    """Query the emulator by walacord_key for each Walacor key and count the records."""
    from walacord.walacor.client import WalacorClient

    began = time.monotonic()
    rows: dict[str, int] = {}
    try:
        with anyio.fail_after(REQUEST_LIMIT):
            async with WalacorClient(emulator_url, username=EMULATOR_USER[0],
                                     password=EMULATOR_USER[1]) as client:
                for key in batch.walacor_keys:
                    result = await client.query(DEV_ETID, {"walacord_key": key},
                                                page_no=0, page_size=0)
                    rows[key] = len(result.rows)
    except (WalacordError, TimeoutError) as exc:
        timeline.fail(f"cannot query Walacor records of ETId {DEV_ETID}: {exc}")
        return

    passed, text = _verdict(f"Walacor ETId {DEV_ETID}", rows, time.monotonic() - began)
    if passed:
        timeline.say(text)
    else:
        timeline.fail(text)


async def check_postgres(timeline: Timeline, database_url: str, batch: Batch) -> None:
    """Count the rows of each PostgreSQL key in the table that DEV_STATEMENT writes."""
    began = time.monotonic()
    query = f"SELECT key, count(*) FROM {DEV_TABLE} WHERE key = ANY(%s) GROUP BY key"
    try:
        with anyio.fail_after(REQUEST_LIMIT):
            async with await psycopg.AsyncConnection.connect(
                    database_url, connect_timeout=int(REQUEST_LIMIT)) as conn:
                cursor = await conn.execute(query, (batch.postgres_keys,))
                found: dict[str, int] = dict(await cursor.fetchall())
    except (psycopg.Error, TimeoutError) as exc:
        timeline.fail(f"cannot count rows in table {DEV_TABLE}: {exc}")
        return

    rows = {key: found.get(key, 0) for key in batch.postgres_keys}
    passed, text = _verdict(f"PostgreSQL table {DEV_TABLE}", rows, time.monotonic() - began)
    if passed:
        timeline.say(text)
    else:
        timeline.fail(text)


async def outage(sandbox: Sandbox) -> None:
    """Run the outage story: normal, PostgreSQL stops, operations queue, Walacor fails
    too, both recover and the outbox drains into them."""
    timeline = Timeline(sandbox.out)
    monitor = sandbox.monitor
    socket_path = str(sandbox.supervisor.runtime.config.control.socket)
    print("\noutage scenario", file=sandbox.out, flush=True)

    # Step 1: everything healthy.
    await timeline.expect(monitor, "normal")

    # Step 2: PostgreSQL stops at once, as in a crash.
    timeline.say("stopping PostgreSQL (pg_ctl stop -m immediate)")
    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, lambda: sandbox.cluster.stop("immediate"))
        await timeline.expect(monitor, "emergency")

    # Step 3: the application hands its writes to the outbox over the control socket.
    batch = await enqueue_operations(timeline, socket_path)

    # Step 4: Walacor returns 503 as well.
    timeline.say("Walacor emulator now returns 503 to every request")
    sandbox.emulator.set_faults(status=503)
    monitor.runners["walacor"].trigger()
    await timeline.expect(monitor, "offline")

    # Step 5: both recover, the outbox drains, and each sink stores every key once.
    timeline.say("starting PostgreSQL and clearing the Walacor fault")
    recovered_at = time.monotonic()
    sandbox.emulator.clear_faults()
    await anyio.to_thread.run_sync(sandbox.cluster.start)
    monitor.runners["walacor"].trigger()
    await timeline.expect(monitor, "normal")
    if await wait_drained(timeline, socket_path, batch, recovered_at=recovered_at):
        await check_walacor(timeline, sandbox.emulator.url, batch)
        await check_postgres(timeline, sandbox.cluster.url("postgres"), batch)

    verdict = "every step passed" if not timeline.failures else (
        f"{timeline.failures} step(s) FAILED")
    timeline.say(f"done: {verdict}")
    sandbox.failures = timeline.failures


SCENARIOS: dict[str, Callable[[Sandbox], Awaitable[None]]] = {"outage": outage}
