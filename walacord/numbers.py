"""Find JSON numbers that would change on their way through walacord.

orjson, like most JSON readers, turns a number into a 64-bit float or integer. A decimal
with more significant digits than a float carries, such as 1234567890123456.78, is
rounded, and an integer beyond 64 bits becomes a rounded float. Because these are
financial records, walacord rejects such numbers and requests them as strings.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal

# A number token of 16 or more characters, or one with an exponent, after the JSON
# punctuation or space that can precede a value. Only such tokens can lose digits, so
# text without them skips the slow exact check. Digits inside a string, such as an
# IBAN, follow a letter or a quote, so they do not match.
# Both branches share their start, so the regular expression engine tests each byte
# against that start once instead of once per branch.
_SUSPECT = re.compile(rb"[:,\[\s]-?\d(?:[\d.eE+-]{15,}|[\d.]*[eE])")
INT_RANGE = (-(2**63), 2**63)


class _Inexact(ValueError):
    def __init__(self, text: str, problem: str) -> None:
        super().__init__(text)
        self.text = text
        self.problem = problem


def _check_float(text: str) -> float:
    value = float(text)
    if Decimal(text) != Decimal(repr(value)):
        raise _Inexact(text, "has more significant digits than a JSON number carries "
                             f"exactly and would be stored as {value!r}")
    return value


def _check_int(text: str) -> int:
    value = int(text)
    if not INT_RANGE[0] <= value < INT_RANGE[1]:
        raise _Inexact(text, "is beyond the signed 64-bit integer range")
    return value


def inexact_number(document: bytes | str) -> str | None:
    """Return a message naming the first number in the JSON `document` that would change.

    Return None when every number comes back exactly, or when the text is not JSON.
    """
    data = document.encode() if isinstance(document, str) else document
    if not _SUSPECT.search(data):
        return None
    try:
        json.loads(data, parse_float=_check_float, parse_int=_check_int)
    except _Inexact as exc:
        return (f"the number {exc.text} {exc.problem}; send amounts like this one as "
                "strings")
    except (ValueError, RecursionError):
        return None  # not JSON: the caller's own parser reports it
    return None
