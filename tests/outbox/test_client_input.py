"""walacord.client on bad input and broken connections: values JSON cannot carry, a
missing socket, a timeout and a daemon restart."""

from __future__ import annotations

import dataclasses
from contextlib import AsyncExitStack, ExitStack
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest
from psycopg_pool import AsyncConnectionPool

from tests.outbox.test_control import serving_outbox
from walacord.client import AsyncOutboxClient, OutboxClient, walacor_operation
from walacord.client_json import encode_request
from walacord.config import Config, OutboxConfig
from walacord.control.protocol import ErrorCode
from walacord.errors import (
    ControlClientError,
    ControlConnectionError,
    ControlError,
    ControlTimeoutError,
    RequestEncodeError,
    WalacordError,
)
from walacord.outbox.service import build_sinks

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
async def test_client_rejects_non_finite_numbers(
        value: float, tmp_path: Path, outbox_config: OutboxConfig,
        ledger_pool: AsyncConnectionPool[Any]) -> None:
    config = dataclasses.replace(outbox_config, sync_interval=3600.0)
    sinks = build_sinks(Config(outbox=config), pool=ledger_pool)
    async with (serving_outbox(tmp_path, config, sinks) as (path, _),
                AsyncOutboxClient(path, timeout=10) as client):
        with pytest.raises(WalacordError) as caught:
            await client.enqueue_walacor(10001, key="nan-1", data={"rows": [1, {"x": value}]})
        stats = await client.stats()

    assert ".data.rows[1].x is " in str(caught.value)
    assert "JSON cannot carry" in str(caught.value)
    assert stats["accepted"] == 0


