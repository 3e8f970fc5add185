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
