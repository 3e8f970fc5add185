"""Checks the emulator applies to submitted records and to query filters.

Walacor rejects a record whose field does not match its schema's DataType, and a
filter it cannot evaluate, with a 400 validation error. The emulator does the same,
so a client bug shows up in tests instead of as silently stored or missed rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# Operators a `$match` stage or a query/get filter may use inside a field's condition.
FILTER_OPERATORS = ("$eq", "$in")

_TYPE_NAMES = {
    "TEXT": "a string",
    "INTEGER": "an integer",
    "DECIMAL": "a number",
    "BOOLEAN": "true or false",
    "DATETIME(EPOCH)": "an integer number of milliseconds since the Unix epoch",
    "ARRAY": "an array",
}


def _has_type(data_type: str, value: Any) -> bool:
    if data_type == "TEXT":
        return isinstance(value, str)
    if data_type in ("INTEGER", "DATETIME(EPOCH)"):
        return isinstance(value, int) and not isinstance(value, bool)
    if data_type == "DECIMAL":
        return (isinstance(value, int | float) and not isinstance(value, bool)
                and math.isfinite(value))
    if data_type == "BOOLEAN":
        return isinstance(value, bool)
    if data_type == "ARRAY":
        return isinstance(value, list)
    return True


def _describe(value: Any) -> str:
    kind = {str: "string", bool: "boolean", int: "integer", float: "number", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text[:40]}{'...' if len(text) > 40 else ''}"


def record_problem(schema: Mapping[str, Any], record: Mapping[str, Any], *,
                   new_row: bool) -> str | None:
    """Return a message naming the first field of `record` that breaks `schema`, or None.

    A required field must be present and not null in a new row, and may not be set to
    null by an update. A null in an optional field is accepted as "no value".
    """
    for field in schema.get("Fields", []):
        name = field["FieldName"]
        required = bool(field.get("Required"))
        if name not in record:
            if required and new_row:
                return f"required field {name} is missing"
            continue
        value = record[name]
        if value is None:
            if required:
                return f"required field {name} is null"
            continue

        data_type = field.get("DataType", "")
        if not _has_type(data_type, value):
            return (f"field {name} is {data_type} and expects "
                    f"{_TYPE_NAMES.get(data_type, data_type)}, got {_describe(value)}")
        limit = field.get("MaxLength")
        if isinstance(value, str) and isinstance(limit, int) and 0 < limit < len(value):
            return (f"field {name} is longer than its MaxLength {limit} "
                    f"({len(value)} characters)")
    return None


def condition_problem(condition: Mapping[str, Any]) -> str | None:
    """Return a message when a filter uses an operator the emulator cannot evaluate.

    A field's condition is a value to compare for equality, or an object of operators
    when any of its keys starts with "$". Only FILTER_OPERATORS are supported, and `$in`
    takes an array.
    """
    for field, expected in condition.items():
        if field.startswith("$"):
            return (f"unsupported query operator {field}: the emulator supports "
                    f"equality and {', '.join(FILTER_OPERATORS)} on fields")
        if not isinstance(expected, dict) or not any(k.startswith("$") for k in expected):
            continue
        for operator, argument in expected.items():
            if operator not in FILTER_OPERATORS:
                return (f"unsupported query operator {operator} on field {field}: "
                        f"the emulator supports equality and "
                        f"{', '.join(FILTER_OPERATORS)}")
            if operator == "$in" and not isinstance(argument, list):
                return f"invalid $in on field {field}: must be an array"
    return None
