"""Human-readable `walacorctl` output: aligned tables, the status view, progress bars."""

from __future__ import annotations

import datetime
import shutil
from collections.abc import Sequence
from typing import Any, TextIO

from walacord.terminal import escape_control_characters

MISSING = "-"


def as_object(value: object) -> dict[str, Any]:
    """Return `value` when it is a JSON object, else an empty one.

    The views below read the daemon's documents with it, so a field of another shape,
    as from a daemon of another release, shows as missing instead of failing.
    """
    return value if isinstance(value, dict) else {}


_ONE_LINE = str.maketrans({"\n": " ", "\r": " ", "\t": " "})


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Return rows as left-aligned columns under upper-case headers.

    Line breaks and tabs inside a value, such as PostgreSQL's CONTEXT line in an error,
    become spaces, so each row stays on one line. Other control characters are printed
    as escapes such as `\\x1b`, so a stored value cannot drive the terminal.
    """
    cells = [[str(h).upper() for h in headers]]
    cells += [[MISSING if value is None else _table_cell(str(value)) for value in row]
              for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             .rstrip() for row in cells]
    return "\n".join(lines)


def _table_cell(text: str) -> str:
    return escape_control_characters(text.translate(_ONE_LINE))


def first_line(text: str, limit: int = 60) -> str:
    """Return the first line of `text` for a table cell, cut to `limit` characters.

    PostgreSQL's error messages go on with LINE, caret, DETAIL and CONTEXT lines, which
    only `--json` and the detail views should show.
    """
    lines = text.strip().splitlines()
    line = lines[0].rstrip() if lines else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."


def format_pairs(pairs: Sequence[tuple[str, object]]) -> str:
    """Return `key: value` lines with the values aligned."""
    width = max((len(key) for key, _ in pairs), default=0) + 1
    return "\n".join(f"{(key + ':').ljust(width)}  "
                     f"{MISSING if value is None else escape_control_characters(str(value))}"
                     for key, value in pairs)


def format_seconds(value: object) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return MISSING
    if value < 1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s"


def format_timestamp(value: object) -> str:
    """Return a Unix time in seconds as ISO 8601 UTC, or the value unchanged."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return MISSING if value is None else str(value)
    moment = datetime.datetime.fromtimestamp(value, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def format_recycle(result: dict[str, Any]) -> str:
    """Return a `pool.recycle` result as aligned lines, with nested figures as dotted keys."""
    pairs: list[tuple[str, object]] = []
    for key, value in sorted(result.items()):
        if isinstance(value, dict):
            pairs += [(f"{key}.{inner}", value[inner]) for inner in sorted(value)]
        elif key == "at":
            pairs.append((key, format_timestamp(value)))
        elif key.endswith("_seconds"):
            pairs.append((key, format_seconds(value)))
        elif isinstance(value, bool):
            pairs.append((key, "yes" if value else "no"))
        else:
            pairs.append((key, value))
    return format_pairs(pairs)


def format_override(override: object) -> str:
    if not override:
        return "none"
    if not isinstance(override, dict):
        return escape_control_characters(str(override))
    remaining = override.get("remaining_seconds")
    left = f", {remaining:.0f}s left" if isinstance(remaining, int | float) else ""
    return (f"{override.get('mode')} until {override.get('expires_at')}{left} "
            f"(by {override.get('set_by')}: {override.get('reason')})")


def format_mode(state: dict[str, Any]) -> str:
    pairs = [
        ("mode", state.get("mode")),
        ("since", state.get("since")),
        ("reason", state.get("reason")),
        ("override", format_override(state.get("override"))),
    ]
    override = as_object(state.get("override"))
    if override.get("probes_mode") not in (None, override.get("mode")):
        pairs.append(("probes say", f"{override['probes_mode']}: "
                                    f"{override.get('probes_reason')}"))
    return format_pairs(pairs)


def override_hides_worse(state: dict[str, Any]) -> bool:
    """Tell whether the override reports a better mode than the probes give."""
    override = as_object(state.get("override"))
    order = ("normal", "degraded", "emergency", "offline")
    forced, probes = override.get("mode"), override.get("probes_mode")
    return forced in order and probes in order and order.index(probes) > order.index(forced)


def format_probes(probes: object) -> str:
    if not isinstance(probes, dict) or not probes:
        return "no probes configured"
    rows = []
    for name in sorted(probes):
        probe = probes[name] if isinstance(probes[name], dict) else {}
        healthy = probe.get("healthy", False)
        state = "up" if healthy else "down"
        if healthy is None:
            state = "not configured"
        reason = probe.get("reason")
        if probe.get("paused"):
            # The state is the last result before the pause.
            state += " (paused)"
            reason = f"paused: {probe['paused']}; last result: {reason}"
        rows.append([name, state, format_seconds(probe.get(
            "latency_seconds")), probe.get("since"), reason])
    return format_table(["probe", "state", "latency", "since", "reason"], rows)


def format_status(status: dict[str, Any]) -> str:
    daemon = as_object(status.get("daemon"))
    pairs: list[tuple[str, object]] = [
        ("mode", status.get("mode")),
        ("since", status.get("since")),
        ("reason", status.get("reason")),
        ("override", format_override(status.get("override"))),
        ("daemon", f"{daemon.get('state')}, version {daemon.get('version')}, "
                   f"environment {daemon.get('environment')}, up "
                   f"{format_seconds(daemon.get('uptime_seconds'))}"),
    ]
    pending = daemon.get("restart_required")
    if pending and isinstance(pending, list):
        pairs.append(("restart", f"needed for {', '.join(map(str, pending))}: changed in the "
                                 "config file, applied at the next restart"))
    return format_pairs(pairs) + "\n\n" + format_probes(status.get("probes"))


class ProgressBar:
    """Draw `{"done", "total", "message"}` progress lines as one redrawn bar on a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.drawn = False

    def __call__(self, progress: dict[str, Any]) -> None:
        done = progress.get("done")
        total = progress.get("total")
        message = str(progress.get("message") or "")
        columns = shutil.get_terminal_size((80, 20)).columns
        if isinstance(done, int | float) and isinstance(total, int | float) and total > 0:
            fraction = min(1.0, max(0.0, done / total))
            width = 30
            filled = int(fraction * width)
            text = (f"[{'#' * filled}{'.' * (width - filled)}] {fraction * 100:5.1f}% "
                    f"{done:g}/{total:g} {message}")
        else:
            text = f"{done or ''} {message}".strip()
        self.stream.write("\r" + text[: columns - 1].ljust(columns - 1))
        self.stream.flush()
        self.drawn = True

    def finish(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
