"""Exactly-once submits when responses are lost after the emulator commits."""

from __future__ import annotations

from collections import Counter

import pytest

from walacord.emulator import Emulator, FaultSpec
from walacord.errors import (
    WalacorRateLimitedError,
    WalacorServerError,
    WalacorValidationError,
)
from walacord.walacor import StoredRecord, WalacorClient

pytestmark = pytest.mark.anyio

SUBMIT = "/api/envelopes/submit"


async def rows_per_key(client: WalacorClient, etid: int, keys: list[str]) -> dict[str, int]:
    """Count stored rows for each key from one unpaged `query/get` over the table."""
    result = await client.query(etid, {}, page_no=0, page_size=0)
    counts = Counter(row.get("walacord_key") for row in result.rows)
    return {key: counts[key] for key in keys}


async def test_submit_once_adopts_after_drop(
    emulator: Emulator, client: WalacorClient, etid: int
) -> None:
    emulator.set_faults(mode="drop_after_commit", path=SUBMIT, count=1)

    stored = await client.submit_once(etid, {"amount": 5}, "op-1")

    assert stored.adopted is True
    rows = (await client.query(etid, {"walacord_key": "op-1"})).rows
    assert [r["UID"] for r in rows] == [stored.uid]
    assert rows[0]["EId"] == stored.eid


async def test_submit_once_resubmits_when_absent(
    emulator: Emulator, client: WalacorClient, etid: int
) -> None:
    # A hung submit is never applied, so the lookup finds nothing and the record is
    # submitted again.
    emulator.set_faults(mode="hang", path=SUBMIT, count=1)
    async with WalacorClient(
        emulator.url, username="admin", password="admin", read_timeout=0.3, request_timeout=2.0
    ) as quick:
        stored = await quick.submit_once(etid, {"amount": 5}, "op-2")

    assert stored.adopted is False
    assert await rows_per_key(client, etid, ["op-2"]) == {"op-2": 1}
    assert emulator.stats()["requests"][SUBMIT] == {"hang": 1, "200": 1}


async def test_submit_once_raises_rejection_without_retry(
    emulator: Emulator, client: WalacorClient, etid: int
) -> None:
    emulator.set_faults(status=400, path=SUBMIT)
    with pytest.raises(WalacorValidationError):
        await client.submit_once(etid, {"amount": 5}, "op-3")
    assert emulator.stats()["requests"][SUBMIT] == {"400": 1}
    assert "/api/query/get" not in emulator.stats()["requests"]


async def test_submit_once_gives_up_with_maybe_committed(
    emulator: Emulator, client: WalacorClient, etid: int
) -> None:
    emulator.set_faults(status=503, path=SUBMIT)
    with pytest.raises(WalacorServerError) as caught:
        await client.submit_once(etid, {"amount": 5}, "op-4")
    assert caught.value.maybe_committed is True
    assert emulator.stats()["requests"][SUBMIT] == {"503": 3}


async def test_submit_once_check_first_adopts_stored(
    emulator: Emulator, client: WalacorClient, etid: int
) -> None:
    first = await client.submit_once(etid, {"amount": 5}, "op-5")
    again = await client.submit_once(etid, {"amount": 5}, "op-5", check_first=True)

    assert again.adopted is True
    assert again.uid == first.uid
    assert emulator.stats()["requests"][SUBMIT] == {"200": 1}


async def test_submit_many_once_rejects_repeated_key(client: WalacorClient, etid: int) -> None:
    with pytest.raises(ValueError, match="unique"):
        await client.submit_many_once(etid, [("k", {}), ("k", {})])


@pytest.mark.chaos
async def test_thousand_keyed_submits_after_drops(
    emulator: Emulator, client: WalacorClient, etid: int
) -> None:
    # Every submit is committed and then its connection is reset, so every first
    # attempt has an unknown outcome and must be resolved by a lookup.
    emulator.set_faults(mode="drop_after_commit", path=SUBMIT)
    keys = [f"payment-{i}" for i in range(1000)]
    results: dict[str, StoredRecord] = {}

    # Client and emulator share one event loop, so concurrent calls would not be faster.
    for key in keys:
        results[key] = await client.submit_once(etid, {"amount": 1}, key)
    emulator.clear_faults()

    counts = await rows_per_key(client, etid, keys)
    assert sorted(k for k, n in counts.items() if n != 1) == []
    assert all(r.adopted for r in results.values())
    assert len({r.uid for r in results.values()}) == 1000
    everything = await client.query(etid, {}, page_no=0, page_size=0)
    assert everything.total == 1000


@pytest.mark.chaos
async def test_batched_submits_after_random_drops(
    emulator: Emulator, client: WalacorClient, etid: int
) -> None:
    emulator.set_faults(mode="drop_after_commit", path=SUBMIT, ratio=0.5)
    keys = [f"batch-{i}" for i in range(1000)]
    results: list[StoredRecord] = []

    for start in range(0, len(keys), 100):
        items = [(key, {"amount": 2}) for key in keys[start : start + 100]]
        results.extend(await client.submit_many_once(etid, items))
    emulator.clear_faults()

    assert [r.key for r in results] == keys
    assert any(r.adopted for r in results)
    assert not all(r.adopted for r in results)
    counts = await rows_per_key(client, etid, keys)
    assert sorted(k for k, n in counts.items() if n != 1) == []
    assert (await client.query(etid, {}, page_no=0, page_size=0)).total == 1000


async def test_failed_lookup_keeps_maybe_committed(
    emulator: Emulator, client: WalacorClient, etid: int
) -> None:
    emulator.set_faults(
        [
            FaultSpec(mode="drop_after_commit", path=SUBMIT, count=1),
            FaultSpec(status=429, retry_after=2, path="/api/query"),
        ]
    )
    with pytest.raises(WalacorRateLimitedError) as caught:
        await client.submit_once(etid, {"amount": 5}, "op-6")
    emulator.clear_faults()

    assert caught.value.maybe_committed is True
    again = await client.submit_once(etid, {"amount": 5}, "op-6", check_first=True)
    assert again.adopted is True
    assert await rows_per_key(client, etid, ["op-6"]) == {"op-6": 1}
