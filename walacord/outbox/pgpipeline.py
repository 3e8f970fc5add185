"""Run many rows of named statements in one PostgreSQL transaction through libpq's pipeline.

psycopg's `executemany` spends about 10 µs of CPU per row (psycopg 3.3, 500 rows per
transaction, on the 2-core benchmark machine): it adapts the parameters, consults its
prepared-statement cache and flushes the socket for every row. Here the parameters of
all rows are adapted first, then BEGIN, one Parse per parameter-type signature, one
Bind/Execute per row and COMMIT go into libpq's output buffer, followed by a single
Sync. The server receives the same protocol messages as from `executemany` in
pipeline mode, and the client spends about 4 µs per row in the same measurement.

Only `PGconn`, the documented libpq-level interface of a psycopg connection, is used
below psycopg's public API.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import psycopg
from psycopg import abc, errors, pq
from psycopg.adapt import PyFormat, Transformer

# psycopg's placeholders: %(name)s, %(name)b, %(name)t, a positional %s/%b/%t, and
# "%%" for a literal percent.
_PLACEHOLDER = re.compile(r"%%|%\((?P<name>[^)]+)\)(?P<fmt>[sbt])|%[sbt]")
_FORMATS = {"s": PyFormat.AUTO, "b": PyFormat.BINARY, "t": PyFormat.TEXT}
_OK = frozenset({pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK})


@dataclass(frozen=True)
class CompiledStatement:
    """A statement with psycopg's named placeholders rewritten to $1, $2, ..."""

    sql: str  # with $n placeholders
    names: tuple[str, ...]  # the parameter name of $1, $2, ...
    formats: tuple[PyFormat, ...]


@functools.lru_cache(maxsize=256)
def compile_statement(sql: str) -> CompiledStatement:
    """Rewrite `sql`'s named placeholders as psycopg would; raise ProgrammingError when
    it has a positional one, because the parameters are a mapping."""
    names: list[str] = []
    formats: list[PyFormat] = []
    numbers: dict[str, int] = {}

    def replace(match: re.Match[str]) -> str:
        text = match.group(0)
        if text == "%%":
            return "%"
        name = match["name"]
        if name is None:
            raise psycopg.ProgrammingError(
                f"statement {sql!r} has a positional placeholder {text}; outbox "
                "statements take named ones, such as %(key)s")
        requested = _FORMATS[match["fmt"]]
        if name not in numbers:
            names.append(name)
            formats.append(requested)
            numbers[name] = len(names)
        elif formats[numbers[name] - 1] is not requested:
            raise psycopg.ProgrammingError(
                f"statement {sql!r} uses placeholder {name!r} with different formats")
        return f"${numbers[name]}"

    rewritten = _PLACEHOLDER.sub(replace, sql)
    return CompiledStatement(rewritten, tuple(names), tuple(formats))


# One row's parameter types, adapted values and formats.
_Row = tuple[tuple[int, ...], Sequence[Any], Sequence[int]]


def _adapt(transformer: abc.Transformer, statement: CompiledStatement,
           rows: Sequence[Mapping[str, Any]]) -> list[_Row]:
    """Adapt every row's parameters; raise ProgrammingError for a missing one, or
    psycopg's error for a value that it cannot adapt."""
    adapted: list[_Row] = []
    append = adapted.append
    formats = statement.formats
    names = statement.names
    single = len(names) == 1  # itemgetter of one name returns the bare value
    values_of = operator.itemgetter(*names) if names else None
    dump = transformer.dump_sequence
    for row in rows:
        try:
            values = () if values_of is None else values_of(row)
        except KeyError as exc:
            raise psycopg.ProgrammingError(f"query parameter missing: {exc.args[0]}") from None
        if single:
            values = (values,)
        dumped = dump(values, formats)
        append((transformer.types or (), dumped, transformer.formats or ()))
    return adapted


async def execute_batch(conn: psycopg.AsyncConnection[Any],
                        groups: Sequence[tuple[CompiledStatement, Sequence[Mapping[str, Any]]]]
                        ) -> None:
    """Run each statement once per parameter row, all in one transaction.

    The caller must hold the connection alone, and it must be idle. Raise the first
    statement error as the psycopg exception of its SQLSTATE, after which nothing of
    the batch is committed. Any other failure, cancellation included, closes the
    connection, because its pipeline state is unknown, so a pool replaces it.
    """
    transformer = Transformer(conn)
    encoding = conn.info.encoding
    # Adapt all rows before anything is sent, so a bad value leaves the connection idle.
    adapted = [(statement.sql.encode(encoding), _adapt(transformer, statement, rows))
               for statement, rows in groups]

    pgconn = conn.pgconn
    try:
        pgconn.enter_pipeline_mode()
        pgconn.send_query_params(b"BEGIN", None)
        for sql, rows in adapted:
            types: tuple[int, ...] | None = None
            for row_types, values, formats in rows:
                if row_types != types:
                    # The unnamed statement is parsed again when the types change, as
                    # psycopg prepares one statement per type signature.
                    types = row_types
                    pgconn.send_prepare(b"", sql, param_types=types)
                pgconn.send_query_prepared(b"", values, param_formats=formats)
        pgconn.send_query_params(b"COMMIT", None)
        pgconn.pipeline_sync()
        await _flush(pgconn)
        error = await _read_until_sync(pgconn, encoding)
        pgconn.exit_pipeline_mode()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await conn.close()
        raise
    if error is not None:
        # The failed BEGIN block stays open after the Sync until it is rolled back.
        await conn.rollback()
        raise error


async def _flush(pgconn: pq.abc.PGconn) -> None:
    """Send libpq's output buffer, and read results meanwhile, so that the server does
    not stall on a full socket while the batch is still being sent."""
    while pgconn.flush():
        async with anyio.create_task_group() as tasks:

            async def wait(ready: Any) -> None:
                await ready(pgconn.socket)
                tasks.cancel_scope.cancel()

            tasks.start_soon(wait, anyio.wait_writable)
            tasks.start_soon(wait, anyio.wait_readable)
        pgconn.consume_input()


async def _read_until_sync(pgconn: pq.abc.PGconn, encoding: str) -> psycopg.Error | None:
    """Consume results up to the pipeline's Sync; return the first statement error."""
    error: psycopg.Error | None = None
    sync_status, aborted_status = pq.ExecStatus.PIPELINE_SYNC, pq.ExecStatus.PIPELINE_ABORTED
    while True:
        pgconn.consume_input()
        while not pgconn.is_busy():
            result = pgconn.get_result()
            if result is None:
                continue  # the end of one statement's results
            status = result.status
            if status == sync_status:
                return error
            if status in _OK or status == aborted_status:
                continue
            if error is None:
                error = _result_error(result, encoding)
        await anyio.wait_readable(pgconn.socket)


def _result_error(result: pq.abc.PGresult, encoding: str) -> psycopg.Error:
    """Build the psycopg exception of the result's SQLSTATE, with the server's message."""
    message = (result.error_message or b"statement failed").decode(encoding, "replace")
    sqlstate = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
    # An SQLSTATE that psycopg does not know falls back to its class ("23000" for
    # "23xyz"), whose exception has the class's SQLSTATE.
    for code in (sqlstate, sqlstate[:2] + "000"):
        try:
            return errors.lookup(code)(message.strip())
        except KeyError:
            continue
    return psycopg.DatabaseError(message.strip())
