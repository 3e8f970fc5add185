"""Protocols the control channel needs from the probes, the mode machine and the database pool.

The `status`, `health`, `probes.*`, `mode.*` and `pool.recycle` methods look for a
component in `runtime.components` that implements one of these protocols. A component
does not import or subclass anything from here: matching method names are enough,
checked with `isinstance` on the runtime-checkable protocol. When no component
implements a protocol, the methods that need it return an UNAVAILABLE error.

Times given to clients are ISO 8601 UTC strings (wall time, for people); TTLs and
durations are seconds measured on the monotonic clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NotRequired, Protocol, TypedDict, runtime_checkable

MODES = ("normal", "degraded", "emergency", "offline")
# Maximum length in characters of the reason of `mode.set` and `pool.recycle`. The
# status, the logs and, for a recycle, a metrics label show the reason, so it stays a
# sentence or two.
MAX_REASON_CHARS = 500


class ProbeState(TypedDict):
    """One probe as status reports it; `reason` is a short phrase such as "timeout"."""

    healthy: bool
    reason: str
    latency_seconds: float | None
    since: NotRequired[str]  # when the probe entered its current state
    details: NotRequired[dict[str, Any]]


class OverrideState(TypedDict):
    """A manual mode override set with `mode.set`."""

    mode: str
    reason: str
    set_by: str
    expires_at: str
    remaining_seconds: float


class ModeState(TypedDict):
    """The current mode, the one-sentence reason for it and when it began."""

    mode: str  # one of MODES
    reason: str
    since: str
    override: OverrideState | None


@runtime_checkable
class ModeControl(Protocol):
    """The mode machine: reports the mode and takes manual overrides with a TTL."""

    def mode_state(self) -> ModeState:
        """Return the current mode from memory; it must not block, as handlers run on the loop."""

    async def set_override(self, mode: str, ttl_seconds: float, reason: str,
                           actor: str) -> ModeState:
        """Force `mode` for `ttl_seconds`; after that the computed mode returns by itself.

        The transition is logged as `mode.changed` with `reason`, and `actor` names who
        made the request (for example "uid=1000 pid=4242"). Returns the state after the
        change. Raises ModeOverrideError, with a message for the operator, when
        `ttl_seconds` is above the implementation's limit.
        """

    async def clear_override(self, actor: str) -> ModeState:
        """End the override now, if one is active, and return the state after it."""


@runtime_checkable
class ProbeControl(Protocol):
    """The probe scheduler: reports probe states and runs probes on request."""

    def probe_states(self) -> dict[str, ProbeState]:
        """Return every probe's latest state by name, from memory; it must not block."""

    async def run_probes(self, names: Sequence[str]) -> dict[str, ProbeState]:
        """Run the named probes now (each under its own deadline) and return their results.

        `names` is never empty and contains only names that `probe_states()` returned.
        """


@runtime_checkable
class PoolControl(Protocol):
    """The database pool: replaces its connections on request."""

    async def recycle_pool(self, reason: str) -> dict[str, Any]:
        """Recycle the pool and return what was done, e.g. the stats before and after.

        Raises a `WalacordError` when the hourly recycle budget is exhausted or a fresh
        connection cannot prove health afterwards; the message is shown to the operator.
        """
