"""`walacorctl alerts`: list alerts and silences, add and end silences."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from walacord.alerts.model import MAX_SILENCE_SECONDS
from walacord.control.arguments import DURATION_HELP, duration_type
from walacord.control.render import format_table
from walacord.terminal import escape_control_characters

if TYPE_CHECKING:
    from walacord.control.cli import Context


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    alerts = commands.add_parser(
        "alerts", help="list active, silenced and recent alerts; `alerts silence` mutes some "
                       "and `alerts unsilence` ends a silence")
    alerts.set_defaults(handler=list_command, action=None)
    actions = alerts.add_subparsers(dest="action", metavar="ACTION")

    silence = actions.add_parser("silence", help="mute alerts that match for a while")
    silence.add_argument("matcher", help='label matchers, e.g. \'alertname="WalacordProbeDown",'
                                         'probe="database"\'')
    silence.add_argument("--for", dest="duration", required=True, metavar="DURATION",
                         type=duration_type(maximum=MAX_SILENCE_SECONDS),
                         help=f"how long, at most 366d: {DURATION_HELP}")
    silence.add_argument("--reason", required=True,
                         help="why; stored with the silence, at most 1000 characters on one "
                              "line, without control or invisible characters")
    silence.set_defaults(handler=silence_command)

    unsilence = actions.add_parser(
        "unsilence", help="end a silence now",
        description="End a silence now. An alert that the silence held and that still "
                    "fires is paged at the next evaluation.")
    unsilence.add_argument("id", help="silence id, as `walacorctl alerts` lists it")
    unsilence.set_defaults(handler=unsilence_command)


def _alert_rows(alerts: list[dict[str, Any]], state: str) -> list[list[object]]:
    rows = []
    for alert in alerts:
        labels = alert.get("labels", {})
        rows.append([
            # An active alert is pending or firing, as its status field shows.
            alert.get("status") if state == "active" and alert.get("status") else state,
            labels.get("alertname"), labels.get("severity"), labels.get("probe", ""),
            alert.get("startsAt"), alert.get("annotations", {}).get("summary", ""),
        ])
    return rows


def _cut(text: str, limit: int = 60) -> str:
    """Escape control characters in `text` and shorten it for a table cell.

    `--json` shows the text whole, with JSON's own escapes.
    """
    text = escape_control_characters(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def list_command(context: Context, args: argparse.Namespace) -> int:
    listing = context.call("alerts.list")
    # NOTE: JSON escapes only U+0000 to U+001F, so --json output keeps DEL, the C1
    # controls and the bidirectional controls of stored text as they are.
    if context.json:
        context.print_json(listing)
        return 0

    rows = (_alert_rows(listing.get("active", []), "active")
            + _alert_rows(listing.get("silenced", []), "silenced")
            + _alert_rows(listing.get("recent", []), "resolved"))
    if rows:
        context.print(format_table(
            ["state", "alertname", "severity", "probe", "since", "summary"], rows))
    else:
        context.print("no alerts")

    silences = listing.get("silences", [])
    if silences:
        context.print("")
        context.print(format_table(
            ["silence", "matchers", "until", "reason"],
            [[s["id"], _cut(",".join(s["matchers"])), s["endsAt"], _cut(s["reason"])]
             for s in silences]))
    return 0


def silence_command(context: Context, args: argparse.Namespace) -> int:
    result = context.call("alerts.silence", {
        "matcher": args.matcher, "duration": args.duration, "reason": args.reason})
    if context.json:
        context.print_json(result)
    else:
        silence = result["silence"]
        context.print(escape_control_characters(
            f"silence {silence['id']} until {silence['endsAt']}"))
        for warning in result.get("warnings", []):
            context.stderr.write(f"walacorctl: warning: {escape_control_characters(warning)}\n")
    return 0


def unsilence_command(context: Context, args: argparse.Namespace) -> int:
    result = context.call("alerts.unsilence", {"id": args.id})
    if context.json:
        context.print_json(result)
    else:
        context.print(escape_control_characters(f"silence {result['expired']} ended"))
    return 0
