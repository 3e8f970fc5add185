"""Footprint: walacord's RSS and CPU with every probe at 1 s, beside the exporter stack
that covers the same checks (postgres_exporter, node_exporter and blackbox_exporter).

Both sides watch the same things. PostgreSQL is a private cluster. Walacor is the
emulator, checked by walacord's Walacor probe and by blackbox's tcp_connect. An
emulator URL plays the application's API, checked by walacord's API probe and by
blackbox's http_2xx. Last comes the host. A
scraper thread fetches every side's metrics once a second, as Prometheus would with a
1 s scrape interval, so the exporters also do their work every second.

The CPU figure is user plus system time over the `--minutes` window, as a percentage of
one core. RSS is sampled every `--sample` seconds for `--long-minutes` (at least
`--minutes`); growth compares the median of the last tenth of the samples with the
median of the first tenth.
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import benchdoc
import psutil

SECTION = "footprint"
PLOT = "footprint_rss.png"
TARGET_RSS_BYTES = 50 * 1024 * 1024
TARGET_CPU_PERCENT = 1.0
EXPORTERS = ("prometheus-postgres-exporter", "prometheus-node-exporter",
             "prometheus-blackbox-exporter")
EMULATOR_USER = ("bench", "bench-secret")
BLACKBOX_CONFIG = """modules:
  http_2xx:
    prober: http
    timeout: 1s
  tcp_connect:
    prober: tcp
    timeout: 1s
