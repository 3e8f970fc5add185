"""Typed TOML decoding: turns a TOML table into a frozen dataclass, collecting problems.

Each field's annotation is its type. `field(metadata=...)` built with `setting()` adds a
range, a set of allowed values, a help text and whether the value is a secret. Secret
keys also accept `KEY_file`, a path whose content (stripped) is the value.
Every invalid value becomes one `ConfigProblem` naming the key, the value and the fix,
so an operator sees all mistakes in one run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NewType, TypeVar

from walacord.errors import ConfigProblem

# Seconds, written in TOML as a number or a string with a unit: "500ms", "30s", "5m", "1h", "7d".
Duration = NewType("Duration", float)
# A filesystem path, written as a string. It must be absolute, and it is normalised
# ("/var/lib/walacord/" and "/var/lib/walacord" are the same setting); an empty string
# stays empty.
PathSetting = NewType("PathSetting", str)

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# A decimal number, with an optional exponent as in 1.5e3, and an optional unit. A
# plain number, as from a command line, counts as seconds. A negative value parses,
# so that range checks can name it. Digits are ASCII only, unlike \d, and "inf",
# "nan" and "1_000", which float() accepts, do not match.
_DURATION_RE = re.compile(
    r"^\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*(ms|s|m|h|d)?\s*$")
DURATION_FORMS = ("a duration is a number of seconds, such as 90 or 1.5e3, or a number with "
                  'a unit ms, s, m, h or d, such as "500ms", "30s", "5m", "1h" or "7d"')

T = TypeVar("T")


def setting(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Callable[[], Any] | None = None,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[str, ...] | None = None,
    secret: bool = False,
    help: str = "",
    example: object = None,
) -> Any:
    """Declare a config field with its range, allowed values and help text.

    `example`, a valid value of a list setting, is shown in the error for a value that
    is not a list. For a list of lists, its first item is the example for each item.
    """
    metadata = {"min": min, "max": max, "choices": choices, "secret": secret, "help": help,
                "example": example}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def parse_duration(value: object) -> float:
    """Return seconds for a number or a string such as "30s" or "1e3"; raise ValueError
    when the value has another form or is not finite.

    The configuration file, every duration option of walacorctl and the control methods
    that take a duration all parse with this function, so they accept the same forms.
    """
    if isinstance(value, bool):
        raise ValueError(DURATION_FORMS)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION_RE.match(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    else:
        raise ValueError(DURATION_FORMS)
    if not math.isfinite(seconds):
        raise ValueError("a duration must be a finite number of seconds")
    return seconds


def format_duration(seconds: float) -> str:
    """Format `seconds` in the largest unit that divides them, such as "366d" or "0.1s"."""
    for unit in ("d", "h", "m"):
        size = _DURATION_UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def duration_range_error(value: object, seconds: float, *, minimum: float | None = None,
                         maximum: float | None = None) -> str | None:
    """Return the message for a duration outside its range, or None when it is inside.

    `value` is the duration as the caller wrote it, and `seconds` is `value` parsed. A
    duration must be above 0 unless `minimum` sets another lower limit. Both limits are
    inclusive.
    """
    too_low = seconds < minimum if minimum is not None else seconds <= 0
    if not too_low and (maximum is None or seconds <= maximum):
        return None
    limits = "above 0" if minimum is None else f"at least {format_duration(minimum)}"
    if maximum is not None:
        limits += f" and at most {format_duration(maximum)}"
    # The seconds are shown when they are short enough to read.
    shown = f" ({_seconds_text(seconds)})" if abs(seconds) < 1e12 else ""
    return f"invalid duration {value!r}{shown}: it must be {limits}"


def _seconds_text(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds == int(seconds) else f"{seconds:g}s"


class Decoder:
    """Decode one TOML document into dataclasses, collecting every problem."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[ConfigProblem] = []
        # key -> where its value came from when not the file, e.g. "environment LOG_LEVEL".
        self.origins: dict[str, str] = {}

    def problem(self, key: str, message: str) -> None:
        self.problems.append(ConfigProblem(self.origins.get(key, self.source), key, message))

    def decode(self, cls: type[T], table: object, prefix: str = "") -> T:
        """Build `cls` from `table`; invalid fields keep their default and add a problem."""
        if not isinstance(table, dict):
            self.problem(prefix or "(top level)",
                         f"expected a table, got {_describe(table)}; write it as [{prefix}]")
            table = {}

        fields = {f.name: f for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                  if not f.metadata.get("internal")}
        hints = typing.get_type_hints(cls)
        known = set(fields)
        known |= {f"{name}_file" for name, f in fields.items() if f.metadata.get("secret")}

        for key in table:
            if key not in known:
                self._unknown_key(key, known, prefix)

        values: dict[str, Any] = {}
        for name, spec in fields.items():
            key = f"{prefix}.{name}" if prefix else name
            if spec.metadata.get("secret") and f"{name}_file" in table:
                if name in table:
                    self.problem(key, f"set either {name} or {name}_file, not both")
                    continue
                secret = self._read_secret_file(f"{key}_file", table[f"{name}_file"])
                if secret is not None:
                    values[name] = secret
                continue
            if name not in table:
                continue
            converted = self._convert(key, hints[name], table[name], spec.metadata)
            if converted is not _INVALID:
                values[name] = converted

        return cls(**values)

    def _unknown_key(self, key: str, known: set[str], prefix: str) -> None:
        full = f"{prefix}.{key}" if prefix else key
        close = _close_matches(key, sorted(known), cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        valid = ", ".join(sorted(known))
        self.problem(full, f"unknown key{hint} (valid keys here: {valid})")

    def _read_secret_file(self, key: str, path: object) -> str | None:
        if not isinstance(path, str) or not path:
            self.problem(key, f"expected a file path string, got {_describe(path)}")
            return None
        if not os.path.isabs(path):
            self.problem(key, relative_path_problem(path))
            return None
        try:
            secret = Path(path).read_text().strip()
        except OSError as exc:
            self.problem(key, f"cannot read secret file {path!r}: {exc.strerror}; "
                              "check the path and that walacord's user can read it")
            return None
        if not secret:
            # Most often a file created for the secret and never filled in.
            name = key.rpartition(".")[2].removesuffix("_file")
            self.problem(key, f"secret file {path!r} is empty; write the {name} into it, "
                              f"or remove {name}_file if walacord needs no {name}")
            return None
        return secret

    def _convert(self, key: str, hint: Any, value: object, meta: typing.Mapping[str, Any]) -> Any:
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)

        if origin in (types.UnionType, typing.Union):
            non_none = [a for a in args if a is not type(None)]
            if len(non_none) == 1:
                return self._convert(key, non_none[0], value, meta)

        if hint is Duration:
            try:
                seconds = parse_duration(value)
            except ValueError as exc:
                self.problem(key, f"invalid value {value!r}: {exc}")
                return _INVALID
            return self._check_range(key, seconds, meta, unit="s")

        if hint is PathSetting:
            path = self._convert_scalar(key, str, value, meta)
            if not isinstance(path, str) or not path:
                return path
            if not os.path.isabs(path):
                self.problem(key, relative_path_problem(path))
                return _INVALID
            return os.path.normpath(path)

        if dataclasses.is_dataclass(hint):
            return self.decode(hint, value, key)  # type: ignore[arg-type]

        if origin is list:
            example = meta.get("example")
            if not isinstance(value, list):
                hint = f"; write a list such as {json.dumps(example)}" if example else ""
                self.problem(key, f"expected a list, got {_describe(value)}{hint}")
                return _INVALID
            item_meta = ({"example": example[0]} if isinstance(example, list) and example
                         and typing.get_origin(args[0]) is list else {})
            items = [self._convert(f"{key}[{i}]", args[0], item, item_meta)
                     for i, item in enumerate(value)]
            return _INVALID if any(i is _INVALID for i in items) else items

        if origin is dict:
            if not isinstance(value, dict):
                self.problem(key, f"expected a table, got {_describe(value)}")
                return _INVALID
            result = {name: self._convert(f"{key}.{name}", args[1], item, {})
                      for name, item in value.items()}
            return _INVALID if any(v is _INVALID for v in result.values()) else result

        return self._convert_scalar(key, hint, value, meta)

    def _convert_scalar(self, key: str, hint: Any, value: object,
                        meta: typing.Mapping[str, Any]) -> Any:
        if hint is bool:
            if not isinstance(value, bool):
                self.problem(key, f"expected true or false, got {_describe(value)}")
                return _INVALID
            return value

        if hint is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self.problem(key, f"expected an integer, got {_describe(value)}")
                return _INVALID
            return self._check_range(key, value, meta)

        if hint is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                self.problem(key, f"expected a number, got {_describe(value)}")
                return _INVALID
            return self._check_range(key, float(value), meta)

        if hint is str:
            if not isinstance(value, str):
                self.problem(key, f"expected a string, got {_describe(value)}")
                return _INVALID
            choices = meta.get("choices")
            if choices and value not in choices:
                close = _close_matches(value, choices, cutoff=0.5)
                hint_text = f"; did you mean {close[0]!r}?" if close else ""
                self.problem(key, f"invalid value {value!r}{hint_text} "
                                  f"(one of: {', '.join(choices)})")
                return _INVALID
            return value

        raise TypeError(f"config field {key} has an unsupported type {hint!r}")

    def _check_range(self, key: str, value: float, meta: typing.Mapping[str, Any],
                     unit: str = "") -> Any:
        if not math.isfinite(value):
            self.problem(key, f"invalid value {value!r}: it must be a finite number")
            return _INVALID
        low, high = meta.get("min"), meta.get("max")
        value_text = _quantity(value, unit)
        if low is not None and value < low:
            self.problem(key, f"value {value_text} is below the minimum {_quantity(low, unit)}; "
                              f"set it to {_quantity(low, unit)} or more")
            return _INVALID
        if high is not None and value > high:
            self.problem(key, f"value {value_text} is above the maximum {_quantity(high, unit)}; "
                              f"set it to {_quantity(high, unit)} or less")
            return _INVALID
        return value


