"""Schemas and envelope rows of the Walacor emulator, in memory or in an SQLite file.

Every row version is kept. `fromSummary` queries read the latest version of each
row through lazily built equality indexes, so key lookups stay fast with many rows.
With a state file, each submit is written and committed before the response is sent.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiosqlite
import orjson

from walacord.emulator.validation import condition_problem, record_problem

# Envelope type that carries schema definitions; custom envelope types start here.
SCHEMA_ETID = 50
MIN_CUSTOM_ETID = 10000
# ES returned for every accepted envelope. The real meaning of ES is undocumented.
ENVELOPE_STATUS = 80
DATA_TYPES = {"TEXT", "INTEGER", "DECIMAL", "BOOLEAN", "DATETIME(EPOCH)", "ARRAY"}
SYSTEM_FIELDS = ("UID", "EId", "CreatedAt", "UpdatedAt", "IsDeleted", "SV")

_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS schemas (etid INTEGER, sv INTEGER, body BLOB, PRIMARY KEY (etid, sv));
CREATE TABLE IF NOT EXISTS row_versions (seq INTEGER PRIMARY KEY, etid INTEGER, body BLOB);
"""


class StoreError(Exception):
    """A request the store rejects; `status` and `reason` go into the error body."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


def _index_key(value: Any) -> tuple[bool, Any] | None:
    """Return a hashable index key that keeps True apart from 1, or None for lists and objects."""
    if isinstance(value, list | dict):
        return None
    return (isinstance(value, bool), value)


def _same(actual: Any, expected: Any) -> bool:
    """Compare JSON values the way JSON does: True is not 1, and 1 equals 1.0."""
    if isinstance(actual, bool) or isinstance(expected, bool):
        return actual is expected
    return bool(actual == expected)


def _is_operators(expected: Any) -> bool:
    return isinstance(expected, dict) and any(key.startswith("$") for key in expected)


def _matches(row: Mapping[str, Any], condition: Mapping[str, Any]) -> bool:
    """Evaluate a condition that passed `condition_problem`: equality, `$eq` and `$in`."""
    for field, expected in condition.items():
        actual = row.get(field)
        if not _is_operators(expected):
            if not _same(actual, expected):
                return False
            continue
        for operator, argument in expected.items():
            if operator == "$eq" and not _same(actual, argument):
                return False
            if operator == "$in" and not any(_same(actual, o) for o in argument):
                return False
    return True


def _check_condition(condition: Mapping[str, Any]) -> None:
    problem = condition_problem(condition)
    if problem is not None:
        raise StoreError(400, "validation", problem)


class Store:
    """Envelope types and rows; `open()` loads an SQLite state file when one is set."""

    def __init__(self, state_path: str | None = None) -> None:
        self.state_path = state_path
        self.schemas: dict[int, dict[str, Any]] = {}
        self.latest: dict[int, dict[str, dict[str, Any]]] = {}
        self.history: dict[int, list[dict[str, Any]]] = {}
        # etid -> field -> index key -> UIDs (a dict used as an ordered set)
        self._indexes: dict[int, dict[str, dict[Any, dict[str, None]]]] = {}
        self._db: aiosqlite.Connection | None = None
        # One write transaction at a time: aiosqlite shares one connection, and the
        # in-memory state must change in the same order as the file.
        self._write_lock = asyncio.Lock()

    async def open(self) -> None:
        if self.state_path is None:
            return
        self._db = await aiosqlite.connect(self.state_path)
        await self._db.executescript(_SCHEMA_SQL)
        await self._db.commit()
        async with self._db.execute("SELECT body FROM schemas ORDER BY etid, sv") as cursor:
            async for (body,) in cursor:
                entry = orjson.loads(body)
                self.schemas[entry["ETId"]] = entry
        async with self._db.execute("SELECT etid, body FROM row_versions ORDER BY seq") as cursor:
            async for etid, body in cursor:
                self._apply_version(etid, orjson.loads(body))

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def record_count(self) -> int:
        return sum(len(rows) for rows in self.latest.values())

    def envelope_types(self) -> list[dict[str, Any]]:
        types = [{"ETId": SCHEMA_ETID, "TableName": "schemas", "SV": 1}]
        for etid, entry in sorted(self.schemas.items()):
            types.append({"ETId": etid, "TableName": entry["TableName"], "SV": entry["SV"]})
        return types

    # --- writes -----------------------------------------------------------------

    async def create_schema(self, sv: Any, schema: Any) -> tuple[str, str]:
        """Validate and store one schema version; return its (EId, UID)."""
        if not isinstance(schema, dict):
            raise StoreError(400, "validation", "Schema must be an object")
        etid = schema.get("ETId")
        if not isinstance(etid, int) or isinstance(etid, bool) or etid < MIN_CUSTOM_ETID:
            raise StoreError(
                400, "validation", f"Schema.ETId must be an integer >= {MIN_CUSTOM_ETID}"
            )
        if not isinstance(sv, int) or sv < 1:
            raise StoreError(400, "validation", "SV must be a positive integer")
        if not isinstance(schema.get("TableName"), str) or not schema["TableName"]:
            raise StoreError(400, "validation", "Schema.TableName is required")
        fields = schema.get("Fields")
        if not isinstance(fields, list):
            raise StoreError(400, "validation", "Schema.Fields must be a list")
        for field in fields:
            if not isinstance(field, dict) or not isinstance(field.get("FieldName"), str):
                raise StoreError(400, "validation", "each field needs a FieldName")
            if field.get("DataType") not in DATA_TYPES:
                raise StoreError(
                    400,
                    "validation",
                    f"field {field['FieldName']}: DataType must be one of {sorted(DATA_TYPES)}",
                )

        entry = {**schema, "ETId": etid, "SV": sv}
        eid, uid = str(uuid.uuid4()), str(uuid.uuid4())
        await asyncio.shield(self._store_schema(etid, sv, entry))
        return eid, uid

    async def _store_schema(self, etid: int, sv: int, entry: dict[str, Any]) -> None:
        # Shielded by the caller: a client that disconnects cancels its handler, and a
        # cancellation between the commit and the in-memory change would leave the file
        # ahead of what the API serves until the next restart.
        async with self._write_lock:
            if self._db is not None:
                await self._db.execute(
                    "INSERT OR REPLACE INTO schemas VALUES (?, ?, ?)",
                    (etid, sv, orjson.dumps(entry)),
                )
                await self._db.commit()
            self.schemas[etid] = entry

    async def submit(
        self, etid: int, records: Sequence[Any], sv: int | None
    ) -> tuple[str, list[str]]:
        """Validate, store and commit one envelope; return its EId and one UID per record."""
        schema = self.schemas.get(etid)
        if schema is None:
            raise StoreError(
                400, "validation", f"no schema for ETId {etid}: create one with POST /api/schemas/"
            )
        return await asyncio.shield(self._store_envelope(etid, schema, records, sv))

    async def _store_envelope(
        self, etid: int, schema: Mapping[str, Any], records: Sequence[Any], sv: int | None
    ) -> tuple[str, list[str]]:
        # Shielded by submit(), for the reason _store_schema gives.
        async with self._write_lock:
            now = int(time.time() * 1000)
            eid = str(uuid.uuid4())
            version = sv if sv is not None else schema["SV"]
            versions = [
                self._new_version(etid, schema, record, eid, now, version) for record in records
            ]
            if self._db is not None:
                await self._db.executemany(
                    "INSERT INTO row_versions (etid, body) VALUES (?, ?)",
                    [(etid, orjson.dumps(v)) for v in versions],
                )
                await self._db.commit()
            for version_row in versions:
                self._apply_version(etid, version_row)
        return eid, [v["UID"] for v in versions]

    def _new_version(
        self, etid: int, schema: Mapping[str, Any], record: Any, eid: str, now: int, sv: int
    ) -> dict[str, Any]:
        if not isinstance(record, dict):
            raise StoreError(400, "validation", "each item of Data must be an object")
        uid = record.get("UID")
        previous = None
        if uid is not None:
            previous = self.latest.get(etid, {}).get(uid)
            if previous is None:
                raise StoreError(404, "not_found", f"no row with UID {uid} in ETId {etid}")
        problem = record_problem(schema, record, new_row=previous is None)
        if problem is not None:
            raise StoreError(400, "validation", problem)

        row = {**previous} if previous is not None else {}
        row.update(record)
        row["UID"] = uid if uid is not None else str(uuid.uuid4())
        row["EId"] = eid
        row["CreatedAt"] = previous["CreatedAt"] if previous is not None else now
        row["UpdatedAt"] = now
        row["IsDeleted"] = bool(record.get("IsDeleted", row.get("IsDeleted", False)))
        row["SV"] = sv
        return row

    def _apply_version(self, etid: int, row: dict[str, Any]) -> None:
        self.history.setdefault(etid, []).append(row)
        latest = self.latest.setdefault(etid, {})
        uid = row["UID"]
        old = latest.get(uid)
        latest[uid] = row
        for field, index in self._indexes.get(etid, {}).items():
            if old is not None:
                old_key = _index_key(old.get(field))
                if old_key is not None:
                    index.get(old_key, {}).pop(uid, None)
            new_key = _index_key(row.get(field))
            if new_key is not None:
                index.setdefault(new_key, {})[uid] = None

    # --- reads ------------------------------------------------------------------

    def query(
        self, etid: int, condition: Mapping[str, Any], *, from_summary: bool
    ) -> list[dict[str, Any]]:
        """Return rows matching an equality (or `$in`) condition, in insertion order."""
        _check_condition(condition)
        if not from_summary:
            return [r for r in self.history.get(etid, []) if _matches(r, condition)]

        latest = self.latest.get(etid, {})
        for field, expected in condition.items():
            candidates = self._candidates(etid, field, expected)
            if candidates is not None:
                rows = (latest[uid] for uid in candidates if uid in latest)
                return sorted(
                    (r for r in rows if _matches(r, condition)),
                    key=lambda r: (r["CreatedAt"], r["UID"]),
                )
        return [r for r in latest.values() if _matches(r, condition)]

    def _candidates(self, etid: int, field: str, expected: Any) -> list[str] | None:
        if _is_operators(expected):
            if set(expected) != {"$in"}:
                return None  # filter with _matches instead of the index
            options = expected["$in"]
        else:
            options = [expected]
        if not isinstance(options, list):
            return None
        keys = [_index_key(o) for o in options]
        if any(k is None for k in keys):
            return None
        index = self._index(etid, field)
        seen: dict[str, None] = {}
        for key in keys:
            seen.update(index.get(key, {}))
        return list(seen)

    def _index(self, etid: int, field: str) -> dict[Any, dict[str, None]]:
        by_field = self._indexes.setdefault(etid, {})
        index = by_field.get(field)
        if index is None:
            index = {}
            for uid, row in self.latest.get(etid, {}).items():
                key = _index_key(row.get(field))
                if key is not None:
                    index.setdefault(key, {})[uid] = None
            by_field[field] = index
        return index

    def aggregate(self, etid: int, pipeline: Sequence[Any]) -> tuple[list[dict[str, Any]], int]:
        """Run the `$match`, `$sort`, `$skip` and `$limit` stages; return rows and the
        number of rows before `$skip` and `$limit`."""
        rows: list[dict[str, Any]] | None = None
        total: int | None = None
        for stage in pipeline:
            if not isinstance(stage, dict) or len(stage) != 1:
                raise StoreError(400, "validation", "each pipeline stage must be a one-key object")
            ((name, argument),) = stage.items()
            if name == "$match" and isinstance(argument, dict):
                if rows is None:
                    rows = self.query(etid, argument, from_summary=True)
                else:
                    _check_condition(argument)
                    rows = [r for r in rows if _matches(r, argument)]
                continue
            if rows is None:
                rows = list(self.latest.get(etid, {}).values())
            if name == "$sort" and isinstance(argument, dict):
                for field, direction in reversed(list(argument.items())):
                    rows.sort(key=_field_sort_key(field), reverse=direction == -1)
            elif name in ("$skip", "$limit"):
                _check_count_stage(name, argument)
                if total is None:
                    total = len(rows)
                rows = rows[argument:] if name == "$skip" else rows[:argument]
            else:
                raise StoreError(
                    400,
                    "validation",
                    f"unsupported pipeline stage {name}: the emulator "
                    "supports $match (equality, $eq, $in), $sort, $skip and $limit",
                )
        if rows is None:
            rows = list(self.latest.get(etid, {}).values())
        return rows, total if total is not None else len(rows)


def _check_count_stage(name: str, argument: Any) -> None:
    """Reject a `$skip` below 0 or a `$limit` below 1, as MongoDB does."""
    minimum = 1 if name == "$limit" else 0
    if isinstance(argument, int) and not isinstance(argument, bool) and argument >= minimum:
        return
    expected = "a positive integer" if minimum else "0 or a positive integer"
    raise StoreError(400, "validation", f"invalid {name} {argument!r}: must be {expected}")


def _field_sort_key(field: str) -> Callable[[Mapping[str, Any]], tuple[int, Any]]:
    def key(row: Mapping[str, Any]) -> tuple[int, Any]:
        return _sort_key(row.get(field))

    return key


def _sort_key(value: Any) -> tuple[int, Any]:
    """Order None first, then numbers, then everything else as text."""
    if value is None:
        return (0, 0)
    if isinstance(value, int | float):
        return (1, value)
    return (2, str(value))
