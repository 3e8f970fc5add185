"""Run the Walacor API emulator (for local use and tests only).

Example: `walacord emulator --listen 127.0.0.1:8080 --user demo:secret`.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

import anyio

from walacord import logs
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

    parser.add_argument("--tls-cert", metavar="PATH", help="PEM certificate chain; serves https")
    parser.add_argument("--tls-key", metavar="PATH", help="PEM private key for --tls-cert")

    faults = parser.add_argument_group("faults set at start (PUT /_emulator/faults changes them)")
    faults.add_argument(
        "--fault-status", type=int, metavar="CODE", help="respond with this HTTP status"
    )
    faults.add_argument(
        "--fault-ratio",
        type=float,
        default=1.0,
        metavar="SHARE",
        help="share of requests affected, 0 to 1 (default %(default)s)",
    )
    faults.add_argument(
        "--fault-latency-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="delay before each affected request",
    )
    faults.add_argument(
        "--fault-retry-after",
        metavar="VALUE",
        help="Retry-After in seconds or an HTTP-date (alone it implies status 429)",
    )
    faults.add_argument("--fault-mode", choices=MODES, help="how affected requests fail")
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
    if int(port) > 65535:
        raise ValueError(f"invalid --listen {value!r}: the port must be from 0 to 65535")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_numbers(args: argparse.Namespace) -> None:
    """Raise ValueError for a setting out of its range, naming the option."""
    if not 0 <= args.token_ttl < math.inf:
        raise ValueError(f"invalid --token-ttl {args.token_ttl:g}: give seconds above 0, or 0 "
                         "for tokens that never expire")
    if not 0 <= args.fault_ratio <= 1:
        raise ValueError(f"invalid --fault-ratio {args.fault_ratio:g}: give a share from 0 to 1")
    for option, value in (("--fault-latency-ms", args.fault_latency_ms),
                          ("--fault-trickle-interval-ms", args.fault_trickle_interval_ms)):
        if not 0 <= value < math.inf:
            raise ValueError(f"invalid {option} {value:g}: give milliseconds from 0")


def check_state_path(path: str | None) -> None:
    """Raise ValueError when --state names a directory or a file in a missing directory."""
    if path is None:
        return
    state = Path(path)
    if state.is_dir():
        raise ValueError(f"invalid --state {path!r}: it is a directory; name a file in it, "
                         f"such as {str(state / 'emulator.db')!r}")
    if not state.parent.is_dir():
        raise ValueError(f"invalid --state {path!r}: directory {str(state.parent)!r} does "
                         "not exist; create it first")


def parse_users(values: list[str]) -> dict[str, str]:
    users = {}
    for value in values:
        name, sep, password = value.partition(":")
        if not sep or not name or not password:
            raise ValueError(f"invalid --user {value!r}: expected NAME:PASSWORD")
        users[name] = password
    return users


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """Return a server TLS context for the certificate and key, or None for plain HTTP."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("--tls-cert and --tls-key must be given together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


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
    # The receiver opens before the listener, so a signal sent as soon as the port
    # answers is not lost to Python's default handler.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:
            url = await tg.start(
                lambda task_status: emulator.run(host=host, port=port, task_status=task_status)
            )
            print(f"walacord emulator listening on {url}/api", flush=True)
            async for signum in signals:
                log.info(
                    "emulator.signal", extra={"fields": {"signal": signal.Signals(signum).name}}
                )
                break
            tg.cancel_scope.cancel()


def command(args: argparse.Namespace) -> int:
    try:
        host, port = parse_listen(args.listen)
        check_numbers(args)
        check_state_path(args.state)
        users = parse_users(args.user)
        faults = fault_from_args(args)
        ssl_context = tls_context(args.tls_cert, args.tls_key)
    except (ValueError, OSError, ssl.SSLError) as exc:
        print(f"walacord emulator: {exc}", file=sys.stderr)
        return 2

    if not users:
        print(
            "walacord emulator: no --user given, accepting admin:admin; for local use only",
            file=sys.stderr,
        )
    emulator = Emulator(
        users=users,
        state_path=args.state,
        token_ttl=args.token_ttl or None,
        faults=faults,
        ssl_context=ssl_context,
    )
    logs.setup("info", secrets=list(users.values()))
    try:
        anyio.run(serve, emulator, host, port)
    except OSError as exc:
        print(f"walacord emulator: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 1
    finally:
        logs.shutdown()
    return 0
