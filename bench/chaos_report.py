"""Render the chaos suite's results file into the chaos section of docs/benchmarks.md.

The suite writes one record per scenario (see tests/chaos/results.py) to the file named
by WALACORD_CHAOS_RESULTS. This script turns that file into a table with each measured
figure beside its bound, so the bounds in the tests and in the docs are the same.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import benchdoc

from tests.chaos.results import RESULTS_ENV, load

SECTION = "chaos"
DEFAULT_RESULTS = benchdoc.RESULTS_DIR / "chaos.json"


def seconds(value: float | None, bound: float | None) -> str:
    measured = "-" if value is None else f"{value:.3f} s"
    return measured if bound is None else f"{measured} (<= {bound:g} s)"


def count(value: int | None) -> str:
    return "not counted" if value is None else str(value)


def render(document: dict[str, Any], command: str) -> str:
    scenarios = document.get("scenarios", {})

    lines = [
        "## Fault-injection suite",
        "",
        "Each scenario injects one fault into a real PostgreSQL server or the emulator "
        "while the real daemon runs, and fails when a figure breaks its bound "
        "(shown in brackets).",
        "",
    ]
    if not scenarios:
        return "\n".join([*lines, "No scenario results were recorded."])

    lines += [
        "| scenario | mode path (expected) | detection | recovery | lost | duplicated | result |",
        "|---|---|---|---|---|---|---|",
    ]
    failed = 0
    for name in sorted(scenarios):
        record = scenarios[name]
        observed = " -> ".join(record.get("mode_path") or []) or "-"
        accepted = [record.get("expected_path") or [], *(record.get("also_accepted") or [])]
        expected = " or ".join(" -> ".join(path) for path in accepted if path)
        matched = any(" -> ".join(path) == observed for path in accepted)
        path = observed if not expected or matched else f"{observed} ({expected})"
        failures = record.get("failures") or []
        failed += bool(failures)
        verdict = "pass" if not failures else "FAIL: " + "; ".join(failures)
        lines.append(
            f"| {name} | {path} | "
            f"{seconds(record.get('detection_s'), record.get('detection_bound_s'))} | "
            f"{seconds(record.get('recovery_s'), record.get('recovery_bound_s'))} | "
            f"{count(record.get('lost'))} | {count(record.get('duplicated'))} | {verdict} |")

    lines += ["", f"{len(scenarios) - failed} of {len(scenarios)} scenarios within bounds."]
    described = [(name, scenarios[name].get("description")) for name in sorted(scenarios)]
    described = [(name, text) for name, text in described if text]
    if described:
        lines += ["", *(f"- **{name}**: {text}" for name, text in described)]
    lines += ["", benchdoc.facts_block({}, command)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("results", nargs="?",
                        default=os.environ.get(RESULTS_ENV, str(DEFAULT_RESULTS)),
                        help=f"results file (env {RESULTS_ENV}; default %(default)s)")
    parser.add_argument("--command", default="bench/run",
                        help="command to show as the one that produced the results")
    parser.add_argument("--no-doc", action="store_true",
                        help="print the section instead of writing docs/benchmarks.md")
    args = parser.parse_args(argv)

    section = render(load(Path(args.results)), args.command)
    benchdoc.publish(SECTION, section, args.no_doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
