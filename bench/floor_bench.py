"""Memory floor: the RSS of an idle Python process at each layer below the daemon.

The footprint target is 50 MiB of RSS. This script shows how much of that the
interpreter and walacord's required libraries take before walacord runs any code of
its own. Each layer is a fresh child process that imports its modules, reports that it
is ready and then waits on its standard input, while this script reads its RSS:

1. the interpreter alone;
2. the libraries the daemon imports from `dependencies` in pyproject.toml, except
   aiohttp, which only the Walacor emulator imports, and google-re2, which the daemon
   imports only once a silence has a regular expression;
3. walacord's daemon modules, with the components of a default configuration built
   inside an event loop and nothing started: no connection, thread or socket.

Each layer runs `--runs` times, and the section reports the median. The running
daemon's RSS is in the footprint section, measured by footprint_bench.py.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import textwrap

import benchdoc
import psutil

SECTION = "floor"
TARGET_RSS_BYTES = 50 * 1024 * 1024
# Top-level modules of the runtime dependencies that the daemon imports.
LIBRARIES = ("anyio", "psycopg", "psycopg_pool", "psutil", "prometheus_client", "orjson",
             "tenacity", "sdnotify", "aiosqlite", "httpx", "uvicorn", "httptools",
             "sniffio")
WAIT = "import sys\nprint(len(sys.modules), flush=True)\nsys.stdin.read()\n"
DAEMON = textwrap.dedent("""\
    import anyio
    from prometheus_client import CollectorRegistry

    from walacord.components import default_components
    from walacord.config import Config
    from walacord.metrics import Metrics
    from walacord.runtime import Runtime
    from walacord.systemd import Notifier
    import walacord.supervisor  # noqa: F401


    async def build():
        registry = CollectorRegistry()
        runtime = Runtime(config=Config(), config_path=None, registry=registry,
                          metrics=Metrics(registry), notifier=Notifier({}))
        return default_components(runtime)


    components = anyio.run(build)
    """)
LAYERS = (
    ("Python interpreter alone", ""),
    ("+ the required libraries", "".join(f"import {name}\n" for name in LIBRARIES)),
    ("+ walacord's daemon modules, components built, nothing started",
     "".join(f"import {name}\n" for name in LIBRARIES) + DAEMON),
)


def status_kib(pid: int, field: str) -> int:
    """Return a `kB` field of /proc/PID/status, such as RssAnon."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field} line")


def measure_layer(code: str, python: str) -> dict[str, float]:
    """Run `code` in a child that then waits; return its RSS, the anonymous and
    file-backed parts of it in bytes, and its module count."""
    child = subprocess.Popen([python, "-c", code + WAIT], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True,
                             cwd=benchdoc.ROOT)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the layer's child exited with {child.wait()} before it was "
                               "ready; run its code by hand to see the error:\n" + code)
        figures = {"rss": float(psutil.Process(child.pid).memory_info().rss),
                   "anon": 1024.0 * status_kib(child.pid, "RssAnon"),
                   "file": 1024.0 * status_kib(child.pid, "RssFile"),
                   "modules": float(line)}
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(timeout=30)
    return figures


def mib(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def render(rows: list[dict[str, float | str]], runs: int, command: str, note: str,
           build: str) -> str:
    lines = [
        "## Memory floor",
        "",
        "RSS of an idle Python process at each layer below the daemon, each layer a "
        f"fresh process, median of {runs} run{'s' if runs != 1 else ''}. The footprint "
        f"target for the running daemon is {mib(TARGET_RSS_BYTES)}; the running daemon's "
        "figure is in the footprint section.",
        "",
        "| layer | RSS median | added by the layer | anonymous | file-backed "
        "| modules loaded |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    previous = 0.0
    for row in rows:
        rss = float(row["rss"])
        added = "" if not previous else mib(rss - previous)
        lines.append(f"| {row['layer']} | {mib(rss)} | {added} | {mib(float(row['anon']))} "
                     f"| {mib(float(row['file']))} | {int(row['modules'])} |")
        previous = rss
    libraries = float(rows[1]["rss"])
    lines += [
        "",
        f"The required libraries alone leave {mib(TARGET_RSS_BYTES - libraries)} of the "
        "target for walacord's code, its threads and connections. Anonymous memory is "
        "mostly the Python objects that importing creates (code, classes, functions). "
        "File-backed memory is the pages of shared libraries. Libraries: "
        + ", ".join(f"`{name}`" for name in LIBRARIES) + f"; {build}"
        + (". The binary implementation brings its own libpq and OpenSSL beside the "
           "OpenSSL that Python's ssl module loads" if "binary" in build else "") + ".",
        "",
        "httpx imports click and, when it is installed, pygments for its command-line "
        "tool. pytest needs pygments, so this checkout's virtual environment has it and "
        "the figures above include it; an install without the test extra does not. "
        "Importing pygments' lexers took about 0.6 MiB when measured on its own.",
        "",
        benchdoc.facts_block({}, command, [note]),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5,
                        help="fresh processes per layer (default 5)")
    parser.add_argument("--no-doc", action="store_true",
                        help="print the section instead of writing docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs {args.runs}: give at least 1")

    note = benchdoc.compile_sources()
    rows: list[dict[str, float | str]] = []
    for layer, code in LAYERS:
        measured = [measure_layer(code, sys.executable) for _ in range(args.runs)]
        row: dict[str, float | str] = {"layer": layer}
        for key in ("rss", "anon", "file", "modules"):
            row[key] = statistics.median(figures[key] for figures in measured)
        rows.append(row)
        print(f"{layer}: {mib(float(rows[-1]['rss']))}", file=sys.stderr)

    benchdoc.save_results("floor", {"rows": rows, "runs": args.runs})
    section = render(rows, args.runs, benchdoc.command_line(), note,
                     benchdoc.psycopg_build())
    benchdoc.publish(SECTION, section, args.no_doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
