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


class MigrationPrivilegeError(MigrationError):
    """The migrator connected, but its role lacks a privilege it needs (SQLSTATE 42501)."""

    def __init__(self, message: str, *, role: str, database: str) -> None:
        super().__init__(message)
        self.role = role
        self.database = database


class PoolRecycleError(DatabaseError):
    """The pool was not recycled (budget spent), or a new connection failed afterwards."""


# --- Walacor API ----------------------------------------------------------------


class WalacorError(WalacordError):
    """A call to the Walacor API failed; `reason` is a short stable class name."""

    reason = "error"
    # True when the request may have reached the server and been applied, so a retry
    # of a write must first look up whether the write is already stored.
    maybe_committed = False

    def __init__(
        self, message: str, *, status: int | None = None, maybe_committed: bool | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        if maybe_committed is not None:
            self.maybe_committed = maybe_committed


class WalacorDNSError(WalacorError):
    """The Walacor host name did not resolve."""

    reason = "dns"


class WalacorConnectRefusedError(WalacorError):
    """The Walacor host rejected the TCP connection."""

    reason = "refused"


class WalacorConnectTimeoutError(WalacorError):
    """The TCP connection to Walacor was not established within the connect timeout."""

    reason = "connect_timeout"


class WalacorTLSError(WalacorError):
    """The TLS handshake with Walacor failed (certificate, CA bundle or protocol)."""

    reason = "tls"


class WalacorTimeoutError(WalacorError):
    """Walacor sent no response within the read timeout or the whole-request deadline."""

    reason = "timeout"
    maybe_committed = True


class WalacorConnectionResetError(WalacorError):
    """The connection broke after the request was sent, so its outcome is unknown."""

    reason = "reset"
    maybe_committed = True


class WalacorAuthError(WalacorError):
    """Walacor returned 401 because it rejected the credentials or the token."""

    reason = "auth"


class WalacorValidationError(WalacorError):
    """Walacor rejected the request with a 4xx status other than 401 and 429."""

    reason = "validation"


class WalacorRateLimitedError(WalacorError):
    """Walacor returned 429; `retry_after` is the requested wait in seconds, or None."""

    reason = "rate_limited"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message, status=429)
        self.retry_after = retry_after


class WalacorServerError(WalacorError):
    """Walacor returned 5xx, which a proxy may send after the service applied the write."""

    reason = "server_error"
    maybe_committed = True


class WalacorSuccessFalseError(WalacorError):
    """Walacor returned 200 with `"success": false` in the body."""

    reason = "success_false"


class WalacorBadResponseError(WalacorError):
    """Walacor returned 2xx with a body that is not the expected JSON shape."""

    reason = "bad_response"
    maybe_committed = True


# --- control channel ------------------------------------------------------------


class ControlError(WalacordError):
    """A control request failed; `code` is the JSON error code sent to the client."""

    def __init__(self, code: int, message: str, data: object = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


class ModeOverrideError(WalacordError, ValueError):
    """A manual mode override was rejected; `data` contains the values that caused it."""

    def __init__(self, message: str, data: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.data = data or {}


class ControlSocketError(WalacordError):
    """The control socket could not be created, or another daemon is listening on it."""


class ControlClientError(WalacordError):
    """walacorctl or walacord.client could not reach the daemon or read its response."""


class ControlConnectionError(ControlClientError, ConnectionError):
    """The connection to the daemon closed or was abandoned before a response came, so
    the request may or may not have taken effect."""


class ControlTimeoutError(ControlClientError, TimeoutError):
    """The daemon sent no response within the client's timeout, so the request may or
    may not have taken effect."""


class RequestEncodeError(WalacordError, TypeError, ValueError):
    """A request contains a value that JSON cannot carry, and `path` names it, such as
    `params.data.amount`.

    It subclasses TypeError and ValueError, which orjson and json.dumps raise for such
    values, so handlers written for those still catch it.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path} {message}")
        self.path = path


# --- outbox ---------------------------------------------------------------------


class OutboxError(WalacordError):
    """The durable outbox could not accept or apply an operation."""


class OutboxInvalidOperation(OutboxError):
    """An operation failed validation; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message


class OutboxStarting(OutboxError):
    """A request arrived before the outbox store opened at start-up, so the caller
    should retry in a moment."""


class OutboxFull(OutboxError):
    """The outbox reached its operation or byte limit and rejects new operations."""


class OutboxRequestTooLarge(OutboxError):
    """One request contains more new operations or payload bytes than the outbox's limits
    allow in all, so it can never be accepted as it is, however far sync drains."""


class OutboxDiskFull(OutboxError):
    """The state directory's file system is full, so no enqueue can be made durable."""


class OutboxStateDirUnusable(OutboxError):
    """The state directory cannot hold the outbox: it is read-only, not writable by
    walacord, not a directory, or fails fsync."""


class OutboxCorrupt(OutboxError):
    """The outbox database failed its integrity check and was moved aside."""


class OutboxConflict(OutboxError):
    """An enqueue reused a stored key with a different sink, target or payload."""


class OutboxNotFound(OutboxError):
    """No operation has the requested id."""


# --- backups --------------------------------------------------------------------


class BackupError(WalacordError):
    """A backup, verification or restore failed."""


# --- database setup (walacord setup-database) -----------------------------------


class DatabaseSetupError(DatabaseError):
    """setup-database could not create or grant what walacord's role needs."""


# --- alerts ---------------------------------------------------------------------


class AlertDeliveryError(WalacordError):
    """A sink did not accept an alert notification; `permanent` means retrying is futile."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
