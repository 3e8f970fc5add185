"""The crash loop: SIGKILL the daemon at random moments while clients enqueue and it syncs.

Each cycle starts walacord on the same state directory and checks the outbox's
conservation (accepted equals the sum over states). Several client threads then
enqueue operations for both sinks through the control socket while the outbox syncs to
a flaky emulator and to PostgreSQL, and the daemon is SIGKILLed after a random delay. After
the last cycle the daemon drains the outbox with Walacor healthy, and the loop checks:

- every acknowledged operation is at its sink exactly once (Walacor rows and ledger
  rows per key);
- the SQLite file passes `PRAGMA integrity_check`;
- the conservation check held at every start.

An operation is acknowledged when `outbox.enqueue` returned it to the client.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import psycopg

from tests.chaos.daemon import WalacordDaemon, control
from tests.chaos.emulator import ETID, USER, EmulatorProcess, create_schema, rows_per_key

LEDGER_DDL = "CREATE TABLE IF NOT EXISTS ledger (key text PRIMARY KEY, amount bigint NOT NULL)"
LEDGER_SQL = ("INSERT INTO ledger (key, amount) VALUES (%(key)s, %(amount)s) "
              "ON CONFLICT (key) DO NOTHING")


@dataclass
class CrashLoopResult:
    """What the loop did and what it found; `problems` is empty when it passed."""

    cycles: int = 0
    acked: int = 0
    walacor_acked: int = 0
    postgres_acked: int = 0
    lost: int = 0
    duplicated: int = 0
    starts_conserved: int = 0
    starts_checked: int = 0
    conservation_failures_logged: int = 0
    integrity: str = ""
    drain_s: float | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def loop_settings(emulator_url: str) -> dict[str, dict[str, Any]]:
    return {
        "walacor": {"url": emulator_url, "username": USER[0], "password": USER[1]},
        "outbox": {"sync_interval": 0.2, "retry_initial": 0.05, "retry_max": 0.5,
                   "sync_batch_min": 5, "sync_batch_max": 50},
        "outbox.statements.ledger": {"sql": LEDGER_SQL},
        "probes.host": {"load_warning_per_cpu": 1000.0},
    }


class Clients:
    """Client threads that enqueue until stopped and keep the keys that were acked."""

    def __init__(self, socket_path: str, cycle: int, count: int, seed: int) -> None:
        self.socket_path = socket_path
        self.cycle = cycle
        self.acked: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(index, seed + index),
                                          daemon=True) for index in range(count)]

    def _run(self, index: int, seed: int) -> None:
        rng = random.Random(seed)
        serial = 0
        while not self._stop.is_set():
            batch = []
            for _ in range(rng.randint(1, 5)):
                key = f"c{self.cycle}-t{index}-{serial}"
                serial += 1
                if rng.random() < 0.5:
                    batch.append({"sink": "walacor", "etid": ETID, "key": key,
                                  "data": {"walacord_key": key, "amount": serial}})
                else:
                    batch.append({"sink": "postgres", "statement": "ledger", "key": key,
                                  "params": {"key": key, "amount": serial}})
            try:
                result = control(self.socket_path, "outbox.enqueue",
                                 {"operations": batch}, timeout=5)
            except (OSError, ValueError, AssertionError):
                # The daemon was killed or is not up yet: nothing in this batch was acked.
                self._stop.wait(0.05)
                continue
            sinks = {item["key"]: item["sink"] for item in batch}
            with self._lock:
                for item in result["results"]:
                    self.acked[item["key"]] = sinks[item["key"]]

    def __enter__(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


def ledger_counts(database_url: str) -> Counter[str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT key FROM ledger").fetchall()
    return Counter(str(row[0]) for row in rows)


def run_crash_loop(workdir: Path, database_url: str, emulator: EmulatorProcess,
                   command: list[str] | None, *, cycles: int, clients: int = 3,
                   seed: int = 1) -> CrashLoopResult:
    """Run `cycles` kill-and-restart cycles, drain, and check what reached the sinks."""
    began = time.monotonic()
    rng = random.Random(seed)
    result = CrashLoopResult()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(LEDGER_DDL)
    anyio.run(create_schema, emulator.url)
    daemon = WalacordDaemon(workdir, database_url, settings=loop_settings(emulator.url),
                            command=command)
    socket_path = daemon.sections["control"]["socket"]
    acked: dict[str, str] = {}

    # Step 1: the cycles, with a fifth of Walacor submits failing.
    emulator.set_faults({"status": 503, "ratio": 0.2, "path": "/api/envelopes/submit"})
    for cycle in range(cycles):
        daemon.start()
        check_start(daemon, socket_path, result)
        with Clients(socket_path, cycle, clients, seed * 1000 + cycle * 10) as running:
            time.sleep(rng.uniform(0.05, 0.6))
            assert daemon.process is not None
            daemon.process.send_signal(signal.SIGKILL)
            daemon.process.wait(10)
        acked.update(running.acked)
        result.cycles += 1

    # Step 2: drain with Walacor healthy, then stop cleanly.
    emulator.clear_faults()
    daemon.start()
    check_start(daemon, socket_path, result)
    drain_began = time.monotonic()
    deadline = drain_began + 120
    while time.monotonic() < deadline:
        stats = control(socket_path, "outbox.stats", timeout=10)
        if stats["pending"] == 0 and stats["in_flight"] == 0:
            result.drain_s = time.monotonic() - drain_began
            break
        time.sleep(0.2)
    daemon.stop()

    # Step 3: check the sinks, the SQLite file and the logs.
    walacor_rows = anyio.run(rows_per_key, emulator.url)
    ledger_rows = ledger_counts(database_url)
    for key, sink in acked.items():
        found = walacor_rows[key] if sink == "walacor" else ledger_rows[key]
        result.lost += found == 0
        result.duplicated += found > 1
    result.acked = len(acked)
    result.walacor_acked = sum(1 for sink in acked.values() if sink == "walacor")
    result.postgres_acked = result.acked - result.walacor_acked
    with sqlite3.connect(Path(daemon.sections["state"]["dir"]) / "outbox.db") as db:
        result.integrity = str(db.execute("PRAGMA integrity_check").fetchone()[0])
    result.conservation_failures_logged = len(daemon.events("outbox.conservation_failed"))
    result.seconds = time.monotonic() - began

    if result.drain_s is None:
        result.problems.append("the outbox did not drain within 120 s")
    if result.lost:
        result.problems.append(f"{result.lost} acknowledged operations are missing")
    if result.duplicated:
        result.problems.append(f"{result.duplicated} operations were applied twice")
    if result.integrity != "ok":
        result.problems.append(f"SQLite integrity_check returned {result.integrity!r}")
    if result.starts_conserved != result.starts_checked:
        result.problems.append(f"conservation held at {result.starts_conserved} of "
                               f"{result.starts_checked} starts")
    if result.conservation_failures_logged:
        result.problems.append(f"{result.conservation_failures_logged} "
                               "outbox.conservation_failed events in the log")
    if not result.acked:
        result.problems.append("no operation was acknowledged: the loop proved nothing")
    return result


def check_start(daemon: WalacordDaemon, socket_path: str, result: CrashLoopResult) -> None:
    """Ask the freshly started daemon for its outbox stats and count a conserved start."""
    stats = control(socket_path, "outbox.stats", timeout=10)
    result.starts_checked += 1
    result.starts_conserved += bool(stats["conserved"])
