"""The method registry and its parameter validation."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import pytest

from walacord.control.methods import ModeSetParams, PoolRecycleParams
from walacord.control.protocol import ErrorCode
from walacord.control.registry import Call, MethodRegistry, parse_params
from walacord.errors import ControlError


@dataclass(frozen=True)
class SampleParams:
    name: str
    count: int = 1
    ratio: float = 0.5
    level: Literal["low", "high"] = "low"
    tags: list[str] | None = None
    enabled: bool = False


async def handler(params: Any, call: Call) -> None:
    return None


def test_parse_params_applies_defaults() -> None:
    parsed = parse_params("m", SampleParams, {"name": "a"})
    assert parsed == SampleParams(name="a")


def test_parse_params_converts_integer_to_float() -> None:
    parsed = parse_params("m", SampleParams, {"name": "a", "ratio": 2})
    assert parsed.ratio == 2.0
    assert isinstance(parsed.ratio, float)


@pytest.mark.parametrize(("params", "fragment"), [
    ({}, "missing param 'name' for m"),
    ({"name": 1}, "invalid param 'name' for m: 1 is not a string"),
    ({"name": "a", "count": True}, "True is not an integer"),
    ({"name": "a", "count": 1.5}, "1.5 is not an integer"),
    ({"name": "a", "ratio": "1"}, "'1' is not a number"),
    ({"name": "a", "level": "mid"}, "is not one of 'low', 'high'"),
    ({"name": "a", "tags": ["x", 2]}, "is not a list of a string or null"),
    ({"name": "a", "enabled": 1}, "1 is not true or false"),
    ({"name": "a", "other": 1, "more": 2}, "unknown param(s) more, other for m"),
])
def test_parse_params_rejects(params: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ControlError) as caught:
        parse_params("m", SampleParams, params)
    assert caught.value.code == ErrorCode.INVALID_PARAMS
    assert fragment in caught.value.message


def test_parse_params_without_model_rejects_any_param() -> None:
    assert parse_params("m", None, {}) is None
    with pytest.raises(ControlError, match="m takes no params, got x"):
        parse_params("m", None, {"x": 1})


def test_parse_params_truncates_long_values() -> None:
    with pytest.raises(ControlError) as caught:
        parse_params("m", SampleParams, {"name": 7, "count": "y" * 10_000})
    assert len(caught.value.message) < 200


def test_register_rejects_duplicate_name() -> None:
    registry = MethodRegistry()
    registry.register("a.b", handler, mutating=False)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a.b", handler, mutating=True)


def test_register_rejects_non_dataclass_params() -> None:
    with pytest.raises(ValueError, match="must be a dataclass"):
        MethodRegistry().register("a.b", handler, list, mutating=False)


def test_dict_params_pass_through_unchanged() -> None:
    assert parse_params("a.b", dict, {"x": [1], "y": None}) == {"x": [1], "y": None}


def test_register_audits_mutating_by_default() -> None:
    registry = MethodRegistry()
    registry.register("w", handler, mutating=True)
    registry.register("quiet", handler, mutating=True, audit=False)
    registry.register("r", handler, mutating=False)
    assert registry.get("w").audit is True  # type: ignore[union-attr]
    assert registry.get("quiet").audit is False  # type: ignore[union-attr]
    assert registry.get("r").audit is False  # type: ignore[union-attr]
    assert registry.names() == ["quiet", "r", "w"]


@pytest.mark.anyio
async def test_silent_progress_handler_sends_heartbeats(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("walacord.control.registry.PROGRESS_HEARTBEAT", 0.5)
    registry = MethodRegistry()

    async def quiet_step(params: dict[str, object], *, progress: object) -> str:
        await anyio.sleep(1.8)  # like pg_dump waiting for a lock: no progress to report
        return "done"

    registry.register_with_progress("test.quiet", quiet_step, mutating=False)
    method = registry.get("test.quiet")
    assert method is not None
    sent: list[tuple[float, float | None, str]] = []

    async def collect(done: float, total: float | None, message: str) -> None:
        sent.append((done, total, message))

    result = await method.handler({}, Call("test.quiet", 1, None, collect))

    assert result == "done"
    assert len(sent) >= 3
    assert set(sent) == {(0, None, "in progress")}


@pytest.mark.parametrize("params", [
    lambda reason: ModeSetParams(mode="degraded", ttl_seconds=60.0, reason=reason),
    lambda reason: PoolRecycleParams(reason=reason),
])
def test_reason_rejects_control_characters(params: Callable[[str], object]) -> None:
    with pytest.raises(ValueError, match=r"control character '\\x1b' \(U\+001B\) at "
                                         r"position 4"):
        params("main\x1b]0;owned\x07")


@pytest.mark.parametrize("params", [
    lambda reason: ModeSetParams(mode="degraded", ttl_seconds=60.0, reason=reason),
    lambda reason: PoolRecycleParams(reason=reason),
])
@pytest.mark.parametrize(("character", "named"), [
    ("\u200b", "U+200B (ZERO WIDTH SPACE)"),
    ("\u2066", "control character '\\u2066' (U+2066)"),
    ("\ufeff", "U+FEFF (ZERO WIDTH NO-BREAK SPACE)"),
])
def test_reason_rejects_invisible_characters(params: Callable[[str], object], character: str,
                                             named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{named} at position 4")):
        params(f"main{character}tenance")


@pytest.mark.parametrize("params", [
    lambda reason: ModeSetParams(mode="degraded", ttl_seconds=60.0, reason=reason),
    lambda reason: PoolRecycleParams(reason=reason),
])
def test_reason_too_long_names_length(params: Callable[[str], object]) -> None:
    with pytest.raises(ValueError) as caught:
        params("x" * 501)

    assert str(caught.value) == "reason is 501 characters, over the limit of 500; shorten it"


@pytest.mark.parametrize("params", [
    lambda reason: ModeSetParams(mode="degraded", ttl_seconds=60.0, reason=reason),
    lambda reason: PoolRecycleParams(reason=reason),
])
@pytest.mark.parametrize("reason", ["", "   "])
def test_reason_empty_rejected(params: Callable[[str], object], reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        params(reason)

    assert str(caught.value) == "reason must not be empty; say why, in at most 500 characters"


def test_reason_of_500_characters_accepted() -> None:
    assert len(PoolRecycleParams(reason="x" * 500).reason) == 500
    assert len(ModeSetParams(mode="degraded", ttl_seconds=60.0, reason="x" * 500).reason) == 500


@pytest.mark.parametrize("params", [
    lambda reason: ModeSetParams(mode="degraded", ttl_seconds=60.0, reason=reason),
    lambda reason: PoolRecycleParams(reason=reason),
])
def test_reason_accepts_emoji(params: Callable[[str], object]) -> None:
    reason = "on call \U0001f469\U0001f3fd\u200d\U0001f4bb, done \u2764\ufe0f"
    assert params(reason).reason == reason  # type: ignore[attr-defined]
