"""The crash loop at full length: SIGKILL walacord at random moments while clients enqueue.

Runs `tests/chaos/crashloop.py`'s loop against a private PostgreSQL cluster and the
emulator, then writes the crash-loop section of docs/benchmarks.md. Each cycle starts
the daemon on the same state directory, lets three clients enqueue to Walacor (which
returns 503 for a fifth of submits) and PostgreSQL, and SIGKILLs it after 0.05-0.6 s.
The checks: every acknowledged operation at its sink exactly once, SQLite
`integrity_check`, and the outbox's conservation at every start.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import benchdoc

from tests.chaos.crashloop import CrashLoopResult, run_crash_loop
from tests.chaos.emulator import EmulatorProcess

SECTION = "crashloop"


def render(result: CrashLoopResult, walacord_command: list[str]) -> str:
    verdict = "passed" if not result.problems else "FAILED: " + "; ".join(result.problems)
    drain = "-" if result.drain_s is None else f"{result.drain_s:.2f} s"
    lines = [
        "## Crash loop",
        "",
        f"{result.cycles} cycles of start, enqueue from several clients, SIGKILL after a "
        "random 0.05-0.6 s, while Walacor returns 503 for a fifth of submits; then a clean "
        "drain.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| acknowledged operations | {result.acked} ({result.walacor_acked} Walacor, "
        f"{result.postgres_acked} PostgreSQL) |",
        f"| lost | {result.lost} |",
        f"| applied twice | {result.duplicated} |",
        f"| SQLite integrity_check | {result.integrity} |",
        f"| conservation held at start | {result.starts_conserved} of "
        f"{result.starts_checked} |",
        f"| final drain | {drain} |",
        f"| whole run | {result.seconds / 60:.1f} min |",
        "",
        f"Result: {verdict}.",
        "",
        benchdoc.facts_block(
            {"walacord": benchdoc.tool_version([*walacord_command, "--version"])},
            benchdoc.command_line()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cycles", type=int, default=1000,
                        help="kill-and-restart cycles (default 1000)")
    parser.add_argument("--clients", type=int, default=3, help="enqueueing clients (default 3)")
    parser.add_argument("--seed", type=int, default=1, help="random seed for the kill times")
    benchdoc.add_common_arguments(parser)
    args = parser.parse_args(argv)

    command = benchdoc.walacord_command(args.walacord)
    with benchdoc.scratch_dir("walacord-bench-crashloop-") as workdir, \
            benchdoc.started_cluster(workdir) as cluster:
        emulator = EmulatorProcess(command, workdir / "emulator").start()
        try:
            result = run_crash_loop(Path(workdir) / "walacord", cluster.url(),  # type: ignore[attr-defined]
                                    emulator, command, cycles=args.cycles,
                                    clients=args.clients, seed=args.seed)
        finally:
            emulator.stop()

    benchdoc.save_results("crashloop", asdict(result))
    section = render(result, command)
    benchdoc.publish(SECTION, section, args.no_doc)
    return 0 if not result.problems else 1


if __name__ == "__main__":
    sys.exit(main())
