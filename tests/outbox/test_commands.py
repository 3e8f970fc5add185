"""walacorctl enqueue, outbox and sync, run against the real control server."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from psycopg_pool import AsyncConnectionPool

from tests.outbox.conftest import ledger_rows
from tests.outbox.test_control import serving_outbox
from walacord.config import Config, OutboxConfig, OutboxStatement
from walacord.control.cli import main as walacorctl
from walacord.outbox.service import build_sinks

pytestmark = pytest.mark.anyio


async def run_walacorctl(path: str, *args: str) -> tuple[int, str, str]:
    """Run walacorctl in a thread, as a separate client would; return code and output."""
    stdout, stderr = io.StringIO(), io.StringIO()

    def run() -> int:
        return walacorctl(["--socket", path, *args], stdout=stdout, stderr=stderr)

    with anyio.fail_after(60):
        code = await anyio.to_thread.run_sync(run)
    return code, stdout.getvalue(), stderr.getvalue()


async def test_walacorctl_enqueue_sync_and_inspect(
        tmp_path: Path, outbox_config: OutboxConfig,
        ledger_pool: AsyncConnectionPool[Any]) -> None:
    config = dataclasses.replace(outbox_config, sync_interval=3600.0)
    lines = [orjson.dumps({"sink": "postgres", "statement": "insert_row", "key": f"f{i}",
                           "params": {"key": f"f{i}", "amount": i}}) for i in range(25)]
    jsonl = tmp_path / "ops.jsonl"
    await anyio.Path(jsonl).write_bytes(b"\n".join(lines) + b"\n")

    sinks = build_sinks(Config(outbox=config), pool=ledger_pool)
    async with serving_outbox(tmp_path, config, sinks) as (path, outbox):
        # Operations stay pending until `sync`: a healthy sink would start a pass at
        # each enqueue.
        outbox.engine.sink_unhealthy("postgres")
        one = await run_walacorctl(path, "--json", "enqueue", "--sink", "postgres",
                                   "--statement", "insert_row", "--key", "single",
                                   "--data", '{"key": "single", "amount": 1}')
        bad = await run_walacorctl(path, "enqueue", "--sink", "postgres", "--statement",
                                   "drop_all", "--key", "x", "--data", "{}")
        many = await run_walacorctl(path, "--json", "enqueue", "--from-file", str(jsonl))
        stats = await run_walacorctl(path, "--json", "outbox", "stats")
        listed = await run_walacorctl(path, "outbox", "list", "--limit", "3")
        synced = await run_walacorctl(path, "--json", "sync")
        no_yes = await run_walacorctl(path, "outbox", "drop", "1")
        exported = await run_walacorctl(path, "outbox", "export")

    assert one[0] == 0
    assert orjson.loads(one[1])["created"] is True
    assert bad[0] == 1
    assert "unknown statement 'drop_all'" in bad[2]
    assert many[0] == 0
    assert orjson.loads(many[1]) == {"enqueued": 25, "already_known": 0, "pending": 26}
    counts = orjson.loads(stats[1])
    for key in ("accepted", "pending", "in_flight", "done", "dead"):
        assert isinstance(counts[key], int), key
    assert (counts["accepted"], counts["pending"]) == (26, 26)
    assert listed[0] == 0
    assert "single" in listed[1]
    assert orjson.loads(synced[1])["applied"] == 26
    assert no_yes[0] == 2
    assert "add --yes" in no_yes[2]
    assert len(exported[1].splitlines()) == 26
    assert len(await ledger_rows(ledger_pool)) == 26


async def test_outbox_list_error_first_line(
        tmp_path: Path, outbox_config: OutboxConfig,
        ledger_pool: AsyncConnectionPool[Any]) -> None:
    # PostgreSQL's message for a syntax error adds a LINE 1 line and a caret line.
    misspelled = OutboxStatement(
        sql="INSERT INTO ledger (key, amount) VALUS (%(key)s, %(amount)s)", idempotent=True)
    config = dataclasses.replace(outbox_config, sync_interval=3600.0, dead_after_attempts=1,
                                 statements={"misspelled": misspelled})
    sinks = build_sinks(Config(outbox=config), pool=ledger_pool)
    async with serving_outbox(tmp_path, config, sinks) as (path, outbox):
        outbox.engine.sink_unhealthy("postgres")
        enqueued = await run_walacorctl(path, "--json", "enqueue", "--sink", "postgres",
                                        "--statement", "misspelled", "--key", "typo-1",
                                        "--data", '{"key": "typo-1", "amount": 1}')
        synced = await run_walacorctl(path, "--json", "sync")
        table = await run_walacorctl(path, "outbox", "list")
        as_json = await run_walacorctl(path, "--json", "outbox", "list")
        detail = await run_walacorctl(path, "outbox", "show", "--key", "typo-1")

    assert enqueued[0] == 0, enqueued[2]
    assert orjson.loads(synced[1])["dead"] == 1
    full_error = orjson.loads(as_json[1])["operations"][0]["last_error"]
    assert full_error.startswith('sqlstate 42601: syntax error at or near "VALUS"\n')
    assert "LINE 1: " in full_error
    assert "^" in full_error
    lines = table[1].splitlines()
    assert len(lines) == 2, table[1]
    assert "LAST ERROR" in lines[0]
    cell = lines[1][lines[0].index("LAST ERROR"):]
    assert cell == 'sqlstate 42601: syntax error at or near "VALUS"'
    assert "LINE 1" in detail[1]
    assert "^" in detail[1]



def postgres_enqueue(key: str, amount: int, ordering_key: str) -> tuple[str, ...]:
    """Return the walacorctl arguments that enqueue one ledger row with an ordering key."""
    return ("--json", "enqueue", "--sink", "postgres", "--statement", "insert_row", "--key",
            key, "--data", f'{{"key": "{key}", "amount": {amount}}}',
            "--ordering-key", ordering_key)


async def test_sync_names_dead_blocker(
        tmp_path: Path, outbox_config: OutboxConfig,
        ledger_pool: AsyncConnectionPool[Any]) -> None:
    config = dataclasses.replace(outbox_config, sync_interval=3600.0, dead_after_attempts=1)
    sinks = build_sinks(Config(outbox=config), pool=ledger_pool)
    async with serving_outbox(tmp_path, config, sinks) as (path, outbox):
        outbox.engine.sink_unhealthy("postgres")
        # The ledger's CHECK (amount >= 0) rejects this one for good.
        bad = await run_walacorctl(path, *postgres_enqueue("bad", -1, "acct-9"))
        first = await run_walacorctl(path, "--json", "sync")
        await run_walacorctl(path, *postgres_enqueue("later-1", 1, "acct-9"))
        later = await run_walacorctl(path, *postgres_enqueue("later-2", 2, "acct-9"))
        await run_walacorctl(path, *postgres_enqueue("free", 3, "acct-1"))
        synced = await run_walacorctl(path, "sync")
        forced = await run_walacorctl(path, "sync", "--all")
        as_json = await run_walacorctl(path, "--json", "sync")
        stats = await run_walacorctl(path, "--json", "outbox", "stats")
        stats_table = await run_walacorctl(path, "outbox", "stats")
        listed = await run_walacorctl(path, "--json", "outbox", "list")
        table = await run_walacorctl(path, "outbox", "list")
        detail = await run_walacorctl(path, "outbox", "show",
                                      str(orjson.loads(later[1])["id"]))
        gauge = outbox.store.metrics.registry.get_sample_value(  # type: ignore[union-attr]
            "walacord_outbox_blocked_operations")
        bad_id = orjson.loads(bad[1])["id"]
        dropped = await run_walacorctl(path, "outbox", "drop", str(bad_id), "--yes")
        released = await run_walacorctl(path, "--json", "sync")

    assert orjson.loads(first[1])["dead"] == 1
    for code, output, _ in (synced, forced):
        assert code == 0
        assert "none was due" not in output
        assert f"2 pending operations wait behind dead operation {bad_id}," in output
        assert f"`walacorctl outbox retry {bad_id}`" in output
        assert f"`walacorctl outbox drop {bad_id} --yes`" in output
    assert "made 0 waiting operations due" in forced[1]
    report = orjson.loads(as_json[1])
    assert report["blockers"] == {"count": 1, "ids": [bad_id], "blocked": 2}
    counts = orjson.loads(stats[1])
    assert counts["blocked"] == 2
    assert (counts["pending"], counts["dead"], counts["done"]) == (2, 1, 1)
    assert counts["conserved"] is True
    assert "blocked: 2 pending operations" in stats_table[1]
    blocked_by = {op["key"]: op["blocked_by"] for op in orjson.loads(listed[1])["operations"]}
    assert blocked_by == {"bad": None, "later-1": bad_id, "later-2": bad_id, "free": None}
    assert table[1].count(f"pending (blocked by {bad_id})") == 2
    assert detail[0] == 0
    assert f"blocked_by:      {bad_id}" in detail[1]
    assert f"waits behind dead operation {bad_id}" in detail[1]
    assert gauge == 2
    assert dropped[0] == 0
    after = orjson.loads(released[1])
    assert after["applied"] == 2
    assert after["blockers"] == {"count": 0, "ids": [], "blocked": 0}
    assert after["stats"]["blocked"] == 0
    assert sorted(key for key, _ in await ledger_rows(ledger_pool)) == [
        "free", "later-1", "later-2"]


async def test_sync_blocker_ids_are_capped(
        tmp_path: Path, outbox_config: OutboxConfig,
        ledger_pool: AsyncConnectionPool[Any]) -> None:
    config = dataclasses.replace(outbox_config, sync_interval=3600.0, dead_after_attempts=1)
    sinks = build_sinks(Config(outbox=config), pool=ledger_pool)
    async with serving_outbox(tmp_path, config, sinks) as (path, outbox):
        outbox.engine.sink_unhealthy("postgres")
        dead_ids = []
        for account in range(7):
            bad = await run_walacorctl(path, *postgres_enqueue(f"bad-{account}", -1,
                                                               f"acct-{account}"))
            dead_ids.append(orjson.loads(bad[1])["id"])
        await run_walacorctl(path, "sync")
        for account in range(7):
            await run_walacorctl(path, *postgres_enqueue(f"next-{account}", 1,
                                                         f"acct-{account}"))
        synced = await run_walacorctl(path, "sync")
        as_json = await run_walacorctl(path, "--json", "sync")

    report = orjson.loads(as_json[1])
    assert report["blockers"] == {"count": 7, "ids": dead_ids[:5], "blocked": 7}
    listed = ", ".join(str(op_id) for op_id in dead_ids[:5])
    assert f"wait behind dead operations {listed}, 2 more that" in synced[1]
    assert "`walacorctl outbox retry ID`" in synced[1]
