"""Outbox operations: their states, the stored row and validation of new operations.

An operation is one write the application hands to walacord for a sink: a Walacor
record of an ETId, or a named PostgreSQL statement with its parameters. The caller's
idempotency key makes the enqueue and the sink write happen at most once per key.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from walacord.errors import OutboxInvalidOperation
from walacord.jsonkeys import duplicate_key
from walacord.numbers import inexact_number

# Most operations one list or export request returns; callers page for more.
MAX_PAGE = 10_000

SINKS = ("walacor", "postgres")
# The fields an operation of each sink may have; any other is rejected.
WALACOR_FIELDS = frozenset({"sink", "key", "etid", "data", "ordering_key"})
POSTGRES_FIELDS = frozenset({"sink", "key", "statement", "params", "ordering_key"})
MAX_KEY_LENGTH = 256
# psycopg's named placeholders %(name)s, %(name)b and %(name)t; "%%" is a literal percent.
_PLACEHOLDER = re.compile(r"%%|%\((?P<name>[^)]+)\)[sbt]")
# The parameter every postgres statement receives: the operation's idempotency key.
KEY_PARAMETER = "key"
# The record field in which the walacor sink stores the key, unless configured otherwise.
DEFAULT_KEY_FIELD = "walacord_key"


@functools.cache
def statement_parameters(sql: str) -> frozenset[str]:
    """Return the names of the named placeholders in `sql`."""
    return frozenset(match["name"] for match in _PLACEHOLDER.finditer(sql) if match["name"])


class State(enum.StrEnum):
    """Operation state; the values are stored in SQLite and shown to operators."""

    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    DONE = "done"
    DEAD = "dead"


@dataclass(frozen=True)
class NewOperation:
    """A validated operation before the store gives it an id."""

    key: str
    sink: str
    target: str  # the ETId for walacor, the statement name for postgres
    payload: bytes  # a JSON object, as orjson wrote it
    ordering_key: str | None = None


@dataclass(slots=True)
class Operation:
    """One stored operation.

    Not frozen: a frozen dataclass sets each field through object.__setattr__, which
    made building the rows of a claim a large share of the drain's CPU time.
    """

    id: int
    key: str
    sink: str
    target: str
    payload: bytes
    ordering_key: str | None
    created_at: float  # Unix time
    attempts: int
    next_attempt_at: float  # Unix time, so that a backoff survives a restart
    last_error: str | None
    state: State
    receipt: dict[str, Any] | None
    updated_at: float

    def data(self) -> dict[str, Any]:
        value = orjson.loads(self.payload)
        assert isinstance(value, dict)
        return value

    def to_json(self, *, with_payload: bool = True) -> dict[str, Any]:
        """Return the operation as the control channel shows it."""
        shown: dict[str, Any] = {
            "id": self.id,
            "key": self.key,
            "sink": self.sink,
            "target": self.target,
            "ordering_key": self.ordering_key,
            "created_at": self.created_at,
            "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at,
            "last_error": self.last_error,
            "state": self.state.value,
            "receipt": self.receipt,
            "updated_at": self.updated_at,
        }
        if with_payload:
            shown["payload"] = self.data()
        return shown


def parse_operation(
    raw: object, *, statements: Mapping[str, object], max_bytes: int,
    key_field: str = DEFAULT_KEY_FIELD,
) -> NewOperation:
    """Validate one operation as the control channel receives it.

    Two forms are accepted: `{"sink": "walacor", "etid": N, "key": K, "data": {...}}` and
    `{"sink": "postgres", "statement": NAME, "key": K, "params": {...}}`, each with an
    optional `ordering_key`. `key_field` is the record field in which the walacor sink
    stores the key (`[walacor] key_field`). Raise OutboxInvalidOperation naming the
    field at fault.
    """
    if not isinstance(raw, dict):
        raise OutboxInvalidOperation("operation", "expected a JSON object")

    sink = raw.get("sink")
    if sink not in SINKS:
        raise OutboxInvalidOperation("sink", f"unknown sink {sink!r}; use one of: "
                                     f"{', '.join(SINKS)}")

    key = raw.get("key")
    if key is None or key == "":
        raise OutboxInvalidOperation("key", "missing idempotency key; pass a non-empty string")
    if not isinstance(key, str):
        raise OutboxInvalidOperation("key", f"key is {type(key).__name__} {key!r}; pass it as "
                                     f"a string, e.g. \"{key}\"")
    if len(key) > MAX_KEY_LENGTH:
        raise OutboxInvalidOperation("key", f"key is {len(key)} characters long; the "
                                     f"maximum is {MAX_KEY_LENGTH}")
    if "\0" in key:
        # PostgreSQL text cannot store it, neither in a target table nor in a query.
        raise OutboxInvalidOperation("key", f"key {key!r} contains the character U+0000 "
                                     "(NUL); remove it")

    ordering_key = raw.get("ordering_key")
    if ordering_key is not None and (not isinstance(ordering_key, str) or not ordering_key):
        raise OutboxInvalidOperation("ordering_key", "expected a non-empty string or null")

    if sink == "walacor":
        target, payload_field = _walacor_target(raw), "data"
    else:
        target, payload_field = _postgres_target(raw, statements), "params"

    value, payload = _payload(raw, payload_field, max_bytes)
    if sink == "postgres":
        _check_parameters(target, statements[target], value, key)
        if b"\\u0000" in payload:
            _reject_nul(value, "params")
    elif key_field in value and value[key_field] != key:
        raise OutboxInvalidOperation(
            f"data.{key_field}", f"data.{key_field} is {value[key_field]!r} but the "
            f"operation's key is {key!r}; walacord stores the operation's key in the "
            f"record's {key_field!r} field ([walacor] key_field), so omit it from data or "
            "give the same value")
    fields = WALACOR_FIELDS if sink == "walacor" else POSTGRES_FIELDS
    if not fields.issuperset(raw):
        unknown = sorted(set(raw) - fields)
        # A misspelt optional field, such as "ordering_kye", would otherwise be dropped.
        raise OutboxInvalidOperation(unknown[0], f"unknown field {unknown[0]!r}; a {sink} "
                                     f"operation has {', '.join(sorted(fields))}")
    return NewOperation(key=key, sink=str(sink), target=target, payload=payload,
                        ordering_key=ordering_key)


def _walacor_target(raw: dict[str, Any]) -> str:
    etid = raw.get("etid")
    if etid is None:
        raise OutboxInvalidOperation("etid", "missing ETId: a walacor operation needs the "
                                     "envelope type's positive integer id (--etid N, or "
                                     "\"etid\" in JSON)")
    if isinstance(etid, bool) or not isinstance(etid, int) or etid <= 0:
        raise OutboxInvalidOperation("etid", f"expected a positive integer ETId, got {etid!r}")
    return str(etid)


def _postgres_target(raw: dict[str, Any], statements: Mapping[str, object]) -> str:
    name = raw.get("statement")
    if not isinstance(name, str) or not name:
        raise OutboxInvalidOperation("statement", "missing statement name")
    if name not in statements:
        known = ", ".join(sorted(statements)) or "none configured"
        raise OutboxInvalidOperation("statement", f"unknown statement {name!r} (configured: "
                                     f"{known}); add it under [outbox.statements.{name}]")
    return name


def _check_parameters(name: str, statement: object, params: dict[str, Any], key: str) -> None:
    """Reject params that lack a placeholder of the statement or give another key.

    The sink passes the operation's key as the parameter `key`, so params may omit it.
    """
    if KEY_PARAMETER in params and params[KEY_PARAMETER] != key:
        raise OutboxInvalidOperation(
            f"params.{KEY_PARAMETER}", f"params.key is {params[KEY_PARAMETER]!r} but the "
            f"operation's key is {key!r}; statement {name!r} receives the operation's key "
            "as the parameter key, so omit params.key or give the same value")

    sql = getattr(statement, "sql", None)
    if not isinstance(sql, str):
        return
    missing = sorted(statement_parameters(sql) - params.keys() - {KEY_PARAMETER})
    if missing:
        raise OutboxInvalidOperation(
            "params", f"missing parameter(s) {', '.join(missing)} that statement {name!r} "
            "needs; add them to params")


def _reject_nul(value: Any, path: str) -> None:
    """Raise OutboxInvalidOperation for the first string in `value` (keys included) that
    contains U+0000, which PostgreSQL text cannot store, so no retry could apply it."""
    if isinstance(value, str):
        if "\0" in value:
            raise OutboxInvalidOperation(
                path, "contains the character U+0000 (NUL), which PostgreSQL text cannot "
                "store; remove it, or send the data base64-encoded for a bytea column")
    elif isinstance(value, dict):
        for name, child in value.items():
            _reject_nul(name, path)
            _reject_nul(child, f"{path}.{name}")
    elif isinstance(value, list):
        for index, child in enumerate(value):
            _reject_nul(child, f"{path}[{index}]")


def _rounded_number(value: Any, path: str) -> str | None:
    """Return the path of the first whole number at or beyond 2**63 in `value`, or None."""
    if isinstance(value, float):
        return path if value.is_integer() and abs(value) >= 2**63 else None
    if isinstance(value, dict):
        items: Iterable[tuple[str, Any]] = ((f"{path}.{k}", v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for child_path, child in items:
        found = _rounded_number(child, child_path)
        if found is not None:
            return found
    return None


def _json_type(value: Any) -> str:
    """Name the JSON type of a decoded value, as a message shows it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else type(value).__name__


