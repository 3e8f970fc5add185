"""Scrape latency: GET /metrics on walacord beside postgres_exporter and node_exporter.

All three run on loopback against the same private PostgreSQL cluster. For each target
the script sends 10 warm-up requests, then `--scrapes` sequential requests on one
keep-alive connection, then `--concurrent-requests` requests from `--clients` threads
with a connection each. Latency is from sending the request to reading the whole body.
The exporters are the Debian packages prometheus-postgres-exporter and
prometheus-node-exporter, started with their default collectors.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import benchdoc

SECTION = "scrape"
PLOT = "scrape_latency.png"
TARGET_P99_S = 0.005
POSTGRES_EXPORTER = "prometheus-postgres-exporter"
NODE_EXPORTER = "prometheus-node-exporter"


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
            for name, port in targets.items():
                serial, size = sequential(port, args.scrapes)
                loaded = concurrent(port, args.clients, args.concurrent_requests)
                figures[name] = {"sequential": serial, "concurrent": loaded,
                                 "body_bytes": size}
                seq = benchdoc.summary(serial)
                con = benchdoc.summary(loaded)
                print(f"{name}: sequential p50 {benchdoc.ms(seq['median'])} p99 "
                      f"{benchdoc.ms(seq['p99'])}; concurrent p50 {benchdoc.ms(con['median'])} "
                      f"p99 {benchdoc.ms(con['p99'])}", flush=True)
        finally:
            daemon.stop()
    return figures, notes


def render(figures: dict[str, Any], notes: list[str], args: argparse.Namespace,
           plot: Path | None, walacord_command: Sequence[str]) -> str:
    lines = [
        "## Scrape latency",
        "",
        f"`GET /metrics`: {args.scrapes} sequential requests on one keep-alive connection, "
        f"then {args.concurrent_requests} requests from {args.clients} concurrent clients. "
        f"Target for walacord: p99 <= {TARGET_P99_S * 1000:g} ms.",
        "",
        "| target | body | sequential p50 | sequential p99 | concurrent p50 | "
        "concurrent p99 | p99 within target |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, data in figures.items():
        seq = benchdoc.summary(data["sequential"])
        con = benchdoc.summary(data["concurrent"])
        verdict = ""
        if name == "walacord":
            # The two loads are judged apart: with N clients on one event loop a scrape
            # waits for up to N-1 others, so the concurrent p99 grows with N.
            verdict = (f"sequential {'yes' if seq['p99'] <= TARGET_P99_S else 'no'}, "
                       f"concurrent {'yes' if con['p99'] <= TARGET_P99_S else 'no'}")
        lines.append(
            f"| {name} | {data['body_bytes'] / 1024:.1f} KiB | {benchdoc.ms(seq['median'])} | "
            f"{benchdoc.ms(seq['p99'])} | {benchdoc.ms(con['median'])} | "
            f"{benchdoc.ms(con['p99'])} | {verdict} |")
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
