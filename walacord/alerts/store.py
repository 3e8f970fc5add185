"""alerts.db: the durable delivery queue and the silences, in their own SQLite file.

Each notification that must be paged becomes one row per sink, written with
`synchronous=FULL` before delivery starts, so an alert raised while a receiver is down
(or just before walacord stops) is delivered once the receiver is back. A row is deleted
only after its sink accepted it. Every call carries the `[alerts] store_timeout`
deadline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiosqlite
import anyio
import orjson

from walacord.alerts.model import Matcher, Silence

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    sink        TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    kind        TEXT NOT NULL,
    payload     BLOB NOT NULL,
    created_at  REAL NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_by_sink ON deliveries (sink, id);
CREATE TABLE IF NOT EXISTS firing (
    fingerprint TEXT PRIMARY KEY,
    document    BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS silences (
    id         TEXT PRIMARY KEY,
    matchers   TEXT NOT NULL,
    starts_at  REAL NOT NULL,
    ends_at    REAL NOT NULL,
    reason     TEXT NOT NULL,
    created_by TEXT NOT NULL DEFAULT ''
);
"""


@dataclass(frozen=True)
class Delivery:
    """One queued notification for one sink."""

    id: int
    sink: str
    fingerprint: str
    kind: str
    payload: dict[str, object]
    attempts: int