"""


def walacord_settings(emulator_url: str) -> dict[str, dict[str, Any]]:
    """Return config sections that run every probe once a second."""
    every_second = {"interval": 1.0, "timeout": 0.8, "fast_interval": 0.5}
    return {
        "walacor": {"url": emulator_url, "username": EMULATOR_USER[0],
                    "password": EMULATOR_USER[1]},
        "probes.database": dict(every_second),
        "probes.walacor": dict(every_second),
        "probes.host": dict(every_second),
        "probes.api": {**every_second,
                       "checks": [{"url": f"{emulator_url}/_emulator/faults"}]},
    }


class Scraper:
    """Fetch each (port, path) once a second from a thread, counting failures."""

    def __init__(self, targets: Sequence[tuple[int, str]]) -> None:
        self.targets = list(targets)
        self.failures = 0
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            for port, path in self.targets:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                try:
                    connection.request("GET", path)
                    response = connection.getresponse()
                    response.read()
                    self.scrapes += 1
                    if response.status != 200:
                        self.failures += 1
                except (OSError, http.client.HTTPException):
                    self.failures += 1
                finally:
                    connection.close()
            self._stop.wait(max(0.0, 1.0 - (time.monotonic() - began)))

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)


def probe_states(daemon: Any) -> str:
    """Return "database up, walacor up, ..." from /api/health, to show what was probed."""
    try:
        _, document = daemon.health()
    except (OSError, ValueError) as exc:
        return f"unknown ({exc})"
    probes = document.get("probes", {})
    return ", ".join(f"{name} {probe.get('state')}" for name, probe in sorted(probes.items()))


def cpu_seconds(processes: Sequence[psutil.Process]) -> float:
    total = 0.0
    for proc in processes:
        times = proc.cpu_times()
        total += times.user + times.system
    return total


def rss_bytes(processes: Sequence[psutil.Process]) -> int:
    return sum(proc.memory_info().rss for proc in processes)


ScrapeTarget = tuple[int, str]


@contextmanager
def exporter_stack(workdir: Path, cluster: Any, emulator_url: str,
                   notes: list[str]) -> Iterator[tuple[list[psutil.Process], list[ScrapeTarget]]]:
    """Start the installed exporters; yield their processes and the URLs to scrape."""
    processes: list[psutil.Process] = []
    targets: list[ScrapeTarget] = []
    missing = [name for name in EXPORTERS if not shutil.which(name)]
    if missing:
        notes.append(f"not installed, so left out of the stack: {', '.join(missing)}.")
    with ExitStack() as stack:
        if shutil.which(EXPORTERS[0]):
            port = benchdoc.free_port()
            env = {"DATA_SOURCE_NAME": cluster.url() + "?sslmode=disable", "PATH": "/usr/bin"}
            child = stack.enter_context(benchdoc.process(
                [EXPORTERS[0], f"--web.listen-address=127.0.0.1:{port}"], env=env,
                log=workdir / "postgres_exporter.log"))
            processes.append(psutil.Process(child.pid))
            targets.append((port, "/metrics"))
        if shutil.which(EXPORTERS[1]):
            port = benchdoc.free_port()
            child = stack.enter_context(benchdoc.process(
                [EXPORTERS[1], f"--web.listen-address=127.0.0.1:{port}"],
                log=workdir / "node_exporter.log"))
            processes.append(psutil.Process(child.pid))
            targets.append((port, "/metrics"))
        if shutil.which(EXPORTERS[2]):
            port = benchdoc.free_port()
            config = workdir / "blackbox.yml"
            config.write_text(BLACKBOX_CONFIG)
            child = stack.enter_context(benchdoc.process(
                [EXPORTERS[2], f"--config.file={config}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                log=workdir / "blackbox_exporter.log"))
            processes.append(psutil.Process(child.pid))
            walacor_address = emulator_url.removeprefix("http://")
            targets.append((port, f"/probe?module=http_2xx&target={emulator_url}"
                                  "/_emulator/faults"))
            targets.append((port, f"/probe?module=tcp_connect&target={walacor_address}"))
        for port in {port for port, _ in targets}:
            benchdoc.wait_for_port(port)
        yield processes, targets


def measure(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], list[str]]:
    from tests.chaos.daemon import WalacordDaemon

    notes: list[str] = []
    command = benchdoc.walacord_command(args.walacord)
    emulator_port = benchdoc.free_port()
    emulator_url = f"http://127.0.0.1:{emulator_port}"
    window = args.minutes * 60
    total = max(window, args.long_minutes * 60)

    notes.append(benchdoc.compile_sources())
    with ExitStack() as stack:
        cluster = stack.enter_context(benchdoc.started_cluster(workdir))
        stack.enter_context(benchdoc.process(
            [*command, "emulator", "--listen", f"127.0.0.1:{emulator_port}",
             "--user", ":".join(EMULATOR_USER)], log=workdir / "emulator.log"))
        benchdoc.wait_for_port(emulator_port)
        stack_processes, stack_targets = stack.enter_context(
            exporter_stack(workdir, cluster, emulator_url, notes))

        daemon = WalacordDaemon(workdir / "walacord", cluster.url(),  # type: ignore[attr-defined]
                                settings=walacord_settings(emulator_url), command=command)
        daemon.start()
        stack.callback(daemon.stop)
        walacord = [psutil.Process(daemon.pid())]

        scraper = stack.enter_context(
            Scraper([(daemon.http_port, "/metrics"), *stack_targets]))
        time.sleep(args.settle)
        notes.append("walacord probe states at the start: " + probe_states(daemon) + ".")

        began = time.monotonic()
        cpu_start = {"walacord": cpu_seconds(walacord), "stack": cpu_seconds(stack_processes)}
        cpu_window: dict[str, float] = {}
        samples: list[dict[str, float]] = []
        while True:
            elapsed = time.monotonic() - began
            samples.append({"t": elapsed, "walacord": rss_bytes(walacord),
                            "stack": rss_bytes(stack_processes) if stack_processes else 0})
            if not cpu_window and elapsed >= window:
                cpu_window = {
                    "walacord": 100 * (cpu_seconds(walacord) - cpu_start["walacord"]) / elapsed,
                    "stack": 100 * (cpu_seconds(stack_processes) - cpu_start["stack"])
                    / elapsed,
                }
            if elapsed >= total:
                break
            time.sleep(min(args.sample, max(0.0, total - elapsed)))
        if scraper.failures:
            notes.append(f"{scraper.failures} of {scraper.scrapes} scrapes failed.")

    print(f"cpu {cpu_window}; last sample {samples[-1]}", flush=True)
    return {"cpu_percent": cpu_window, "samples": samples, "window_s": window,
            "total_s": total}, notes


def growth(samples: Sequence[dict[str, float]], key: str) -> tuple[float, float]:
    """Return (median RSS of the first tenth, of the last tenth) of the samples."""
    tenth = max(1, len(samples) // 10)
    first = statistics.median(sample[key] for sample in samples[:tenth])
    last = statistics.median(sample[key] for sample in samples[-tenth:])
    return first, last


def mib(value: float) -> str:
    return f"{value / 1024 / 1024:.1f} MiB"


def render(figures: dict[str, Any], notes: list[str], plot: Path | None,
           walacord_command: Sequence[str]) -> str:
    samples = figures["samples"]
    window = figures["window_s"]
    window_samples = [sample for sample in samples if sample["t"] <= window] or samples
    cpu = figures["cpu_percent"]
    lines = [
        "## Footprint",
        "",
        f"Every walacord probe at 1 s, and every side scraped once a second. CPU over "
        f"{window / 60:g} min; RSS sampled for {figures['total_s'] / 60:g} min. "
        f"Targets for walacord: RSS <= {mib(TARGET_RSS_BYTES)}, CPU <= "
        f"{TARGET_CPU_PERCENT:g} % of a core.",
        "",
        "| side | RSS median | RSS max | CPU (% of a core) | RSS first tenth -> last tenth |",
        "|---|---|---|---|---|",
    ]
    for key, label in (("walacord", "walacord"),
                       ("stack", "postgres_exporter + node_exporter + blackbox_exporter")):
        values = [sample[key] for sample in window_samples]
        if not any(values):
            continue
        first, last = growth(samples, key)
        lines.append(
            f"| {label} | {mib(statistics.median(values))} | {mib(max(values))} | "
            f"{cpu.get(key, float('nan')):.2f} | {mib(first)} -> {mib(last)} |")
    rss_max = max(sample["walacord"] for sample in window_samples)
    stack_rss = statistics.median(sample["stack"] for sample in window_samples)
    walacord_rss = statistics.median(sample["walacord"] for sample in window_samples)
    if stack_rss and walacord_rss and cpu.get("walacord"):
        lines += ["", f"The exporter stack's median RSS is {stack_rss / walacord_rss:.2f} times "
                      f"walacord's, and its CPU {cpu['stack'] / cpu['walacord']:.2f} times."]
    lines += ["", f"walacord within target: RSS {'yes' if rss_max <= TARGET_RSS_BYTES else 'no'}"
                  f", CPU {'yes' if cpu.get('walacord', 100) <= TARGET_CPU_PERCENT else 'no'}."]
    if figures["total_s"] < 3600:
        lines.append(f"The RSS run lasted {figures['total_s'] / 60:g} min, not the documented "
                     "1 h.")
    if plot is not None:
        lines += ["", f"![RSS over time, walacord beside the exporter stack]({plot.name})"]
    versions = {"walacord": benchdoc.tool_version([*walacord_command, "--version"])}
    if "python" in Path(walacord_command[0]).name:
        versions["psycopg"] = benchdoc.psycopg_build(walacord_command[0])
    for name in EXPORTERS:
        versions[name] = benchdoc.tool_version([name, "--version"])
    lines += ["", benchdoc.facts_block(versions, benchdoc.command_line(), notes)]
    return "\n".join(lines)


def draw(figures: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    samples = figures["samples"]
    minutes = [sample["t"] / 60 for sample in samples]
    figure, axis = plt.subplots(figsize=(8, 4))
    axis.plot(minutes, [sample["walacord"] / 2**20 for sample in samples], label="walacord")
    if any(sample["stack"] for sample in samples):
        axis.plot(minutes, [sample["stack"] / 2**20 for sample in samples],
                  label="exporter stack")
    axis.axhline(TARGET_RSS_BYTES / 2**20, color="grey", linestyle="--", linewidth=1,
                 label="walacord target")
    axis.set_xlabel("minutes")
    axis.set_ylabel("RSS (MiB)")
    axis.set_ylim(bottom=0)
    axis.set_title("Resident memory over time")
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="window for CPU and RSS figures, in minutes (default 10)")
    parser.add_argument("--long-minutes", type=float, default=60.0,
                        help="length of the RSS run, in minutes (default 60)")
    parser.add_argument("--sample", type=float, default=5.0,
                        help="seconds between RSS samples (default 5)")
    parser.add_argument("--settle", type=float, default=10.0,
                        help="seconds after start-up before measuring (default 10)")
    benchdoc.add_common_arguments(parser)
    args = parser.parse_args(argv)

    with benchdoc.scratch_dir("walacord-bench-footprint-") as workdir:
        figures, notes = measure(args, workdir)

    benchdoc.save_results("footprint", {"figures": figures, "notes": notes})
    plot = None if args.no_doc else draw(figures, benchdoc.DOC.parent / PLOT)
    command = benchdoc.walacord_command(args.walacord)
    section = render(figures, notes, plot, command)
    benchdoc.publish(SECTION, section, args.no_doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
