"""The sync engine replays pending operations into their sinks.

Three things start a pass: `sink_healthy()` when the mode machine detects that a sink
recovered, `sync_now()` from `walacorctl sync`, and a periodic timer, which also wakes
for the earliest retry that falls due. A pass claims batches per sink until nothing is due
or the sink keeps failing. Operations with the same ordering key are applied one
after another in id order; the others run concurrently up to a limit.

Batch size follows additive-increase, multiplicative-decrease. It starts small after an
outage or a start and doubles while the failed share stays at or below the threshold.
Past the threshold it grows by the minimum, up to the maximum. A batch with more
failures halves it.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import tenacity

from walacord.config import OutboxConfig
from walacord.errors import OutboxError
from walacord.metrics import Metrics
from walacord.outbox.model import Operation, State
from walacord.outbox.queries import Outcome
from walacord.outbox.sinks import Sink
from walacord.outbox.startup import is_disk_full
from walacord.outbox.store import OutboxStore

log = logging.getLogger(__name__)


@dataclass
class Ramp:
    """The AIMD batch size of one sink."""

    minimum: int
    maximum: int
    error_ratio: float
    size: int = 0
    threshold: int = 0

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start again from the minimum, as after an outage."""
        self.size = self.minimum
        self.threshold = self.maximum

    def update(self, applied: int, failed: int) -> None:
        total = applied + failed
        if total == 0:
            return
        if failed / total <= self.error_ratio:
            grown = self.size * 2 if self.size < self.threshold else self.size + self.minimum
            self.size = min(self.maximum, grown)
        else:
            self.size = max(self.minimum, self.size // 2)
            self.threshold = self.size


@dataclass
class PassReport:
    """Counts of what one sync pass applied, retried and dead-lettered."""

    applied: int = 0
    retried: int = 0
    dead: int = 0
    by_sink: dict[str, int] = field(default_factory=dict)
    error: str | None = None  # the store error that ended the pass early, if any

    def to_json(self) -> dict[str, Any]:
        return {"applied": self.applied, "retried": self.retried, "dead": self.dead,
                "by_sink": dict(self.by_sink), "error": self.error}


def retry_delay(attempt: int, config: OutboxConfig, retry_after: float | None) -> float:
    """Return the jittered exponential delay before attempt `attempt + 1`, in seconds."""
    wait = (tenacity.wait_exponential(multiplier=config.retry_initial, max=config.retry_max)
            + tenacity.wait_random(0, config.retry_initial))
    state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
    state.attempt_number = attempt
    delay = min(float(wait(state)), config.retry_max)
    if retry_after is not None:
        delay = max(delay, min(retry_after, config.retry_max))
    return delay


class SyncEngine:
    """Replays pending operations into `sinks`; a component with `run(task_status)`."""

    def __init__(self, store: OutboxStore, sinks: Mapping[str, Sink], config: OutboxConfig,
                 *, metrics: Metrics | None = None) -> None:
        self.store = store
        self.sinks = dict(sinks)
        self.config = config
        self.metrics = metrics
        self.ramps = {name: Ramp(config.sync_batch_min, config.sync_batch_max,
                                 config.sync_error_ratio) for name in self.sinks}
        self.healthy = dict.fromkeys(self.sinks, True)
        self.last_report = PassReport()
        self._wake = anyio.Event()
        self._forced = False
        self._pass_done = anyio.Event()
        self._in_pass = False
        # Set by drain() at shutdown: no new pass starts and a running one claims no more.
        self.stopping = False
        # Outcomes applied at a sink whose state the store could not write yet (full
        # disk, I/O error). The next pass stores them before it claims anything new.
        self._unrecorded: dict[str, list[Outcome]] = {name: [] for name in self.sinks}
        self._store_failures = 0  # consecutive passes that ended on a store error
        # Sinks whose last pass could claim nothing. Their due operations, if any, wait
        # behind an earlier operation of their ordering key, so only a later retry time
        # is a reason to wake.
        self._stalled: set[str] = set()
        self._current: PassReport | None = None  # the report of the running pass

    # --- triggers -----------------------------------------------------------------

    def sink_healthy(self, name: str) -> None:
        """Called by the mode machine when `name` recovers: ramp up from a small batch."""
        if name not in self.sinks:
            return
        if not self.healthy[name]:
            self.ramps[name].reset()
        self.healthy[name] = True
        self._wake.set()

    def sink_unhealthy(self, name: str) -> None:
        """Called by the mode machine when `name` fails: timer passes skip it."""
        if name in self.sinks:
            self.healthy[name] = False

    def wake(self) -> None:
        """Start a pass soon without waiting for it."""
        self._wake.set()

    def operations_added(self, sinks: Iterable[str]) -> None:
        """Start a pass soon when a new operation's sink is healthy, so that it is
        applied at once instead of on the next timer pass."""
        healthy = self.healthy
        for name in sinks:
            if healthy.get(name, False):
                self._wake.set()
                return

    async def sync_now(self) -> PassReport:
        """Start a pass over every sink, healthy or not, and return its report.

        The caller puts the deadline around it; the pass goes on when it gives up.
        Raise OutboxError once shutdown has begun, because no pass starts after that.
        """
        if self.stopping:
            raise OutboxError("walacord is stopping; run the sync again once it has started")
        if self._in_pass:
            # The running pass may have claimed its batches already; wait for it to
            # end so that the forced pass starts after this call.
            await self._pass_done.wait()
        self._forced = True
        waiting_for = self._pass_done
        self._wake.set()
        await waiting_for.wait()
        return self.last_report

    async def drain(self) -> None:
        """Let a running pass finish its rounds and store their outcomes, and start no
        new pass or round. The supervisor bounds the wait with `drain_timeout`."""
        self.stopping = True
        if self._in_pass:
            log.info("outbox.drain_waiting", extra={"fields": {
                "applied_so_far": self._current.applied if self._current else 0}})
            await self._pass_done.wait()

    # --- loop ---------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        await self.store.check_conservation()
        task_status.started()
        while True:
            with anyio.move_on_after(await self._sleep_for()):
                await self._wake.wait()
            self._wake = anyio.Event()
            if self.stopping:
                await anyio.sleep_forever()
            forced, self._forced = self._forced, False

            self._in_pass = True
            try:
                report = await self.run_pass(forced=forced)
                if report.error is None:
                    await self.store.check_conservation()
            except (OutboxError, sqlite3.Error) as exc:
                report = self._store_failed(PassReport(), exc)
            finally:
                self._in_pass = False
            self.last_report = report
            done, self._pass_done = self._pass_done, anyio.Event()
            done.set()

    def _store_failed(self, report: PassReport, exc: Exception) -> PassReport:
        """Log and count a store error that ended a pass, so the next pass waits a backoff."""
        self._store_failures += 1
        report.error = f"outbox store write failed: {exc}"
        if isinstance(exc, sqlite3.Error) and is_disk_full(exc, self.store.path.parent):
            report.error += ("; the state directory's file system is full. Free space there "
                             "and replay resumes by itself")
        if self.metrics is not None:
            self.metrics.outbox_store_errors.inc()
        log.error("outbox.sync_store_failed", extra={"fields": {
            "error": str(exc), "consecutive": self._store_failures,
            "unrecorded": sum(len(outcomes) for outcomes in self._unrecorded.values())}})
        return report

    async def _sleep_for(self) -> float:
        """Return seconds until the timer or the earliest due retry, whichever is first.

        After a pass that ended on a store error, wait the retry backoff instead, so a
        full disk costs one log line per backoff step.
        """
        if self._store_failures:
            return retry_delay(self._store_failures, self.config, None)
        delay: float = self.config.sync_interval
        for name in self.sinks:
            try:
                due = await self.store.next_due(
                    name, after=time.time() if name in self._stalled else None)
            except sqlite3.Error as exc:
                log.warning("outbox.next_due_failed", extra={"fields": {
                    "sink": name, "error": str(exc)}})
                return delay
            if due is not None:
                delay = min(delay, max(0.0, due - time.time()))
        return delay

    async def run_pass(self, *, forced: bool = False) -> PassReport:
        """Apply due operations of each sink until none is due or the sink fails."""
        report = self._current = PassReport()
        try:
            for name, sink in self.sinks.items():
                if forced or self.healthy[name]:
                    await self._drain_sink(name, sink, report)
        except (OutboxError, sqlite3.Error) as exc:
            return self._store_failed(report, exc)
        self._store_failures = 0
        if report.applied or report.dead:
            log.info("outbox.synced", extra={"fields": report.to_json()})
        return report

    async def _drain_sink(self, name: str, sink: Sink, report: PassReport) -> None:
        """Claim and apply rounds until none is due or a round applies nothing.

        While the batch size is still ramping, one round runs at a time so that each
        result steers the next size. At full size, the next round is claimed while
        the previous one is applied, so SQLite's commits overlap the sink's work.
        The outcomes of a round are stored in the transaction of the next claim, and
        those left when the loop ends are stored on their own before this returns.

        A store error stops the claims, lets the running rounds finish and is raised
        after them. Their outcomes stay in `self._unrecorded` for the next pass, and
        the operations stay in flight meanwhile, so nothing is claimed twice.
        """
        ramp = self.ramps[name]
        rounds = anyio.CapacityLimiter(1)
        failing = False
        self._stalled.add(name)
        unrecorded = self._unrecorded[name]
        store_error: OutboxError | sqlite3.Error | None = None

        async def apply_round(operations: list[Operation], token: object) -> None:
            nonlocal failing
            try:
                outcomes = await self._apply_round(sink, operations)
                unrecorded.extend(outcomes)
            finally:
                rounds.release_on_behalf_of(token)
            applied, failed = self._count(report, name, outcomes)
            ramp.update(applied, failed)
            rounds.total_tokens = 2 if ramp.size >= ramp.maximum else 1
            if self.metrics is not None:
                self.metrics.outbox_batch_size.labels(sink=name).set(ramp.size)
            if applied == 0:
                failing = True  # the sink is failing; backoff decides when to try again

        try:
            async with anyio.create_task_group() as tasks:
                while not failing and not self.stopping:
                    token = object()
                    await rounds.acquire_on_behalf_of(token)
                    if failing:
                        rounds.release_on_behalf_of(token)
                        break
                    try:
                        operations = await self.store.claim(
                            name, ramp.size, time.time(), record=unrecorded,
                            durable=sink.durable_claims)
                    except (OutboxError, sqlite3.Error) as exc:
                        store_error = exc
                        rounds.release_on_behalf_of(token)
                        break
                    except BaseException:
                        rounds.release_on_behalf_of(token)
                        raise
                    if not operations:
                        rounds.release_on_behalf_of(token)
                        break
                    self._stalled.discard(name)
                    tasks.start_soon(apply_round, operations, token)
        finally:
            # Shielded, so a cancelled pass still stores what its sink applied instead
            # of leaving it in flight until a restart; bounded by the write deadline.
            with anyio.move_on_after(self.config.write_timeout, shield=True):
                stored = list(unrecorded)
                try:
                    await self.store.record(stored)
                except (OutboxError, sqlite3.Error) as exc:
                    store_error = store_error or exc
                else:
                    del unrecorded[:len(stored)]
        if store_error is not None:
            raise store_error

    def _count(self, report: PassReport, name: str, outcomes: list[Outcome]
               ) -> tuple[int, int]:
        """Add `outcomes` to the report; return how many were applied and how many
        attempted ones failed (retried or dead)."""
        applied = dead = retried = 0
        for outcome in outcomes:
            state = outcome.state
            if state is State.DONE:
                applied += 1
            elif state is State.DEAD:
                dead += 1
            elif outcome.attempted:
                retried += 1
        report.applied += applied
        report.dead += dead
        report.retried += retried
        if applied:
            report.by_sink[name] = report.by_sink.get(name, 0) + applied
        return applied, dead + retried

    # --- applying -----------------------------------------------------------------

    async def _apply_round(self, sink: Sink, operations: list[Operation]) -> list[Outcome]:
        chains: dict[str, list[Operation]] = {}
        singles: list[Operation] = []
        for operation in operations:
            if operation.ordering_key:
                chains.setdefault(operation.ordering_key, []).append(operation)
            else:
                singles.append(operation)

        outcomes: list[Outcome] = []
        if len(singles) > 1:
            singles = await self._try_batch(sink, singles, outcomes)

        limiter = anyio.CapacityLimiter(self.config.sync_concurrency)
        async with anyio.create_task_group() as tasks:
            for operation in singles:
                tasks.start_soon(self._apply_chain, sink, [operation], limiter, outcomes)
            for chain in chains.values():
                tasks.start_soon(self._apply_chain, sink, chain, limiter, outcomes)
        return outcomes

    async def _try_batch(self, sink: Sink, operations: list[Operation],
                         outcomes: list[Outcome]) -> list[Operation]:
        """Apply all in one call; return the operations left to apply one by one."""
        try:
            results = await sink.apply_batch(operations)
        except Exception as exc:
            # Part of the batch may be stored: every operation counts as attempted,
            # so its retry looks its key up first.
            results = [exc for _ in operations]

        first = results[0] if results else None
        if (isinstance(first, dict) and len(results) == len(operations)
                and all(result is first for result in results)):
            # The whole batch applied and shares one receipt, as the postgres sink's does.
            done = State.DONE
            outcomes.extend([Outcome(operation, done, first) for operation in operations])
            return []

        left: list[Operation] = []
        for operation, result in zip(operations, results, strict=True):
            if result is None:
                left.append(operation)
            elif isinstance(result, Exception):
                outcomes.append(self._failed(sink, operation, result))
            else:
                outcomes.append(Outcome(operation, State.DONE, receipt=result))
        if left:
            log.info("outbox.batch_split", extra={"fields": {
                "sink": sink.name, "size": len(operations), "one_by_one": len(left)}})
        return left

    async def _apply_chain(self, sink: Sink, chain: list[Operation],
                           limiter: anyio.CapacityLimiter, outcomes: list[Outcome]) -> None:
        async with limiter:
            for index, operation in enumerate(chain):
                outcome = await self._apply_one(sink, operation)
                outcomes.append(outcome)
                if outcome.state is not State.DONE:
                    # Later operations with this key wait for this one.
                    outcomes.extend(Outcome(op, State.PENDING, attempted=False,
                                            next_attempt_at=op.next_attempt_at,
                                            error=op.last_error)
                                    for op in chain[index + 1:])
                    return

    async def _apply_one(self, sink: Sink, operation: Operation) -> Outcome:
        try:
            receipt = await sink.apply(operation)
        except Exception as exc:
            return self._failed(sink, operation, exc)
        return Outcome(operation, State.DONE, receipt=receipt)

    def _failed(self, sink: Sink, operation: Operation, exc: Exception) -> Outcome:
        failure = sink.classify(exc)
        attempts = operation.attempts + 1
        if self.metrics is not None:
            self.metrics.outbox_sync_errors.labels(sink=sink.name, reason=failure.reason).inc()

        if failure.permanent and attempts >= self.config.dead_after_attempts:
            log.error("outbox.dead", extra={"fields": {
                "id": operation.id, "key": operation.key, "sink": sink.name,
                "attempts": attempts, "error": str(failure)}})
            return Outcome(operation, State.DEAD, error=str(failure))

        delay = retry_delay(attempts, self.config, failure.retry_after)
        if failure.schema_pending:
            # The operation id is left out, so the log's repeat filter collapses the
            # warnings of every operation that waits for the same table or column.
            log.warning("outbox.waiting_for_schema", extra={"fields": {
                "sink": sink.name, "statement": operation.target, "error": str(failure),
                "action": "run the migration that creates it, or fix the statement"}})
        log.debug("outbox.retry_scheduled", extra={"fields": {
            "id": operation.id, "sink": sink.name, "attempt": attempts,
            "wait": round(delay, 3), "error": str(failure)}})
        return Outcome(operation, State.PENDING, error=str(failure),
                       next_attempt_at=time.time() + delay)


