"""Alert values: conditions fed to the engine, tracked alerts, matchers and silences.

A `Condition` is what a rule or a component reports at one moment: an alert's labels,
whether its problem is present, and the text that explains it. The engine turns
conditions into `Alert`s with a state and timestamps. Labels identify an alert: its
fingerprint is a hash of the sorted label pairs, so the same problem always maps to the
same alert in alerts.log, alerts.db and Alertmanager.
"""

from __future__ import annotations

import functools
import hashlib
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

SEVERITIES = ("critical", "warning", "info")
AlertState = Literal["pending", "firing", "resolved"]


def fingerprint(labels: Mapping[str, str]) -> str:
    """Return a stable 16-hex-digit hash of the label set, independent of label order."""
    return _fingerprint_of(tuple(sorted(labels.items())))


# The rules report the same few label sets on every evaluation, so their hashes are kept.
@functools.lru_cache(maxsize=256)
def _fingerprint_of(items: tuple[tuple[str, str], ...]) -> str:
    digest = hashlib.sha256()
    for name, value in items:
        digest.update(name.encode())
        digest.update(b"\xff")
        digest.update(value.encode())
        digest.update(b"\xff")
    return digest.hexdigest()[:16]


def parse_rfc3339(text: str) -> float:
    """Return the Unix timestamp of an RFC 3339 string such as 2027-01-15T08:00:00.000Z."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def rfc3339(wall: float | None) -> str | None:
    """Format a Unix timestamp as RFC 3339 in UTC, as Alertmanager expects."""
    if wall is None:
        return None
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


@dataclass(frozen=True)
class Condition:
    """One rule's verdict on one subject: is the problem present, and how to describe it."""

    alertname: str
    active: bool
    severity: str = "warning"
    labels: Mapping[str, str] = field(default_factory=dict)
    summary: str = ""
    description: str = ""
    value: float | None = None
    for_seconds: float = 0.0
    # True when an inactive verdict comes from a check that just ran, such as a probe
    # that succeeded. It then resolves an alert restored after a restart at once,
    # without waiting for the restore grace.
    checked: bool = False

    def full_labels(self) -> dict[str, str]:
        return {**self.labels, "alertname": self.alertname, "severity": self.severity}

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.full_labels())


@dataclass
class Alert:
    """An alert the engine tracks, from its first active condition until it resolves.

    Durations (`active_since`, `last_sent`) are monotonic seconds. `starts_at` and
    `ends_at` are Unix timestamps, for logs and for Alertmanager.
    """

    fingerprint: str
    labels: dict[str, str]
    annotations: dict[str, str]
    for_seconds: float
    active_since: float
    starts_at: float
    state: AlertState = "pending"
    value: float | None = None
    ends_at: float | None = None
    # A firing alert is paged once it is queued for Alertmanager and the hooks. Until
    # then it is only in alerts.log, and `held_by` names the reason: a silence, a
    # dependency or the rate cap.
    paged: bool = False
    held_by: str | None = None
    last_sent: float | None = None
    # A firing alert loaded from alerts.db at start-up is kept until this monotonic
    # time even without a condition, so the sources have time to report it again.
    restored_until: float | None = None

    @property
    def alertname(self) -> str:
        return self.labels["alertname"]

    def document(self) -> dict[str, Any]:
        """Return the alert as JSON-able data: the Alertmanager fields plus walacord's."""
        document: dict[str, Any] = {
            "fingerprint": self.fingerprint,
            "status": self.state,
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "startsAt": rfc3339(self.starts_at),
            "endsAt": rfc3339(self.ends_at),
            "paged": self.paged,
        }
        if self.value is not None:
            document["value"] = self.value
        if self.held_by:
            document["heldBy"] = self.held_by
        return document


# --- matchers and silences --------------------------------------------------------

_MATCHER = re.compile(
    r'^\s*(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<op>=~|!~|!=|=)\s*(?P<value>"(?:[^"\\]|\\.)*"|[^,"]*?)\s*$')


@dataclass(frozen=True)
class Matcher:
    """One label test, written as in Alertmanager: name=value, !=, =~ or !~ (anchored)."""

    name: str
    op: str
    value: str

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.name, "")
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        found = re.fullmatch(self.value, actual) is not None
        return found if self.op == "=~" else not found

    def __str__(self) -> str:
        value = self.value.replace("\\", "\\\\").replace('"', '\\"')
        return f'{self.name}{self.op}"{value}"'

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "op": self.op, "value": self.value}

    @classmethod
    def from_json(cls, data: Mapping[str, str]) -> Matcher:
        return cls(data["name"], data["op"], data["value"])


def parse_matchers(text: str) -> list[Matcher]:
    """Parse `alertname=X,probe=~"data.*"` (braces optional); raise ValueError if invalid."""
    body = text.strip()
    if body.startswith("{") and body.endswith("}"):
        body = body[1:-1]
    matchers = []
    for part in _split_outside_quotes(body):
        if not part.strip():
            continue
        match = _MATCHER.match(part)
        if match is None:
            unclosed = " (a quote is not closed)" if part.count('"') % 2 else ""
            raise ValueError(f"invalid matcher {part.strip()!r}{unclosed}: write NAME=VALUE, "
                             "NAME!=VALUE, NAME=~REGEX or NAME!~REGEX")
        value = match.group("value")
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        if match.group("op") in ("=~", "!~"):
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
        matchers.append(Matcher(match.group("name"), match.group("op"), value))
    if not matchers:
        raise ValueError("empty matcher: write at least one NAME=VALUE, e.g. "
                         "alertname=WalacordProbeDown")
    return matchers


def _split_outside_quotes(text: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


@dataclass(frozen=True)
class Silence:
    """Stops paging for alerts whose labels match every matcher, until `ends_at`.

    `starts_at` and `ends_at` are Unix timestamps, because silences outlive restarts
    and a monotonic clock does not.
    """

    id: str
    matchers: tuple[Matcher, ...]
    starts_at: float
    ends_at: float
    reason: str
    created_by: str = ""

    @classmethod
    def create(cls, matchers: list[Matcher], duration: float, reason: str, now: float,
               created_by: str = "") -> Silence:
        return cls(uuid.uuid4().hex[:12], tuple(matchers), now, now + duration, reason,
                   created_by)

    def active(self, now: float) -> bool:
        return self.starts_at <= now < self.ends_at

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(matcher.matches(labels) for matcher in self.matchers)

    def document(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "matchers": [str(m) for m in self.matchers],
            "startsAt": rfc3339(self.starts_at),
            "endsAt": rfc3339(self.ends_at),
            "reason": self.reason,
            "createdBy": self.created_by,
        }
