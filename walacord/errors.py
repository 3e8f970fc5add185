"""Every exception walacord raises, under one root.

A failed probe is a result value, not an exception: these classes are for calls
that cannot return what the caller asked for.
"""

from __future__ import annotations

from dataclasses import dataclass


class WalacordError(Exception):
    """Root of every error raised by walacord."""


# --- configuration --------------------------------------------------------------


@dataclass(frozen=True)
class ConfigProblem:
    """One invalid value in a configuration file, with the fix."""

    source: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.message}"


class ConfigError(WalacordError):
    """The configuration is invalid; `problems` lists every invalid value."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# --- PostgreSQL -----------------------------------------------------------------


class DatabaseError(WalacordError):
    """A PostgreSQL operation walacord needs failed."""


class MigrationError(DatabaseError):
    """A schema migration could not be applied."""


# --- Walacor API ----------------------------------------------------------------


class WalacorError(WalacordError):
    """A call to the Walacor API failed; `reason` is a short stable class name."""

    reason = "error"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# --- control channel ------------------------------------------------------------


class ControlError(WalacordError):
    """A control request failed; `code` is the JSON error code sent to the client."""

    def __init__(self, code: int, message: str, data: object = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


# --- outbox ---------------------------------------------------------------------


class OutboxError(WalacordError):
    """The durable outbox could not accept or apply an operation."""


class OutboxInvalidOperation(OutboxError):
    """An operation failed validation; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class OutboxFull(OutboxError):
    """The outbox reached its operation or byte limit and rejects new operations."""


class OutboxDiskFull(OutboxError):
    """The state directory's file system is full, so no enqueue can be made durable."""


class OutboxCorrupt(OutboxError):
    """The outbox database failed its integrity check and was moved aside."""


class OutboxNotFound(OutboxError):
    """No operation has the requested id."""


# --- backups --------------------------------------------------------------------


class BackupError(WalacordError):
    """A backup, verification or restore failed."""
