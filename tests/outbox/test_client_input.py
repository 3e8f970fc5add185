"""walacord.client on bad input: numbers JSON cannot carry, and a socket that is not there."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import anyio
import pytest
from psycopg_pool import AsyncConnectionPool

from tests.outbox.test_control import serving_outbox
from walacord.client import AsyncOutboxClient, OutboxClient
from walacord.config import Config, OutboxConfig
from walacord.control.protocol import ErrorCode
from walacord.errors import ControlClientError, ControlError, WalacordError
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
