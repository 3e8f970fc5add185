"""Outbox control methods, called through walacord.client and the real control server."""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import orjson
import pytest
from prometheus_client import CollectorRegistry
from psycopg_pool import AsyncConnectionPool

from tests.outbox.conftest import ledger_op, ledger_rows
from walacord.client import (
    AsyncOutboxClient,
    OutboxClient,
    postgres_operation,
    walacor_operation,
)
from walacord.config import Config, ControlConfig, OutboxConfig, StateConfig
from walacord.control.server import ControlServer
from walacord.errors import ControlError
from walacord.metrics import Metrics
from walacord.outbox.control import (
    INVALID_PARAMS,
    OPERATION_FAILED,
    register_methods,
    sync_run,
)
from walacord.outbox.model import State
from walacord.outbox.queries import Outcome
from walacord.outbox.service import Outbox, build_sinks
from walacord.outbox.sinks import Sink
from walacord.runtime import Runtime
from walacord.systemd import Notifier

pytestmark = pytest.mark.anyio


def outbox_components(tmp_path: Path, outbox_config: OutboxConfig, sinks: dict[str, Sink],
                      idle_timeout: float = 60.0
                      ) -> tuple[str, Runtime, Outbox, ControlServer]:
    """Build a runtime, an Outbox and a ControlServer with the outbox methods, unstarted."""
    path = str(tmp_path / "control.sock")
    config = Config(state=StateConfig(dir=str(tmp_path / "state")),
                    control=ControlConfig(socket=path, group="", idle_timeout=idle_timeout),
                    outbox=outbox_config)
    registry = CollectorRegistry()
    runtime = Runtime(config=config, config_path=None, registry=registry,
                      metrics=Metrics(registry), notifier=Notifier({}))
    outbox = Outbox(config, sinks, metrics=runtime.metrics)
    register_methods(runtime.methods, outbox)
    return path, runtime, outbox, ControlServer(runtime)


@asynccontextmanager
async def serving_outbox(tmp_path: Path, outbox_config: OutboxConfig,
                         sinks: dict[str, Sink], idle_timeout: float = 60.0
                         ) -> AsyncIterator[tuple[str, Outbox]]:
    """Run an Outbox and a ControlServer with the outbox methods until the block ends."""
    path, runtime, outbox, server = outbox_components(tmp_path, outbox_config, sinks,
                                                      idle_timeout)
    async with anyio.create_task_group() as tasks:
        for component in (outbox, server):
            runtime.components[component.name] = component
            await tasks.start(component.run)
        runtime.ready.set()
        yield path, outbox
        tasks.cancel_scope.cancel()


@pytest.fixture
async def control_socket(tmp_path: Path, outbox_config: OutboxConfig,
                         ledger_pool: AsyncConnectionPool[Any]
                         ) -> AsyncIterator[tuple[str, Outbox]]:
    config = dataclasses.replace(outbox_config, max_operations=50, sync_interval=3600.0)
    sinks = build_sinks(Config(outbox=config), pool=ledger_pool)
    async with serving_outbox(tmp_path, config, sinks) as served:
        # Operations stay pending until a test syncs: a healthy sink would start a
        # pass at each enqueue.
        served[1].engine.sink_unhealthy("postgres")
        yield served


async def test_client_enqueue_and_duplicate(control_socket: tuple[str, Outbox]) -> None:
    path, _ = control_socket
    async with AsyncOutboxClient(path, timeout=10) as client:
        first = await client.enqueue_walacor(10001, key="inv-1", data={"amount": 3})
        again = await client.enqueue_walacor(10001, key="inv-1", data={"amount": 3})
        with pytest.raises(ControlError) as conflict:
            await client.enqueue_walacor(10001, key="inv-1", data={"amount": 4})
        stats = await client.stats()
    assert "key 'inv-1' is already stored" in str(conflict.value)
    assert "different payload" in str(conflict.value)
    assert first["created"] is True
    assert first["state"] == "pending"
    assert again == {**first, "created": False}
    for key in ("accepted", "pending", "in_flight", "done", "dead"):
        assert isinstance(stats[key], int), key
    assert (stats["accepted"], stats["pending"]) == (1, 1)


async def test_client_batch_rejects_bad_field(control_socket: tuple[str, Outbox]) -> None:
    path, _ = control_socket
    good = postgres_operation("insert_row", key="row-1", params={"key": "row-1", "amount": 1})
    bad = {"sink": "postgres", "statement": "insert_row", "params": {}}
    async with AsyncOutboxClient(path, timeout=10) as client:
        with pytest.raises(ControlError) as caught:
            await client.enqueue_many([good, bad])
        unknown = {**good, "statement": "drop_everything"}
        with pytest.raises(ControlError) as unknown_caught:
            await client.enqueue(unknown)
        stats = await client.stats()
    assert caught.value.code == INVALID_PARAMS
    assert caught.value.data == {"field": "operations[1].key"}
    assert "operations[1].key: missing idempotency key" in caught.value.message
    assert unknown_caught.value.data == {"field": "statement"}
    assert stats["accepted"] == 0