class AlertStore:
    """The open alerts.db; create with `await AlertStore.open(path, timeout)`."""

    def __init__(self, db: aiosqlite.Connection, path: Path, call_timeout: float, *,
                 in_memory: bool = False) -> None:
        self.db = db
        self.path = path
        self.timeout = call_timeout
        self.in_memory = in_memory

    @classmethod
    async def open(cls, path: Path, call_timeout: float, *, in_memory: bool = False
                   ) -> AlertStore:
        """Open or create the file in WAL mode with synchronous=FULL.

        With `in_memory`, the database lives in memory and `path` only names it: nothing
        survives a restart.
        """
        if not in_memory:
            path.parent.mkdir(parents=True, exist_ok=True)
        with anyio.fail_after(call_timeout):
            db = await aiosqlite.connect(":memory:" if in_memory else path)
            try:
                await db.execute_fetchall("PRAGMA journal_mode=WAL")  # returns a row
                await db.execute("PRAGMA synchronous=FULL")
                await db.executescript(SCHEMA)
                await db.commit()
            except BaseException:
                await db.close()
                raise
        return cls(db, path, call_timeout, in_memory=in_memory)

    async def adopt(self, other: AlertStore) -> int:
        """Copy the queued deliveries and the silences of `other` into this store, in
        one transaction; return how many deliveries were copied.

        The deliveries keep their order and follow the rows already queued here.
        The firing alerts are not copied, because the caller stores its current set.
        """
        with anyio.fail_after(other.timeout):
            deliveries = list(await other.db.execute_fetchall(
                "SELECT sink, fingerprint, kind, payload, created_at, attempts, last_error "
                "FROM deliveries ORDER BY id"))
            silences = await other.db.execute_fetchall(
                "SELECT id, matchers, starts_at, ends_at, reason, created_by FROM silences")
        with anyio.fail_after(self.timeout):
            await self.db.executemany(
                "INSERT INTO deliveries (sink, fingerprint, kind, payload, created_at, "
                "attempts, last_error) VALUES (?, ?, ?, ?, ?, ?, ?)", deliveries)
            await self.db.executemany(
                "INSERT OR REPLACE INTO silences (id, matchers, starts_at, ends_at, reason, "
                "created_by) VALUES (?, ?, ?, ?, ?, ?)", silences)
            await self.db.commit()
        return len(deliveries)

    async def close(self) -> None:
        with anyio.fail_after(self.timeout):
            await self.db.close()

    # --- delivery queue -------------------------------------------------------------

    async def enqueue(self, rows: Iterable[tuple[str, str, str, dict[str, object]]],
                      max_rows: int) -> int:
        """Append (sink, fingerprint, kind, payload) rows; return how many old rows were cut.

        When the queue would exceed `max_rows`, the oldest rows are deleted, because a
        newer notification about the same alert supersedes an older one.
        """
        now = time.time()
        with anyio.fail_after(self.timeout):
            await self.db.executemany(
                "INSERT INTO deliveries (sink, fingerprint, kind, payload, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [(sink, fp, kind, orjson.dumps(payload), now) for sink, fp, kind, payload in rows])
            cursor = await self.db.execute(
                "DELETE FROM deliveries WHERE id NOT IN "
                "(SELECT id FROM deliveries ORDER BY id DESC LIMIT ?)", (max_rows,))
            await self.db.commit()
        return max(cursor.rowcount, 0)

    async def pending(self, sink: str, limit: int) -> list[Delivery]:
        with anyio.fail_after(self.timeout):
            cursor = await self.db.execute(
                "SELECT id, sink, fingerprint, kind, payload, attempts FROM deliveries "
                "WHERE sink = ? ORDER BY id LIMIT ?", (sink, limit))
            rows = await cursor.fetchall()
        return [Delivery(r[0], r[1], r[2], r[3], orjson.loads(r[4]), r[5]) for r in rows]

    async def delete(self, ids: Sequence[int]) -> None:
        with anyio.fail_after(self.timeout):
            await self.db.executemany("DELETE FROM deliveries WHERE id = ?",
                                      [(i,) for i in ids])
            await self.db.commit()

    async def record_failure(self, ids: Sequence[int], error: str) -> None:
        with anyio.fail_after(self.timeout):
            await self.db.executemany(
                "UPDATE deliveries SET attempts = attempts + 1, last_error = ? WHERE id = ?",
                [(error[:500], i) for i in ids])
            await self.db.commit()

    async def count(self) -> int:
        with anyio.fail_after(self.timeout):
            cursor = await self.db.execute("SELECT count(*) FROM deliveries")
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def drop_other_sinks(self, sinks: Iterable[str]) -> int:
        """Delete rows for sinks no longer configured; return how many."""
        names = list(sinks)
        marks = ",".join("?" * len(names)) or "''"
        with anyio.fail_after(self.timeout):
            cursor = await self.db.execute(
                f"DELETE FROM deliveries WHERE sink NOT IN ({marks})", names)
            await self.db.commit()
        return max(cursor.rowcount, 0)

    # --- firing alerts, restored after a restart -----------------------------------

    async def replace_firing(self, documents: Iterable[dict[str, object]]) -> None:
        """Store exactly `documents` as the firing alerts, in one transaction."""
        with anyio.fail_after(self.timeout):
            await self.db.execute("DELETE FROM firing")
            await self.db.executemany(
                "INSERT INTO firing (fingerprint, document) VALUES (?, ?)",
                [(str(d["fingerprint"]), orjson.dumps(d)) for d in documents])
            await self.db.commit()

    async def firing(self) -> list[dict[str, object]]:
        with anyio.fail_after(self.timeout):
            cursor = await self.db.execute("SELECT document FROM firing")
            rows = await cursor.fetchall()
        return [orjson.loads(row[0]) for row in rows]

    # --- silences ---------------------------------------------------------------------

    async def add_silence(self, silence: Silence) -> None:
        matchers = orjson.dumps([m.to_json() for m in silence.matchers]).decode()
        with anyio.fail_after(self.timeout):
            await self.db.execute(
                "INSERT INTO silences (id, matchers, starts_at, ends_at, reason, created_by) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (silence.id, matchers, silence.starts_at, silence.ends_at, silence.reason,
                 silence.created_by))
            await self.db.commit()

    async def expire_silence(self, silence_id: str, now: float) -> bool:
        """End a silence now; return False when no unexpired silence has that id."""
        with anyio.fail_after(self.timeout):
            cursor = await self.db.execute(
                "UPDATE silences SET ends_at = ? WHERE id = ? AND ends_at > ?",
                (now, silence_id, now))
            await self.db.commit()
        return cursor.rowcount > 0

    async def silences(self, now: float) -> list[Silence]:
        """Return the silences that have not ended; delete those ended a day ago."""
        with anyio.fail_after(self.timeout):
            await self.db.execute("DELETE FROM silences WHERE ends_at < ?", (now - 86400,))
            await self.db.commit()
            cursor = await self.db.execute(
                "SELECT id, matchers, starts_at, ends_at, reason, created_by FROM silences "
                "WHERE ends_at > ? ORDER BY starts_at", (now,))
            rows = await cursor.fetchall()
        silences = []
        for row in rows:
            try:
                matchers = tuple(Matcher.from_json(m) for m in orjson.loads(row[1]))
            except ValueError as exc:
                # Versions that matched with Python's re stored patterns that RE2
                # rejects. Such a silence is left out, so its alerts page again.
                log.warning("alerts.silence_skipped", extra={"fields": {
                    "silence": row[0], "error": str(exc)}})
                continue
            silences.append(Silence(row[0], matchers, row[2], row[3], row[4], row[5]))
        return silences
