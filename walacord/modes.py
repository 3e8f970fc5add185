"""The operating mode: a pure decision from probe states, and the machine that applies it.

`decide()` has no I/O: it maps the current mode, the probe states and the time to the
next mode and one sentence saying why. `ModeMachine` calls it, and on a change logs
`mode.changed`, updates systemd STATUS=, counts the transition and runs the hooks.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio

from walacord.config import ModesConfig
from walacord.errors import ModeOverrideError
from walacord.probes.base import Health, ProbeState
from walacord.processes import run_in_group

log = logging.getLogger(__name__)

# Variables hook and restart commands inherit from walacord's environment.
INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "HOME")

# Transitions kept in `ModeMachine.history`.
HISTORY = 50

# Reason classes of a database or Walacor failure that mean "cannot reach the server",
# as opposed to "reached it and it said no".
UNREACHABLE = frozenset({
    "refused", "timeout", "connect_timeout", "dns", "reset", "connection_lost", "tls",
    "shutting_down", "starting_up", "unreachable",
})
# Walacor returning 5xx cannot store anything either, so it counts as unreachable.
WALACOR_UNAVAILABLE = UNREACHABLE | {"server_error"}


class Mode(enum.Enum):
    """Operating modes, best first; the values are stable and appear in metrics."""

    NORMAL = "normal"
    DEGRADED = "degraded"
    EMERGENCY = "emergency"
    OFFLINE = "offline"

    @property
    def rank(self) -> int:
        return list(Mode).index(self)


@dataclass(frozen=True)
class Override:
    """A manual mode set for maintenance, valid until `until` (monotonic seconds)."""

    mode: Mode
    reason: str
    until: float
    set_at: float
    set_by: str = ""


@dataclass(frozen=True)
class Current:
    """The mode in force and when it began (monotonic seconds)."""

    mode: Mode
    since: float


@dataclass(frozen=True)
class Decision:
    mode: Mode
    reason: str
    evidence: dict[str, str] = field(default_factory=dict)


def decide(current: Current, observations: Mapping[str, ProbeState], now: float, *,
           policy: ModesConfig | None = None, override: Override | None = None,
           outbox_full: str | None = None) -> Decision:
    """Return the next mode and a one-sentence reason.

    `outbox_full` is the outbox's sentence saying why it rejects new operations, if it does.

    The rules, first match wins:

    1. an unexpired override sets its mode;
    2. offline: PostgreSQL and Walacor are both unreachable, or the host probe is down
       while a remote probe is down too;
    3. emergency: PostgreSQL cannot take writes, or the outbox is full and rejects new
       operations;
    4. degraded: Walacor or the API is down or slow, the database is slow or
       saturated, or the host warns or fails;
    5. normal otherwise.

    A worse mode applies at once. A better mode replaces a worse one only after the
    worse one has lasted `min_dwell`.
    """
    policy = policy or ModesConfig()
    if override is not None and now < override.until:
        remaining = override.until - now
        return Decision(override.mode, f"Manual override for {remaining:.0f}s more: "
                        f"{override.reason}.", {"override": override.reason})

    probes = {name: state for name, state in observations.items()
              if name not in policy.ignore_probes}
    evidence = {name: f"{state.health.value}: {state.message}"
                for name, state in probes.items()}
    proposed, reason = _rules(probes, policy)
    if outbox_full and proposed.rank < Mode.EMERGENCY.rank:
        proposed = Mode.EMERGENCY
        reason = outbox_full
        evidence["outbox"] = "full"

    if proposed.rank < current.mode.rank and now - current.since < policy.min_dwell:
        wait = policy.min_dwell - (now - current.since)
        return Decision(current.mode, f"Staying {current.mode.value} for {wait:.1f}s more "
                        f"before {proposed.value}: {_lower_first(reason)}", evidence)
    return Decision(proposed, reason, evidence)


def _rules(probes: Mapping[str, ProbeState], policy: ModesConfig) -> tuple[Mode, str]:
    database = probes.get("database")
    walacor = probes.get("walacor")
    api = probes.get("api")
    host = probes.get("host")
    db_down = database is not None and database.down
    walacor_down = walacor is not None and walacor.down

    if (db_down and walacor_down and database is not None and walacor is not None
            and database.reason in UNREACHABLE and walacor.reason in WALACOR_UNAVAILABLE):
        return Mode.OFFLINE, (f"PostgreSQL ({database.reason}) and Walacor "
                              f"({walacor.reason}) are both unreachable.")
    remote_down = [p.name for p in (database, walacor, api) if p is not None and p.down]
    if host is not None and host.down and remote_down:
        return Mode.OFFLINE, (f"The host itself is failing ({host.message}) while "
                              f"{', '.join(remote_down)} {_verb(remote_down)} down.")
    if db_down and database is not None:
        return Mode.EMERGENCY, f"PostgreSQL cannot take writes: {database.message}."
    if walacor_down and walacor is not None and policy.walacor_down == "emergency":
        return Mode.EMERGENCY, f"Walacor is down: {walacor.message}."

    problems = []
    for state, label in ((walacor, "Walacor"), (api, "the application API")):
        if state is not None and state.down:
            problems.append(f"{label} is down ({state.message})")
        elif state is not None and state.warning:
            problems.append(f"{label} is slow ({state.message})")
    if database is not None and database.warning:
        problems.append(f"the database warns ({database.message})")
    if host is not None and host.down:
        problems.append(f"the host is failing ({host.message})")
    elif host is not None and host.warning:
        problems.append(f"the host warns ({host.message})")
    if problems:
        return Mode.DEGRADED, _sentence("Degraded because " + "; ".join(problems))

    unknown = [p.name for p in probes.values() if p.health is Health.UNKNOWN]
    if unknown:
        return Mode.NORMAL, (f"Every probe with a result is healthy; waiting for "
                             f"{', '.join(unknown)}.")
    return Mode.NORMAL, "Every critical probe is healthy."


def _verb(names: list[str]) -> str:
    return "is" if len(names) == 1 else "are"


def _sentence(text: str) -> str:
    return text if text.endswith(".") else text + "."


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _seconds_text(seconds: float) -> str:
    """Return e.g. "172800s (2.0 days)" for an error message."""
    if seconds >= 1e12:
        return f"{seconds:.3g}s"
    text = f"{seconds:.0f}s"
    if seconds >= 86400:
        return f"{text} ({seconds / 86400:.1f} days)"
    if seconds >= 3600:
        return f"{text} ({seconds / 3600:.1f} hours)"
    return text


def wall_time(monotonic_at: float, now: float | None = None) -> str:
    """Return an ISO 8601 UTC time for a monotonic timestamp, for output only."""
    now = time.monotonic() if now is None else now
    return datetime.fromtimestamp(time.time() - (now - monotonic_at), UTC).isoformat(
        timespec="milliseconds")


class ModeMachine:
    """Holds the mode, applies `decide()` and performs every transition's side effects."""

    def __init__(self, config: ModesConfig, metrics: Any = None) -> None:
        self.config = config
        self.metrics = metrics
        now = time.monotonic()
        self.current = Current(Mode.NORMAL, now)
        self.reason = "Starting: no probe has reported yet."
        self.evidence: dict[str, str] = {}
        # The mode and reason the probes alone give, which an override hides.
        self.automatic: tuple[Mode, str] = (self.current.mode, self.reason)
        self.override: Override | None = None
        self._override_ended = False
        self.transitions = 0
        # Per hook command, the environments of the runs still to start, oldest first.
        self._hook_queues: dict[tuple[str, ...], deque[dict[str, str]]] = {}
        self._hook_lanes: set[tuple[str, ...]] = set()
        self._hook_wake = anyio.Event()
        self._changed = anyio.Event()
        # The latest transitions, oldest first, for status output.
        self.history: deque[dict[str, str]] = deque(maxlen=HISTORY)
        self._publish()

    @property
    def mode(self) -> Mode:
        return self.current.mode

    def evaluate(self, observations: Mapping[str, ProbeState],
                 now: float | None = None, *, outbox_full: str | None = None) -> Decision:
        """Decide the mode from `observations` and apply it; return the decision."""
        now = time.monotonic() if now is None else now
        if self.override is not None and now >= self.override.until:
            log.info("mode.override_expired", extra={"fields": {
                "mode": self.override.mode.value, "reason": self.override.reason}})
            self.override = None
            self._override_ended = True
        current = self.current
        if self._override_ended:
            # The operator chose the last mode, so leaving it needs no dwell.
            current = Current(current.mode, -math.inf)
            self._override_ended = False
        decision = decide(current, observations, now, policy=self.config,
                          override=self.override, outbox_full=outbox_full)
        self.reason = decision.reason
        self.evidence = decision.evidence
        automatic = decision
        if self.override is not None:
            automatic = decide(current, observations, now, policy=self.config,
                               outbox_full=outbox_full)
        self.automatic = (automatic.mode, automatic.reason)
        if decision.mode is not self.current.mode:
            self._transition(decision, now)
        return decision

    def time_change_at(self, now: float) -> float | None:
        """Return the monotonic time at which time alone can change the decision.

        That is the end of the override, or else the end of the current mode's
        `min_dwell`, while one of them lies ahead of `now`. Otherwise the decision
        changes only when its inputs do, so this returns None.
        """
        if self.override is not None:
            return self.override.until
        dwell_end = self.current.since + self.config.min_dwell
        return dwell_end if dwell_end > now else None

    def set_override(self, mode: Mode, reason: str, ttl: float,
                     now: float | None = None, set_by: str = "") -> Override:
        """Force `mode` for `ttl` seconds.

        Raises ModeOverrideError when the reason is empty or `ttl` is not positive or
        is above `override_max_ttl`. The override in force, if any, stays unchanged.
        """
        if not reason.strip():
            raise ModeOverrideError("an override needs a reason, e.g. "
                                    "\"database maintenance\"")
        if not 0 < ttl < math.inf:
            raise ModeOverrideError(f"invalid TTL {ttl:g}s: it must be positive and finite")
        limit = self.config.override_max_ttl
        if ttl > limit:
            raise ModeOverrideError(
                f"override TTL {_seconds_text(ttl)} is above the limit of "
                f"{_seconds_text(limit)} that [modes] override_max_ttl sets. Use a shorter "
                "TTL, or raise override_max_ttl in the configuration file and run "
                "`walacorctl reload`",
                {"ttl_seconds": ttl, "override_max_ttl_seconds": limit})
        now = time.monotonic() if now is None else now
        self.override = Override(mode, reason.strip(), now + ttl, now, set_by)
        log.info("mode.override_set", extra={"fields": {
            "mode": mode.value, "reason": reason, "ttl_seconds": ttl, "set_by": set_by}})
        return self.override

    def apply_config(self, config: ModesConfig, now: float | None = None) -> None:
        """Use `config` from now on.

        An override in force that now lasts longer than the new `override_max_ttl`
        from when it was set ends at that limit instead, or at the next evaluation when
        the limit has already passed.
        """
        self.config = config
        override = self.override
        if override is None or override.until - override.set_at <= config.override_max_ttl:
            return
        now = time.monotonic() if now is None else now
        until = max(now, override.set_at + config.override_max_ttl)
        self.override = dataclasses.replace(override, until=until)
        log.info("mode.override_shortened", extra={"fields": {
            "mode": override.mode.value, "reason": override.reason,
            "remaining_seconds": round(until - now, 3),
            "override_max_ttl_seconds": config.override_max_ttl}})

    def clear_override(self) -> bool:
        """Drop the override; return whether there was one."""
        had = self.override is not None
        if self.override is not None:
            log.info("mode.override_cleared", extra={"fields": {
                "mode": self.override.mode.value}})
            self._override_ended = True
        self.override = None
        return had

    async def wait_changed(self) -> None:
        """Wait for the next transition."""
        await self._changed.wait()

    def _transition(self, decision: Decision, now: float) -> None:
        old = self.current.mode
        self.current = Current(decision.mode, now)
        self.transitions += 1
        self._changed.set()
        self._changed = anyio.Event()
        self.history.append({"from": old.value, "to": decision.mode.value,
                             "reason": decision.reason, "at": wall_time(now)})
        level = logging.INFO if decision.mode.rank <= Mode.DEGRADED.rank else logging.WARNING
        log.log(level, "mode.changed", extra={"fields": {
            "from": old.value, "to": decision.mode.value, "reason": decision.reason,
            "evidence": decision.evidence}})
        if self.metrics is not None:
            self.metrics.mode_transitions.labels(
                **{"from": old.value, "to": decision.mode.value}).inc()
        self._publish()
        env = {"WALACORD_MODE_FROM": old.value, "WALACORD_MODE_TO": decision.mode.value,
               "WALACORD_MODE_REASON": decision.reason}
        for argv in self.config.hooks:
            self._hook_queues.setdefault(tuple(argv), deque()).append(env)
        self._hook_wake.set()

    def _publish(self) -> None:
        if self.metrics is None:
            return
        for mode in Mode:
            self.metrics.mode.labels(mode=mode.value).set(
                1 if mode is self.current.mode else 0)

    def status_part(self) -> str:
        """Return the phrase for systemd STATUS=, e.g. "mode emergency: PostgreSQL ..."."""
        return f"mode {self.current.mode.value}: {self.reason}"

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """Return the mode, reason, since and override as a JSON-able dict."""
        now = time.monotonic() if now is None else now
        override = None
        if self.override is not None:
            override = {"mode": self.override.mode.value, "reason": self.override.reason,
                        "set_by": self.override.set_by,
                        "probes_mode": self.automatic[0].value,
                        "probes_reason": self.automatic[1],
                        "remaining_seconds": round(max(0.0, self.override.until - now), 1),
                        "expires_at": wall_time(self.override.until, now)}
        return {"mode": self.current.mode.value, "reason": self.reason,
                "since": wall_time(self.current.since, now),
                "since_seconds": round(now - self.current.since, 3),
                "transitions": self.transitions, "override": override,
                "evidence": self.evidence}

    async def run_hooks(self) -> None:
        """Run queued hook commands, each bounded by `hook_timeout`.

        Different commands run concurrently, so a hung one delays no other. Runs of one
        command follow each other in the order of the mode changes.
        """
        async with anyio.create_task_group() as tg:
            while True:
                await self._hook_wake.wait()
                self._hook_wake = anyio.Event()
                for argv, pending in self._hook_queues.items():
                    if pending and argv not in self._hook_lanes:
                        self._hook_lanes.add(argv)
                        tg.start_soon(self._run_hook_lane, argv, pending)

    async def _run_hook_lane(self, argv: tuple[str, ...], pending: deque[dict[str, str]]) -> None:
        try:
            while pending:
                env = pending.popleft()
                await run_command(list(argv), self.config.hook_timeout, env, event="mode.hook")
        finally:
            self._hook_lanes.discard(argv)


async def run_command(argv: list[str], time_limit: float, extra_env: Mapping[str, str],
                      *, event: str) -> int | None:
    """Run `argv` without a shell in its own process group; return its exit code.

    Returns None when the command could not start or ran out of time. After
    `time_limit` seconds, or when the caller is cancelled, the command and every process
    it started in its group are killed. The command gets only INHERITED_ENV from
    walacord's environment, never its credentials.
    """
    env = {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}
    env.update(extra_env)
    began = time.monotonic()
    try:
        result = await run_in_group(argv, time_limit, env)
    except TimeoutError:
        log.error(f"{event}_timed_out", extra={"fields": {
            "argv": argv, "timeout_seconds": time_limit}})
        return None
    except OSError as exc:
        log.error(f"{event}_failed", extra={"fields": {"argv": argv, "error": str(exc)}})
        return None
    fields = {"argv": argv, "exit_code": result.returncode,
              "duration_seconds": round(time.monotonic() - began, 3),
              "stderr": result.stderr.decode(errors="replace")[-500:]}
    if result.returncode == 0:
        log.info(f"{event}_ran", extra={"fields": fields})
    else:
        log.error(f"{event}_failed", extra={"fields": fields})
    return result.returncode