async def test_client_full_outbox_error(control_socket: tuple[str, Outbox]) -> None:
    path, outbox = control_socket
    operations = [walacor_operation(10001, key=f"k{i}", data={"i": i}) for i in range(50)]
    async with AsyncOutboxClient(path, timeout=10) as client:
        results = await client.enqueue_many(operations)
        with pytest.raises(ControlError) as caught:
            await client.enqueue(walacor_operation(10001, key="one-more", data={}))
        stats = await client.stats()
    assert len(results) == 50
    assert caught.value.code == OPERATION_FAILED
    assert caught.value.data == {"reason": "outbox_full"}
    assert stats["full"] is True
    assert outbox.store.full


async def test_operator_methods(control_socket: tuple[str, Outbox]) -> None:
    path, _ = control_socket
    async with AsyncOutboxClient(path, timeout=10) as client:
        created = await client.enqueue_many(
            [walacor_operation(10001, key=f"op-{i}", data={"i": i}) for i in range(5)])
        ids = [r["id"] for r in created]
        page = await client.call("outbox.list", {"limit": 2})
        rest = await client.call("outbox.list", {"limit": 10,
                                                 "after_id": page["next_after_id"]})
        first_operation = await client.call("outbox.show", {"id": ids[0]})
        by_key = await client.call("outbox.show", {"key": "op-2"})
        with pytest.raises(ControlError) as unknown_key:
            await client.call("outbox.show", {"key": "no-such-key"})
        with pytest.raises(ControlError) as long_key:
            await client.call("outbox.show", {"key": "k" * 100_000})
        exported = await client.call("outbox.export", {"state": "pending"})
        with pytest.raises(ControlError) as unconfirmed:
            await client.call("outbox.drop", {"id": ids[1]})
        dropped = await client.call("outbox.drop", {"id": ids[1], "confirm": True})
        with pytest.raises(ControlError) as missing:
            await client.call("outbox.show", {"id": ids[1]})
        stats = await client.stats()

    assert [op["key"] for op in page["operations"]] == ["op-0", "op-1"]
    assert "payload" not in page["operations"][0]
    assert [op["key"] for op in rest["operations"]] == ["op-2", "op-3", "op-4"]
    assert rest["next_after_id"] is None
    assert first_operation["payload"] == {"i": 0}
    assert (by_key["id"], by_key["payload"]) == (ids[2], {"i": 2})
    assert unknown_key.value.data == {"reason": "not_found"}
    assert "no outbox operation has key 'no-such-key'" in unknown_key.value.message
    assert f"no outbox operation has key '{'k' * 77}...'" in long_key.value.message
    assert len(long_key.value.message) < 300
    assert len(exported["operations"]) == 5
    assert unconfirmed.value.data == {"field": "confirm"}
    assert dropped["dropped"]["key"] == "op-1"
    assert missing.value.data == {"reason": "not_found"}
    assert (stats["accepted"], stats["pending"], stats["dropped"]) == (5, 4, 1)
    assert stats["conserved"] is True


async def test_retry_names_state_it_cannot_retry(control_socket: tuple[str, Outbox]) -> None:
    path, outbox = control_socket
    async with AsyncOutboxClient(path, timeout=10) as client:
        created = await client.enqueue_many(
            [walacor_operation(10001, key=f"busy-{i}", data={"i": i}) for i in range(2)])
        claimed = await outbox.store.claim("walacor", 2, time.time())
        await outbox.store.record([Outcome(claimed[0], State.DONE, receipt={"eid": "e"})])
        with pytest.raises(ControlError) as done:
            await client.call("outbox.retry", {"id": created[0]["id"]})
        with pytest.raises(ControlError) as in_flight:
            await client.call("outbox.retry", {"id": created[1]["id"]})
        with pytest.raises(ControlError) as missing:
            await client.call("outbox.retry", {"id": 999_999})

    assert done.value.data == {"reason": "done"}
    assert f"operation {created[0]['id']} is done: it was applied" in done.value.message
    assert in_flight.value.data == {"reason": "in_flight"}
    assert "is being applied now" in in_flight.value.message
    assert missing.value.data == {"reason": "not_found"}
    assert missing.value.message == "no outbox operation has id 999999"


