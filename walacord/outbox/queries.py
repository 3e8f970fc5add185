"""Reads and state changes on stored operations: sync claims, results, operator actions.

`OutboxStore` inherits these. Every write goes through `writing()`, so no two transactions
interleave on the shared writer connection. Reads use the read-only connection and
see committed data only.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiosqlite
import anyio
import orjson

from walacord.errors import OutboxError, OutboxNotFound
from walacord.metrics import Metrics
from walacord.outbox.model import Operation, State
from walacord.terminal import shorten

log = logging.getLogger(__name__)

COLUMNS = ("id, key, sink, target, payload, ordering_key, created_at, attempts, "
           "next_attempt_at, last_error, state, receipt, updated_at")
# The columns a claim reads back. The others are known: the claim's sink, state
# in_flight, updated_at of the claim, and no receipt, because only done operations
# have one and a done operation never becomes pending again.
CLAIM_COLUMNS = ("id, key, target, payload, ordering_key, created_at, attempts, "
                 "next_attempt_at, last_error")
COMPACT_CHUNK = 5000
# Rows a claim reads past operations that wait behind their ordering key, at most.
CLAIM_SCAN_ROWS = 20_000


@dataclass(slots=True)
class Outcome:
    """The result of one apply: done with a receipt, retry at a time, or dead."""

    operation: Operation
    state: State
    receipt: dict[str, Any] | None = None
    error: str | None = None
    next_attempt_at: float = 0.0
    attempted: bool = True  # False for operations put back unapplied behind a failure


@dataclass(frozen=True)
class Stats:
    """Operation counts by state, from one consistent snapshot."""

    accepted: int
    pending: int
    in_flight: int
    done: int  # includes operations already compacted away
    dead: int
    dropped: int
    oldest_pending_created_at: float | None
    # Pending operations that wait behind a dead operation with their ordering key.
    # They stay pending until an operator retries or drops the dead one.
    blocked: int = 0

    @property
    def accounted(self) -> int:
        return self.done + self.pending + self.in_flight + self.dead + self.dropped

    @property
    def conserved(self) -> bool:
        return self.accepted == self.accounted

    def to_json(self, now: float) -> dict[str, Any]:
        oldest = self.oldest_pending_created_at
        return {
            "accepted": self.accepted, "pending": self.pending, "in_flight": self.in_flight,
            "done": self.done, "dead": self.dead, "dropped": self.dropped,
            "oldest_pending_age_seconds": max(0.0, now - oldest) if oldest else 0.0,
            "conserved": self.conserved,
            "blocked": self.blocked,
        }


@dataclass(frozen=True)
class Blockers:
    """Dead operations that hold back later pending operations with their ordering key."""

    count: int  # dead operations with a later pending operation of their ordering key
    ids: list[int]  # the first of them, in id order
    blocked: int  # pending operations behind them

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "ids": self.ids, "blocked": self.blocked}


_STATES = {state.value: state for state in State}

# Pending operations behind the first dead operation of their ordering key. Both ends
# use an index: dead rows through operations_state, and each dead key's later rows
# through operations_ordering. Those later rows are pending or dead, because none of
# them can be claimed while the dead one exists, so the cost follows dead + blocked rows, not
# the size of the outbox.
BLOCKED_COUNT = (
    "SELECT count(*) FROM (SELECT ordering_key, min(id) AS first_dead FROM operations "
    "WHERE state = 'dead' AND ordering_key IS NOT NULL GROUP BY ordering_key) AS dead "
    "JOIN operations AS later ON later.ordering_key = dead.ordering_key "
    "AND later.id > dead.first_dead WHERE later.state = 'pending'")
# Dead operations with a later pending operation of their ordering key, with their count.
BLOCKING_DEAD = (
    "SELECT dead.id, count(*) OVER () FROM operations AS dead WHERE dead.state = 'dead' "
    "AND dead.ordering_key IS NOT NULL AND EXISTS (SELECT 1 FROM operations AS later "
    "WHERE later.ordering_key = dead.ordering_key AND later.id > dead.id "
    "AND later.state = 'pending') ORDER BY dead.id LIMIT ?")


def row_to_operation(row: Sequence[Any], memory_claims: Collection[int] = ()) -> Operation:
    """Build an operation from its COLUMNS row; a pending one in `memory_claims` is in
    flight."""
    state = _STATES[row[10]]
    if state is State.PENDING and row[0] in memory_claims:
        state = State.IN_FLIGHT
    return Operation(
        id=row[0], key=row[1], sink=row[2], target=row[3], payload=bytes(row[4]),
        ordering_key=row[5], created_at=row[6], attempts=row[7], next_attempt_at=row[8],
        last_error=row[9], state=state,
        receipt=orjson.loads(row[11]) if row[11] else None, updated_at=row[12])


def _id_list(ids: Iterable[int]) -> str:
    """Return `ids` as a JSON array, the parameter of a `json_each(?)` subquery."""
    return orjson.dumps(list(ids)).decode()


async def execute_in_order(db: aiosqlite.Connection,
                           statements: Sequence[tuple[str, Sequence[Any]]]) -> list[list[Any]]:
    """Run `statements` in order as one call on the connection's thread; return their rows.

    Every statement runs even when an earlier one fails, so a closing COMMIT or PRAGMA
    still takes effect. Raise the first statement's error, if any.

    One call instead of one per statement saves a thread hand-off and an event-loop
    wake-up per statement. Each hand-off waits for the GIL, which the event loop holds
    while it prepares the PostgreSQL round that runs beside the claim.
    """
    # NOTE: Connection._execute and Connection._conn are private aiosqlite API, used
    # because aiosqlite has no public call that runs a function on its thread.
    # Every claim, record and enqueue passes here, so the outbox tests fail at once
    # if a release removes them.
    results, error = await db._execute(_run_in_order, db._conn, statements)
    if error is not None:
        raise error
    return results


def _run_in_order(connection: sqlite3.Connection,
                  statements: Sequence[tuple[str, Sequence[Any]]]
                  ) -> tuple[list[list[Any]], sqlite3.Error | None]:
    """Run each statement and fetch its rows; return the rows and the first error."""
    results: list[list[Any]] = []
    first_error: sqlite3.Error | None = None
    for sql, parameters in statements:
        try:
            results.append(connection.execute(sql, parameters).fetchall())
        except sqlite3.Error as exc:
            results.append([])
            if first_error is None:
                first_error = exc
    return results, first_error


def _record_updates(outcomes: Sequence[Outcome], now: float,
                    memory_claims: Collection[int]) -> list[tuple[str, Sequence[Any]]]:
    """Return the UPDATE statements that store `outcomes`.

    Outcomes that set the same values share one set-based UPDATE, which costs about
    half of one UPDATE per row in SQLite. Each UPDATE changes only rows still in the
    state their claim left them: in_flight, or pending for the ids in `memory_claims`.
    A row that left that state meanwhile keeps its new state.
    """
    groups: dict[tuple[Any, ...], list[int]] = {}
    # A batch shares one receipt object among its operations; encode it once.
    encoded: dict[int, str] = {}
    previous: Outcome | None = None
    ids: list[int] = []
    previous_claimed_state = ""
    for o in outcomes:
        claimed_state = "pending" if o.operation.id in memory_claims else "in_flight"
        if (previous is not None and o.state is previous.state
                and o.receipt is previous.receipt and o.error is previous.error
                and o.attempted is previous.attempted
                and o.next_attempt_at == previous.next_attempt_at
                and claimed_state == previous_claimed_state):
            # The outcomes of one batch come in a run with the same values, so most
            # rows skip building and hashing the values.
            ids.append(o.operation.id)
            continue
        receipt = None
        if o.receipt:
            receipt = encoded.get(id(o.receipt))
            if receipt is None:
                receipt = encoded[id(o.receipt)] = orjson.dumps(o.receipt).decode()
        values = (o.state.value, receipt, o.error, int(o.attempted), o.next_attempt_at,
                  claimed_state)
        ids = groups.setdefault(values, [])
        ids.append(o.operation.id)
        previous, previous_claimed_state = o, claimed_state
    return [("UPDATE operations SET state = ?, receipt = ?, last_error = ?, "
             "attempts = attempts + ?, next_attempt_at = ?, updated_at = ? "
             "WHERE id IN (SELECT value FROM json_each(?)) AND state = ?",
             (*values[:5], now, _id_list(ids), values[5])) for values, ids in groups.items()]


def _claimed_operations(rows: list[Any], sink: str, now: float) -> list[Operation]:
    """Build the operations of a claim from its CLAIM_COLUMNS rows, in id order."""
    # Ids are unique, so sorting the row tuples sorts by id. SQLite returns RETURNING
    # rows in no defined order.
    rows.sort()
    in_flight = State.IN_FLIGHT
    return [Operation(op_id, key, sink, target, payload, ordering_key, created_at,
                      attempts, next_attempt_at, last_error, in_flight, None, now)
            for (op_id, key, target, payload, ordering_key, created_at, attempts,
                 next_attempt_at, last_error) in rows]


class OutboxQueries:
    """Queries and state changes; needs `_writer()`, `_read()` and `released()`."""

    metrics: Metrics | None
    on_alert: Callable[[str, str], None]

    def __init__(self) -> None:
        self.write_lock = anyio.Lock()
        self.read_lock = anyio.Lock()
        # Ids of operations claimed in memory (see `claim(durable=False)`): pending in
        # the database, in flight for every reader. Changed only under `write_lock`.
        self.memory_claims: set[int] = set()

    def _writer(self) -> aiosqlite.Connection:
        raise NotImplementedError

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[aiosqlite.Connection]:
        """Hold the write lock, shielded so that a cancelled caller still ends its
        transaction and restores synchronous=FULL."""
        async with self.write_lock:
            with anyio.CancelScope(shield=True):
                yield self._writer()

    def _read(self) -> aiosqlite.Connection:
        raise NotImplementedError

    def released(self, count: int, size: int) -> None:
        raise NotImplementedError

    async def _rollback_quietly(self, db: aiosqlite.Connection) -> None:
        """Queue a ROLLBACK; a COMMIT queued before it may already have ended the
        transaction, so "no transaction" errors are expected and ignored."""
        try:
            await db.execute("ROLLBACK")
        except sqlite3.OperationalError as exc:
            if "no transaction" not in str(exc):
                log.warning("outbox.rollback_failed", extra={"fields": {"error": str(exc)}})

    # --- sync ---------------------------------------------------------------------

    async def claim(self, sink: str, limit: int, now: float,
                    record: list[Outcome] | None = None, *, durable: bool = True
                    ) -> list[Operation]:
        """Mark up to `limit` due operations of `sink` in flight and return them in id order.

        `record` contains outcomes of earlier rounds. They are stored first, in the
        same transaction, as `record()` would store them, and removed from the list
        once committed, so after an error the list contains exactly the unstored
        outcomes. Outcomes appended while this runs stay in the list.

        An operation with an ordering key is claimed only when every earlier operation
        with that key is done, or is claimed in this same call before it. So a dead
        operation holds back later ones with its key until it is retried or dropped.
        Operations that wait so are skipped, and the claim reads on past them (at most
        CLAIM_SCAN_ROWS rows), so a blocked key does not stall the rest of the sink.

        With `durable=False` the claim is kept in memory (`memory_claims`) instead of
        in the database: it reads the due rows with a SELECT, which writes nothing, and
        the rows stay pending in SQLite until their outcome is stored. Readers still see
        them in flight. A crash or power loss loses such a claim, so its operations
        replay without counting the attempt. Only a sink whose replay is harmless
        without that count may ask for it (see `Sink.durable_claims`). The commit of
        the recorded outcomes skips the fsync, as `record()` does.
        """
        recording = list(record or ())
        updates = _record_updates(recording, now, self.memory_claims)
        # The last statement restores FULL even when an earlier one fails.
        relaxed = [] if durable else [("PRAGMA synchronous = NORMAL", ())]
        restore = [] if durable else [("PRAGMA synchronous = FULL", ())]
        async with self.writing() as db:
            # One statement marks (or, in memory, only reads) the due rows, and the
            # COMMIT is queued with it, so the common case costs one wait for SQLite's
            # thread. A durable claim survives a power loss: the restart turns its
            # in-flight operations into attempted ones, which makes the walacor sink
            # look their key up before it submits again.
            if durable:
                select: tuple[str, Sequence[Any]] = (
                    "UPDATE operations SET state = 'in_flight', updated_at = ? WHERE id IN "
                    "(SELECT id FROM operations WHERE state = 'pending' AND sink = ? "
                    "AND next_attempt_at <= ? ORDER BY id LIMIT ?) "
                    f"RETURNING {CLAIM_COLUMNS}", (now, sink, now, limit))
            else:
                # The outcomes recorded above leave `memory_claims` only after the
                # commit, so they are excluded here as well.
                excluded = [_id_list(self.memory_claims)] if self.memory_claims else []
                select = (f"SELECT {CLAIM_COLUMNS} FROM operations WHERE state = 'pending' "
                          "AND sink = ? AND next_attempt_at <= ? "
                          f"{self._without_memory_claims()} ORDER BY id LIMIT ?",
                          (sink, now, *excluded, limit))
            try:
                results = await execute_in_order(db, [
                    *relaxed, ("BEGIN IMMEDIATE", ()), *updates, select, ("COMMIT", ()),
                    *restore])
                rows = results[len(relaxed) + 1 + len(updates)]
            except BaseException:
                # As in record(): the PRAGMA has no effect inside a transaction that a
                # failed COMMIT left open, so restore FULL after the rollback.
                await self._rollback_quietly(db)
                if not durable:
                    await db.execute("PRAGMA synchronous = FULL")
                raise
            if record:
                del record[:len(recording)]
            self._recorded(recording)

            candidates = _claimed_operations(rows, sink, now)
            claimed = await self._in_order(db, candidates)
            if not durable:
                self.memory_claims.update(op.id for op in claimed)
            elif len(claimed) < len(candidates):
                await self._unclaim(db, candidates, claimed)
            if len(claimed) < len(candidates) and len(candidates) == limit:
                claimed += await self._claim_after(db, sink, limit, now, claimed,
                                                   candidates[-1].id, durable=durable)
        return claimed

    async def _claim_after(self, db: aiosqlite.Connection, sink: str, limit: int,
                           now: float, claimed: list[Operation], after_id: int, *,
                           durable: bool) -> list[Operation]:
        """Claim due operations with ids above `after_id` until `claimed` and these
        make `limit`, skipping those that wait behind their ordering key; return them.

        Reads at most CLAIM_SCAN_ROWS rows, a window of `limit` at a time, and writes
        only the operations it claims.
        """
        more: list[Operation] = []
        scanned = 0
        while len(claimed) + len(more) < limit and scanned < CLAIM_SCAN_ROWS:
            excluded = [_id_list(self.memory_claims)] if self.memory_claims else []
            rows = await db.execute_fetchall(
                f"SELECT {CLAIM_COLUMNS} FROM operations WHERE state = 'pending' AND sink = ? "
                f"AND next_attempt_at <= ? AND id > ? {self._without_memory_claims()} "
                "ORDER BY id LIMIT ?", (sink, now, after_id, *excluded, limit))
            window = _claimed_operations(list(rows), sink, now)
            if not window:
                break
            scanned += len(window)
            after_id = window[-1].id
            earlier = {op.id for op in claimed} | {op.id for op in more}
            allowed = await self._in_order(db, [*claimed, *more, *window])
            fresh = [op for op in allowed if op.id not in earlier]
            fresh = fresh[:limit - len(claimed) - len(more)]
            if not fresh:
                continue
            if durable:
                await self._mark_in_flight(db, fresh, now)
            else:
                self.memory_claims.update(op.id for op in fresh)
            more += fresh
        return more

    async def _mark_in_flight(self, db: aiosqlite.Connection, operations: list[Operation],
                              now: float) -> None:
        """Mark `operations`, read as pending under the write lock, in flight durably."""
        try:
            await execute_in_order(db, [
                ("BEGIN IMMEDIATE", ()),
                ("UPDATE operations SET state = 'in_flight', updated_at = ? WHERE id IN "
                 "(SELECT value FROM json_each(?)) AND state = 'pending'",
                 (now, _id_list(op.id for op in operations))),
                ("COMMIT", ())])
        except BaseException:
            await self._rollback_quietly(db)
            raise

    def _without_memory_claims(self) -> str:
        """Return the condition that excludes `memory_claims`, whose JSON array is the
        next parameter, or an empty string when there are none."""
        return "AND id NOT IN (SELECT value FROM json_each(?))" if self.memory_claims else ""

    async def _unclaim(self, db: aiosqlite.Connection, candidates: list[Operation],
                       claimed: list[Operation]) -> None:
        """Put back to pending the candidates that wait behind an earlier operation.

        This runs after the claim's commit. A crash in between leaves them in flight,
        so the restart counts them as attempted: that costs the walacor sink one key
        lookup, and order is kept because they are only claimable in order.
        """
        kept = {op.id for op in claimed}
        waiting = [op.id for op in candidates if op.id not in kept]
        try:
            await execute_in_order(db, [
                ("BEGIN IMMEDIATE", ()),
                ("UPDATE operations SET state = 'pending' WHERE id IN "
                 "(SELECT value FROM json_each(?)) AND state = 'in_flight'",
                 (orjson.dumps(waiting).decode(),)),
                ("COMMIT", ())])
        except BaseException:
            await self._rollback_quietly(db)
            raise

    async def _in_order(self, db: aiosqlite.Connection, candidates: list[Operation]
                        ) -> list[Operation]:
        keys = sorted({op.ordering_key for op in candidates if op.ordering_key})
        if not keys:
            return candidates

        # For each ordering key, the claimable chain is the prefix of its undone ids
        # that is also among the candidates: a gap means an earlier operation waits.
        marks = ",".join("?" * len(keys))
        last_id = candidates[-1].id
        rows = await db.execute_fetchall(
            f"SELECT ordering_key, id FROM operations WHERE ordering_key IN ({marks}) "
            "AND state != 'done' AND id <= ? ORDER BY id", (*keys, last_id))
        candidate_ids = {op.id for op in candidates}
        allowed: set[int] = set()
        broken: set[str] = set()
        for ordering_key, op_id in rows:
            if ordering_key in broken:
                continue
            if op_id in candidate_ids:
                allowed.add(op_id)
            else:
                broken.add(ordering_key)
        return [op for op in candidates if not op.ordering_key or op.id in allowed]

    async def record(self, outcomes: Sequence[Outcome]) -> None:
        """Store the outcome of applied operations in one transaction."""
        if not outcomes:
            return
        updates = _record_updates(outcomes, time.time(), self.memory_claims)
        async with self.writing() as db:
            # Without an fsync: if a crash loses this commit, the operations come back
            # as in flight and replay through the sinks' exactly-once paths. In WAL
            # mode a process crash loses nothing; only a power loss can. The last
            # statement restores FULL even when an earlier one fails.
            try:
                await execute_in_order(db, [("PRAGMA synchronous = NORMAL", ()),
                                            ("BEGIN IMMEDIATE", ()), *updates, ("COMMIT", ()),
                                            ("PRAGMA synchronous = FULL", ())])
            except BaseException:
                # A failed COMMIT (full disk) leaves the transaction open, and the
                # PRAGMA above has no effect inside one, so restore FULL after it.
                await self._rollback_quietly(db)
                await db.execute("PRAGMA synchronous = FULL")
                raise
            self._recorded(outcomes)

    def _recorded(self, outcomes: Sequence[Outcome]) -> None:
        """Release the claims of `outcomes`, just committed, and the capacity of the
        operations they marked done. Call it under `write_lock`."""
        if self.memory_claims:
            self.memory_claims.difference_update(o.operation.id for o in outcomes)
        done = [o for o in outcomes if o.state is State.DONE]
        if not done:
            return
        self.released(len(done), sum(len(o.operation.payload) for o in done))
        if self.metrics is not None:
            by_sink = Counter(outcome.operation.sink for outcome in done)
            for sink, count in by_sink.items():
                self.metrics.outbox_synced.labels(sink=sink).inc(count)

    async def next_due(self, sink: str, *, after: float | None = None) -> float | None:
        """Return the earliest next attempt time of a pending operation of `sink`, or
        with `after`, the earliest one later than `after`."""
        excluded = [_id_list(self.memory_claims)] if self.memory_claims else []
        later = [] if after is None else [after]
        rows = await self._read().execute_fetchall(
            "SELECT min(next_attempt_at) FROM operations WHERE state = 'pending' AND sink = ? "
            f"{'AND next_attempt_at > ? ' if later else ''}{self._without_memory_claims()}",
            (sink, *later, *excluded))
        value = next(iter(rows))[0]
        return None if value is None else float(value)

    # --- statistics and conservation ----------------------------------------------

    async def stats(self) -> Stats:
        db = self._read()
        # One read transaction, so the counters and the counts come from one snapshot.
        # The lock keeps concurrent callers from nesting BEGINs on the shared reader,
        # and the shield makes sure a cancelled caller still ends the transaction.
        async with self.read_lock:
            with anyio.CancelScope(shield=True):
                stats = await self._stats_snapshot(db)
        return stats

    async def _stats_snapshot(self, db: aiosqlite.Connection) -> Stats:
        claimed = _id_list(self.memory_claims) if self.memory_claims else None
        await db.execute("BEGIN")
        try:
            counters = {str(row[0]): int(row[1]) for row in
                        await db.execute_fetchall("SELECT name, value FROM counters")}
            by_state = {str(row[0]): int(row[1]) for row in await db.execute_fetchall(
                "SELECT state, count(*) FROM operations GROUP BY state")}
            oldest = await db.execute_fetchall(
                "SELECT created_at FROM operations WHERE state IN ('pending', 'in_flight') "
                "ORDER BY id LIMIT 1")
            blocked = next(iter(await db.execute_fetchall(BLOCKED_COUNT)))[0]
            # Claims kept in memory are pending rows that count as in flight.
            claimed_pending = 0 if claimed is None else next(iter(await db.execute_fetchall(
                "SELECT count(*) FROM operations WHERE state = 'pending' AND id IN "
                "(SELECT value FROM json_each(?))", (claimed,))))[0]
        finally:
            await db.execute("COMMIT")
        oldest_row = next(iter(oldest), None)
        return Stats(
            accepted=int(counters["accepted"]),
            pending=int(by_state.get("pending", 0)) - claimed_pending,
            in_flight=int(by_state.get("in_flight", 0)) + claimed_pending,
            done=int(by_state.get("done", 0)) + int(counters["compacted"]),
            dead=int(by_state.get("dead", 0)), dropped=int(counters["dropped"]),
            oldest_pending_created_at=oldest_row[0] if oldest_row else None,
            blocked=int(blocked))

    async def check_conservation(self) -> Stats:
        """Compute the stats, export them, and alert when accepted != the sum of states."""
        stats = await self.stats()
        now = time.time()
        if self.metrics is not None:
            m = self.metrics
            m.outbox_pending.set(stats.pending + stats.in_flight)
            m.outbox_dead.set(stats.dead)
            m.outbox_blocked.set(stats.blocked)
            m.outbox_accepted.set(stats.accepted)
            m.outbox_accounted.set(stats.accounted)
            m.outbox_oldest_pending_age.set(stats.to_json(now)["oldest_pending_age_seconds"])
            m.outbox_conservation_ok.set(1 if stats.conserved else 0)
            if not stats.conserved:
                m.outbox_conservation_failures.inc()
        if not stats.conserved:
            message = (f"outbox conservation check failed: accepted {stats.accepted} but "
                       f"done {stats.done} + pending {stats.pending} + in flight "
                       f"{stats.in_flight} + dead {stats.dead} + dropped {stats.dropped} = "
                       f"{stats.accounted}")
            log.error("outbox.conservation_failed", extra={"fields": stats.to_json(now)})
            self.on_alert("outbox_conservation", message)
        return stats

    # --- operator actions ---------------------------------------------------------

    async def get(self, op_id: int) -> Operation:
        rows = await self._read().execute_fetchall(
            f"SELECT {COLUMNS} FROM operations WHERE id = ?", (op_id,))
        row = next(iter(rows), None)
        if row is None:
            raise OutboxNotFound(f"no outbox operation has id {op_id}")
        return row_to_operation(row, self.memory_claims)

    async def get_by_key(self, key: str) -> Operation:
        rows = await self._read().execute_fetchall(
            f"SELECT {COLUMNS} FROM operations WHERE key = ?", (key,))
        row = next(iter(rows), None)
        if row is None:
            raise OutboxNotFound(f"no outbox operation has key {shorten(key, 80)!r}: it was never "
                                 "enqueued here, or it was done and compacted after the "
                                 "retention period")
        return row_to_operation(row, self.memory_claims)

    async def blockers(self, limit: int = 5) -> Blockers:
        """Return the dead operations that hold back pending ones, the first `limit` by id."""
        db = self._read()
        # One read transaction, so the ids and the blocked count agree.
        async with self.read_lock:
            with anyio.CancelScope(shield=True):
                await db.execute("BEGIN")
                try:
                    rows = await db.execute_fetchall(BLOCKING_DEAD, (limit,))
                    blocked = next(iter(await db.execute_fetchall(BLOCKED_COUNT)))[0]
                finally:
                    await db.execute("COMMIT")
        ids = [int(row[0]) for row in rows]
        count = int(next(iter(rows))[1]) if ids else 0
        return Blockers(count=count, ids=ids, blocked=int(blocked))

    async def waits_behind(self, operations: Sequence[Operation]) -> dict[int, int]:
        """Map each pending operation of `operations` that waits behind a dead one with
        its ordering key to the id of the first such dead operation."""
        pending = [op for op in operations if op.state is State.PENDING and op.ordering_key]
        if not pending:
            return {}
        keys = sorted({str(op.ordering_key) for op in pending})
        rows = await self._read().execute_fetchall(
            "SELECT ordering_key, min(id) FROM operations WHERE state = 'dead' AND "
            "ordering_key IN (SELECT value FROM json_each(?)) GROUP BY ordering_key",
            (orjson.dumps(keys).decode(),))
        first_dead = {str(key): int(op_id) for key, op_id in rows}
        waiting: dict[int, int] = {}
        for op in pending:
            dead_id = first_dead.get(str(op.ordering_key))
            if dead_id is not None and dead_id < op.id:
                waiting[op.id] = dead_id
        return waiting

    async def list(self, *, states: Sequence[State] = (), after_id: int = 0,
                   limit: int = 100) -> list[Operation]:
        """Return operations with id > `after_id` in id order, optionally by state."""
        where, params = "id > ?", list[Any]([after_id])
        claimed = set(self.memory_claims)
        if states:
            stored = {s.value for s in states}
            if claimed and (State.PENDING in states) != (State.IN_FLIGHT in states):
                # Memory claims are pending rows that count as in flight: a filter on
                # one of the two states but not the other must look at their ids.
                stored.add(State.PENDING.value)
                where += (" AND (state != 'pending' OR id "
                          f"{'' if State.IN_FLIGHT in states else 'NOT '}IN "
                          "(SELECT value FROM json_each(?)))")
                params.append(_id_list(claimed))
            where += f" AND state IN ({','.join('?' * len(stored))})"
            params += sorted(stored)
        rows = await self._read().execute_fetchall(
            f"SELECT {COLUMNS} FROM operations WHERE {where} ORDER BY id LIMIT ?",
            (*params, limit))
        return [row_to_operation(row, claimed) for row in rows]

    async def retry(self, ids: Sequence[int] = (), *, all_dead: bool = False) -> int:
        """Return dead operations to pending with a fresh attempt count; return how many."""
        async with self.writing() as db:
            if all_dead:
                cursor = await db.execute(
                    "UPDATE operations SET state = 'pending', attempts = 0, "
                    "next_attempt_at = 0, updated_at = ? WHERE state = 'dead'", (time.time(),))
                return cursor.rowcount
            await db.execute("BEGIN IMMEDIATE")
            count = 0
            try:
                for op_id in ids:
                    if op_id in self.memory_claims:
                        continue  # in flight; its outcome decides what comes next
                    cursor = await db.execute(
                        "UPDATE operations SET state = 'pending', attempts = 0, "
                        "next_attempt_at = 0, updated_at = ? WHERE id = ? AND state IN "
                        "('dead', 'pending')", (time.time(), op_id))
                    count += cursor.rowcount
                await db.execute("COMMIT")
            except BaseException:
                await self._rollback_quietly(db)
                raise
            return count

    async def make_due(self) -> int:
        """Make pending operations that wait out a retry backoff due now; return how many.

        Unlike `retry`, their attempt counts stay, so a permanent error still ends dead.
        """
        async with self.writing() as db:
            cursor = await db.execute(
                "UPDATE operations SET next_attempt_at = 0, updated_at = ? "
                "WHERE state = 'pending' AND next_attempt_at > ?", (time.time(), time.time()))
            return cursor.rowcount

    async def drop(self, op_id: int, *, reason: str) -> Operation:
        """Delete an operation that is not done or in flight; count it as dropped."""
        async with self.writing() as db:
            await db.execute("BEGIN IMMEDIATE")
            try:
                rows = await db.execute_fetchall(
                    f"SELECT {COLUMNS} FROM operations WHERE id = ?", (op_id,))
                row = next(iter(rows), None)
                if row is None:
                    raise OutboxNotFound(f"no outbox operation has id {op_id}")
                operation = row_to_operation(row, self.memory_claims)
                if operation.state not in (State.PENDING, State.DEAD):
                    raise OutboxError(f"operation {op_id} is {operation.state.value}; only "
                                      "pending or dead operations can be dropped")
                await db.execute("DELETE FROM operations WHERE id = ?", (op_id,))
                await db.execute("UPDATE counters SET value = value + 1 WHERE name = 'dropped'")
                await db.execute("COMMIT")
            except BaseException:
                await self._rollback_quietly(db)
                raise
        self.released(1, len(operation.payload))
        log.warning("outbox.dropped", extra={"fields": {
            "id": op_id, "key": operation.key, "sink": operation.sink,
            "state": operation.state.value, "reason": reason}})
        return operation

    async def compact(self, now: float | None = None) -> int:
        """Delete done operations older than the retention period, then checkpoint the WAL."""
        cutoff = (time.time() if now is None else now) - self._retention()
        total = 0
        while True:
            async with self.writing() as db:
                await db.execute("BEGIN IMMEDIATE")
                try:
                    cursor = await db.execute(
                        "DELETE FROM operations WHERE id IN (SELECT id FROM operations "
                        "WHERE state = 'done' AND updated_at < ? LIMIT ?)",
                        (cutoff, COMPACT_CHUNK))
                    deleted = cursor.rowcount
                    await db.execute("UPDATE counters SET value = value + ? WHERE name = "
                                     "'compacted'", (deleted,))
                    await db.execute("COMMIT")
                except BaseException:
                    # Without it a failed write (full disk) leaves the transaction open
                    # and every later BEGIN on the shared writer connection fails.
                    await self._rollback_quietly(db)
                    raise
            total += deleted
            if deleted < COMPACT_CHUNK:
                break

        async with self.writing() as db:
            # The checkpoint returns a row. Left unread, its statement stays active on
            # the shared writer connection, and the next COMMIT there fails with
            # "cannot commit transaction - SQL statements in progress".
            await db.execute_fetchall("PRAGMA wal_checkpoint(TRUNCATE)")
        if total:
            log.info("outbox.compacted", extra={"fields": {"deleted": total}})
        return total

    def _retention(self) -> float:
        raise NotImplementedError
