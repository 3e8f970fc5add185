"""The durable outbox store: SQLite in WAL mode with synchronous=FULL and group commit.

One writer task owns every enqueue. It takes all requests queued while the previous
commit ran and writes them in one transaction, so concurrent callers share one fsync.
A caller's enqueue returns only after its transaction committed, which with
synchronous=FULL means the WAL frame is on disk. Other writers (sync, compaction,
operator actions) take the same lock and use the same connection. Reads go through a
second, read-only connection, which sees committed data only.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import orjson

from walacord.config import OutboxConfig
from walacord.errors import (
    OutboxConflict,
    OutboxCorrupt,
    OutboxDiskFull,
    OutboxError,
    OutboxFull,
    OutboxRequestTooLarge,
    OutboxStarting,
    OutboxStateDirUnusable,
)
from walacord.metrics import Metrics
from walacord.outbox import startup
from walacord.outbox.model import NewOperation, Operation, State
from walacord.outbox.queries import (
    COLUMNS,
    OutboxQueries,
    execute_in_order,
    row_to_operation,
)
from walacord.outbox.schema import migrate

log = logging.getLogger(__name__)

# (alert name, message); the alert engine delivers it.
AlertCallback = Callable[[str, str], None]
SQL_KEYS_PER_QUERY = 500
# Rows per multi-row INSERT: 9 parameters each stays under SQLite's default limit of
# 32766 host parameters (SQLite 3.32 and later).
INSERT_CHUNK = 1000
# A small enqueue can still fit in the last free pages of a full file system. So the
# disk-full state, and its alert, ends only once this much space is free again, or a
# tenth of the file system on a smaller one.
DISK_FREE_TO_CLEAR = 1024 * 1024
# Seconds between attempts to open the database while its file system is full at start-up.
OPEN_RETRY_INTERVAL = 5.0
# Seconds that closing the store waits for reads and writes in progress.
CLOSE_WAIT = 10.0
# Seconds between checks for free space while the disk-full state lasts.
SPACE_CHECK_INTERVAL = 2.0
# Maximum interval between two checks for enqueues past `write_timeout`, in seconds.
# A timed-out enqueue raises late by at most this, or by a quarter of write_timeout
# when that is shorter.
EXPIRY_CHECK_INTERVAL = 0.25


@dataclass
class EnqueueResult:
    """The stored operation for one enqueued key, and whether this call created it."""

    operation: Operation
    created: bool


@dataclass
class _Plan:
    """The new operations of one group commit by key, and their payload bytes."""

    operations: dict[str, Operation] = field(default_factory=dict)
    size: int = 0


# Per batch of one submission, its results or the OutboxError that rejected it.
Outcomes = list[list[EnqueueResult] | OutboxError]
# Called once per submission with its outcomes, or with the OutboxError or TimeoutError
# that ended the wait for all of them.
SubmitCallback = Callable[[Outcomes | OutboxError | TimeoutError], None]


class _Completion:
    """One submission's wait for the writer: it ends when the writer has finished every
    request of it, when its deadline (`anyio.current_time()` seconds) passes, or when
    the store stops."""

    __slots__ = ("deadline", "done", "expired", "on_done", "remaining", "requests",
                 "stopped")

    def __init__(self, requests: list[_Request | None], deadline: float,
                 on_done: Callable[[_Completion], None]) -> None:
        self.requests = requests
        self.remaining = 0
        self.deadline = deadline
        self.expired = False
        self.stopped = False
        self.done = False
        self.on_done = on_done

    def finish_one(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.end()

    def end(self) -> None:
        if not self.done:
            self.done = True
            try:
                self.on_done(self)
            except Exception:
                # The writer and the expiry task call this, and neither may stop.
                log.error("outbox.callback_failed", exc_info=True)
            finally:
                # The requests refer back to this completion. Breaking that cycle lets
                # reference counting free the submission and its callbacks now. Left to
                # the cyclic collector, they cost a quarter of the daemon's CPU time in
                # the socket benchmark with 16 single-op clients, and each full
                # collection stopped the event loop for about 70 ms.
                self.requests = []
                self.on_done = _ended


def _ended(completion: _Completion) -> None:
    """Stand in for the callback of a completion that has ended."""


class _Request:
    __slots__ = ("completion", "error", "operations", "results")

    def __init__(self, operations: Sequence[NewOperation], completion: _Completion) -> None:
        self.operations = operations
        self.completion = completion
        self.results: list[EnqueueResult] = []
        self.error: OutboxError | None = None


class OutboxStore(OutboxQueries):
    """Operations in `<state dir>/outbox.db`; `run()` opens it and runs the writer."""

    def __init__(self, path: Path, config: OutboxConfig, *, metrics: Metrics | None = None,
                 on_alert: AlertCallback | None = None,
                 extend_start_timeout: Callable[[float], None] | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.config = config
        self.metrics = metrics
        self.on_alert = on_alert if on_alert is not None else (lambda name, message: None)
        self.extend_start_timeout = extend_start_timeout
        self.moved_aside: Path | None = None
        self.disk_full = False
        # Why the store cannot take requests yet: at start-up its file system was full,
        # or its directory was unusable (read-only, say).
        self.unavailable: str | None = None
        self._unavailable_type: type[OutboxError] = OutboxDiskFull
        self.opened = anyio.Event()
        self.commits = 0  # group-commit transactions, for tests and the benchmark
        self._db: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._last_id = 0
        self._undelivered = 0
        self._undelivered_bytes = 0
        self._full_alerted = False
        # Requests for the writer, and the future it waits on while there are none.
        # Both are plain asyncio objects, because anyio's memory stream and Event cost
        # a large share of an enqueue's CPU time.
        self._queue: deque[_Request] = deque()
        self._running = False
        # Set when `run()` ends, so a store that never opened reads as stopped, not
        # as starting.
        self._stopped = False
        self._writer_wakeup: asyncio.Future[None] | None = None
        # The writer is woken once the queue contains this many requests.
        self._wake_at = 1
        # Requests of the last group commit plus those queued when it ended, and the
        # loop time when its callers were acknowledged: see `_wait_for_callers()`.
        self._expected_requests = 0
        self._last_commit_end = 0.0
        # Completions of submissions in the order of their deadlines, as a heap of
        # (deadline, sequence number, completion). One task expires them, because a
        # timer per call was a large share of an enqueue's CPU time.
        self._waiting: list[tuple[float, int, _Completion]] = []
        self._submitted = 0
        # Set while the expiry task sleeps with nothing waiting; a submission wakes it.
        self._expiry_idle: anyio.Event | None = None

    # --- lifecycle ----------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Open the store, then run the group-commit writer and compaction until cancelled.

        If the file system is full at start-up, it reports started with the store
        unavailable, so the rest of the daemon runs in emergency mode, and opens the store
        once space returns.
        """
        try:
            await self._run(task_status)
        finally:
            self._stopped = True

    async def _run(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        started = False
        while True:
            try:
                await self.open()
                break
            except (OutboxDiskFull, OutboxStateDirUnusable) as exc:
                self._open_failed(exc)
                if not started:
                    task_status.started()
                    started = True
                await anyio.sleep(OPEN_RETRY_INTERVAL)
        if self.unavailable is not None:
            self.unavailable = None
            log.info("outbox.available", extra={"fields": {"path": str(self.path)}})
            self._check_space_returned()
        try:
            self._running = True
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._write_loop)
                tasks.start_soon(self._expire_loop)
                tasks.start_soon(self._space_loop)
                tasks.start_soon(self._maintenance_loop)
                self.opened.set()
                if not started:
                    task_status.started()
        finally:
            self._running = False
            self._stop_waiting()
            with anyio.CancelScope(shield=True):
                await self.close()

    def _open_failed(self, exc: OutboxDiskFull | OutboxStateDirUnusable) -> None:
        first = self.unavailable is None
        self.unavailable = (f"the outbox cannot open {self.path}: {exc}. walacord retries every "
                            f"{OPEN_RETRY_INTERVAL:g} s and accepts operations once it opens")
        self._unavailable_type = type(exc)
        if first:
            log.error("outbox.open_failed", extra={"fields": {
                "path": str(self.path), "error": str(exc)}})
        if isinstance(exc, OutboxDiskFull):
            if not self.disk_full:
                self.disk_full = True
                self.on_alert("outbox_disk_full", f"file system of {self.path.parent} is "
                                                  "full; the outbox database cannot open")
        elif first:
            self.on_alert("outbox_state_dir", self.unavailable)

    def require_open(self) -> None:
        """Raise OutboxStarting before the store opened its database, or the start-up
        error while it could not open it."""
        if self.unavailable is not None:
            raise self._unavailable_type(self.unavailable)
        if self.starting:
            raise self._starting_error()

    @property
    def starting(self) -> bool:
        """True until the store opened its database or gave up."""
        return not self.opened.is_set() and not self._stopped

    def _starting_error(self) -> OutboxStarting:
        return OutboxStarting("walacord is starting and has not opened the outbox store "
                              "yet; retry in a moment")

    def _not_running_error(self) -> OutboxError:
        """Return why the store cannot take a request now: starting, unavailable or stopped."""
        if self.unavailable is not None:
            return self._unavailable_type(self.unavailable)
        if self.starting:
            return self._starting_error()
        return OutboxError("the outbox store is not running")

    def _check_space_returned(self) -> None:
        if self.disk_full and startup.has_free_space(self.path.parent, DISK_FREE_TO_CLEAR):
            self.disk_full = False
            log.info("outbox.disk_space_returned", extra={"fields": {"path": str(self.path)}})

    async def _space_loop(self) -> None:
        """Clear the disk-full state once space returns, without waiting for an enqueue."""
        while True:
            await anyio.sleep(SPACE_CHECK_INTERVAL)
            self._check_space_returned()

    async def open(self) -> None:
        """Check the directory and database, migrate, and recover in-flight operations."""
        # 1. The directory must make writes durable before anything is accepted.
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutboxDiskFull(f"cannot create {self.path.parent}: {exc.strerror}") from exc
            raise OutboxStateDirUnusable(
                f"cannot create {self.path.parent} ([state] dir): {exc.strerror}") from exc
        with anyio.fail_after(self.config.open_timeout):
            seconds = await anyio.to_thread.run_sync(startup.fsync_self_test, self.path.parent)
        log.info("outbox.fsync_checked", extra={"fields": {"seconds": round(seconds, 4)}})

        # 2. A damaged database is renamed, never deleted, and a new one starts.
        async with anyio.create_task_group() as tasks:
            if self.extend_start_timeout is not None:
                tasks.start_soon(self._extend_while_checking)
            with anyio.fail_after(self.config.open_timeout):
                await self._check_or_move_aside()
            tasks.cancel_scope.cancel()

        # 3. Open, migrate and recover.
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await self._configure(self._db)
            before, after = await migrate(self._db)
            if before != after:
                log.info("outbox.migrated", extra={"fields": {"from": before, "to": after}})
            recovered = await self._reset_in_flight()
            self.memory_claims.clear()
            await self._load_counters()
            self._reader = await aiosqlite.connect(f"file:{self.path}?mode=ro", uri=True,
                                                   isolation_level=None)
            await self._reader.execute("PRAGMA query_only = ON")
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self.close()
            if isinstance(exc, sqlite3.Error) and startup.is_disk_full(exc, self.path.parent):
                raise OutboxDiskFull(f"file system of {self.path.parent} is full ({exc})"
                                     ) from exc
            raise
        log.info("outbox.opened", extra={"fields": {
            "path": str(self.path), "undelivered": self._undelivered,
            "recovered_in_flight": recovered}})

    async def close(self) -> None:
        """Close both connections once the shielded reads and writes in progress end.

        Those keep running after their caller was cancelled, so closing under them
        would fail them with "no active connection". After CLOSE_WAIT it closes anyway.
        """
        with anyio.move_on_after(CLOSE_WAIT) as waiting:
            async with self.write_lock, self.read_lock:
                await self._close_connections()
        if waiting.cancelled_caught:
            await self._close_connections()

    async def _close_connections(self) -> None:
        for connection in (self._reader, self._db):
            if connection is not None:
                await connection.close()
        self._reader = self._db = None

    async def _extend_while_checking(self) -> None:
        assert self.extend_start_timeout is not None
        while True:
            self.extend_start_timeout(30.0)
            await anyio.sleep(10)

    async def _check_or_move_aside(self) -> None:
        if not self.path.exists():
            return
        problem = await startup.check_integrity(self.path)
        if problem is None:
            return

        target = await anyio.to_thread.run_sync(startup.move_aside, self.path)
        self.moved_aside = target
        message = (f"outbox database {self.path} failed its integrity check ({problem}); "
                   f"moved it aside to {target} and started an empty one. Operations in "
                   "the old file are not replayed; recover them from it by hand")
        log.error("outbox.corrupt", extra={"fields": {
            "path": str(self.path), "moved_to": str(target), "problem": problem}})
        self.on_alert("outbox_corrupt", message)

    async def _configure(self, db: aiosqlite.Connection) -> None:
        async with db.execute("PRAGMA journal_mode = WAL") as cursor:
            row = await cursor.fetchone()
        if not row or str(row[0]).lower() != "wal":
            raise OutboxError(f"cannot switch {self.path} to WAL mode (got {row!r}); the "
                              "state directory must be on a local file system")
        await db.execute("PRAGMA synchronous = FULL")
        # Both return a row, which is read so that no statement stays active.
        await db.execute_fetchall(
            f"PRAGMA journal_size_limit = {int(self.config.wal_max_bytes)}")
        await db.execute_fetchall(
            f"PRAGMA busy_timeout = {int(self.config.write_timeout * 1000)}")

    async def _reset_in_flight(self) -> int:
        """Return operations left in flight by a crash to pending.

        They count as attempted, so the walacor sink looks their key up before it
        submits again; postgres statements are idempotent, so a replay changes nothing.
        """
        db = self._writer()
        cursor = await db.execute(
            "UPDATE operations SET state = 'pending', attempts = attempts + 1, "
            "last_error = 'interrupted: in flight when walacord stopped', updated_at = ? "
            "WHERE state = 'in_flight'", (time.time(),))
        return cursor.rowcount

    async def _load_counters(self) -> None:
        db = self._writer()
        rows = await db.execute_fetchall(
            "SELECT count(*), coalesce(sum(size), 0) FROM operations WHERE state != 'done'")
        self._undelivered, self._undelivered_bytes = next(iter(rows))
        rows = await db.execute_fetchall("SELECT coalesce(max(id), 0) FROM operations")
        self._last_id = next(iter(rows))[0]

    def _writer(self) -> aiosqlite.Connection:
        if self._db is None:
            raise self._not_open_error()
        return self._db

    def _read(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise self._not_open_error()
        return self._reader

    def _not_open_error(self) -> OutboxError:
        if self.starting or self.unavailable is not None:
            return self._not_running_error()
        return OutboxError("the outbox store is not open")

    # --- capacity -----------------------------------------------------------------

    @property
    def full(self) -> bool:
        """True while new operations are rejected for capacity, a full disk or an
        unusable state directory."""
        return self.disk_full or self.unavailable is not None or self._over_capacity(1, 1)

    @property
    def full_reason(self) -> str | None:
        """Return why new operations are rejected, as the mode's reason, or None."""
        if self.disk_full:
            return (f"The outbox rejects new operations because the file system of "
                    f"{self.path.parent} is full.")
        if self.unavailable is not None:
            return f"The outbox rejects new operations because {self.unavailable}."
        if self._over_capacity(1, 1):
            return ("The outbox is full and rejects new operations until sync drains it or "
                    "its capacity is raised.")
        return None

    def _over_capacity(self, count: int, size: int) -> bool:
        return (self._undelivered + count > self.config.max_operations
                or self._undelivered_bytes + size > self.config.max_bytes)

    def _next_id(self, now: float) -> int:
        # Milliseconds since the epoch in the high bits keep ids in time order; the
        # max() keeps them strictly increasing when the clock steps back.
        self._last_id = max(int(now * 1000) << 20, self._last_id + 1)
        return self._last_id

    # --- enqueue (group commit) ---------------------------------------------------

    async def enqueue(self, operations: Sequence[NewOperation]) -> list[EnqueueResult]:
        """Store `operations` durably, all or none; return the stored operation per key.

        A key already stored returns the existing operation with created=False.
        Raise OutboxFull, OutboxDiskFull or OutboxError, in which case nothing of this
        call was stored. After TimeoutError the commit may still complete, so the
        caller enqueues the same keys again to learn their state.
        """
        (outcome,) = await self.enqueue_each([operations])
        if isinstance(outcome, OutboxError):
            raise outcome
        return outcome

    async def enqueue_each(self, batches: Sequence[Sequence[NewOperation]]
                           ) -> list[list[EnqueueResult] | OutboxError]:
        """Enqueue each batch as `enqueue()` would, with one deadline for all of them.

        Return per batch its results, or the OutboxError that rejected it. The
        batches reach the writer together, so they usually share one commit, but each
        is accepted or rejected on its own. Raise OutboxError when the store is not
        running or stops before the writer took the batches, and TimeoutError as
        `enqueue()` does.
        """
        future: asyncio.Future[Outcomes | OutboxError | TimeoutError] = \
            asyncio.get_running_loop().create_future()

        def wake(outcome: Outcomes | OutboxError | TimeoutError) -> None:
            if not future.done():  # done when the caller was cancelled
                future.set_result(outcome)

        self.submit_each(batches, wake)
        outcome = await future
        if isinstance(outcome, OutboxError | TimeoutError):
            raise outcome
        return outcome

    def submit_each(self, batches: Sequence[Sequence[NewOperation]],
                    on_done: SubmitCallback, *, timeout: float | None = None) -> None:
        """Queue each batch as `enqueue_each()` does, and call `on_done` with the outcome
        instead of waiting for it.

        `on_done` gets the outcomes, or the OutboxError or TimeoutError that
        `enqueue_each()` would raise. It runs on the event loop, from this call when
        no batch has operations or the store is not running, else from the writer or
        the expiry task. `timeout` in seconds replaces `write_timeout` when shorter.
        """
        if not self._running:
            on_done(self._not_running_error())
            return
        write_timeout = self.config.write_timeout
        seconds = write_timeout if timeout is None else min(timeout, write_timeout)
        # The asyncio loop's clock is anyio.current_time(), without its backend lookup.
        completion = _Completion([], asyncio.get_running_loop().time() + seconds,
                                 partial(self._finish_submission, on_done, seconds))
        requests = completion.requests
        queue = self._queue
        for operations in batches:
            if operations:
                request = _Request(operations, completion)
                requests.append(request)
                queue.append(request)
                completion.remaining += 1
            else:
                requests.append(None)
        if not completion.remaining:
            completion.end()
            return
        self._submitted += 1
        heapq.heappush(self._waiting, (completion.deadline, self._submitted, completion))
        if self._expiry_idle is not None:
            self._expiry_idle.set()
            self._expiry_idle = None
        wakeup = self._writer_wakeup
        if wakeup is not None and not wakeup.done() and len(queue) >= self._wake_at:
            wakeup.set_result(None)

    def _finish_submission(self, on_done: SubmitCallback, seconds: float,
                           completion: _Completion) -> None:
        if completion.stopped:
            on_done(OutboxError("the outbox store stopped before it stored the operations; "
                                "enqueue the same keys again once walacord runs, to learn "
                                "their state"))
            return
        if completion.expired:
            on_done(TimeoutError(f"enqueue not committed within {seconds:g}s; enqueue "
                                 "the same keys again to learn their state"))
            return

        outcomes: Outcomes = []
        for request in completion.requests:
            if request is None:
                outcomes.append([])
            elif request.error is None:
                outcomes.append(request.results)
            else:
                if self.metrics is not None:
                    self.metrics.outbox_rejected.labels(
                        reason=type(request.error).__name__).inc()
                outcomes.append(request.error)
        on_done(outcomes)

    async def _expire_loop(self) -> None:
        """Wake the callers of enqueues that are still waiting after `write_timeout`."""
        interval = min(EXPIRY_CHECK_INTERVAL, self.config.write_timeout / 4)
        waiting = self._waiting
        while True:
            if not waiting:
                # Nothing to expire: sleep until a submission arrives, so an idle
                # daemon does not wake four times a second for nothing.
                self._expiry_idle = idle = anyio.Event()
                await idle.wait()
            await anyio.sleep(interval)
            now = anyio.current_time()
            while waiting and (waiting[0][2].done or waiting[0][0] <= now):
                completion = heapq.heappop(waiting)[2]
                if not completion.done:
                    completion.expired = True
                    completion.end()

    def _stop_waiting(self) -> None:
        """Wake every caller still waiting, because no writer will finish its enqueue."""
        while self._waiting:
            completion = heapq.heappop(self._waiting)[2]
            if not completion.done:
                completion.stopped = True
                completion.end()
        self._queue.clear()

    async def _write_loop(self) -> None:
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            if not queue:
                self._writer_wakeup = loop.create_future()
                try:
                    await self._writer_wakeup
                finally:
                    self._writer_wakeup = None
                continue
            if len(queue) < self._expected_requests and self.config.commit_delay > 0:
                await self._wait_for_callers(loop)
            first = queue.popleft()
            batch, count = [first], len(first.operations)
            while queue and count < self.config.max_batch:
                request = queue.popleft()
                batch.append(request)
                count += len(request.operations)

            finished = False
            try:
                # The lock is usually free. Taking it at once skips the yield to the
                # event loop that `writing()` makes on every acquire.
                try:
                    self.write_lock.acquire_nowait()
                except anyio.WouldBlock:
                    await self.write_lock.acquire()
                try:
                    began = loop.time()
                    with anyio.CancelScope(shield=True):
                        await self._commit(batch)
                    if self.metrics is not None:
                        self.metrics.outbox_commit_duration.observe(loop.time() - began)
                finally:
                    self.write_lock.release()
                finished = True
            finally:
                for request in batch:
                    if not finished:
                        # Cancelled while waiting for the write lock (the commit
                        # itself is shielded): nothing was stored for these callers.
                        request.completion.stopped = True
                    request.completion.finish_one()
            self._expected_requests = len(batch) + len(queue)
            self._last_commit_end = loop.time()

    async def _wait_for_callers(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait until the queue contains as many requests as the last commit expects, at
        most until `commit_delay` after that commit acknowledged its callers.

        Callers that wait for each acknowledgement before they send again, such as
        clients without pipelining, split into two groups that take turns: one group
        sends while the other's commit runs, so each commit carries half of them. An
        acknowledged caller usually sends again within a few hundred microseconds, so
        waiting that long joins both groups into one commit, which halves the commits
        and their CPU time. A lone caller is never delayed, because the last commit
        then expects only that caller.
        """
        deadline = self._last_commit_end + self.config.commit_delay
        if loop.time() >= deadline:
            return
        wakeup = self._writer_wakeup = loop.create_future()
        self._wake_at = self._expected_requests
        timer = loop.call_at(deadline, _wake, wakeup)
        try:
            await wakeup
        finally:
            timer.cancel()
            self._writer_wakeup = None
            self._wake_at = 1

    async def _commit(self, batch: list[_Request]) -> None:
        """Write a batch in one transaction: one INSERT, or BEGIN, one INSERT per chunk
        and COMMIT.

        Keys are assumed new. A batch of up to INSERT_CHUNK operations is first tried as
        one INSERT in autocommit mode, which SQLite commits (with synchronous=FULL,
        durably) before the call returns, so the common case waits for SQLite's thread
        once, whatever the batch size. That INSERT fails as a whole when a key is
        already stored. The batch then goes through a transaction whose INSERTs skip
        stored keys, and the skipped keys are read back and checked for conflicts
        before COMMIT, so a rejected request's rows are never committed.
        """
        db = self._writer()
        now = time.time()
        plan = _Plan()
        planned = plan.operations
        accepted: list[_Request] = []
        try:
            for request in batch:
                if await self._plan(db, request, plan, now):
                    accepted.append(request)
            if not planned:
                return

            rows = [(op.id, op.key, op.sink, op.target, op.payload, len(op.payload),
                     op.ordering_key, now, now) for op in planned.values()]
            chunks = [rows[start:start + INSERT_CHUNK]
                      for start in range(0, len(rows), INSERT_CHUNK)]
            inserted: set[str] | None = None
            # One INSERT is its own transaction, which SQLite rolls back when it fails.
            # An open transaction here means that a writer did not end its own. BEGIN
            # then fails, instead of this INSERT joining that transaction uncommitted.
            if len(chunks) == 1 and not db.in_transaction:
                try:
                    await db.execute_fetchall(*self._insert_statement(chunks[0],
                                                                      skip_stored=False))
                    inserted = set(planned)
                except sqlite3.IntegrityError:
                    pass  # a key is already stored; nothing was committed
            in_transaction = inserted is None
            if inserted is None:
                # Several chunks need BEGIN and COMMIT around them, or an earlier chunk
                # would stay committed after a later one failed.
                statements = [("BEGIN IMMEDIATE", ()),
                              *(self._insert_statement(chunk) for chunk in chunks)]
                results = (await execute_in_order(db, statements))[1:]
                inserted = {row[0] for result in results for row in result}
            skipped = [key for key in planned if key not in inserted]
            existing = await self._existing(db, skipped) if skipped else {}
            rejected = self._conflicts(accepted, existing) if existing else []
            if rejected:
                # A rejected request stores nothing, so its new rows are deleted again
                # before COMMIT.
                inserted -= await self._withdraw(db, rejected, inserted)
                accepted = [request for request in accepted if request not in rejected]
            if in_transaction:
                await db.execute("COMMIT")
        except sqlite3.Error as exc:
            await self._rollback_quietly(db)
            error = self._write_error(exc)
            for request in accepted:
                request.error, request.results = error, []
            return

        # Keys that were stored before this batch resolve to the stored operation.
        for request in accepted if existing else ():
            request.results = [
                EnqueueResult(existing[r.operation.key], created=False)
                if r.operation.key in existing else r for r in request.results]
        added = [planned[key] for key in inserted]
        self.commits += 1
        self._check_space_returned()
        self._undelivered += len(added)
        self._undelivered_bytes += (plan.size if len(added) == len(planned)
                                    else sum(len(op.payload) for op in added))
        if self.metrics is not None:
            self.metrics.outbox_enqueued.inc(len(added))

    async def _plan(self, db: aiosqlite.Connection, request: _Request, plan: _Plan,
                    now: float) -> bool:
        """Give the request's new keys ids in `plan`; return False when it is rejected.

        Keys already planned by an earlier request of the batch resolve to that
        operation. A request that does not fit is checked against the stored keys
        before it is rejected, so re-enqueueing a stored key works while full.
        """
        planned = plan.operations
        own: dict[str, Operation] = {}
        own_size = 0
        results: list[EnqueueResult] = []
        for new in request.operations:
            earlier = planned.get(new.key) or own.get(new.key)
            if earlier is not None:
                if self._conflicts([request], {new.key: earlier},
                                   same_request=new.key in own):
                    return False
                results.append(EnqueueResult(earlier, created=False))
                continue
            operation = Operation(
                id=self._next_id(now), key=new.key, sink=new.sink, target=new.target,
                payload=new.payload, ordering_key=new.ordering_key, created_at=now,
                attempts=0, next_attempt_at=0.0, last_error=None, state=State.PENDING,
                receipt=None, updated_at=now)
            own[new.key] = operation
            own_size += len(new.payload)
            results.append(EnqueueResult(operation, created=True))

        count = len(planned) + len(own)
        size = plan.size + own_size
        if own and self._over_capacity(count, size):
            stored = await self._existing(db, list(own))
            if self._conflicts([request], stored):
                return False
            fresh = {key: op for key, op in own.items() if key not in stored}
            size -= sum(len(op.payload) for key, op in own.items() if key in stored)
            fresh_size = size - plan.size
            if (len(fresh) > self.config.max_operations
                    or fresh_size > self.config.max_bytes):
                # Not even an empty outbox has room for it, so it tells nothing about
                # the backlog. No alert and no emergency mode follow.
                request.error = OutboxRequestTooLarge(
                    f"this request has {len(fresh)} new "
                    f"operation{'' if len(fresh) == 1 else 's'} with {fresh_size} "
                    "payload bytes, more than the outbox holds in all (limits "
                    f"{self.config.max_operations} operations and {self.config.max_bytes} "
                    "bytes: outbox.max_operations, outbox.max_bytes); nothing was accepted. "
                    + ("Raise outbox.max_bytes, or shrink the payload" if len(fresh) == 1
                       else "Split it into smaller requests, or raise those limits"))
                return False
            if fresh and self._over_capacity(len(planned) + len(fresh), size):
                request.error = OutboxFull(
                    f"outbox is full ({self._undelivered + len(planned)} undelivered "
                    f"operations, {self._undelivered_bytes} bytes; limits "
                    f"{self.config.max_operations} and {self.config.max_bytes}); nothing "
                    "was accepted. Restore the sinks so the backlog drains, or raise "
                    "outbox.max_operations / outbox.max_bytes")
                self._alert_full(request.error)
                return False
            results = [EnqueueResult(stored[r.operation.key], created=False)
                       if r.operation.key in stored else r for r in results]
            own = fresh
            own_size = size - plan.size

        planned.update(own)
        plan.size += own_size
        request.results = results
        return True

    def _conflicts(self, accepted: list[_Request], existing: dict[str, Operation], *,
                   same_request: bool = False) -> list[_Request]:
        """Set OutboxConflict on requests that reuse a stored key with other content, or,
        with `same_request`, a key of an earlier operation in the same request."""
        rejected: list[_Request] = []
        for request in accepted:
            for new in request.operations:
                stored = existing.get(new.key)
                if stored is None:
                    continue
                differs = [name for name, ours, theirs in (
                    ("sink", new.sink, stored.sink), ("target", new.target, stored.target),
                    ("payload", new.payload, stored.payload),
                    ("ordering key", new.ordering_key, stored.ordering_key)) if ours != theirs]
                if not differs:
                    continue
                if same_request:
                    request.error = OutboxConflict(
                        f"key {new.key!r} appears more than once in this request, with a "
                        f"different {_join_names(differs)}; nothing of this request was "
                        "accepted. Give each operation its own key")
                else:
                    request.error = OutboxConflict(
                        f"key {new.key!r} is already stored (operation {stored.id}) with a "
                        f"different {_join_names(differs)}; nothing of this request was "
                        "accepted. Use a new key for a different operation")
                request.results = []
                rejected.append(request)
                break
        return rejected

    async def _withdraw(self, db: aiosqlite.Connection, rejected: list[_Request],
                        inserted: set[str]) -> set[str]:
        """Delete the rows that rejected requests added in the open transaction; return
        their keys."""
        keys = {new.key for request in rejected for new in request.operations} & inserted
        if not keys:
            return keys
        params = (orjson.dumps(sorted(keys)).decode(),)
        await execute_in_order(db, [
            ("DELETE FROM operations WHERE key IN (SELECT value FROM json_each(?))", params),
            ("UPDATE counters SET value = value - ? WHERE name = 'accepted'", (len(keys),))])
        return keys

    @staticmethod
    def _insert_statement(rows: list[tuple[Any, ...]], *, skip_stored: bool = True
                          ) -> tuple[str, list[Any]]:
        """Return an INSERT of `rows`. With `skip_stored` it skips keys already stored
        and lists the keys it added. Without it, a stored key fails the whole statement,
        so it lists nothing.

        RETURNING costs the SQLite thread one step per row, and each step takes the
        GIL back from the event loop, which delays the commit behind it.
        """
        values = ",".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(rows))
        clause = " ON CONFLICT (key) DO NOTHING RETURNING key" if skip_stored else ""
        return ("INSERT INTO operations (id, key, sink, target, payload, size, ordering_key, "
                f"created_at, updated_at) VALUES {values}{clause}",
                [value for row in rows for value in row])

    def _alert_full(self, error: OutboxError) -> None:
        if not self._full_alerted:
            self._full_alerted = True
            log.error("outbox.full", extra={"fields": {
                "undelivered": self._undelivered, "bytes": self._undelivered_bytes}})
            self.on_alert("outbox_full", str(error))

    def _write_error(self, exc: sqlite3.Error) -> OutboxError:
        if startup.is_disk_full(exc, self.path.parent):
            if not self.disk_full:
                self.disk_full = True
                log.error("outbox.disk_full", extra={"fields": {
                    "path": str(self.path), "error": str(exc)}})
                self.on_alert("outbox_disk_full", f"file system of {self.path.parent} is full")
            return OutboxDiskFull(f"cannot store the operation: the file system of "
                                  f"{self.path.parent} is full ({exc}); nothing was accepted. "
                                  "Free space there; enqueueing resumes by itself")
        if startup.is_corruption(exc):
            self.on_alert("outbox_corrupt", f"outbox database {self.path}: {exc}")
            return OutboxCorrupt(f"outbox database {self.path} is damaged: {exc}; restart "
                                 "walacord to move it aside")
        log.error("outbox.write_failed", extra={"fields": {"error": str(exc)}})
        return OutboxError(f"cannot store the operation in {self.path}: {exc}")

    async def _existing(self, db: aiosqlite.Connection, keys: Iterable[str]
                        ) -> dict[str, Operation]:
        found: dict[str, Operation] = {}
        keys = list(keys)
        for start in range(0, len(keys), SQL_KEYS_PER_QUERY):
            chunk = keys[start:start + SQL_KEYS_PER_QUERY]
            marks = ",".join("?" * len(chunk))
            rows = await db.execute_fetchall(
                f"SELECT {COLUMNS} FROM operations WHERE key IN ({marks})", chunk)
            for row in rows:
                found[row[1]] = row_to_operation(row, self.memory_claims)
        return found

    # --- maintenance --------------------------------------------------------------

    async def _maintenance_loop(self) -> None:
        while True:
            await anyio.sleep(self.config.compact_interval)
            try:
                await self.compact()
            except (OutboxError, sqlite3.Error) as exc:
                log.warning("outbox.compact_failed", extra={"fields": {"error": str(exc)}})

    def released(self, count: int, size: int) -> None:
        """Record that operations left the undelivered set (done or dropped)."""
        self._undelivered -= count
        self._undelivered_bytes -= size
        if self._full_alerted and not self.full:
            self._full_alerted = False
            log.info("outbox.space_available", extra={"fields": {
                "undelivered": self._undelivered, "bytes": self._undelivered_bytes}})

    def _retention(self) -> float:
        return self.config.retention


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _join_names(names: list[str]) -> str:
    """Join names as a sentence lists them: "a", "a and b", "a, b and c"."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
