"""Fault injection for the Walacor emulator: which requests fail, and how.

A `FaultSpec` is what `PUT /_emulator/faults` and the CLI flags set. `FaultState`
decides for each API request whether the fault applies (path prefix, ratio, count).
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import socket
import struct
from dataclasses import asdict, dataclass, fields
from typing import Any

from aiohttp import web

MODES = ("hang", "trickle", "reset", "drop_after_commit", "success_false")


@dataclass(frozen=True)
class FaultSpec:
    """One fault setting; all fields are optional and combine.

    `latency_ms` delays each affected request before anything else happens. `status`
    responds with that HTTP status and a documented error body instead of running
    the request; `retry_after` alone implies status 429. `mode` picks one of MODES.
    `path` limits the fault to request paths starting with it, `ratio` to a random
    share of requests, and `count` to the next N affected requests.
    """

    status: int | None = None
    ratio: float = 1.0
    latency_ms: float = 0.0
    retry_after: float | str | None = None
    mode: str | None = None
    path: str | None = None
    count: int | None = None
    trickle_interval_ms: float = 1000.0
    body: Any = None

    @classmethod
    def from_json(cls, data: Any) -> FaultSpec:
        """Build a spec from a JSON object; raise ValueError naming each invalid key."""
        if not isinstance(data, dict):
            raise ValueError("faults must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fault keys {unknown}; known keys are {sorted(known)}")
        spec = cls(**data)
        spec.validate()
        return spec

    def validate(self) -> None:
        problems = []
        if self.status is not None and (
            not isinstance(self.status, int) or not 100 <= self.status <= 599
        ):
            problems.append("status must be an HTTP status code from 100 to 599")
        if not isinstance(self.ratio, int | float) or not 0.0 <= self.ratio <= 1.0:
            problems.append("ratio must be a number from 0 to 1")
        if not isinstance(self.latency_ms, int | float) or self.latency_ms < 0:
            problems.append("latency_ms must be a number >= 0")
        if self.retry_after is not None and not _valid_retry_after(self.retry_after):
            problems.append(f"retry_after must be seconds >= 0 or an HTTP-date string such as "
                            f"'Wed, 21 Oct 2026 07:28:00 GMT', got {self.retry_after!r}")
        if self.mode is not None and self.mode not in MODES:
            problems.append(f"mode must be one of {list(MODES)}")
        if self.path is not None and not isinstance(self.path, str):
            problems.append("path must be a string prefix such as /api/envelopes/submit")
        if self.count is not None and (not isinstance(self.count, int) or self.count < 0):
            problems.append("count must be an integer >= 0")
        interval = self.trickle_interval_ms
        if not isinstance(interval, int | float) or interval <= 0:
            problems.append("trickle_interval_ms must be a number > 0")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def effective_status(self) -> int | None:
        if self.status is None and self.retry_after is not None and self.mode is None:
            return 429
        return self.status

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _valid_retry_after(value: object) -> bool:
    """Return whether `value` is a valid Retry-After: delay-seconds or an HTTP-date."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return math.isfinite(value) and value >= 0
    if not isinstance(value, str):
        return False
    if value.isdigit():
        return True
    try:
        email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return False
    return True


class FaultState:
    """The active fault rules and the random source that applies their ratios.

    Rules are tried in order for each request. The first rule whose path matches,
    whose count is not used up and whose ratio draw succeeds applies.
    """

    def __init__(
        self, spec: FaultSpec | list[FaultSpec] | None = None, *, seed: int | None = None
    ) -> None:
        self._random = random.Random(seed)
        self.rules: list[FaultSpec] = []
        self._remaining: list[int | None] = []
        self.set(spec)

    @property
    def spec(self) -> FaultSpec | None:
        """The first rule, or None when no fault is set."""
        return self.rules[0] if self.rules else None

    def set(self, rules: FaultSpec | list[FaultSpec] | None) -> None:
        if rules is None:
            rules = []
        elif isinstance(rules, FaultSpec):
            rules = [rules]
        self.rules = list(rules)
        self._remaining = [rule.count for rule in self.rules]

    def decide(self, path: str) -> FaultSpec | None:
        """Return the rule that applies to a request for `path`, else None."""
        for index, rule in enumerate(self.rules):
            if rule.path is not None and not path.startswith(rule.path):
                continue
            remaining = self._remaining[index]
            if remaining is not None and remaining <= 0:
                continue
            if rule.ratio < 1.0 and self._random.random() >= rule.ratio:
                continue
            if remaining is not None:
                self._remaining[index] = remaining - 1
            return rule
        return None


def error_body(status: int, message: str, reason: str | None = None) -> dict[str, Any]:
    """Return an error body in a shape the real API sends for this status."""
    if status >= 500:
        return {"error": message}
    return {
        "errors": [{"reason": reason or _REASONS.get(status, "error"), "message": message}],
        "code": status,
    }


_REASONS = {
    400: "validation",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    408: "timeout",
    422: "duplicate",
    429: "rate_limited",
}


def reset_connection(request: web.Request) -> None:
    """Close the request's connection with a TCP RST instead of a FIN."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # SO_LINGER on with a zero timeout makes close() send RST and drop unsent data.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def wait_for_disconnect(request: web.Request) -> web.StreamResponse:
    """Wait without responding until aiohttp cancels the handler.

    The runner is created with handler_cancellation=True, so a client disconnect
    or a server shutdown cancels the handler.
    """
    await asyncio.Event().wait()
    raise AssertionError("unreachable: the wait above ends only by cancellation")


async def trickle(
    request: web.Request, response: web.StreamResponse, interval: float
) -> web.StreamResponse:
    """Send the response body one byte per `interval` seconds."""
    body = response.body if isinstance(response, web.Response) else b""
    payload = body if isinstance(body, bytes) else b""
    stream = web.StreamResponse(
        status=response.status, headers={"Content-Type": "application/json"}
    )
    stream.content_length = len(payload)
    await stream.prepare(request)
    for index in range(len(payload)):
        if request.transport is None or request.transport.is_closing():
            break
        try:
            await stream.write(payload[index : index + 1])
        except ConnectionError:
            break
        await asyncio.sleep(interval)
    return stream