def _payload(raw: dict[str, Any], field: str, max_bytes: int) -> tuple[dict[str, Any], bytes]:
    if field not in raw:
        other, sink = ("params", "walacor") if field == "data" else ("data", "postgres")
        hint = ""
        if other in raw:
            hint = f"; this operation has {other!r}, but a {sink} operation carries it in {field!r}"
        raise OutboxInvalidOperation(field, f"missing payload object{hint}")

    value = raw[field]
    if isinstance(value, str | bytes):
        problem = inexact_number(value)
        if problem is not None:
            raise OutboxInvalidOperation(field, problem)
        try:
            text, value = value, orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise OutboxInvalidOperation(field, f"payload must be a JSON object, or a string "
                                         f"that holds one; got a string that is not JSON "
                                         f"({exc})") from None
        problem = duplicate_key(text, value)
        if problem is not None:
            raise OutboxInvalidOperation(field, problem)

    if not isinstance(value, dict):
        raise OutboxInvalidOperation(field, f"payload must be a JSON object, got "
                                     f"{_json_type(value)}")

    try:
        encoded = orjson.dumps(value)
    except TypeError as exc:
        raise OutboxInvalidOperation(field, f"payload cannot be encoded as JSON: {exc}") from None

    if b"e+" in encoded:
        # orjson reads an integer beyond 64 bits as a float, which rounds it: an amount
        # must never change on its way through the outbox.
        path = _rounded_number(value, field)
        if path is not None:
            raise OutboxInvalidOperation(path, "a number too large to store "
                                         "exactly: beyond the 64-bit integer range, JSON "
                                         "numbers lose digits. Send it as a string")

    if len(encoded) > max_bytes:
        raise OutboxInvalidOperation(field, f"payload is {len(encoded)} bytes; the maximum is "
                                     f"{max_bytes} (outbox.max_operation_bytes)")
    return value, encoded