async def test_client_names_missing_socket(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere.sock")
    with pytest.raises(ControlClientError) as asynchronous:
        async with AsyncOutboxClient(missing, timeout=2):
            pass
    with pytest.raises(ControlClientError) as blocking, OutboxClient(missing, timeout=2):
        pass

    for caught in (asynchronous, blocking):
        assert f"control socket {missing} not found" in str(caught.value)


async def test_client_oversized_request_error(
        tmp_path: Path, outbox_config: OutboxConfig,
        ledger_pool: AsyncConnectionPool[Any]) -> None:
    config = dataclasses.replace(outbox_config, sync_interval=3600.0)
    sinks = build_sinks(Config(outbox=config), pool=ledger_pool)
    huge = {"note": "x" * (2 * 1024 * 1024)}
    async with (serving_outbox(tmp_path, config, sinks) as (path, _),
                AsyncOutboxClient(path, timeout=10) as client):
        with pytest.raises(ControlError) as caught:
            await client.enqueue_walacor(10001, key="huge-1", data=huge)
        # The connection stays usable after the rejected request.
        after = await client.enqueue_walacor(10001, key="small-1", data={"note": "x"})

    assert caught.value.code == ErrorCode.REQUEST_TOO_LARGE
    assert "request longer than" in str(caught.value)
    assert after["key"] == "small-1"


async def test_enqueue_with_healthy_sink_syncs_at_once(
        tmp_path: Path, outbox_config: OutboxConfig,
        ledger_pool: AsyncConnectionPool[Any]) -> None:
    # The timer would wait an hour: only the enqueue itself can start the pass.
    config = dataclasses.replace(outbox_config, sync_interval=3600.0)
    sinks = build_sinks(Config(outbox=config), pool=ledger_pool)
    async with (serving_outbox(tmp_path, config, sinks) as (path, outbox),
                AsyncOutboxClient(path, timeout=10) as client):
        await anyio.sleep(0.2)  # let the start-up pass finish
        await client.enqueue_postgres("insert_row", key="now-1",
                                      params={"key": "now-1", "amount": 1})
        with anyio.fail_after(5):
            while (await outbox.store.stats()).done < 1:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        stats = await outbox.store.stats()

    assert stats.done == 1
    assert stats.pending == 0


UNENCODABLE = [
    pytest.param(Decimal("12.50"), "send the amount as a string", id="decimal"),
    pytest.param(b"\x00\x01", "send it as text, such as base64", id="bytes"),
    pytest.param(2**70, "outside the 64-bit range", id="big-int"),
    pytest.param({1: "one"}, "keys must be strings", id="int-key"),
]


@pytest.mark.parametrize(("value", "hint"), UNENCODABLE)
async def test_client_rejects_unencodable_values(
        value: Any, hint: str, tmp_path: Path, outbox_config: OutboxConfig) -> None:
    config = dataclasses.replace(outbox_config, sync_interval=3600.0)
    operation = walacor_operation(10001, key="bad-1", data={"rows": [{"amount": value}]})
    async with (serving_outbox(tmp_path, config, {}) as (path, _),
                AsyncOutboxClient(path, timeout=10) as client):
        with pytest.raises(RequestEncodeError) as asynchronous:
            await client.enqueue(operation)
        with pytest.raises(RequestEncodeError) as batch:
            await client.enqueue_many([operation])

        def blocking() -> tuple[pytest.ExceptionInfo[RequestEncodeError], dict[str, Any]]:
            with OutboxClient(path, timeout=10) as sync_client:
                with pytest.raises(RequestEncodeError) as caught:
                    sync_client.enqueue(operation)
                # Nothing was sent, so the connection stays usable.
                return caught, sync_client.stats()

        blocking_caught, blocking_stats = await anyio.to_thread.run_sync(blocking)
        stats = await client.stats()

    for caught in (asynchronous, blocking_caught):
        assert caught.value.path == "params.data.rows[0].amount"
        assert str(caught.value).startswith("params.data.rows[0].amount ")
        assert hint in str(caught.value)
        assert isinstance(caught.value, TypeError)
    assert batch.value.path == "params.operations[0].data.rows[0].amount"
    assert stats["accepted"] == 0
    assert blocking_stats["accepted"] == 0


async def test_blocking_client_reconnects_after_timeout(
        tmp_path: Path, outbox_config: OutboxConfig) -> None:
    config = dataclasses.replace(outbox_config, sync_interval=3600.0)
    first = walacor_operation(10001, key="slow-1", data={"amount": 1})
    second = walacor_operation(10001, key="slow-2", data={"amount": 2})
    async with serving_outbox(tmp_path, config, {}) as (path, outbox):
        with OutboxClient(path, timeout=0.2) as client:
            # The writer needs the write lock to store an operation, so the response
            # to the first enqueue waits until the lock is released.
            await outbox.store.write_lock.acquire()
            try:
                with pytest.raises(ControlTimeoutError) as caught:
                    await anyio.to_thread.run_sync(client.enqueue, first)
            finally:
                outbox.store.write_lock.release()
            client.timeout = 10
            after = await anyio.to_thread.run_sync(client.enqueue, second)
            retried = await anyio.to_thread.run_sync(client.enqueue, first)
            stats = await anyio.to_thread.run_sync(client.stats)

    message = str(caught.value)
    assert isinstance(caught.value, TimeoutError)
    assert f"timed out because walacord at {path} sent no response within 0.2s" in message
    assert "may or may not have been stored" in message
    assert "Retrying it with the same key is safe" in message
    assert after["key"] == "slow-2"
    assert after["created"] is True
    # The first enqueue was stored although its response never reached the client.
    assert retried["created"] is False
    assert stats["accepted"] == 2


async def test_async_client_reconnects_after_timeout(
        tmp_path: Path, outbox_config: OutboxConfig) -> None:
    config = dataclasses.replace(outbox_config, sync_interval=3600.0)
    first = walacor_operation(10001, key="slow-1", data={"amount": 1})
    queued = walacor_operation(10001, key="slow-2", data={"amount": 2})
    later = walacor_operation(10001, key="slow-3", data={"amount": 3})
    errors: dict[str, BaseException] = {}

    async def enqueue(client: AsyncOutboxClient, operation: dict[str, Any]) -> None:
        try:
            await client.enqueue(operation)
        except WalacordError as exc:
            errors[operation["key"]] = exc

    async with (serving_outbox(tmp_path, config, {}) as (path, outbox),
                AsyncOutboxClient(path, timeout=2.0) as client):
        await outbox.store.write_lock.acquire()
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(enqueue, client, first)
                # Pipelined behind the first enqueue, which times out 1.8 s earlier.
                await anyio.sleep(0.2)
                tasks.start_soon(enqueue, client, queued)
        finally:
            outbox.store.write_lock.release()
        client.timeout = 10
        after = await client.enqueue(later)
        retried = [await client.enqueue(first), await client.enqueue(queued)]
        stats = await client.stats()

    timed_out, out_of_step = errors["slow-1"], errors["slow-2"]
    assert isinstance(timed_out, ControlTimeoutError)
    assert f"walacord at {path} sent no response within 2s" in str(timed_out)
    assert "may or may not have been stored" in str(timed_out)
    assert isinstance(out_of_step, ControlConnectionError)
    assert "left out of step (outbox.enqueue failed with ControlTimeoutError)" \
        in str(out_of_step)
    assert "Retrying it with the same key is safe" in str(out_of_step)
    assert after["created"] is True
    # The first enqueue was stored although its response never reached the client.
    # The queued one may not have been read before the connection closed.
    assert retried[0]["created"] is False
    assert retried[1]["key"] == "slow-2"
    assert stats["accepted"] == 3


async def test_blocking_client_after_daemon_restart(
        tmp_path: Path, outbox_config: OutboxConfig) -> None:
    config = dataclasses.replace(outbox_config, sync_interval=3600.0)
    before = walacor_operation(10001, key="restart-1", data={"amount": 1})
    after = walacor_operation(10001, key="restart-2", data={"amount": 2})
    with ExitStack() as stack:
        async with serving_outbox(tmp_path, config, {}) as (path, _):
            client = stack.enter_context(OutboxClient(path, timeout=10))
            await anyio.to_thread.run_sync(client.enqueue, before)
        async with serving_outbox(tmp_path, config, {}) as (path, _):
            # The old connection is closed, so the client opens a new one first.
            stored = await anyio.to_thread.run_sync(client.enqueue, after)

    assert stored["created"] is True


async def test_async_client_after_daemon_restart(
        tmp_path: Path, outbox_config: OutboxConfig) -> None:
    config = dataclasses.replace(outbox_config, sync_interval=3600.0)
    before = walacor_operation(10001, key="restart-1", data={"amount": 1})
    after = walacor_operation(10001, key="restart-2", data={"amount": 2})
    async with AsyncExitStack() as stack:
        async with serving_outbox(tmp_path, config, {}) as (path, _):
            client = await stack.enter_async_context(AsyncOutboxClient(path, timeout=10))
            await client.enqueue(before)
        async with serving_outbox(tmp_path, config, {}) as (path, _):
            # The old connection is closed, so the client opens a new one first.
            stored = await client.enqueue(after)

    assert stored["created"] is True


async def test_clients_reconnect_after_idle_close(tmp_path: Path,
                                                  outbox_config: OutboxConfig) -> None:
    """walacord closes a connection idle for [control] idle_timeout. A client that calls
    after that opens a new connection instead of failing the call."""
    config = dataclasses.replace(outbox_config, sync_interval=3600.0)
    async with (serving_outbox(tmp_path, config, {}, idle_timeout=0.2) as (path, _),
                AsyncOutboxClient(path, timeout=10) as client):
        with OutboxClient(path, timeout=10) as sync_client:
            await client.stats()
            await anyio.to_thread.run_sync(sync_client.stats)
            await anyio.sleep(0.6)  # the server closes both connections meanwhile
            stored = await client.enqueue(walacor_operation(10001, key="idle-1", data={}))
            stored_sync = await anyio.to_thread.run_sync(
                sync_client.enqueue, walacor_operation(10001, key="idle-2", data={}))

    assert stored["created"] is True
    assert stored_sync["created"] is True


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), "5", True])
def test_clients_reject_unusable_timeouts(timeout: Any) -> None:
    """0 would make socket calls non-blocking, and the socket module rejects NaN and
    negative values with errors that are no WalacordError."""
    for client_class in (OutboxClient, AsyncOutboxClient):
        with pytest.raises(WalacordError) as caught:
            client_class("/nonexistent/control.sock", timeout=timeout)
        assert str(caught.value) == (f"timeout must be a positive, finite number of "
                                     f"seconds, got {timeout!r}")


def nested_lists(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def cyclic() -> dict[str, Any]:
    value: dict[str, Any] = {"amount": 1}
    value["again"] = value
    return value


@pytest.mark.parametrize(("data", "path", "hint"), [
    ({"note": "caf\udce9"}, "params.data.note", "is not valid UTF-8 text"),
    ({"caf\udce9": 1}, "params.data", "has the key 'caf\\udce9', which is not valid UTF-8"),
    ({"rows": cyclic()}, "params.data.rows.again", "contains itself"),
    ({"deep": nested_lists(300)}, "params.data.deep[0]",
     "nests lists or objects more deeply than JSON encoding allows"),
])
def test_encode_errors_name_the_field(data: dict[str, Any], path: str, hint: str) -> None:
    """Values that orjson rejects without naming them are found and named."""
    with pytest.raises(RequestEncodeError) as caught:
        encode_request(1, "outbox.enqueue", walacor_operation(10001, key="k", data=data))

    assert caught.value.path.startswith(path)
    assert hint in str(caught.value)
    assert len(str(caught.value)) < 400