async def test_blocking_client_sync_run(control_socket: tuple[str, Outbox],
                                        ledger_pool: AsyncConnectionPool[Any]) -> None:
    path, _ = control_socket

    def application() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        with OutboxClient(path, timeout=10) as client:
            results = client.enqueue_many([
                postgres_operation("insert_row", key=f"r{i}", params={"key": f"r{i}",
                                                                       "amount": i})
                for i in range(20)])
            report = client.call("sync.run", {})
        return results, report

    with anyio.fail_after(30):
        results, report = await anyio.to_thread.run_sync(application)
    assert len(results) == 20
    assert report["applied"] == 20
    assert report["stats"]["done"] == 20
    assert len(await ledger_rows(ledger_pool)) == 20


async def test_sync_all_retries_waiting_operations(control_socket: tuple[str, Outbox],
                                                  tmp_path: Path) -> None:
    path, _ = control_socket

    def enqueue() -> None:
        with OutboxClient(path, timeout=10) as client:
            client.enqueue_many([
                postgres_operation("insert_row", key=f"w{i}", params={"key": f"w{i}",
                                                                       "amount": i})
                for i in range(3)])

    def call(params: dict[str, Any]) -> dict[str, Any]:
        with OutboxClient(path, timeout=10) as client:
            return client.call("sync.run", params)  # type: ignore[no-any-return]

    await anyio.to_thread.run_sync(enqueue)
    # As after failed attempts: each waits out an hour of backoff.
    with sqlite3.connect(tmp_path / "state" / "outbox.db") as db:
        db.execute("UPDATE operations SET attempts = 2, next_attempt_at = ?",
                   (time.time() + 3600,))
    waiting = await anyio.to_thread.run_sync(call, {})
    forced = await anyio.to_thread.run_sync(call, {"all": True})
    with sqlite3.connect(tmp_path / "state" / "outbox.db") as db:
        attempts = db.execute("SELECT attempts FROM operations").fetchall()

    assert waiting["applied"] == 0
    assert waiting["stats"]["pending"] == 3
    assert forced["made_due"] == 3
    assert forced["applied"] == 3
    assert forced["stats"]["done"] == 3
    assert attempts == [(3,), (3,), (3,)]


async def test_sync_progress_leaves_out_blocked(control_socket: tuple[str, Outbox],
                                               tmp_path: Path) -> None:
    _, outbox = control_socket
    await outbox.store.enqueue([ledger_op("bad", ordering_key="acct-9"),
                                ledger_op("later-1", ordering_key="acct-9"),
                                ledger_op("later-2", ordering_key="acct-9"),
                                ledger_op("free")])
    with sqlite3.connect(tmp_path / "state" / "outbox.db") as db:
        db.execute("UPDATE operations SET state = 'dead' WHERE key = 'bad'")
    progress: list[tuple[float, float | None, str]] = []
    reported = anyio.Event()
    reports: list[dict[str, Any]] = []

    def record(done: float, total: float | None, message: str) -> None:
        progress.append((done, total, message))
        reported.set()

    async def run() -> None:
        reports.append(await sync_run(outbox, {}, progress=record))

    # The pass waits for the write lock, so the first progress line comes before it
    # claims anything.
    async with anyio.create_task_group() as tasks:
        await outbox.store.write_lock.acquire()
        try:
            tasks.start_soon(run)
            with anyio.fail_after(10):
                await reported.wait()
        finally:
            outbox.store.write_lock.release()

    assert progress[0] == (0, 1, "1 operations left")
    assert reports[0]["applied"] == 1
    assert reports[0]["stats"]["blocked"] == 2


async def test_client_pipelined_enqueues_share_commits(tmp_path: Path,
                                                       outbox_config: OutboxConfig) -> None:
    config = dataclasses.replace(outbox_config, sync_interval=3600.0)
    results: dict[int, dict[str, Any]] = {}
    async with serving_outbox(tmp_path, config, {}) as (path, outbox):
        commits_before = outbox.store.commits
        async with AsyncOutboxClient(path, timeout=10) as client:

            async def enqueue(index: int) -> None:
                results[index] = await client.enqueue_walacor(10001, key=f"p{index}",
                                                              data={"i": index})

            async with anyio.create_task_group() as tasks:
                for index in range(64):
                    tasks.start_soon(enqueue, index)
            duplicate = await client.enqueue_walacor(10001, key="p0", data={"i": 0})
            stats = await client.stats()
        commits = outbox.store.commits - commits_before

    assert sorted(results) == list(range(64))
    assert all(results[index]["key"] == f"p{index}" for index in results)
    assert all(result["created"] for result in results.values())
    assert duplicate == {**results[0], "created": False}
    assert stats["pending"] == 64
    # The daemon serves pipelined requests together, so they share commits.
    assert commits < 64


