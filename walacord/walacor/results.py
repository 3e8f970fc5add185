"""Values the Walacor client returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SubmitReceipt:
    """Receipt for one submitted envelope, with one UID per record in submit order."""

    eid: str
    etid: int
    es: int | None
    uids: list[str]


@dataclass(frozen=True)
class QueryResult:
    """Rows of one query page and, when requested, the total number of matches."""

    rows: list[dict[str, Any]]
    total: int | None


@dataclass(frozen=True)
class StoredRecord:
    """Storage location of one keyed record; `adopted` is True when an earlier attempt stored it."""

    key: str
    uid: str
    eid: str
    etid: int
    es: int | None
    adopted: bool
