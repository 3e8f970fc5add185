"""The core `walacorctl` commands: status, check, probes, mode, pool, reload, log-level, watch."""

from __future__ import annotations

import argparse
import datetime
import time
from typing import TYPE_CHECKING, Any

import orjson

from walacord.config import LOG_LEVELS
from walacord.control.arguments import DURATION_HELP, duration_type
from walacord.control.cli import EXIT_USAGE, error_document, report_error
from walacord.control.interfaces import MAX_REASON_CHARS, MODES
from walacord.control.protocol import ErrorCode
from walacord.control.render import (
    as_object,
    format_mode,
    format_pairs,
    format_probes,
    format_recycle,
    format_seconds,
    format_status,
    override_hides_worse,
)
from walacord.errors import ControlClientError, ControlError
from walacord.terminal import escape_json_text

if TYPE_CHECKING:
    from walacord.control.cli import Context

# Nagios plugin return codes and the state word that starts the output line.
NAGIOS = {"normal": (0, "OK"), "degraded": (1, "WARNING"),
          "emergency": (2, "CRITICAL"), "offline": (2, "CRITICAL")}
NAGIOS_UNKNOWN = (3, "UNKNOWN")
WATCH_CLEAR = "\x1b[H\x1b[2J"


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = commands.add_parser("status", help="show the mode, its reason and every probe")
    status.set_defaults(handler=status_command)

    health = commands.add_parser(
        "health", help="show the daemon's own state: components, stalls, mode and probes")
    health.set_defaults(handler=health_command)

    check = commands.add_parser(
        "check", help="Nagios plugin: one line with perfdata; exit 0 normal, 1 degraded, "
                      "2 emergency or offline, 3 unreachable")
    # Check definitions usually put options after the command, so the global options
    # are accepted here too. SUPPRESS keeps the global values when these are absent.
    from walacord.control.cli import socket_path_type, timeout_type
    check.add_argument("--socket", metavar="PATH", type=socket_path_type,
                       default=argparse.SUPPRESS,
                       help="control socket, as before the command")
    check.add_argument("--timeout", type=timeout_type, metavar="DURATION",
                       default=argparse.SUPPRESS,
                       help="how long to wait for each read, as before the command")
    check.set_defaults(handler=check_command)

    probes = commands.add_parser("probes", help="list the probes; `probes run` runs them now")
    probes.set_defaults(handler=probes_command, action=None)
    probe_actions = probes.add_subparsers(dest="action", metavar="ACTION")
    probes_run = probe_actions.add_parser("run", help="run probes now and show the results")
    probes_run.add_argument("names", nargs="*", metavar="NAME", help="probes to run (default all)")

    mode = commands.add_parser("mode", help="show the mode; `mode set` and `mode clear` "
                                            "override it")
    mode.set_defaults(handler=mode_command, action=None)
    mode_actions = mode.add_subparsers(dest="action", metavar="ACTION")
    mode_set = mode_actions.add_parser("set", help="force a mode for a limited time")
    mode_set.add_argument("mode", choices=MODES)
    # The daemon checks the TTL against [modes] override_max_ttl, which the client does
    # not know, and returns an error that names the limit.
    mode_set.add_argument("--ttl", required=True, type=duration_type(), metavar="DURATION",
                          help="how long the override lasts, at most [modes] "
                               f"override_max_ttl: {DURATION_HELP}")
    mode_set.add_argument("--reason", required=True,
                          help=f"why; goes into the transition log, at most {MAX_REASON_CHARS} "
                               "characters on one line")
    mode_actions.add_parser("clear", help="end the override now")

    pool = commands.add_parser("pool", help="act on the database connection pool")
    pool_actions = pool.add_subparsers(dest="action", metavar="ACTION", required=True)
    recycle = pool_actions.add_parser("recycle", help="replace every pooled connection")
    recycle.add_argument("--reason", default="manual",
                         help=f"recorded with the recycle, at most {MAX_REASON_CHARS} characters "
                              "on one line")
    pool.set_defaults(handler=pool_command)

    reload = commands.add_parser("reload", help="reload the configuration file, like SIGHUP")
    reload.set_defaults(handler=reload_command)

    log_level = commands.add_parser(
        "log-level", help="change the log level until the next reload or restart")
    log_level.add_argument("level", choices=LOG_LEVELS)
    log_level.set_defaults(handler=log_level_command)

    watch = commands.add_parser("watch", help="redraw the status live until Ctrl-C")
    watch.add_argument("--interval", default=2.0, metavar="DURATION",
                       type=duration_type(minimum=MIN_WATCH_INTERVAL, maximum=MAX_DURATION),
                       help="time between refreshes, from 0.1s to 365d: "
                            f"{DURATION_HELP} (default %(default)ss)")
    watch.set_defaults(handler=watch_command)