async def test_pipelined_enqueue_errors_stay_per_request(tmp_path: Path,
                                                        outbox_config: OutboxConfig) -> None:
    config = dataclasses.replace(outbox_config, sync_interval=3600.0)
    requests = [
        walacor_operation(10001, key="a", data={"i": 1}),
        {"sink": "walacor", "etid": 10001, "data": {"i": 2}},  # no key
        walacor_operation(10001, key="a", data={"i": 1}),  # same key and payload as the first
        {"operations": [walacor_operation(10001, key="b", data={}),
                        walacor_operation(10001, key="c", data={})]},
    ]
    lines = b"".join(orjson.dumps({"id": number, "method": "outbox.enqueue", "version": 1,
                                   "params": params}) + b"\n"
                     for number, params in enumerate(requests))
    async with serving_outbox(tmp_path, config, {}) as (path, outbox):
        commits_before = outbox.store.commits
        async with await anyio.connect_unix(path) as stream:
            # One write, so the server finds all four requests buffered together.
            await stream.send(lines)
            received = b""
            with anyio.fail_after(10):
                while received.count(b"\n") < len(requests):
                    received += await stream.receive()
        commits = outbox.store.commits - commits_before
        stats = await outbox.store.stats()

    responses = [orjson.loads(line) for line in received.splitlines()]
    assert [response["id"] for response in responses] == [0, 1, 2, 3]
    first, missing_key, repeated, batch = responses
    assert first["result"]["created"] is True
    assert missing_key["error"]["code"] == INVALID_PARAMS
    assert missing_key["error"]["data"] == {"field": "key"}
    assert repeated["result"] == {**first["result"], "created": False}
    assert [r["key"] for r in batch["result"]["results"]] == ["b", "c"]
    assert commits == 1
    assert stats.pending == 3


@asynccontextmanager
async def control_before_outbox(tmp_path: Path, outbox_config: OutboxConfig
                                ) -> AsyncIterator[tuple[str, Outbox, anyio.abc.TaskGroup]]:
    """Run a ControlServer with the outbox methods but leave the Outbox unstarted, as
    the supervisor does between starting the control socket and the outbox.

    Yields the socket path, the outbox and a task group the test may start it in.
    """
    path, runtime, outbox, server = outbox_components(tmp_path, outbox_config, {})
    runtime.components[server.name] = server
    async with anyio.create_task_group() as tasks:
        await tasks.start(server.run)
        yield path, outbox, tasks
        tasks.cancel_scope.cancel()


def enqueue_blocking(path: str, operation: dict[str, Any]) -> pytest.ExceptionInfo[ControlError]:
    with OutboxClient(path, timeout=10) as client, pytest.raises(ControlError) as caught:
        client.enqueue(operation)
    return caught


async def test_enqueue_while_starting_says_retry(tmp_path: Path,
                                                 outbox_config: OutboxConfig) -> None:
    operation = walacor_operation(10001, key="early-1", data={"amount": 1})
    async with control_before_outbox(tmp_path, outbox_config) as (path, outbox, tasks):
        async with AsyncOutboxClient(path, timeout=10) as client:
            with pytest.raises(ControlError) as pipelined:
                await client.enqueue(operation)
            with pytest.raises(ControlError) as batch:
                await client.enqueue_many([operation])
            with pytest.raises(ControlError) as stats:
                await client.stats()
        # The blocking client runs in a thread, so the server keeps serving.
        blocking_caught = await anyio.to_thread.run_sync(enqueue_blocking, path, operation)

        await tasks.start(outbox.run)
        async with AsyncOutboxClient(path, timeout=10) as client:
            stored = await client.enqueue(operation)

    for caught in (pipelined, batch, stats, blocking_caught):
        assert caught.value.code == OPERATION_FAILED
        assert caught.value.data == {"reason": "starting"}
        assert "walacord is starting" in caught.value.message
        assert "retry in a moment" in caught.value.message
    assert stored["created"] is True


async def test_enqueue_after_store_stopped(tmp_path: Path,
                                           outbox_config: OutboxConfig) -> None:
    operation = walacor_operation(10001, key="late-1", data={"amount": 1})
    async with control_before_outbox(tmp_path, outbox_config) as (path, outbox, _):
        async with anyio.create_task_group() as outbox_tasks:
            await outbox_tasks.start(outbox.run)
            outbox_tasks.cancel_scope.cancel()
        async with AsyncOutboxClient(path, timeout=10) as client:
            with pytest.raises(ControlError) as caught:
                await client.enqueue(operation)

    assert caught.value.code == OPERATION_FAILED
    assert caught.value.data == {"reason": "outbox_error"}
    assert caught.value.message == "the outbox store is not running"
