"""Sinks apply an outbox operation to its backend, each through an exactly-once path.

- walacor: the client's `submit_once` looks the idempotency key up before any retry
  whose outcome is unknown, so a replay finds the record instead of adding a second.
- postgres: only statements named in config run, and each must be idempotent (an
  INSERT ... ON CONFLICT or a MERGE), so a replay after a crash changes nothing.

`classify()` turns an exception into a `Failure`: permanent failures (a 4xx validation
error, an SQL error in the statement or its data) go dead after the configured number
of attempts; transient ones are retried with backoff.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from walacord.config import OutboxStatement
from walacord.errors import WalacorError
from walacord.outbox.model import Operation

# Walacor error reasons that repeat however often the same record is sent.
PERMANENT_WALACOR_REASONS = frozenset({"validation"})
# SQLSTATE classes that a retry may clear: connection, transaction rollback
# (serialization failure, deadlock), insufficient resources, operator intervention
# (shutdown, cancel), system error, and lock timeouts ("55P03" in class 55).
TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57", "58", "XX"})
TRANSIENT_SQLSTATES = frozenset({"55P03", "55006"})


@dataclass(frozen=True)
class Failure:
    """Why an apply failed, and whether a retry can succeed."""

    reason: str
    message: str
    permanent: bool
    retry_after: float | None = None

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class Sink(Protocol):
    """A backend that operations are applied to."""

    name: str

    async def apply(self, operation: Operation) -> dict[str, Any]:
        """Apply one operation and return its receipt; raise on failure."""
        ...

    def classify(self, exc: Exception) -> Failure: ...


class WalacorClientLike(Protocol):
    async def submit_once(self, etid: int, record: dict[str, Any], key: str) -> Any: ...


class WalacorSink:
    """Submits each operation as one record of its ETId through `submit_once`."""

    name = "walacor"

    def __init__(self, client: WalacorClientLike, *, key_field: str, timeout: float) -> None:
        self.client = client
        self.key_field = key_field
        self.timeout = timeout

    async def apply(self, operation: Operation) -> dict[str, Any]:
        record = operation.data()
        record[self.key_field] = operation.key
        with anyio.fail_after(self.timeout):
            receipt = await self.client.submit_once(int(operation.target), record,
                                                    operation.key)
        return {"eid": receipt.eid, "uids": list(receipt.uids)}

    def classify(self, exc: Exception) -> Failure:
        if isinstance(exc, WalacorError):
            reason = str(getattr(exc, "reason", "error"))
            return Failure(reason, str(exc), permanent=reason in PERMANENT_WALACOR_REASONS,
                           retry_after=getattr(exc, "retry_after", None))
        if isinstance(exc, TimeoutError):
            return Failure("timeout", f"no answer within {self.timeout:g}s", permanent=False)
        return Failure(type(exc).__name__, str(exc), permanent=False)


class PostgresSink:
    """Runs the operation's named statement with its payload as parameters."""

    name = "postgres"

    def __init__(self, pool: AsyncConnectionPool[Any],
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
                cursor = await conn.execute(sql, operation.data())
                return {"rowcount": cursor.rowcount}

    async def apply_batch(self, operations: Sequence[Operation]) -> list[dict[str, Any]]:
        """Apply operations in one transaction, one executemany per statement, all or none.

        The caller falls back to `apply()` one by one when this raises, so one bad
        operation does not hold back the rest.
        """
        groups: dict[str, list[Operation]] = {}
        for operation in operations:
            groups.setdefault(operation.target, []).append(operation)

        with anyio.fail_after(self.timeout):
            async with self.pool.connection(timeout=self.timeout) as conn, conn.transaction():
                for group in groups.values():
                    async with conn.cursor() as cursor:
                        await cursor.executemany(self._sql(group[0]),
                                                 [op.data() for op in group])
        return [{"batch": len(operations)} for _ in operations]

    def classify(self, exc: Exception) -> Failure:
        if isinstance(exc, TimeoutError | PoolTimeout):
            return Failure("timeout", f"no result within {self.timeout:g}s", permanent=False)
        if isinstance(exc, LookupError):
            return Failure("statement", str(exc), permanent=True)
        if isinstance(exc, psycopg.Error):
            sqlstate = exc.sqlstate or ""
            if not sqlstate:
                # No SQLSTATE: a connection failure is transient, a parameter that the
                # payload lacks (ProgrammingError) is not.
                permanent = isinstance(exc, psycopg.ProgrammingError)
                return Failure("statement" if permanent else "connection", str(exc).strip(),
                               permanent=permanent)
            transient = (sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES
                         or sqlstate in TRANSIENT_SQLSTATES)
            return Failure(f"sqlstate {sqlstate}", str(exc).strip(), permanent=not transient)
        return Failure(type(exc).__name__, str(exc), permanent=False)
