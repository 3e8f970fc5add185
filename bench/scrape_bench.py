"""Scrape latency: GET /metrics on walacord beside postgres_exporter and node_exporter.

All three run on loopback against the same private PostgreSQL cluster. For each target
the script sends 10 warm-up requests, then `--scrapes` sequential requests on one
keep-alive connection, then `--concurrent-requests` requests from `--clients` threads
with a connection each. Latency is from sending the request to reading the whole body.
The exporters are the Debian packages prometheus-postgres-exporter and
prometheus-node-exporter, started with their default collectors.

When wrk (Debian package wrk) is installed, the same two loads are measured again with
it, each for `--wrk-seconds`: one connection, then `--clients` connections. wrk is
written in C and runs its connections on two threads, so its own CPU use adds less to the
figures than Python threads that share one interpreter lock. Every target is measured
both ways in the same run. wrk 4 corrects its latencies for coordinated omission, and
no option turns that off. For a response that took at least twice the run's mean
interval between requests on a connection, it adds the samples that requests sent at
that steady interval would have had while waiting. Its p99 is therefore stricter than
the raw p99 of the Python client.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import benchdoc
import orjson

SECTION = "scrape"
PLOT = "scrape_latency.png"
TARGET_P99_S = 0.005
POSTGRES_EXPORTER = "prometheus-postgres-exporter"
NODE_EXPORTER = "prometheus-node-exporter"
WRK = "wrk"
WRK_SCRIPT = Path(__file__).with_name("wrk_latencies.lua")
# Event-loop threads of wrk; the connections are split among them.
WRK_THREADS = 2


def scrape(connection: http.client.HTTPConnection, path: str = "/metrics") -> tuple[float, int]:
    """GET `path` and return (seconds, body bytes)."""
    began = time.perf_counter()
    connection.request("GET", path)
    response = connection.getresponse()
    body = response.read()
    elapsed = time.perf_counter() - began
    if response.status != 200:
        raise RuntimeError(f"GET {path} returned status {response.status}: {body[:200]!r}")
    return elapsed, len(body)


def sequential(port: int, count: int) -> tuple[list[float], int]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for _ in range(10):
            scrape(connection)
        samples = []
        size = 0
        for _ in range(count):
            elapsed, size = scrape(connection)
            samples.append(elapsed)
        return samples, size
    finally:
        connection.close()


def concurrent(port: int, clients: int, total: int) -> list[float]:
    samples: list[float] = []
    lock = threading.Lock()
    per_client = max(1, total // clients)
    barrier = threading.Barrier(clients)

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        own = []
        try:
            scrape(connection)
            barrier.wait()
            for _ in range(per_client):
                own.append(scrape(connection)[0])
        finally:
            connection.close()
        with lock:
            samples.extend(own)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return samples


def wrk_run(port: int, connections: int, seconds: float) -> list[float]:
    """GET /metrics on `connections` wrk connections for `seconds`; return the latencies."""
    threads = min(WRK_THREADS, connections)
    argv = [WRK, f"--connections={connections}", f"--threads={threads}",
            f"--duration={max(1, round(seconds))}s", "--timeout=10s", f"--script={WRK_SCRIPT}",
            f"http://127.0.0.1:{port}/metrics"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60,
                            check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{shlex.join(argv)} failed with exit status {result.returncode}: "
                           f"{(result.stderr or result.stdout)[-500:]}")
    report = orjson.loads(lines[-1])
    if report["status_errors"] or report["socket_errors"]:
        raise RuntimeError(f"wrk on port {port}: {report['status_errors']} non-2xx responses "
                           f"and {report['socket_errors']} socket errors")
    return [microseconds / 1e6 for microseconds, count in report["latency_us"]
            for _ in range(count)]


@contextmanager
def exporters(workdir: Path, cluster: Any, notes: list[str]) -> Iterator[dict[str, int]]:
    """Start the Debian exporters that are installed; yield name -> port."""
    ports: dict[str, int] = {}
    with ExitStack() as stack:
        if shutil.which(POSTGRES_EXPORTER):
            port = benchdoc.free_port()
            env = dict(os.environ, DATA_SOURCE_NAME=cluster.url() + "?sslmode=disable")
            stack.enter_context(benchdoc.process(
                [POSTGRES_EXPORTER, f"--web.listen-address=127.0.0.1:{port}"],
                env=env, log=workdir / "postgres_exporter.log"))
            ports["postgres_exporter"] = port
        else:
            notes.append(f"{POSTGRES_EXPORTER} is not installed: no postgres_exporter anchor.")
        if shutil.which(NODE_EXPORTER):
            port = benchdoc.free_port()
            stack.enter_context(benchdoc.process(
                [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}"],
                log=workdir / "node_exporter.log"))
            ports["node_exporter"] = port
        else:
            notes.append(f"{NODE_EXPORTER} is not installed: no node_exporter anchor.")
        for port in ports.values():
            benchdoc.wait_for_port(port)
        yield ports


def measure(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], list[str]]:
    from tests.chaos.daemon import WalacordDaemon

    notes: list[str] = []
    figures: dict[str, Any] = {}
    with benchdoc.started_cluster(workdir) as cluster, \
            exporters(workdir, cluster, notes) as ports:
        daemon = WalacordDaemon(workdir / "walacord", cluster.url(),  # type: ignore[attr-defined]
                                command=shlex.split(args.walacord) if args.walacord else None)
        daemon.start()
        try:
            # Let every probe report once, so /metrics carries its full set of series.
            time.sleep(args.settle)
            targets = {"walacord": daemon.http_port, **ports}
            use_wrk = shutil.which(WRK) is not None
            if not use_wrk:
                notes.append(f"{WRK} is not installed: no figures measured with wrk.")
            for name, port in targets.items():
                serial, size = sequential(port, args.scrapes)
                loaded = concurrent(port, args.clients, args.concurrent_requests)
                figures[name] = {"sequential": serial, "concurrent": loaded,
                                 "body_bytes": size}
                print_figures(name, "Python client", serial, loaded)
                if use_wrk:
                    serial = wrk_run(port, 1, args.wrk_seconds)
                    loaded = wrk_run(port, args.clients, args.wrk_seconds)
                    figures[name]["wrk"] = {"sequential": serial, "concurrent": loaded}
                    print_figures(name, "wrk", serial, loaded)
        finally:
            daemon.stop()
    return figures, notes


def print_figures(name: str, client: str, serial: list[float], loaded: list[float]) -> None:
    seq = benchdoc.summary(serial)
    con = benchdoc.summary(loaded)
    print(f"{name} ({client}): sequential p50 {benchdoc.ms(seq['median'])} p99 "
          f"{benchdoc.ms(seq['p99'])}; concurrent p50 {benchdoc.ms(con['median'])} "
          f"p99 {benchdoc.ms(con['p99'])}", flush=True)


def table(rows: dict[str, dict[str, Any]], sizes: dict[str, int]) -> list[str]:
    """Return the Markdown table of one client's figures, with walacord's verdict."""
    lines = [
        "| target | body | sequential p50 | sequential p99 | concurrent p50 | "
        "concurrent p99 | p99 within target |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, data in rows.items():
        seq = benchdoc.summary(data["sequential"])
        con = benchdoc.summary(data["concurrent"])
        verdict = ""
        if name == "walacord":
            # The two loads are judged apart: with N clients on one event loop a scrape
            # waits for up to N-1 others, so the concurrent p99 grows with N.
            verdict = (f"sequential {'yes' if seq['p99'] <= TARGET_P99_S else 'no'}, "
                       f"concurrent {'yes' if con['p99'] <= TARGET_P99_S else 'no'}")
        lines.append(
            f"| {name} | {sizes[name] / 1024:.1f} KiB | {benchdoc.ms(seq['median'])} | "
            f"{benchdoc.ms(seq['p99'])} | {benchdoc.ms(con['median'])} | "
            f"{benchdoc.ms(con['p99'])} | {verdict} |")
    return lines


def render(figures: dict[str, Any], notes: list[str], args: argparse.Namespace,
           plot: Path | None, walacord_command: Sequence[str]) -> str:
    lines = [
        "## Scrape latency",
        "",
        f"`GET /metrics`: {args.scrapes} sequential requests on one keep-alive connection, "
        f"then {args.concurrent_requests} requests from {args.clients} concurrent clients. "
        f"Target for walacord: p99 <= {TARGET_P99_S * 1000:g} ms.",
        "",
        "Python client: `http.client`, the concurrent clients as threads of one process.",
        "",
    ]
    sizes = {name: data["body_bytes"] for name, data in figures.items()}
    lines += table(figures, sizes)
    measured_with_wrk = {name: data["wrk"] for name, data in figures.items() if "wrk" in data}
    if measured_with_wrk:
        lines += ["", f"wrk, the same two loads for {args.wrk_seconds:g} s each: one "
                      f"connection, then {args.clients} connections on "
                      f"{min(WRK_THREADS, args.clients)} threads. Latencies at wrk's 1 "
                      "microsecond resolution, with wrk's correction for coordinated "
                      "omission: a slow response also counts the requests a steady scraper "
                      "would have had waiting behind it.", ""]
        lines += table(measured_with_wrk, sizes)
    walacord = figures.get("walacord")
    for anchor in ("postgres_exporter", "node_exporter"):
        if walacord and anchor in figures:
            ratio = (benchdoc.summary(figures[anchor]["sequential"])["median"]
                     / benchdoc.summary(walacord["sequential"])["median"])
            lines.append(f"\n{anchor}'s sequential p50 is {ratio:.1f} times walacord's.")
    if plot is not None:
        lines += ["", f"![/metrics latency, walacord beside the exporters]({plot.name})"]
    versions = {
        "walacord": benchdoc.tool_version([*walacord_command, "--version"]),
        "postgres_exporter": benchdoc.tool_version([POSTGRES_EXPORTER, "--version"]),
        "node_exporter": benchdoc.tool_version([NODE_EXPORTER, "--version"]),
        "wrk": benchdoc.tool_version([WRK, "--version"]),
    }
    lines += ["", benchdoc.facts_block(versions, benchdoc.command_line(), notes)]
    return "\n".join(lines)


def draw(figures: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(figures)
    kinds = [("sequential", "median", "sequential p50"), ("sequential", "p99", "sequential p99"),
             ("concurrent", "median", "concurrent p50"), ("concurrent", "p99", "concurrent p99")]
    figure, axis = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(kinds)
    for offset, (series, stat, label) in enumerate(kinds):
        values = [benchdoc.summary(figures[name][series])[stat] * 1000 for name in names]
        positions = [index + offset * width for index in range(len(names))]
        axis.bar(positions, values, width, label=label)
    axis.set_xticks([index + width * 1.5 for index in range(len(names))], names)
    axis.axhline(TARGET_P99_S * 1000, color="grey", linestyle="--", linewidth=1,
                 label="walacord p99 target")
    axis.set_ylabel("milliseconds")
    axis.set_yscale("log")
    axis.set_title("GET /metrics latency")
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scrapes", type=int, default=300,
                        help="sequential requests per target (default 300)")
    parser.add_argument("--clients", type=int, default=8,
                        help="concurrent clients (default 8)")
    parser.add_argument("--concurrent-requests", type=int, default=800,
                        help="requests in the concurrent phase, split among the clients "
                             "(default 800)")
    parser.add_argument("--wrk-seconds", type=float, default=5.0,
                        help="seconds of each wrk load per target, when wrk is installed "
                             "(default 5)")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds to let the probes run before measuring (default 5)")
    benchdoc.add_common_arguments(parser)
    args = parser.parse_args(argv)

    with benchdoc.scratch_dir("walacord-bench-scrape-") as workdir:
        figures, notes = measure(args, workdir)

    benchdoc.save_results("scrape", {"figures": figures, "notes": notes})
    plot = None if args.no_doc else draw(figures, benchdoc.DOC.parent / PLOT)
    command = benchdoc.walacord_command(args.walacord)
    section = render(figures, notes, args, plot, command)
    benchdoc.publish(SECTION, section, args.no_doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
