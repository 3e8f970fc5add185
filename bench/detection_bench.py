"""Detection and recovery: PostgreSQL stopped with `pg_ctl stop -m immediate` and started
again, measured for walacord and for Monit watching the same server in the same runs.

Each run:

1. waits until walacord reports mode normal and Monit's last event is "up";
2. sleeps a random 0.2-1.2 s, so the stop falls at a random point of each tool's cycle;
3. runs `pg_ctl stop -m immediate`. Detection is measured from just before pg_ctl is
   launched: for walacord to the first /api/health response whose mode is not normal
   (polled every 5 ms) and, separately, to the `ts` of the `mode.changed` event in its
   log; for Monit to the timestamp its `exec` action writes on failure;
4. runs `pg_ctl start -w`. Recovery is measured from the moment pg_ctl returns, when
   the server accepts connections, to mode normal and to Monit's "up" timestamp.

Monit (Debian package `monit`) runs with `set daemon 1`, its shortest cycle, and
`if failed port P protocol pgsql`. walacord runs with its default probe settings.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import benchdoc

from tests.chaos.faults import backend_pids

SECTION = "detection"
PLOT = "detection.png"


# --- Monit ----------------------------------------------------------------------------


class MonitAnchor:
    """Monit checking 127.0.0.1:`port` with the pgsql protocol test every second."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.stamps = workdir / "monit-events"
        self.control = workdir / "monitrc"
        self.log = workdir / "monit.log"
        self.process: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        stamp = self.workdir / "stamp.sh"
        stamp.write_text(f'#!/bin/sh\necho "$1 $(date +%s.%N)" >> {self.stamps}\n')
        stamp.chmod(0o755)
        self.control.write_text(
            "set daemon 1\n"
            f"set logfile {self.log}\n"
            f"set pidfile {self.workdir / 'monit.pid'}\n"
            f"set idfile {self.workdir / 'monit.id'}\n"
            f"set statefile {self.workdir / 'monit.state'}\n"
            "check host postgresql with address 127.0.0.1\n"
            f"    if failed port {self.port} protocol pgsql with timeout 1 seconds\n"
            f'        then exec "{stamp} down"\n'
            f'        else if succeeded then exec "{stamp} up"\n'
        )
        self.control.chmod(0o600)

    def start(self) -> None:
        self.write_config()
        with open(self.log, "ab") as output:
            self.process = subprocess.Popen(
                ["monit", "-I", "-c", str(self.control)], stdout=output,
                stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def events(self) -> list[tuple[str, float]]:
        """Return (kind, wall time) for each exec Monit ran: kind is "up" or "down"."""
        try:
            lines = self.stamps.read_text().splitlines()
        except FileNotFoundError:
            return []
        found = []
        for line in lines:
            kind, _, stamp = line.partition(" ")
            if stamp:
                found.append((kind, float(stamp)))
        return found

    def wait_for(self, kind: str, after_wall: float, timeout: float) -> float | None:
        """Return the wall time of the first `kind` event after `after_wall`, or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event_kind, stamp in self.events():
                if event_kind == kind and stamp >= after_wall:
                    return stamp
            time.sleep(0.01)
        return None

    def last_kind(self) -> str | None:
        events = self.events()
        return events[-1][0] if events else None


# --- the runs -------------------------------------------------------------------------


class ProcessExitWatch:
    """Poll a pid every half millisecond from a thread and note when it is gone."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.gone_at: float | None = None
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                self.gone_at = time.monotonic()
                return
            time.sleep(0.0005)

    def wait(self, since: float, timeout: float) -> float | None:
        """Return seconds from `since` until the process was gone, or None."""
        self._thread.join(timeout)
        return None if self.gone_at is None else self.gone_at - since


@dataclass
class RunResult:
    """One stop-and-start cycle; times in seconds, None when not seen within the wait."""

    backend_exit_s: float | None = None
    walacord_detection_s: float | None = None
    walacord_detection_log_s: float | None = None
    walacord_recovery_s: float | None = None
    walacord_modes: list[str] = field(default_factory=list)
    monit_detection_s: float | None = None
    monit_recovery_s: float | None = None


def logged_change_after(daemon: Any, after_wall: float, from_mode: str,
                        timeout: float = 3.0) -> float | None:
    """Return the ts of the first `mode.changed` from `from_mode` after `after_wall`.

    The log is written by a thread after the mode changes, so wait for it briefly.
    """
    deadline = time.monotonic() + timeout
    while True:
        for stamp, old, _new in daemon.mode_changes():
            # The log's ts has millisecond resolution: allow one millisecond of rounding.
            if old == from_mode and stamp >= after_wall - 0.001:
                return float(stamp)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def measure(args: argparse.Namespace, workdir: Path) -> tuple[list[RunResult], list[str]]:
    from tests.chaos.daemon import ModeWatcher, WalacordDaemon

    notes: list[str] = []
    results: list[RunResult] = []
    with benchdoc.started_cluster(workdir) as cluster, ExitStack() as cleanup:
        monit = None
        if not args.no_monit:
            if shutil.which("monit"):
                monit = MonitAnchor(workdir, cluster.port)  # type: ignore[attr-defined]
                cleanup.callback(monit.stop)
                monit.start()
            else:
                notes.append("Monit is not installed (apt-get install monit): no anchor.")

        command = shlex.split(args.walacord) if args.walacord else None
        if not args.no_walacord:
            notes.append("walacord runs with its default hysteresis and flap damping; a "
                         "fresh daemon watches each run, because 20 outages a minute "
                         "apart are flapping, which walacord's damping rightly holds down.")
        for index in range(args.runs):
            with ExitStack() as per_run:
                daemon = None
                watcher = None
                if not args.no_walacord:
                    # Identical warnings are written once per repeat_window, and every run
                    # logs the same normal -> emergency change, so the window is 1 s.
                    daemon = WalacordDaemon(
                        workdir / "walacord", cluster.url(),  # type: ignore[attr-defined]
                        settings={"logging": {"repeat_window": 1.0}}, command=command)
                    per_run.callback(daemon.stop)
                    daemon.start()
                    watcher = ModeWatcher(daemon.http_port, interval=0.005).start()
                    per_run.callback(watcher.stop)
                    daemon.wait_for_mode("normal", timeout=30)
                result = one_run(cluster, daemon, watcher, monit, args.wait)
            results.append(result)
            print(f"run {index + 1}/{args.runs}: {result}", flush=True)
    return results, notes


def one_run(cluster: Any, daemon: Any, watcher: Any, monit: MonitAnchor | None,
            wait: float) -> RunResult:
    result = RunResult()

    # Step 1: both tools see a healthy server.
    if watcher is not None:
        if watcher.wait_for("normal", since=0.0, timeout=30) is None:
            raise TimeoutError("walacord did not report mode normal within 30 s")
        while watcher.current() != "normal":
            time.sleep(0.01)
    if monit is not None:
        deadline = time.monotonic() + 10
        while monit.last_kind() == "down" and time.monotonic() < deadline:
            time.sleep(0.05)

    # Step 2: a random phase against both tools' cycles.
    time.sleep(random.uniform(0.2, 1.2))

    # Step 3: stop and measure detection. The exit of one of walacord's backends shows
    # how much of the detection time pg_ctl and the server's shutdown take.
    exit_watch = None
    if daemon is not None:
        pids = backend_pids(cluster, "walacord")
        exit_watch = ProcessExitWatch(pids[0]) if pids else None
    stop_wall = time.time()
    stop_mono = time.monotonic()
    cluster.stop("immediate")
    if exit_watch is not None:
        result.backend_exit_s = exit_watch.wait(stop_mono, timeout=wait)
    if watcher is not None:
        seen = watcher.wait_for(lambda mode: mode != "normal", since=stop_mono, timeout=wait)
        result.walacord_detection_s = None if seen is None else seen.monotonic - stop_mono
        changed = logged_change_after(daemon, stop_wall, "normal")
        result.walacord_detection_log_s = None if changed is None else changed - stop_wall
    if monit is not None:
        down = monit.wait_for("down", stop_wall, timeout=wait)
        result.monit_detection_s = None if down is None else down - stop_wall

    # Step 4: start and measure recovery.
    cluster.start()
    start_wall = time.time()
    start_mono = time.monotonic()
    if watcher is not None:
        seen = watcher.wait_for("normal", since=start_mono, timeout=wait)
        result.walacord_recovery_s = None if seen is None else seen.monotonic - start_mono
        result.walacord_modes = watcher.path(since=stop_mono)
    if monit is not None:
        up = monit.wait_for("up", start_wall, timeout=wait)
        result.monit_recovery_s = None if up is None else up - start_wall
    return result


# --- report ---------------------------------------------------------------------------


def figures(results: Sequence[RunResult], name: str) -> dict[str, float] | None:
    values = [getattr(run, name) for run in results]
    seen = [value for value in values if value is not None]
    if not seen:
        return None
    stats = benchdoc.summary(seen)
    stats["missed"] = len(values) - len(seen)
    return stats


ROWS = (
    ("a walacord backend gone (part of walacord's detection)", "backend_exit_s", "-"),
    ("walacord detection (/api/health poll)", "walacord_detection_s", "median <= 0.1 s"),
    ("walacord detection (log `mode.changed` ts)", "walacord_detection_log_s",
     "median <= 0.1 s"),
    ("Monit detection (`set daemon 1`)", "monit_detection_s", "anchor"),
    ("walacord recovery", "walacord_recovery_s", "median <= 1.0 s"),
    ("Monit recovery", "monit_recovery_s", "anchor"),
)


def render(results: Sequence[RunResult], notes: list[str], plot: Path | None,
           walacord_command: Sequence[str]) -> str:
    lines = [
        "## Detection and recovery",
        "",
        "PostgreSQL stopped with `pg_ctl stop -m immediate`, then started with "
        "`pg_ctl start -w`; walacord and Monit watch the same server in the same runs. "
        "Detection counts from just before pg_ctl is launched; recovery counts from "
        "pg_ctl returning, when the server accepts connections.",
        "",
        "| figure | runs | median | p95 | min | max | missed | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, name, target in ROWS:
        stats = figures(results, name)
        if stats is None:
            continue
        lines.append(
            f"| {label} | {int(stats['n'])} | {benchdoc.ms(stats['median'])} | "
            f"{benchdoc.ms(stats['p95'])} | {benchdoc.ms(stats['min'])} | "
            f"{benchdoc.ms(stats['max'])} | {int(stats['missed'])} | {target} |")
    walacord = figures(results, "walacord_detection_s")
    monit = figures(results, "monit_detection_s")
    if walacord and monit and walacord["median"] > 0:
        lines += ["", f"Monit's median detection is {monit['median'] / walacord['median']:.1f}"
                  " times walacord's in the same runs."]
    paths = sorted({" -> ".join(run.walacord_modes) for run in results if run.walacord_modes})
    if paths:
        lines += ["", "walacord mode paths seen: " + "; ".join(f"`{p}`" for p in paths)]
    if plot is not None:
        lines += ["", f"![Detection and recovery, walacord beside Monit]({plot.name})"]
    versions = {
        "walacord": benchdoc.tool_version([*walacord_command, "--version"]),
        "Monit": benchdoc.tool_version(["monit", "-V"]),
    }
    lines += ["", benchdoc.facts_block(versions, benchdoc.command_line(), notes)]
    return "\n".join(lines)


def draw(results: Sequence[RunResult], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    plotted = [(label.replace("`", ""), name) for label, name, _ in ROWS
               if name not in ("walacord_detection_log_s", "backend_exit_s")]
    series = [(label, [getattr(run, name) * 1000 for run in results
                       if getattr(run, name) is not None])
              for label, name in plotted]
    series = [(label, values) for label, values in series if values]
    if not series:
        return None
    figure, axis = plt.subplots(figsize=(8, 4))
    axis.boxplot([values for _, values in series], vert=False,
                 tick_labels=[label for label, _ in series])
    axis.set_xlabel("milliseconds")
    axis.set_title("PostgreSQL stop -m immediate: detection and recovery")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=10, help="stop/start cycles (default 10)")
    parser.add_argument("--wait", type=float, default=10.0,
                        help="seconds to wait for each detection or recovery (default 10)")
    benchdoc.add_common_arguments(parser)
    parser.add_argument("--no-walacord", action="store_true", help="measure Monit only")
    parser.add_argument("--no-monit", action="store_true", help="measure walacord only")
    args = parser.parse_args(argv)

    with benchdoc.scratch_dir("walacord-bench-detection-") as workdir:
        results, notes = measure(args, workdir)

    benchdoc.save_results("detection",
                          {"runs": [asdict(run) for run in results], "notes": notes})
    plot = None if args.no_doc else draw(results, benchdoc.DOC.parent / PLOT)
    command = benchdoc.walacord_command(args.walacord)
    section = render(results, notes, plot, command)
    benchdoc.publish(SECTION, section, args.no_doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