# The range of `watch --interval`. Below the minimum, watch would send requests faster
# than the daemon's probes produce new results, and only load it.
MIN_WATCH_INTERVAL = 0.1
MAX_DURATION = 365 * 86400.0



# --- status and check -------------------------------------------------------------


def status_command(context: Context, args: argparse.Namespace) -> int:
    status = context.call_object("status")
    if context.json:
        context.print_json(status)
    else:
        context.print(format_status(status))
    return 0


def health_command(context: Context, args: argparse.Namespace) -> int:
    health = context.call_object("health")
    if context.json:
        context.print_json(health)
        return 0
    stalled = as_object(health.get("stalled_components"))
    mode = as_object(health.get("mode"))
    components = health.get("components")
    context.print(format_pairs([
        ("state", health.get("state")),
        ("version", health.get("version")),
        ("environment", health.get("environment")),
        ("uptime", format_seconds(health.get("uptime_seconds"))),
        ("components", ", ".join(map(str, components)) if isinstance(components, list)
         and components else "none"),
        ("stalled", ", ".join(f"{name} ({seconds:g}s)" if isinstance(seconds, int | float)
                              else str(name) for name, seconds in stalled.items()) or "none"),
        ("mode", mode.get("mode") if mode else "no mode machine configured"),
    ]))
    if health.get("probes") is not None:
        context.print("\n" + format_probes(health["probes"]))
    return 0


def check_command(context: Context, args: argparse.Namespace) -> int:
    try:
        status = context.call_object("status")
    except (ControlClientError, ControlError) as exc:
        code, word = NAGIOS_UNKNOWN
        text = f"WALACORD {word} - {exc}"
        return _print_check(context, code, word, None, text)

    mode = status.get("mode")
    code, word = NAGIOS.get(mode, NAGIOS_UNKNOWN) if isinstance(mode, str) else NAGIOS_UNKNOWN
    probes = {name: probe for name, probe in as_object(status.get("probes")).items()
              if isinstance(probe, dict)}
    # healthy is None for a probe that is not configured: it is left out of the count.
    unconfigured = sorted(name for name, probe in probes.items() if probe.get("healthy") is None)
    configured = {name: probe for name, probe in probes.items() if name not in unconfigured}
    healthy = sum(1 for probe in configured.values() if probe.get("healthy"))
    perfdata = [f"probes_healthy={healthy};;;0;{len(configured)}"]
    for name in sorted(configured):
        latency = configured[name].get("latency_seconds")
        if isinstance(latency, int | float):
            perfdata.append(f"{_perf_label(name)}_latency={latency:.6f}s;;;0")
    reason = " ".join(str(status.get("reason") or "").split())
    if unconfigured:
        reason += f" (not configured: {', '.join(unconfigured)})"
    text = f"WALACORD {word} - mode {mode}: {reason} | {' '.join(perfdata)}"
    return _print_check(context, code, word, status, text)


def _print_check(context: Context, code: int, word: str, status: dict[str, Any] | None,
                 text: str) -> int:
    if context.json:
        context.print_json({"exit_code": code, "state": word, "text": text,
                            "mode": status.get("mode") if status else None})
    else:
        context.print(text)
    return code


