"""Sinks apply an outbox operation to its backend, each through an exactly-once path.

- walacor: the client's `submit_once` looks the idempotency key up before any retry
  whose outcome is unknown, so a replay finds the record instead of adding a second.
- postgres: only statements named in config run, and each must be idempotent (an
  INSERT ... ON CONFLICT or a MERGE), so a replay after a crash changes nothing.

`classify()` turns an exception into a `Failure`. Permanent failures, such as a 4xx
validation error or an SQL error in the statement or its data, go dead after the
configured number of attempts. Transient ones are retried with backoff.

A statement whose table or column does not exist yet (SQLSTATE 42P01 or 42703) counts
as transient. During a deploy the application may enqueue operations before the
migration that creates the table has run, and those operations should wait for it.
They are retried with backoff for as long as it takes. `outbox list` shows the error,
`walacord_outbox_sync_errors_total` counts it by SQLSTATE, and the pending-age alert
fires when the wait exceeds its threshold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import orjson
import psycopg
from psycopg_pool import PoolTimeout

from walacord.config import OutboxStatement
from walacord.errors import WalacorError
from walacord.outbox.model import KEY_PARAMETER, Operation
from walacord.outbox.pgpipeline import compile_statement, execute_batch
from walacord.walacor.results import StoredRecord

# Walacor error reasons that repeat however often the same record is sent.
PERMANENT_WALACOR_REASONS = frozenset({"validation"})
# SQLSTATE classes that a retry may clear: connection, transaction rollback
# (serialization failure, deadlock), insufficient resources, operator intervention
# (shutdown, cancel), system error, lock timeouts ("55P03" in class 55), and
# read_only_sql_transaction ("25006"), which a standby or a database set read-only
# raises until the primary is back or the setting is undone.
TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57", "58", "XX"})
TRANSIENT_SQLSTATES = frozenset({"55P03", "55006", "25006"})
# undefined_table and undefined_column: the statement runs ahead of the migration that
# creates its table or column. A table in a schema that does not exist is 42P01 too
# (checked with PostgreSQL 15).
SCHEMA_PENDING_SQLSTATES = frozenset({"42P01", "42703"})


@dataclass(frozen=True)
class Failure:
    """The reason an apply failed, and whether a retry can succeed."""

    reason: str
    message: str
    permanent: bool
    retry_after: float | None = None
    # True when the statement's table or column does not exist yet (transient).
    schema_pending: bool = False

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


# Per operation of a batch: its receipt, the error that failed it, or None when the
# batch failed as a whole and the operation must be applied on its own.
BatchResult = dict[str, Any] | Exception | None


class Sink(Protocol):
    """A backend that operations are applied to."""

    name: str
    # True when a replay after a lost claim needs the claim's attempt count, so the
    # claim is written to SQLite and survives a crash. False keeps claims in memory,
    # which saves SQLite a write of every row (see OutboxQueries.claim).
    durable_claims: bool

    async def apply(self, operation: Operation) -> dict[str, Any]:
        """Apply one operation and return its receipt; raise on failure."""
        ...

    async def apply_batch(self, operations: Sequence[Operation]) -> list[BatchResult]:
        """Apply several operations in one call; return one BatchResult per operation."""
        ...

    def classify(self, exc: Exception) -> Failure: ...


class WalacorClientLike(Protocol):
    key_field: str

    async def submit_once(self, etid: int, record: Mapping[str, Any], key: str, *,
                          check_first: bool = False) -> StoredRecord: ...

    async def submit_many_once(self, etid: int, items: Sequence[tuple[str, Mapping[str, Any]]],
                               *, check_first: bool = False) -> list[StoredRecord]: ...


def _receipt(stored: StoredRecord) -> dict[str, Any]:
    return {"uid": stored.uid, "eid": stored.eid, "adopted": stored.adopted}


def _tried_before(operation: Operation) -> bool:
    """Return whether an earlier submit of `operation` may have reached Walacor.

    attempts counts tries, and a crash restart counts one found in flight. `walacorctl
    outbox retry` sets attempts back to 0 but keeps last_error, so an error means a try
    too, and that try may have stored the record before its response was lost.
    """
    return operation.attempts > 0 or operation.last_error is not None


class WalacorSink:
    """Submits each operation as one record of its ETId through the exactly-once client.

    The client puts the key into the record's key field. An operation tried before
    is looked up by key first, so an earlier submit whose response was lost is adopted,
    not repeated (see `_tried_before`).
    """

    name = "walacor"
    # A replay looks the key up first only for an operation counted as attempted.
    durable_claims = True

    def __init__(self, client: WalacorClientLike, *, timeout: float) -> None:
        self.client = client
        self.timeout = timeout

    async def apply(self, operation: Operation) -> dict[str, Any]:
        with anyio.fail_after(self.timeout):
            stored = await self.client.submit_once(
                int(operation.target), operation.data(), operation.key,
                check_first=_tried_before(operation))
        return _receipt(stored)

    async def apply_batch(self, operations: Sequence[Operation]) -> list[BatchResult]:
        """Submit operations as one envelope per ETId.

        A group whose envelope was rejected as invalid stored nothing, so its
        operations get None and the caller applies them one by one to find the bad one.
        A group that failed otherwise may have been stored: its operations get the
        error and are retried later with a key lookup first.
        """
        groups: dict[str, list[Operation]] = {}
        for operation in operations:
            groups.setdefault(operation.target, []).append(operation)

        results: dict[int, BatchResult] = {}
        with anyio.fail_after(self.timeout):
            for etid, group in groups.items():
                try:
                    stored = await self.client.submit_many_once(
                        int(etid), [(op.key, op.data()) for op in group],
                        check_first=any(_tried_before(op) for op in group))
                except WalacorError as exc:
                    one_by_one = self.classify(exc).permanent and not exc.maybe_committed
                    results.update((op.id, None if one_by_one else exc) for op in group)
                    continue
                for op, record in zip(group, stored, strict=True):
                    results[op.id] = _receipt(record)
        return [results[op.id] for op in operations]

    def classify(self, exc: Exception) -> Failure:
        if isinstance(exc, WalacorError):
            reason = str(getattr(exc, "reason", "error"))
            return Failure(reason, str(exc), permanent=reason in PERMANENT_WALACOR_REASONS,
                           retry_after=getattr(exc, "retry_after", None))
        if isinstance(exc, TimeoutError):
            return Failure("timeout", f"no answer within {self.timeout:g}s", permanent=False)
        return Failure(type(exc).__name__, str(exc), permanent=False)


def _parameters(operation: Operation) -> dict[str, Any]:
    """Return the statement parameters: the params plus the operation's key as `key`."""
    params = operation.data()
    # Enqueue rejects a params.key that differs, so setdefault only fills a missing one.
    params.setdefault(KEY_PARAMETER, operation.key)
    return params


