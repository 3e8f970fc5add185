"""Control-channel handlers for `walacorctl alerts`: list, silence and unsilence.

Each handler is a plain async function from request params to a JSON-able dict.
`handlers(service)` binds them to the running alerts component, for the control
server's method registry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any

from walacord.alerts import rules
from walacord.alerts.model import MAX_SILENCE_SECONDS, Silence, contradicting_pairs
from walacord.alerts.service import AlertService
from walacord.config import PROBE_NAMES
from walacord.control.protocol import ErrorCode
from walacord.control.registry import Call, reject_unknown_params
from walacord.errors import ControlError
from walacord.probes.host import RESOURCES
from walacord.settings import duration_range_error, parse_duration
from walacord.terminal import shorten

INVALID_PARAMS = ErrorCode.INVALID_PARAMS
SILENCE_PARAMS = frozenset({"matcher", "duration", "reason"})
# Label values that walacord's alerts can carry, for labels with a fixed set.
KNOWN_VALUES: dict[str, tuple[str, ...]] = {"probe": PROBE_NAMES, "resource": RESOURCES}
CRITICAL_EVENT_SAMPLES = ("outbox.full", "outbox.disk_full", "outbox.corrupt",
                          "outbox.conservation", "outbox.state_dir", "component.crashed")

Handler = Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]]


async def alerts_list(service: AlertService, params: Mapping[str, Any]) -> dict[str, Any]:
    """Return active, silenced and recently resolved alerts, and the active silences."""
    reject_unknown_params("alerts.list", params, frozenset())
    return service.listing()


async def alerts_silence(service: AlertService, params: Mapping[str, Any], *,
                         created_by: str = "") -> dict[str, Any]:
    """Create a silence from `matcher`, `duration` ("2h" or seconds) and `reason`.

    `created_by` is the caller's identity from the socket, which a client cannot set.
    """
    reject_unknown_params("alerts.silence", params, SILENCE_PARAMS)
    matcher = _required_text(params, "matcher")
    reason = _required_text(params, "reason")
    requested = params.get("duration")
    try:
        duration = parse_duration(requested)
    except ValueError as exc:
        raise ControlError(INVALID_PARAMS, f"invalid duration {requested!r}: {exc}") from None
    problem = duration_range_error(requested, duration, maximum=MAX_SILENCE_SECONDS)
    if problem is not None:
        raise ControlError(INVALID_PARAMS, problem)
    try:
        silence = await service.silence(matcher, duration, reason, created_by)
    except ValueError as exc:
        raise ControlError(INVALID_PARAMS, str(exc)) from None
    return {"silence": silence.document(), "warnings": _matcher_warnings(silence)}


def _matcher_warnings(silence: Silence) -> list[str]:
    """Name matchers that no walacord alert can satisfy, such as a misspelt label."""
    warnings = []
    contradictions = contradicting_pairs(silence.matchers)
    for first, second in contradictions:
        warnings.append(f"{first} and {second} contradict each other, so this silence "
                        "matches no alert. Remove one of them")
    for matcher in silence.matchers:
        if matcher.name not in rules.LABEL_NAMES:
            warnings.append(f"walacord's alerts have no label {matcher.name!r}; they have "
                            f"{', '.join(rules.LABEL_NAMES)}")
        elif (matcher.name, matcher.op) == ("alertname", "=") \
                and matcher.value not in rules.ALERT_NAMES:
            warnings.append(f"walacord has no alert named {matcher.value!r}; it has "
                            f"{', '.join(rules.ALERT_NAMES)}")
        elif matcher.op == "=" and matcher.name in KNOWN_VALUES \
                and matcher.value not in KNOWN_VALUES[matcher.name]:
            warnings.append(f"walacord has no {matcher.name} {matcher.value!r}; it has "
                            f"{', '.join(KNOWN_VALUES[matcher.name])}")
        # A silence with contradicting matchers matches nothing, so it is not too wide.
        if not contradictions and matcher.name != "alertname" and matcher.matches({}) \
                and not any(other.name == "alertname" for other in silence.matchers):
            # A missing label reads as "", as in Alertmanager.
            scope = "only" if matcher.op == "=" else "also"
            warnings.append(f"{matcher} {scope} matches every alert without a "
                            f"{matcher.name!r} label, such as {rules.MODE_NOT_NORMAL} and "
                            f"{rules.DEAD_OPERATIONS}; add alertname=NAME to narrow it")
    if all(silence.matches(labels) for labels in _sample_label_sets()):
        warnings.append("this silence matches every alert walacord raises, critical ones "
                        "included; end it with `walacorctl alerts unsilence ID` unless "
                        "that is what you want")
    return warnings


def _sample_label_sets() -> list[dict[str, str]]:
    """Return label sets that, together, stand for every alert walacord can raise: each
    alert name at each severity, with each known value of the label it carries."""
    samples = []
    for name in rules.ALERT_NAMES:
        label = rules.ALERT_LABEL.get(name)
        # CRITICAL_ERROR's event is the outbox's alert kind or the event of a critical
        # log line; these stand for both.
        values = KNOWN_VALUES.get(label, CRITICAL_EVENT_SAMPLES) if label else ("",)
        for severity in ("warning", "critical"):
            for value in values:
                labels = {"alertname": name, "severity": severity}
                if label:
                    labels[label] = value
                samples.append(labels)
    return samples


async def alerts_unsilence(service: AlertService, params: Mapping[str, Any]) -> dict[str, Any]:
    """End the silence with `id` now."""
    reject_unknown_params("alerts.unsilence", params, frozenset({"id"}))
    silence_id = _required_text(params, "id")
    if not await service.unsilence(silence_id):
        raise ControlError(INVALID_PARAMS, f"silence {shorten(silence_id, 60)!r} not found "
                           "or already ended; list silences with `walacorctl alerts`")
    return {"expired": silence_id}


def silence_as_caller(service: AlertService) -> Callable[[Any, Call], Awaitable[Any]]:
    """Return the `alerts.silence` control handler that records the caller's identity.

    The identity comes from the socket's peer credentials, so a client cannot set it.
    """

    async def silence(params: Any, call: Call) -> dict[str, Any]:
        creator = call.peer.describe() if call.peer is not None else "unknown"
        return await alerts_silence(service, params or {}, created_by=creator)

    return silence


def handlers(service: AlertService) -> dict[str, Handler]:
    """Return the alert methods bound to `service`, keyed by control method name."""
    return {
        "alerts.list": partial(alerts_list, service),
        "alerts.silence": partial(alerts_silence, service),
        "alerts.unsilence": partial(alerts_unsilence, service),
    }


# Shown when a required text is missing.
_EXAMPLES = {"matcher": 'alertname="WalacordProbeDown",probe="database"',
             "reason": '"database maintenance"'}


def _required_text(params: Mapping[str, Any], key: str) -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value.strip():
        example = _EXAMPLES.get(key)
        hint = f", e.g. {example}" if example else ""
        raise ControlError(INVALID_PARAMS, f"missing or empty {key!r}: give it as non-empty "
                           f"text{hint}")
    return value.strip()