def _perf_label(name: str) -> str:
    # Nagios labels may not contain '=' or quotes; probe names are short identifiers.
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name)


# --- probes and mode -----------------------------------------------------------


def probes_command(context: Context, args: argparse.Namespace) -> int:
    if args.action == "run":
        params = {"probes": args.names} if args.names else {}
        try:
            result = context.call_object("probes.run", params, progress=True)
        except ControlError as exc:
            # The probe names come from the daemon's configuration, so only the daemon
            # can check them. Its error for an unknown name lists the valid ones.
            if exc.code != ErrorCode.INVALID_PARAMS:
                raise
            report_error(context, exc)
            return EXIT_USAGE
    else:
        result = context.call_object("probes.list")
    if context.json:
        context.print_json(result)
    else:
        context.print(format_probes(result.get("probes") or {}))
    return 0


def mode_command(context: Context, args: argparse.Namespace) -> int:
    if args.action == "set":
        state = context.call_object("mode.set", {"mode": args.mode, "ttl_seconds": args.ttl,
                                          "reason": args.reason})
    elif args.action == "clear":
        state = context.call_object("mode.clear")
    else:
        state = context.call_object("mode.get")
    if context.json:
        context.print_json(state)
    else:
        context.print(format_mode(state))
        if args.action == "set" and override_hides_worse(state):
            context.stderr.write(
                f"walacorctl: warning: the probes say {state['override']['probes_mode']}, "
                f"but /api/health and the metrics report {args.mode} until the override "
                "ends; `walacorctl mode clear` ends it now\n")
    return 0


# --- pool, reload, log level -------------------------------------------------------


def pool_command(context: Context, args: argparse.Namespace) -> int:
    result = context.call_object("pool.recycle", {"reason": args.reason}, progress=True)
    if context.json:
        context.print_json(result)
    else:
        context.print(format_recycle(result) if result else "pool recycled")
    return 0


def reload_command(context: Context, args: argparse.Namespace) -> int:
    result = context.call_object("config.reload")
    if context.json:
        context.print_json(result)
    else:
        context.print(f"configuration {result.get('config')} reloaded")
        pending = result.get("restart_required") or []
        if pending:
            context.print(f"changed settings that apply only after a restart: "
                          f"{', '.join(pending)}; restart walacord to apply them "
                          f"(systemctl restart walacord, or Ctrl-C and walacord dev "
                          f"again for the sandbox)")
    return 0


def log_level_command(context: Context, args: argparse.Namespace) -> int:
    result = context.call_object("log.set_level", {"level": args.level})
    if context.json:
        context.print_json(result)
    else:
        context.print(f"log level {result.get('previous')} -> {result.get('level')} "
                      "(until the next reload or restart)")
    return 0


# --- watch --------------------------------------------------------------------


def watch_command(context: Context, args: argparse.Namespace) -> int:
    """Redraw the status every interval until Ctrl-C; keep going while the daemon is away."""
    clear = not context.json and context.stdout.isatty()
    try:
        while True:
            began = time.monotonic()
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            try:
                status = context.call_object("status")
                body = format_status(status)
                document: dict[str, Any] = {"at": now, "status": status}
            except (ControlClientError, ControlError) as exc:
                context.client.close()  # reconnect on the next round
                body = f"walacorctl: {exc}"
                document = {"at": now, "error": error_document(exc)}

            if context.json:
                context.stdout.write(_compact_json(document) + "\n")
            else:
                header = f"walacorctl watch: every {args.interval:g}s, Ctrl-C to stop ({now})"
                context.stdout.write((WATCH_CLEAR if clear else "") + header + "\n\n" + body
                                     + "\n" + ("" if clear else "\n"))
            context.stdout.flush()
            time.sleep(max(0.0, args.interval - (time.monotonic() - began)))
    except KeyboardInterrupt:
        return 0


def _compact_json(document: Any) -> str:
    return escape_json_text(orjson.dumps(document, option=orjson.OPT_SORT_KEYS).decode())
