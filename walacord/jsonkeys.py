"""Find a key that appears twice in one JSON object.

JSON readers, orjson among them, keep the last value of a repeated key and drop the
others without a word. In a financial record, `{"amount": 10, "amount": 1000}` is far
more likely a bug in the sender than a wish, so walacord rejects it.
"""

from __future__ import annotations

import json
import re
from typing import Any

# A quote, optional JSON whitespace and a colon. The colon after every key matches,
# and so may a colon right after an escaped quote inside a string.
_KEY_END = re.compile(rb'"[ \t\n\r]*:')


class _Repeated(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _count_keys(value: Any) -> int:
    count = 0
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            count += len(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return count


def _reject_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _Repeated(key)
        result[key] = value
    return result


def duplicate_key(document: bytes | str, parsed: Any) -> str | None:
    """Return a message naming a key that appears twice in one object of `document`.

    `parsed` is what a JSON reader made of `document`. Return None when no object
    repeats a key, or when the text is not JSON.
    """
    data = document.encode() if isinstance(document, str) else document
    keys = _count_keys(parsed)
    # Each key in the text has one colon after it, and the reader kept one entry per
    # distinct key. Both counts below are at least the number of keys in the text, so
    # when either equals the number of entries, nothing was dropped.
    if data.count(b":") == keys or len(_KEY_END.findall(data)) == keys:
        return None
    try:
        json.loads(data, object_pairs_hook=_reject_repeats)
    except _Repeated as exc:
        key = exc.key if len(exc.key) <= 60 else exc.key[:57] + "..."
        return (f"the key {key!r} appears twice in one object; JSON readers keep only "
                "the last value, so send each key once")
    except (ValueError, RecursionError):
        return None  # not JSON: the caller's own parser reports it
    return None
