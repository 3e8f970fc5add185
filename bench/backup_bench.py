"""Time walacord's backup against plain `pg_dump -Fc` of the same database.

The script starts a private PostgreSQL cluster under a temporary directory, fills it
with `pgbench -i -s SCALE` (scale 68 is about 1 GB), then alternates the two
contenders for `--runs` rounds:
- plain: `pg_dump -Fc -f FILE`, the same program and compression level;
- walacord: `BackupManager.take()`, which adds the advisory lock, the exported
  snapshot, row counts, fsync, the sha256 checksum, `pg_restore --list` and the
  manifest.
Target: the walacord median is at most 1.05 x the plain median + 1 s. The figures go
into docs/benchmarks.md between `<!-- backup:start -->` and `<!-- backup:end -->`.

Usage: python bench/backup_bench.py [--scale 68] [--runs 3] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import anyio

from walacord import __version__
from walacord.backup.manager import BackupManager
from walacord.backup.pgclient import client_environment, find_client_bindir
from walacord.config import BackupConfig
from walacord.pgcluster import PgCluster

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "benchmarks.md"
START_MARKER = "<!-- backup:start -->"
END_MARKER = "<!-- backup:end -->"
RELATIVE_MARGIN = 0.05
FIXED_MARGIN_SECONDS = 1.0
COMPRESSION_LEVEL = 6  # zlib's default, which `pg_dump -Fc` uses when -Z is not given


@dataclass
class Timings:
    plain: list[float]
    walacord: list[float]
    plain_size: int
    walacord_size: int
    load_before: float = 0.0
    load_after: float = 0.0


def run(argv: list[str], env: dict[str, str] | None = None) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        sys.exit(f"{argv[0]} failed with exit {result.returncode}: {result.stderr.strip()}")
    return result.stdout.strip()


def populate(cluster: PgCluster, scale: int) -> tuple[int, float]:
    """Load pgbench tables; return the database size in bytes and the load time."""
    bindir = find_client_bindir()
    started = time.monotonic()
    with client_environment(cluster.password) as env:
        run([str(bindir / "pgbench"), "-i", "-q", "-s", str(scale), "-h", "127.0.0.1",
             "-p", str(cluster.port), "-U", cluster.superuser, "bench"], env=env)
    elapsed = time.monotonic() - started
    size = int(cluster.psql("SELECT pg_database_size('bench')", dbname="bench"))
    return size, elapsed


def time_plain(cluster: PgCluster, target: Path) -> tuple[float, int]:
    bindir = find_client_bindir()
    conninfo = f"host=127.0.0.1 port={cluster.port} user={cluster.superuser} dbname=bench"
    with client_environment(cluster.password) as env:
        started = time.monotonic()
        run([str(bindir / "pg_dump"), "-Fc", f"--compress={COMPRESSION_LEVEL}",
             f"--file={target}", f"--dbname={conninfo}"], env=env)
        elapsed = time.monotonic() - started
    size = target.stat().st_size
    target.unlink()
    return elapsed, size


def time_walacord(cluster: PgCluster, directory: Path) -> tuple[float, int]:
    config = BackupConfig(dir=str(directory), compression_level=COMPRESSION_LEVEL,
                          dump_timeout=3600.0, verify_timeout=3600.0, query_timeout=60.0)
    manager = BackupManager(config, conninfo=cluster.url("bench"))

    async def take() -> tuple[float, int]:
        started = time.monotonic()
        manifest = await manager.take()
        elapsed = time.monotonic() - started
        if manifest is None or not manifest.verified:
            sys.exit("walacord's backup was skipped or failed verification")
        return elapsed, manifest.size_bytes

    elapsed, size = anyio.run(take)
    shutil.rmtree(directory)
    return elapsed, size


def measure(cluster: PgCluster, work: Path, runs: int) -> Timings:
    timings = Timings([], [], 0, 0, load_before=os.getloadavg()[0])
    for round_number in range(runs):
        # Alternate who goes first so page-cache warmth does not favour one side.
        order = ["plain", "walacord"] if round_number % 2 == 0 else ["walacord", "plain"]
        for contender in order:
            if contender == "plain":
                seconds, timings.plain_size = time_plain(cluster, work / "plain.dump")
                timings.plain.append(seconds)
            else:
                seconds, timings.walacord_size = time_walacord(cluster, work / "walacord")
                timings.walacord.append(seconds)
            print(f"round {round_number + 1}: {contender} {seconds:.2f} s", flush=True)
    timings.load_after = os.getloadavg()[0]
    return timings


def machine_lines(bindir: Path) -> list[str]:
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
    return [
        f"- machine (`uname -a`): `{run(['uname', '-a'])}`",
        f"- CPUs (`nproc`): {run(['nproc'])}; memory: {total_kib / 1024 / 1024:.1f} GiB",
        f"- {run([str(bindir / 'postgres'), '--version'])}; "
        f"{run([str(bindir / 'pg_dump'), '--version'])}",
        f"- Python {platform.python_version()}, walacord {__version__}",
    ]


def report(args: argparse.Namespace, timings: Timings, db_size: int, load_seconds: float,
           bindir: Path) -> str:
    plain = statistics.median(timings.plain)
    walacord = statistics.median(timings.walacord)
    limit = plain * (1 + RELATIVE_MARGIN) + FIXED_MARGIN_SECONDS
    verdict = "met" if walacord <= limit else "missed"
    rows = "\n".join(
        f"| {i + 1} | {p:.2f} | {w:.2f} |"
        for i, (p, w) in enumerate(zip(timings.plain, timings.walacord, strict=True)))
    return "\n".join([
        START_MARKER,
        "## Backups: walacord vs plain `pg_dump -Fc`",
        "",
        f"Recorded {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by "
        f"`{shlex.join(['python', 'bench/backup_bench.py', *args.argv])}`.",
        "",
        *machine_lines(bindir),
        f"- database: `pgbench -i -s {args.scale}`, {db_size / 1e9:.2f} GB "
        f"(pg_database_size), loaded in {load_seconds:.0f} s",
        "- cluster: private, started by the script (fsync off, shared_buffers 32MB); "
        "the dump files go to the same temporary directory",
        f"- dump size: plain {timings.plain_size / 1e6:.1f} MB, walacord "
        f"{timings.walacord_size / 1e6:.1f} MB (both compression level {COMPRESSION_LEVEL}), "
        f"{timings.plain_size / db_size * 100:.1f} % of the database because pgbench rows "
        "are mostly blank padding",
        "",
        "| round | plain pg_dump -Fc (s) | walacord take, incl. sha256 and --list (s) |",
        "|---|---|---|",
        rows,
        "",
        f"Median: plain {plain:.2f} s, walacord {walacord:.2f} s "
        f"({(walacord / plain - 1) * 100:+.1f} %). Target: at most "
        f"{plain:.2f} x {1 + RELATIVE_MARGIN:.2f} + {FIXED_MARGIN_SECONDS:.0f} s = "
        f"{limit:.2f} s: **{verdict}**.",
        "",
        "The rounds alternate which contender goes first. Other work shared the CPUs "
        f"(1-minute load average {timings.load_before:.1f} before the rounds and "
        f"{timings.load_after:.1f} after), so single rounds vary; compare the medians.",
        END_MARKER,
    ])


def write_section(section: str) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmarks\n"
    if START_MARKER in text and END_MARKER in text:
        before = text[:text.index(START_MARKER)]
        after = text[text.index(END_MARKER) + len(END_MARKER):]
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=68,
                        help="pgbench scale factor; 68 is about 1 GB (default %(default)s)")
    parser.add_argument("--runs", type=int, default=3,
                        help="rounds per contender; the medians are compared (default 3)")
    parser.add_argument("--no-write", action="store_true",
                        help="print the section instead of writing docs/benchmarks.md")
    args = parser.parse_args()
    args.argv = sys.argv[1:]

    bindir = find_client_bindir()
    base = Path(tempfile.mkdtemp(prefix="walacord-bench-"))
    os.chmod(base, 0o711)  # the server may run as another user and must reach base/pg
    cluster = PgCluster(base / "pg")
    try:
        cluster.init()
        cluster.start()
        cluster.psql("CREATE DATABASE bench")
        db_size, load_seconds = populate(cluster, args.scale)
        print(f"database: {db_size / 1e9:.2f} GB, loaded in {load_seconds:.0f} s", flush=True)
        work = base / "out"
        work.mkdir()
        timings = measure(cluster, work, args.runs)
    finally:
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)

    section = report(args, timings, db_size, load_seconds, bindir)
    print(section)
    if not args.no_write:
        write_section(section)
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
