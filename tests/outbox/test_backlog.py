"""A 10,000-operation backlog built while Walacor fails, then drained exactly once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import anyio
import pytest

from tests.outbox.conftest import walacor_rows_per_key
from tests.outbox.test_control import serving_outbox
from walacord.client import AsyncOutboxClient, walacor_operation
from walacord.config import OutboxConfig
from walacord.emulator import Emulator
from walacord.outbox.sinks import WalacorSink
from walacord.walacor import WalacorClient

pytestmark = pytest.mark.anyio
COUNT = 10_000


async def test_backlog_during_503_syncs_once(
        tmp_path: Path, outbox_config: OutboxConfig, emulator: Emulator,
        walacor_client: WalacorClient) -> None:
    config = dataclasses.replace(outbox_config, sync_interval=3600.0)
    sinks = {"walacor": WalacorSink(walacor_client, timeout=30)}
    keys = [f"backlog-{i}" for i in range(COUNT)]
    emulator.set_faults(status=503, path="/api/envelopes/submit")

    async with serving_outbox(tmp_path, config, sinks) as (path, outbox):
        # As the mode machine would: timer passes leave the failing sink alone, and
        # only the explicit sync.run below tries it.
        outbox.engine.sink_unhealthy("walacor")
        async with AsyncOutboxClient(path, timeout=60) as client:
            for start in range(0, COUNT, 1000):
                await client.enqueue_many([walacor_operation(10001, key=key,
                                                             data={"amount": 1})
                                           for key in keys[start:start + 1000]])
            failed = await client.call("sync.run", {})
            during = await client.stats()

            emulator.clear_faults()
            outbox.engine.sink_healthy("walacor")
            with anyio.fail_after(120):
                while (await client.stats())["pending"]:
                    await client.call("sync.run", {})
            after = await client.stats()

    counts = await walacor_rows_per_key(walacor_client)
    assert failed["applied"] == 0
    assert (during["accepted"], during["pending"]) == (COUNT, COUNT)
    assert (after["done"], after["pending"], after["dead"]) == (COUNT, 0, 0)
    assert after["conserved"] is True
    assert sum(counts[key] for key in keys) == COUNT
    assert [key for key in keys if counts[key] != 1] == []