_INVALID = object()


def relative_path_problem(path: str) -> str:
    """Return the message for a relative path in a path setting.

    walacord would resolve it against its working directory, which is / under systemd,
    so a file that `check-config` accepts in one directory could fail in the daemon.
    """
    return (f"{path!r} is a relative path, which depends on the directory walacord "
            "starts in (/ under systemd); give an absolute path")


def _describe(value: object) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{kind} {shown}"


def _close_matches(word: str, candidates: Sequence[str], cutoff: float) -> list[str]:
    # Imported here: only an invalid file needs difflib, and the daemon saves 0.2 MiB.
    import difflib

    return difflib.get_close_matches(word, candidates, n=1, cutoff=cutoff)


def _quantity(value: float, unit: str) -> str:
    """Return `value` with its unit, whole numbers without an exponent.

    Seconds of an hour or more also get a day or hour form: 31536000s (365d).
    """
    if float(value).is_integer() and abs(value) < 1e18:
        text = f"{int(value)}{unit}"
    else:
        text = f"{value:.6g}{unit}"
    if unit == "s" and abs(value) >= 3600 and abs(value) < 1e18:
        days, hours = value / 86400, value / 3600
        text += f" ({days:g}d)" if days.is_integer() else f" ({hours:g}h)"
    return text