def _parameter_rows(operations: Sequence[Operation]) -> list[dict[str, Any]]:
    """Return `_parameters` of each operation, without a call per operation."""
    loads = orjson.loads
    rows: list[dict[str, Any]] = []
    for operation in operations:
        params = loads(operation.payload)
        if not isinstance(params, dict):
            raise TypeError(f"operation {operation.id} has a payload that is not a JSON "
                            "object")
        params.setdefault(KEY_PARAMETER, operation.key)
        rows.append(params)
    return rows


class ConnectionSource(Protocol):
    """The source of the postgres sink's connections: a psycopg_pool pool, or the
    daemon's `SinkPool`, which can be paused."""

    def connection(self, timeout: float | None = None
                   ) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]: ...


class PostgresSink:
    """Runs the operation's named statement with its payload as parameters."""

    name = "postgres"
    # Statements are idempotent, so a replay is harmless whatever the attempt count.
    durable_claims = False

    def __init__(self, pool: ConnectionSource,
                 statements: Mapping[str, OutboxStatement], *, timeout: float) -> None:
        self.pool = pool
        self.statements = statements
        self.timeout = timeout

    def _sql(self, operation: Operation) -> str:
        statement = self.statements.get(operation.target)
        if statement is None:
            raise LookupError(f"statement {operation.target!r} is no longer in the "
                              "configuration; add it back under [outbox.statements]")
        return statement.sql

    async def apply(self, operation: Operation) -> dict[str, Any]:
        sql = self._sql(operation)
        with anyio.fail_after(self.timeout):
            async with self.pool.connection(timeout=self.timeout) as conn, conn.transaction():
                cursor = await conn.execute(sql, _parameters(operation))
                return {"rowcount": cursor.rowcount}

    async def apply_batch(self, operations: Sequence[Operation]) -> list[BatchResult]:
        """Apply operations in one pipelined transaction (see `pgpipeline`), all or none.

        When the transaction fails for a permanent reason, or because a table or
        column does not exist yet, every operation gets None. The caller then applies
        them one by one, so only the operations of that statement fail and the others
        are applied. Any other transient failure is returned for every operation.
        """
        groups: dict[str, list[Operation]] = {}
        for operation in operations:
            groups.setdefault(operation.target, []).append(operation)

        try:
            statements = [(compile_statement(self._sql(group[0])),
                           _parameter_rows(group)) for group in groups.values()]
            with anyio.fail_after(self.timeout):
                async with self.pool.connection(timeout=self.timeout) as conn:
                    await execute_batch(conn, statements)
        except (psycopg.Error, LookupError, TimeoutError, PoolTimeout) as exc:
            failure = self.classify(exc)
            if failure.permanent or failure.schema_pending:
                return [None for _ in operations]
            return [exc for _ in operations]
        receipt = {"batch": len(operations)}
        return [receipt for _ in operations]

    def classify(self, exc: Exception) -> Failure:
        if isinstance(exc, TimeoutError | PoolTimeout):
            return Failure("timeout", f"no result within {self.timeout:g}s", permanent=False)
        if isinstance(exc, LookupError):
            return Failure("statement", str(exc), permanent=True)
        if isinstance(exc, psycopg.Error):
            sqlstate = exc.sqlstate or ""
            if not sqlstate:
                # No SQLSTATE: a connection failure (OperationalError, InterfaceError) is
                # transient. Any other error comes from psycopg itself, such as a
                # parameter that the payload lacks (ProgrammingError) or a value that
                # cannot be sent (DataError), and repeats on every attempt.
                transient = isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
                return Failure("connection" if transient else "statement", str(exc).strip(),
                               permanent=not transient)
            schema_pending = sqlstate in SCHEMA_PENDING_SQLSTATES
            transient = (sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES
                         or sqlstate in TRANSIENT_SQLSTATES or schema_pending)
            return Failure(f"sqlstate {sqlstate}", str(exc).strip(), permanent=not transient,
                           schema_pending=schema_pending)
        return Failure(type(exc).__name__, str(exc), permanent=False)
