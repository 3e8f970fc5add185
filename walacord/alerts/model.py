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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from walacord.terminal import (
    describe_character,
    escape_control_characters,
    find_nonprinting_character,
)

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
    r'^\s*(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<op>=~|!~|!=|=)\s*'
    r'(?P<value>"(?:[^"\\]|\\.)*"|(?:[^,"\\]|\\.)*?\\?)\s*$')


OPERATORS = ("=", "!=", "=~", "!~")
# The escapes of a matcher value, as in Alertmanager, and what each one stands for.
_ESCAPE = re.compile(r'\\(["\\\\n])')
_UNESCAPED = {'"': '"', "\\": "\\", "n": "\n"}


@dataclass(frozen=True)
class Matcher:
    """One label test, written as in Alertmanager: name=value, !=, =~ or !~ (anchored).

    A regular expression must match the whole label value. It is compiled when the
    matcher is built, so an invalid pattern raises ValueError there and never during
    alert evaluation.
    """

    name: str
    op: str
    value: str
    _regex: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.op not in OPERATORS:
            raise ValueError(f"invalid matcher operator {self.op!r} in {self.name}"
                             f"{self.op}{self.value!r}: use one of {', '.join(OPERATORS)}")
        if self.op in ("=~", "!~"):
            object.__setattr__(self, "_regex", _compile_re2(self.value))

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.name, "")
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        # Bytes skip google-re2's conversion of match offsets back to str positions,
        # which a boolean result does not need. The pattern still reads UTF-8.
        found = self._regex.fullmatch(actual.encode()) is not None
        return found if self.op == "=~" else not found

    def __str__(self) -> str:
        value = self.value.replace("\\", "\\\\").replace('"', '\\"')
        return f'{self.name}{self.op}"{value}"'

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "op": self.op, "value": self.value}

    @classmethod
    def from_json(cls, data: Mapping[str, str]) -> Matcher:
        return cls(data["name"], data["op"], data["value"])


def _compile_re2(pattern: str) -> Any:
    """Compile `pattern` with RE2, which matches in time linear in the value's length.

    RE2 is the syntax of Go's regexp package and so of Alertmanager's matchers. Python's
    re backtracks, and a pattern such as `(a+)+$` could stall the event loop for
    minutes. The module is imported here, on first use, because it adds about 3 MiB
    to the daemon's resident memory and most silences have no regular expression.
    """
    import re2

    options = re2.Options()
    # RE2 logs each rejected pattern to stderr unless log_errors is off. The
    # ValueError below carries the same message to the caller instead.
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        # google-re2 raises re2.error with RE2's message as bytes.
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        # RE2 quotes the offending part of the pattern as is, unlike the repr above.
        detail = escape_control_characters(str(detail))
        raise ValueError(f"invalid regular expression {pattern!r}: {detail}. Matchers use "
                         "RE2 syntax, as Alertmanager does, so backreferences, lookarounds "
                         "and possessive quantifiers are not available") from None


def parse_matchers(text: str) -> list[Matcher]:
    """Parse `alertname=X,probe=~"data.*"` (braces optional); raise ValueError if invalid."""
    check_silence_text("matcher", text)
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
            value = value[1:-1]
        value = _unescape(value)
        found = find_nonprinting_character(value)
        if found is not None:
            raise ValueError(f"invalid matcher {part.strip()!r}: the value has the "
                             f"{describe_character(found[1])}; matchers cannot contain "
                             "line breaks")
        matchers.append(Matcher(match.group("name"), match.group("op"), value))
    if not matchers:
        raise ValueError("empty matcher: write at least one NAME=VALUE, e.g. "
                         "alertname=WalacordProbeDown")
    return matchers


def _unescape(value: str) -> str:
    """Undo a matcher value's escapes as Alertmanager's matcher parser does.

    `\\"` is a double quote, `\\\\` a backslash and `\\n` a line feed. Any other backslash
    stays as written, so a regular expression such as `\\w+` or `a\\.b` keeps its meaning.
    """
    return _ESCAPE.sub(lambda found: _UNESCAPED[found.group(1)], value)


def contradicting_pairs(matchers: Sequence[Matcher]) -> list[tuple[Matcher, Matcher]]:
    """Return the pairs of matchers on one label that no label value satisfies together.

    A missing label reads as "", as in Alertmanager, so `x=""` and `x!=""` contradict.
    """
    pairs = []
    for index, first in enumerate(matchers):
        for second in matchers[index + 1:]:
            if first.name == second.name and _contradict(first, second):
                pairs.append((first, second))
    return pairs


def _contradict(first: Matcher, second: Matcher) -> bool:
    for fixed, other in ((first, second), (second, first)):
        value = _only_value(fixed)
        if value is not None and not other.matches({fixed.name: value}):
            return True
    # NOTE: two different regular expressions are not compared, so x=~"a.*" with
    # x=~"b.*" is not reported although no value matches both.
    return {first.op, second.op} == {"=~", "!~"} and first.value == second.value


# Characters with a meaning in RE2 syntax. A pattern without them matches itself only.
_REGEX_SYNTAX = frozenset("\\.+*?()|[]{}^$")


def _only_value(matcher: Matcher) -> str | None:
    """Return the one value that `matcher` accepts, or None when it accepts several."""
    if matcher.op == "=":
        return matcher.value
    if matcher.op == "=~" and not any(char in _REGEX_SYNTAX for char in matcher.value):
        return matcher.value
    return None


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


# A reason is a sentence or two, and a matcher a few labels. The cap keeps a mistaken
# paste, such as a whole log file, out of alerts.db, alerts.log and walacorctl's table.
MAX_SILENCE_TEXT = 1000
# The maximum duration of a silence: a year, with a day to spare for a leap year.
MAX_SILENCE_SECONDS = 366 * 86400


def check_silence_text(field_name: str, text: str, *, prose: bool = False) -> None:
    """Raise ValueError when `text` is over MAX_SILENCE_TEXT or has a control character
    or an invisible one (see `find_nonprinting_character`).

    Tabs and line breaks are rejected too, so the text prints on one line as written.
    An invisible character, such as U+200B ZERO WIDTH SPACE, would make a matcher that
    looks right never match.
    """
    if len(text) > MAX_SILENCE_TEXT:
        raise ValueError(f"invalid {field_name}: {len(text)} characters, over the limit of "
                         f"{MAX_SILENCE_TEXT}. Shorten it")
    found = find_nonprinting_character(text, prose=prose)
    if found is not None:
        position, character = found
        raise ValueError(f"invalid {field_name}: {describe_character(character)} at "
                         f"position {position}. Write it as printable text on one line, "
                         "without escape sequences, tabs, line breaks or invisible "
                         "characters")


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
        """Build a new silence; raise ValueError when `reason` or `created_by` is invalid.

        Silences loaded from alerts.db skip these checks, so text stored by older
        versions may still contain control characters.
        """
        check_silence_text("reason", reason, prose=True)
        check_silence_text("created_by", created_by)
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
