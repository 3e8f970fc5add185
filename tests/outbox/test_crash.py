"""Acknowledged operations survive SIGKILL and reach their sink exactly once."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream
from psycopg_pool import AsyncConnectionPool

from tests.outbox.conftest import ledger_rows, walacor_rows_per_key
from walacord.emulator import Emulator
from walacord.walacor import WalacorClient

pytestmark = pytest.mark.anyio
REPO = Path(__file__).resolve().parents[2]
# Kill cycles of the crash loop; CI's slow run raises it to 200.
CRASH_CYCLES = int(os.environ.get("WALACORD_OUTBOX_CRASH_CYCLES", "20"))


class Worker:
    """A tests.outbox.worker process and the lines it printed."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._buffer = ""
        assert process.stdout is not None
        self._stream = TextReceiveStream(process.stdout)

    async def read_until(self, predicate: Any) -> None:
        while not any(predicate(line) for line in self.lines):
            await self._read_some()

    async def _read_some(self) -> bool:
        try:
            chunk = await self._stream.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            return False
        self._buffer += chunk
        *complete, self._buffer = self._buffer.split("\n")
        self.lines.extend(complete)
        return True

    async def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        with anyio.fail_after(10):
            # Read what the pipe still holds: those lines were printed before the kill.
            while await self._read_some():
                pass
            await self.process.wait()

    def acked(self) -> set[str]:
        return {line[4:] for line in self.lines if line.startswith("ack ")}


async def start_worker(*args: str) -> Worker:
    process = await anyio.open_process([sys.executable, "-m", "tests.outbox.worker", *args],
                                       cwd=REPO, stderr=None)
    return Worker(process)


async def kill_after_acks(db_path: Path, count: int, *args: str
                          ) -> tuple[set[str], set[str], int]:
    """Run a worker until a client's `count`th ack, SIGKILL it; return acked keys, stored
    keys and the stored `accepted` counter."""
    worker = await start_worker("--db", str(db_path), *args)
    with anyio.fail_after(30):
        await worker.read_until(
            lambda line: line.startswith("ack ") and line.endswith(f"-{count}"))
    await worker.kill()

    with sqlite3.connect(db_path) as conn:
        stored = {row[0] for row in conn.execute("SELECT key FROM operations")}
        accepted = conn.execute("SELECT value FROM counters WHERE name = 'accepted'").fetchone()
    return worker.acked(), stored, accepted[0]


async def test_enqueue_acked_survives_sigkill(db_path: Path) -> None:
    acked, stored, accepted = await kill_after_acks(db_path, 30, "--clients", "8")

    assert len(acked) >= 30
    assert acked <= stored
    assert accepted == len(stored)


async def test_pipelined_socket_acks_survive_sigkill(db_path: Path) -> None:
    socket_path = db_path.parent.parent / "control.sock"
    acked, stored, accepted = await kill_after_acks(
        db_path, 200, "--socket", str(socket_path), "--clients", "4", "--depth", "8")

    assert len(acked) >= 200
    assert acked <= stored
    assert accepted == len(stored)


@pytest.mark.chaos
async def test_sigkill_loop_delivers_exactly_once(
        db_path: Path, pg_db: str, ledger_pool: AsyncConnectionPool[Any], emulator: Emulator,
        walacor_client: WalacorClient) -> None:
    sinks = ("--pg", pg_db, "--walacor", emulator.url)
    emulator.set_faults(status=503, path="/api/envelopes/submit", ratio=0.2)
    rng = random.Random(1234)
    acked: set[str] = set()
    starts: list[str] = []

    for cycle in range(CRASH_CYCLES):
        worker = await start_worker("--db", str(db_path), *sinks, "--prefix", f"c{cycle}")
        with anyio.fail_after(30):
            await worker.read_until(lambda line: line.startswith("start "))
        await anyio.sleep(rng.uniform(0.05, 0.6))
        await worker.kill()
        acked |= worker.acked()
        starts += [line for line in worker.lines if line.startswith("start ")]

    emulator.clear_faults()
    final = await start_worker("--db", str(db_path), *sinks, "--count", "0", "--drain")
    with anyio.fail_after(120):
        await final.read_until(lambda line: line.startswith("drained"))
    await final.kill()
    starts += [line for line in final.lines if line.startswith("start ")]

    walacor_counts = await walacor_rows_per_key(walacor_client)
    ledger_counts: dict[str, int] = {}
    for key, _ in await ledger_rows(ledger_pool):
        ledger_counts[key] = ledger_counts.get(key, 0) + 1
    delivered = {**walacor_counts, **ledger_counts}

    assert len(starts) == CRASH_CYCLES + 1
    assert all("conserved=1" in line for line in starts), starts
    assert "drained dead=0" in final.lines
    assert len(acked) > CRASH_CYCLES
    missing = sorted(key for key in acked if delivered.get(key, 0) == 0)
    assert missing == []
    duplicated = sorted(key for key, count in walacor_counts.items() if count > 1)
    assert duplicated == []
    assert all(count == 1 for count in ledger_counts.values())
