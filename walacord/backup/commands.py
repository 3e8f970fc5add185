"""`walacorctl backup`: take, list, verify and restore backups."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from walacord.backup.manifest import manual_restore_advice, parse_time, utc_now
from walacord.control.arguments import non_empty
from walacord.control.cli import EXIT_SKIPPED
from walacord.control.render import format_seconds, format_table
from walacord.terminal import escape_control_characters

if TYPE_CHECKING:
    from walacord.control.cli import Context


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    backup = commands.add_parser("backup", help="take, list, verify and restore backups")
    actions = backup.add_subparsers(dest="action", metavar="ACTION", required=True)

    now = actions.add_parser("now", help="take a backup now and wait for it")
    now.set_defaults(handler=now_command)

    listing = actions.add_parser(
        "list", help="show backups, newest first, with the result of their last recorded checks")
    listing.set_defaults(handler=list_command)

    verify = actions.add_parser("verify", help="check a backup's checksum and pg_restore --list")
    verify.add_argument("id", nargs="?", help="backup id (default: the newest)")
    verify.add_argument("--drill", action="store_true",
                        help="also restore it into a scratch database and compare row counts")
    verify.set_defaults(handler=verify_command)

    restore = actions.add_parser("restore", help="restore a backup into a database")
    restore.add_argument("id", help="backup id from `walacorctl backup list`")
    restore.add_argument("--target-db", required=True, metavar="NAME",
                         type=non_empty("name", "give the name of the database to restore "
                                                "into"),
                         help="database to create; it must not exist unless --force")
    restore.add_argument("--force", action="store_true",
                         help="replace the target database if it exists")
    restore.add_argument("--ignore-checksum", action="store_true",
                         help="restore even when the file's sha256 differs from its "
                              "manifest's (the file changed after it was written)")
    restore.set_defaults(handler=restore_command)


def _size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 3600:
        return f"{int(seconds // 60)}m"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    return f"{int(seconds // 86400)}d{int(seconds % 86400 // 3600):02d}h"


def now_command(context: Context, args: argparse.Namespace) -> int:
    result = context.call("backup.now", progress=True)
    # Non-zero, so that `walacorctl backup now && ship-offsite` ships nothing old.
    skipped = result.get("status") == "skipped"
    if context.json:
        context.print_json(result)
        return EXIT_SKIPPED if skipped else 0
    if skipped:
        context.print(f"skipped: {result['reason']}")
        return EXIT_SKIPPED
    verified = "yes" if result["verified"] else "NO"
    context.print(f"backup {result['id']} written to {result['path']} "
                  f"({_size(result.get('size_bytes'))}, verified: {verified})")
    return 0


def list_command(context: Context, args: argparse.Namespace) -> int:
    listing = context.call("backup.list")
    if context.json:
        # The whole result, warnings included, as the other commands print theirs.
        context.print_json(listing)
        return 0
    backups: list[dict[str, Any]] = listing["backups"]
    # Built by the daemon from the real file names, which may not be UTF-8.
    commands: dict[str, str] = listing.get("restore_commands", {})
    for damaged in listing.get("unreadable", []):
        _warn(context, f"warning: manifest {damaged['path']} cannot be read "
                       f"({damaged['error']}), so its backup is not listed; restore the "
                       "manifest from a copy, or take a new backup")
        dump = damaged.get("dump")
        if dump:
            _warn(context, manual_restore_advice(dump, commands.get(dump)))
    for dump in listing.get("without_manifest", []):
        _warn(context, f"warning: dump {dump} has no manifest, so its backup is not "
                       "listed; restore the manifest from a copy")
        _warn(context, manual_restore_advice(dump, commands.get(dump)))
    for leftover in listing.get("leftover_databases", []):
        size = leftover.get("size_bytes")
        _warn(context, f"warning: database {leftover['name']} "
                       f"({'size unknown' if size is None else _size(size)}): "
                       f"{leftover['description']}")
    if listing.get("leftover_databases_error"):
        _warn(context, f"warning: {listing['leftover_databases_error']}")
    if listing.get("scratch_journal_error"):
        _warn(context, f"warning: {listing['scratch_journal_error']}")
    if not backups:
        context.print("no backups yet; take one with `walacorctl backup now`")
        return 0
    rows = [[b["id"], _age(b.get("age_seconds")), _size_column(b),
             "yes" if b["verified"] else "no", _checked_ago(b.get("checked_at")),
             _drilled(b.get("drill")), (b.get("sha256") or "")[:16]] for b in backups]
    context.print(format_table(
        ["id", "age", "size", "verified", "checked", "drilled", "sha256"], rows))
    # "verified" is the result of the checks recorded at "checked", not of a check run now.
    explained = [b for b in backups if b.get("problems") or b.get("notes")]
    if explained:
        context.print("")
    for entry in explained:
        for sentence in [*entry.get("problems", []), *entry.get("notes", [])]:
            context.print(f"{entry['id']}: {sentence}")
    return 0


def _size_column(entry: dict[str, Any]) -> str:
    """Return the SIZE column: the file's size, and the manifest's when they differ."""
    recorded = entry.get("size_bytes")
    actual = entry.get("file_size_bytes")
    if actual is None or actual == recorded:
        return _size(recorded)
    return f"{_size(actual)} (manifest {_size(recorded)})"


def _warn(context: Context, text: str) -> None:
    """Write `text` as one walacorctl line on standard error, with control characters
    escaped, because the file and database names in it could hold terminal escapes."""
    context.stderr.write(f"walacorctl: {escape_control_characters(text)}\n")


def _drilled(drill: dict[str, Any] | None) -> str:
    """Return the DRILLED column: "stale" for a drill of other file content."""
    if drill is None:
        return "no"
    if drill.get("stale"):
        return "stale"
    return "yes" if drill.get("ok") else "no"


def _checked_ago(moment: str | None) -> str:
    """Return how long ago an ISO 8601 time was, as "3h05m ago", or "never"."""
    if moment is None:
        return "never"
    seconds = (utc_now() - parse_time(moment)).total_seconds()
    return f"{_age(max(0.0, seconds))} ago"


def verify_command(context: Context, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"drill": args.drill}
    if args.id:
        params["id"] = args.id
    result = context.call("backup.verify", params, progress=True)
    if context.json:
        context.print_json(result)
        return 0 if result["verified"] else 1
    # The entry carries the last drill's result; name it only when this call ran one.
    # Its error, like every other reason, is among the entry's problems.
    drill = result.get("drill") if args.drill else None
    line = f"backup {result['id']}: verified {'yes' if result['verified'] else 'NO'}"
    if drill is not None:
        line += f", drill {'passed' if drill.get('ok') else 'FAILED'}"
    context.print(line)
    # Failed checks are among the problems, so only passed ones are printed here.
    for passed in _passed_checks(result):
        context.print(f"  {passed}")
    for sentence in [*(result.get("problems") or []), *(result.get("notes") or [])]:
        context.print(f"  {sentence}")
    if not result["verified"]:
        context.print("  Do not restore this backup: take a new one with `walacorctl backup "
                      "now`, check the storage, and see `walacorctl backup list` for older "
                      "backups")
    return 0 if result["verified"] and (drill is None or drill.get("ok")) else 1


def _passed_checks(entry: dict[str, Any]) -> list[str]:
    """Return a sentence for the entry's checksum and readability checks that passed."""
    passed = []
    checksum = entry.get("checksum")
    if checksum and checksum.get("ok"):
        passed.append(f"checksum check passed at {checksum['at']}: sha256 is "
                      f"{checksum.get('sha256')}, as the manifest records")
    listing = entry.get("list")
    # A stale result read other bytes than the file has now, so it is among the notes.
    if listing and listing.get("ok") and not listing.get("stale"):
        if entry.get("format") == "plain-gzip":
            found = (f"the SQL decompresses to {_size(listing.get('uncompressed_bytes'))} "
                     "and ends with pg_dump's completion line")
        else:
            found = f"pg_restore --list read {listing.get('entries')} entries"
        passed.append(f"readability check passed at {listing['at']}: {found}")
    return passed


def restore_command(context: Context, args: argparse.Namespace) -> int:
    result = context.call("backup.restore", {
        "id": args.id, "target_db": args.target_db, "force": args.force,
        "ignore_checksum": args.ignore_checksum}, progress=True)
    if context.json:
        context.print_json(result)
        return 0
    verb = "replaced" if result["replaced"] else "created"
    context.print(f"restored backup {result['id']} into {result['target_db']} ({verb}, "
                  f"{format_seconds(result['duration_seconds'])})")
    if not result.get("checksum_ok", True):
        context.print("warning: the file's sha256 did not match its manifest; check the "
                      "restored data before using it")
    return 0
