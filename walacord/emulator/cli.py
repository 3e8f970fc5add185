"""Run the Walacor API emulator (for local use and tests only).

Example: `walacord emulator --listen 127.0.0.1:8080 --user demo:secret`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

import anyio

from walacord.emulator.app import Emulator
from walacord.emulator.faults import MODES, FaultSpec

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8080"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help="address to listen on (default %(default)s; port 0 picks a free port)",
    )
    parser.add_argument(
        "--user",
        action="append",
        default=[],
        metavar="NAME:PASSWORD",
        help="accepted login, repeatable (default: admin:admin, for local use only)",
    )
    parser.add_argument(
        "--state", metavar="PATH", help="SQLite file that keeps schemas and rows across restarts"
    )
    parser.add_argument(
        "--token-ttl",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="token lifetime in seconds; 0 means tokens never expire (default %(default)s)",
    )
    faults = parser.add_argument_group("faults set at start (PUT /_emulator/faults changes them)")
    faults.add_argument("--fault-status", type=int, metavar="CODE", help="answer with this status")
    faults.add_argument(
        "--fault-ratio",
        type=float,
        default=1.0,
        metavar="SHARE",
        help="share of requests affected, 0 to 1 (default %(default)s)",
    )
    faults.add_argument(
        "--fault-latency-ms", type=float, default=0.0, metavar="MS", help="delay in milliseconds"
    )
    faults.add_argument(
        "--fault-retry-after", metavar="SECONDS", help="Retry-After value (implies status 429)"
    )
    faults.add_argument("--fault-mode", choices=MODES, help="failure mode")
    faults.add_argument(
        "--fault-path", metavar="PREFIX", help="affect only paths starting with PREFIX"
    )
    faults.add_argument(
        "--fault-trickle-interval-ms",
        type=float,
        default=1000.0,
        metavar="MS",
        help="delay between bytes in trickle mode (default %(default)s)",
    )


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"invalid --listen {value!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]") or "127.0.0.1", int(port)


def parse_users(values: list[str]) -> dict[str, str]:
    users = {}
    for value in values:
        name, sep, password = value.partition(":")
        if not sep or not name or not password:
            raise ValueError(f"invalid --user {value!r}: expected NAME:PASSWORD")
        users[name] = password
    return users


def fault_from_args(args: argparse.Namespace) -> FaultSpec | None:
    settings: dict[str, Any] = {}
    if args.fault_status is not None:
        settings["status"] = args.fault_status
    if args.fault_latency_ms:
        settings["latency_ms"] = args.fault_latency_ms
    if args.fault_retry_after is not None:
        value = args.fault_retry_after
        settings["retry_after"] = int(value) if value.isdigit() else value
    if args.fault_mode is not None:
        settings["mode"] = args.fault_mode
    if not settings:
        return None
    settings["ratio"] = args.fault_ratio
    settings["trickle_interval_ms"] = args.fault_trickle_interval_ms
    if args.fault_path is not None:
        settings["path"] = args.fault_path
    return FaultSpec.from_json(settings)


async def serve(emulator: Emulator, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM, then stop the listener and close the state file."""
    async with anyio.create_task_group() as tg:
        url = await tg.start(
            lambda task_status: emulator.run(host=host, port=port, task_status=task_status)
        )
        print(f"walacord emulator listening on {url}/api", flush=True)
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info(
                    "emulator.signal", extra={"fields": {"signal": signal.Signals(signum).name}}
                )
                break
        tg.cancel_scope.cancel()


def command(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        host, port = parse_listen(args.listen)
        users = parse_users(args.user)
        faults = fault_from_args(args)
    except ValueError as exc:
        print(f"walacord emulator: {exc}", file=sys.stderr)
        return 2

    if not users:
        print(
            "walacord emulator: no --user given, accepting admin:admin; for local use only",
            file=sys.stderr,
        )
    emulator = Emulator(
        users=users, state_path=args.state, token_ttl=args.token_ttl or None, faults=faults
    )
    try:
        anyio.run(serve, emulator, host, port)
    except OSError as exc:
        print(f"walacord emulator: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 1
    return 0
