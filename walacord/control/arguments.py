"""argparse types that walacorctl's options share.

`--timeout`, `check --timeout`, `mode set --ttl`, `watch --interval` and `alerts
silence --for` all accept the forms of `parse_duration` (90, 1.5e3, 500ms, 30s, 5m,
1h, 7d) and word their errors as the daemon words the same problem. `non_empty`
rejects an empty value while parsing. Otherwise connect() or the daemon would reject
it later with a message that does not name the option.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from walacord.settings import duration_range_error, parse_duration

# Appended to the help text of each duration option.
DURATION_HELP = "seconds, or a number with a unit ms, s, m, h or d, such as 30s or 1.5h"


def duration_type(*, minimum: float | None = None,
                  maximum: float | None = None) -> Callable[[str], float]:
    """Return an argparse type that parses a duration into seconds and checks its range.

    A duration must be above 0 unless `minimum` sets another lower limit. Both limits
    are inclusive.
    """

    def duration(text: str) -> float:
        try:
            seconds = parse_duration(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"invalid duration {text!r}: {exc}") from None
        problem = duration_range_error(text, seconds, minimum=minimum, maximum=maximum)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return seconds

    return duration


def non_empty(value_name: str, fix: str) -> Callable[[str], str]:
    """Return an argparse type that rejects an empty string as "empty {value_name}; {fix}"."""

    def text(value: str) -> str:
        if not value:
            raise argparse.ArgumentTypeError(f"empty {value_name}; {fix}")
        return value

    return text
