"""Map httpx failures and Walacor responses to the WalacorError classes.

Each class carries a stable `reason` string and a `maybe_committed` flag, so callers
can count failures by reason and know when a write must be looked up before a retry.
"""

from __future__ import annotations

import email.utils
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import orjson

from walacord.errors import (
    WalacorAuthError,
    WalacorBadResponseError,
    WalacorConnectionResetError,
    WalacorConnectRefusedError,
    WalacorConnectTimeoutError,
    WalacorDNSError,
    WalacorError,
    WalacorRateLimitedError,
    WalacorServerError,
    WalacorSuccessFalseError,
    WalacorTimeoutError,
    WalacorTLSError,
    WalacorValidationError,
)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Return the wait in seconds that a `Retry-After` header requests, or None.

    The header contains either delta-seconds ("120") or an HTTP-date. A date in
    the past gives 0. `now` is the wall-clock time in seconds since the epoch.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isdigit():
        return float(text)
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, moment.timestamp() - current)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """Yield an exception, its causes and contexts, and members of exception groups."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        if isinstance(item, BaseExceptionGroup):
            stack.extend(item.exceptions)
        if item.__cause__ is not None:
            stack.append(item.__cause__)
        if item.__context__ is not None:
            stack.append(item.__context__)


def classify_transport_error(
    exc: httpx.TransportError, operation: str, scheme: str
) -> WalacorError:
    """Turn an httpx transport failure of `operation` into a WalacorError."""
    if isinstance(exc, httpx.ConnectTimeout):
        return WalacorConnectTimeoutError(f"{operation}: connect timed out")
    if isinstance(exc, httpx.PoolTimeout):
        return WalacorTimeoutError(
            f"{operation}: timed out waiting for a free connection in the pool",
            maybe_committed=False,
        )
    if isinstance(exc, httpx.TimeoutException):
        return WalacorTimeoutError(f"{operation}: timed out waiting for the response ({exc!r})")
    if isinstance(exc, httpx.ConnectError):
        return _classify_connect_error(exc, operation, scheme)
    if isinstance(exc, httpx.ReadError | httpx.WriteError | httpx.RemoteProtocolError):
        return WalacorConnectionResetError(
            f"{operation}: connection broke after the request was sent ({exc!r})"
        )
    return WalacorError(f"{operation}: request failed ({exc!r})", maybe_committed=True)


def _classify_connect_error(exc: httpx.ConnectError, operation: str, scheme: str) -> WalacorError:
    causes = list(_chain(exc))
    for cause in causes:
        if isinstance(cause, socket.gaierror):
            return WalacorDNSError(f"{operation}: host name did not resolve ({cause})")
    for cause in causes:
        if isinstance(cause, ssl.SSLError | ssl.CertificateError):
            return WalacorTLSError(f"{operation}: TLS handshake failed ({cause})")
    for cause in causes:
        if isinstance(cause, ConnectionRefusedError):
            return WalacorConnectRefusedError(f"{operation}: connection refused")
    for cause in causes:
        if isinstance(cause, TimeoutError):
            return WalacorConnectTimeoutError(f"{operation}: connect timed out")
    stream_closed = any(
        isinstance(c, anyio.EndOfStream | anyio.BrokenResourceError) for c in causes
    )
    if scheme == "https" and stream_closed:
        # httpcore maps these to ConnectError only while starting TLS: the TCP
        # connection opened, then the peer closed it during the handshake.
        return WalacorTLSError(f"{operation}: connection closed during the TLS handshake")
    # NOTE: other connect failures (network or host unreachable) share the "refused"
    # class, because to a caller they mean the same: nothing reached the server.
    return WalacorConnectRefusedError(f"{operation}: connect failed ({exc!r})")


def error_message(content: bytes) -> str:
    """Extract a readable message from one of the documented Walacor error bodies."""
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return content[:200].decode("utf-8", "replace") or "(empty body)"
    return _message_from(body) or content[:200].decode("utf-8", "replace")


def _message_from(body: Any) -> str:
    if isinstance(body, str):
        return body
    if not isinstance(body, dict):
        return ""
    errors = body.get("errors")
    if isinstance(errors, list) and errors:
        parts = []
        for item in errors:
            if isinstance(item, dict):
                reason = item.get("reason")
                message = item.get("message", "")
                parts.append(f"{reason}: {message}" if reason else str(message))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    for field in ("error", "message"):
        if field in body:
            return _message_from(body[field]) or str(body[field])
    return ""


def parse_response(response: httpx.Response, operation: str) -> dict[str, Any]:
    """Return the JSON object of a successful response, or raise its WalacorError."""
    status = response.status_code
    if status >= 300:
        raise _status_error(response, operation)

    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError as exc:
        raise WalacorBadResponseError(
            f"{operation}: response {status} is not JSON ({exc})", status=status
        ) from None
    if not isinstance(body, dict):
        raise WalacorBadResponseError(
            f"{operation}: response {status} is not a JSON object", status=status
        )
    if body.get("success") is False:
        message = _message_from(body) or "no error detail"
        raise WalacorSuccessFalseError(f"{operation}: success false ({message})", status=status)
    return body


def _status_error(response: httpx.Response, operation: str) -> WalacorError:
    status = response.status_code
    message = f"{operation}: HTTP {status}: {error_message(response.content)}"
    if status == 401:
        return WalacorAuthError(message, status=status)
    if status == 429:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return WalacorRateLimitedError(message, retry_after=retry_after)
    if status == 408:
        # The server gave up reading the request, so it did not apply it.
        return WalacorTimeoutError(message, status=status, maybe_committed=False)
    if 400 <= status < 500:
        return WalacorValidationError(message, status=status)
    if status >= 500:
        return WalacorServerError(message, status=status)
    return WalacorBadResponseError(f"{operation}: unexpected HTTP {status}", status=status)
