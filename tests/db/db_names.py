"""Type of the `names` fixture, importable by the test modules beside it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Names:
    """A role and database name unique to one test, plus the roles it made on the side."""

    role: str
    database: str
    extra_roles: list[str]
