"""`walacorctl enqueue`, `walacorctl outbox ...` and `walacorctl sync`."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import orjson

from walacord.control.protocol import ErrorCode
from walacord.control.render import first_line, format_table
from walacord.errors import ControlClientError, ControlError
from walacord.jsonkeys import duplicate_key
from walacord.numbers import inexact_number
from walacord.outbox.model import MAX_PAGE
from walacord.terminal import escape_control_characters, escape_json_text

if TYPE_CHECKING:
    from walacord.control.cli import Context

# Operations per outbox.enqueue request when reading --from-file; each request is one
# durable transaction on the daemon.
FILE_BATCH = 1000
# Bytes per request when reading --from-file, below the daemon's default 1 MiB limit
# ([control] max_request_bytes); a daemon with a lower limit makes walacorctl halve it.
REQUEST_BUDGET = 512 * 1024
EXPORT_PAGE = 1000
# Longest --from-file line read: the largest request any daemon takes ([control]
# max_request_bytes at its maximum). A longer line is rejected before it is read whole.
MAX_LINE_BYTES = 64 * 1024 * 1024
UTF8_BOM = b"\xef\xbb\xbf"
STATES = ("pending", "in_flight", "done", "dead")


def _int64(text: str, minimum: int = 0, maximum: int = 2**63 - 1) -> int:
    """Parse a whole number from `minimum` to `maximum`, by default any that fits the
    control protocol's 64-bit integers."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid whole number: {text!r}") from None
    if not minimum <= value <= maximum:
        raise argparse.ArgumentTypeError(f"{text} is out of range; use a whole number from "
                                         f"{minimum} to {maximum}")
    return value


def _etid(text: str) -> int:
    """Parse an envelope type id: a whole number from 1."""
    if text.strip() == "0":
        raise argparse.ArgumentTypeError("0 is not an envelope type id; use the ETId of a "
                                         "Walacor schema, a whole number from 1")
    return _int64(text, minimum=1)


def _limit(text: str) -> int:
    """Parse `outbox list --limit`: the rows of one page the daemon returns."""
    return _int64(text, minimum=1, maximum=MAX_PAGE)


def _check_encodable(operation: dict[str, Any], where: str) -> None:
    """Raise UsageError when the operation cannot become a JSON request line."""
    try:
        # Wrapped as in a batch request, whose extra levels count toward orjson's
        # nesting limit.
        orjson.dumps({"params": {"operations": [operation]}})
    except TypeError as exc:
        if "recursion" in str(exc).lower():
            advice = ("it nests arrays or objects too deeply; keep the payload within 250 "
                      "levels")
        elif "64-bit" in str(exc):
            advice = "send integers beyond 64 bits as strings"
        else:
            advice = str(exc)
        raise UsageError(f"{where} cannot be sent as JSON: {advice}") from None


class _Once(argparse.Action):
    """Store an option's value, and reject the option when it is given twice.

    argparse keeps the last of repeated options, so `--data A --data B` would enqueue B
    without a word, like a repeated JSON key.
    """

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} is given twice; give it once")
        setattr(namespace, self.dest, values)


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    enqueue = commands.add_parser(
        "enqueue", help="hand one operation, or a JSON-lines file of them, to the outbox")
    enqueue.add_argument("--sink", action=_Once, choices=("walacor", "postgres"),
                         help="target backend")
    enqueue.add_argument("--etid", action=_Once, type=_etid,
                         help="Walacor envelope type id, from 1 (sink walacor)")
    enqueue.add_argument("--statement", action=_Once,
                         help="configured statement name (sink postgres)")
    enqueue.add_argument("--key", action=_Once,
                         help="idempotency key; enqueueing it again changes nothing")
    enqueue.add_argument("--data", action=_Once, help="the record (walacor) or parameters "
                                                      "(postgres), as a JSON object")
    enqueue.add_argument("--ordering-key", action=_Once,
                         help="operations sharing it are applied in order")
    enqueue.add_argument("--from-file", action=_Once, type=Path, metavar="FILE",
                         help="JSON lines, one operation each, e.g. {\"sink\": \"walacor\", "
                              "\"etid\": 10001, \"key\": \"k1\", \"data\": {...}}; - reads "
                              "standard input")
    enqueue.set_defaults(handler=enqueue_command)

    outbox = commands.add_parser("outbox", help="inspect and act on outbox operations")
    outbox.set_defaults(handler=stats_command, action=None)
    actions = outbox.add_subparsers(dest="action", metavar="ACTION")
    actions.add_parser("stats", help="counts by state (the default)").set_defaults(
        handler=stats_command)

    listing = actions.add_parser("list", help="operations without payloads, oldest first")
    listing.add_argument("--state", choices=STATES, action="append",
                         help="only this state; repeat for several")
    listing.add_argument("--limit", type=_limit, default=50,
                         help=f"rows to show, 1 to {MAX_PAGE} (default 50)")
    listing.add_argument("--after", type=_int64, default=0, metavar="ID",
                         help="start after this operation id")
    listing.set_defaults(handler=list_command)

    show = actions.add_parser("show", help="one operation with its payload and receipt, by "
                                           "id or by --key")
    show.add_argument("id", type=_int64, nargs="?", help="operation id, as `outbox list` shows")
    show.add_argument("--key", help="the idempotency key the operation was enqueued with")
    show.set_defaults(handler=show_command)

    retry = actions.add_parser("retry", help="return a dead operation to pending")
    retry.add_argument("id", type=_int64, nargs="?")
    retry.add_argument("--all-dead", action="store_true", help="retry every dead operation")
    retry.set_defaults(handler=retry_command)

    drop = actions.add_parser("drop", help="delete a pending or dead operation for good")
    drop.add_argument("id", type=_int64)
    drop.add_argument("--yes", action="store_true", help="confirm; required")
    drop.add_argument("--reason", default="", help="logged with the drop")
    drop.set_defaults(handler=drop_command)

    export = actions.add_parser("export", help="print operations with payloads as JSON lines")
    export.add_argument("--state", choices=STATES, action="append")
    export.set_defaults(handler=export_command)

    sync = commands.add_parser("sync", help="replay due pending operations now and wait")
    sync.add_argument("--all", action="store_true",
                      help="also retry at once the operations waiting out a retry backoff "
                           "after earlier failures, for example once a backend is fixed")
    sync.set_defaults(handler=sync_command)


EXIT_USAGE = 2


class UsageError(ValueError):
    """Invalid command-line input, reported as exit code 2."""


def _usage(context: Context, error: UsageError) -> int:
    context.stderr.write(f"walacorctl: {error}\n")
    return EXIT_USAGE


# The options of one operation on the command line, by sink.
ENQUEUE_FORMS = {
    "walacor": "--sink walacor --etid N --key KEY --data JSON",
    "postgres": "--sink postgres --statement NAME --key KEY --data JSON",
}


def _operation_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    misplaced = {
        "walacor": ("--statement", args.statement,
                    "a Walacor record names its envelope type with --etid N"),
        "postgres": ("--etid", args.etid,
                     "a PostgreSQL operation names its configured statement with "
                     "--statement NAME"),
    }
    if args.sink is not None:
        flag, value, fix = misplaced[args.sink]
        if value is not None:
            raise UsageError(f"{flag} does not apply to --sink {args.sink}: {fix}")

    target = {"walacor": ("--etid", args.etid), "postgres": ("--statement", args.statement)}
    options = [("--sink", args.sink)]
    if args.sink is not None:
        options.append(target[args.sink])
    options += [("--key", args.key), ("--data", args.data)]
    missing = [flag for flag, value in options if value is None]
    if missing:
        names = missing[0] if len(missing) == 1 else (
            f"{', '.join(missing[:-1])} and {missing[-1]}")
        forms = (ENQUEUE_FORMS[args.sink] if args.sink is not None
                 else " or ".join(ENQUEUE_FORMS.values()))
        raise UsageError(f"enqueue is missing {names}; write {forms}, or --from-file FILE "
                         "for a file of operations")
    if not args.key.strip():
        raise UsageError("--key is empty; give the operation's idempotency key, such as "
                         "its payment id")
    try:
        payload = orjson.loads(args.data)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"--data is not valid JSON: {exc}") from None
    problem = inexact_number(args.data) or duplicate_key(args.data, payload)
    if problem is not None:
        raise UsageError(f"--data: {problem}")
    if not isinstance(payload, dict):
        raise UsageError(f"--data must be a JSON object, such as '{{\"amount\": 1}}'; got "
                         f"{args.data[:60]}")
    operation: dict[str, Any] = {"sink": args.sink, "key": args.key}
    if args.sink == "walacor":
        operation.update(etid=args.etid, data=payload)
    else:
        operation.update(statement=args.statement, params=payload)
    if args.ordering_key:
        operation["ordering_key"] = args.ordering_key
    _check_encodable(operation, "--data")
    return operation


def _read_lines(path: Path, stdin: BinaryIO | None) -> tuple[list[dict[str, Any]], list[int]]:
    """Return the file's operations and the line number of each.

    Path "-" reads `stdin`, or standard input when `stdin` is None.
    """
    operations = []
    numbers = []
    if str(path) == "-":
        source: contextlib.AbstractContextManager[BinaryIO] = contextlib.nullcontext(
            stdin or sys.stdin.buffer)
    else:
        source = path.open("rb")
    with source as handle:
        number = 0
        while line := handle.readline(MAX_LINE_BYTES + 1):
            number += 1
            if number == 1 and line.startswith(UTF8_BOM):
                # Some Windows editors start UTF-8 files with one; JSON allows ignoring it.
                line = line[len(UTF8_BOM):]
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                raise UsageError(f"{path}:{number}: line longer than {MAX_LINE_BYTES} bytes, "
                                 "more than any daemon takes in one request; put one "
                                 "operation on each line and shrink this one")
            if not line.strip():
                continue
            try:
                line.decode()
            except UnicodeDecodeError as exc:
                raise UsageError(
                    f"{path}:{number}: not valid UTF-8: byte 0x{line[exc.start]:02x} at "
                    f"byte {exc.start + 1} of the line; save the file as UTF-8") from None
            try:
                operation = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise UsageError(f"{path}:{number}: invalid JSON: {exc}") from None
            problem = inexact_number(line) or duplicate_key(line, operation)
            if problem is not None:
                raise UsageError(f"{path}:{number}: {problem}")
            _check_encodable(operation, f"{path}:{number}")
            operations.append(operation)
            numbers.append(number)
    return operations, numbers


def enqueue_command(context: Context, args: argparse.Namespace) -> int:
    try:
        if args.from_file is None:
            return _enqueue_one(context, _operation_from_flags(args))
        extra = [flag for flag, value in (
            ("--sink", args.sink), ("--etid", args.etid), ("--statement", args.statement),
            ("--key", args.key), ("--data", args.data), ("--ordering-key", args.ordering_key))
            if value is not None]
        if extra:
            raise UsageError(f"--from-file takes every field from the file; drop "
                             f"{', '.join(extra)}")
        operations, numbers = _read_lines(args.from_file, context.stdin)
    except UsageError as exc:
        return _usage(context, exc)
    except OSError as exc:
        return _usage(context, UsageError(f"cannot read {args.from_file}: {exc.strerror}"))
    return _enqueue_many(context, operations, args.from_file, numbers)


def _too_large(operation: dict[str, Any], size: int, limit: int | None) -> str:
    """Describe an operation that does not fit in one request of `limit` bytes."""
    return (f"the operation with key {operation.get('key')!r} is {size} bytes, more than the "
            f"daemon takes in one request ({limit} bytes, [control] max_request_bytes); "
            "shrink its payload, or raise that limit and, for a payload that large, "
            "[outbox] max_operation_bytes")


def _enqueue_one(context: Context, operation: dict[str, Any]) -> int:
    try:
        result = context.call("outbox.enqueue", operation)
    except ControlError as exc:
        if exc.code != ErrorCode.REQUEST_TOO_LARGE:
            raise
        size = len(orjson.dumps(operation)) + 1
        raise ControlError(exc.code, f"{_too_large(operation, size, _request_limit(exc))}. "
                           "Nothing was enqueued", exc.data) from None
    if context.json:
        context.print_json(result)
    else:
        state = "accepted" if result["created"] else "already known"
        context.print(f"{state}: id {result['id']} key {result['key']} ({result['state']})")
    return 0


def _enqueue_many(context: Context, operations: list[dict[str, Any]], path: Path,
                  numbers: list[int]) -> int:
    sizes = [len(orjson.dumps(operation)) + 1 for operation in operations]
    budget = REQUEST_BUDGET
    created = known = 0
    start = 0
    while start < len(operations):
        # Step 1: take up to FILE_BATCH operations that fit the request budget.
        end, size = start + 1, sizes[start]
        while end < len(operations) and end - start < FILE_BATCH and \
                size + sizes[end] <= budget:
            size += sizes[end]
            end += 1

        # Step 2: send them; a request over the daemon's limit is discarded unread, so the
        # same operations go again in smaller requests.
        try:
            results = context.call("outbox.enqueue",
                                   {"operations": operations[start:end]})["results"]
        except ControlClientError as exc:
            raise ControlClientError(
                f"{exc}. {path}: "
                f"{_what_was_enqueued(numbers[start], created + known, in_doubt=True)} "
                "Run the same file again once walacord answers: operations already stored "
                "are reported as already known and are not added twice") from None
        except ControlError as exc:
            if exc.code != ErrorCode.REQUEST_TOO_LARGE:
                located = _at_line(exc, path, numbers, start, created + known)
                if located is exc:
                    # The error names no single operation, such as a key conflict
                    # between two lines, so it covers the lines of the whole request.
                    lines = (f"{numbers[start]}" if end - start == 1
                             else f"{numbers[start]}-{numbers[end - 1]}")
                    located = ControlError(exc.code, (
                        f"{path}:{lines}: {exc.message}. "
                        f"{_what_was_enqueued(numbers[start], created + known)}"), exc.data)
                raise located from None
            limit = _request_limit(exc)
            if end - start == 1 or limit is None:
                raise ControlError(exc.code, (
                    f"{path}:{numbers[start]}: "
                    f"{_too_large(operations[start], sizes[start], limit)}. "
                    f"{_what_was_enqueued(numbers[start], created + known)}"),
                    exc.data) from None
            budget = min(budget // 2, limit // 2)
            continue
        created += sum(1 for r in results if r["created"])
        known += sum(1 for r in results if not r["created"])
        start = end

    # Every operation is stored by now, so a failure to read the count below does not
    # make the run fail.
    pending: int | None = None
    try:
        pending = context.call("outbox.stats")["pending"]
    except (ControlClientError, ControlError) as exc:
        context.stderr.write(f"walacorctl: warning: every operation was enqueued, but "
                             f"reading the outbox's pending count failed: {exc}\n")
    summary = {"enqueued": created, "already_known": known, "pending": pending}
    if context.json:
        context.print_json(summary)
    else:
        tail = "" if pending is None else f"; {pending} pending in the outbox"
        context.print(f"enqueued {created}, already known {known}{tail}")
    return 0


def _what_was_enqueued(first_line: int, sent: int, *, in_doubt: bool = False) -> str:
    """Say which part of a --from-file run reached the outbox before a rejection.

    With `in_doubt`, the request from `first_line` on got no response, so the daemon
    may have stored it.
    """
    if in_doubt:
        before = ("nothing" if sent == 0 else
                  "1 operation" if sent == 1 else f"{sent} operations")
        return (f"Enqueued before line {first_line}: {before}. The request from that line "
                "on got no response, so it may or may not be stored.")
    if sent == 0:
        return "Nothing was enqueued"
    counted = "1 operation was" if sent == 1 else f"{sent} operations were"
    return f"The {counted} enqueued before line {first_line}, and nothing from that line on"


def _request_limit(error: ControlError) -> int | None:
    """Return the daemon's request limit from a REQUEST_TOO_LARGE error, if it gave one."""
    data = error.data if isinstance(error.data, dict) else {}
    limit = data.get("max_request_bytes")
    return limit if isinstance(limit, int) and limit > 0 else None


def _at_line(error: ControlError, path: Path, numbers: list[int], start: int,
             sent: int) -> ControlError:
    """Return `error` with "operations[K]" of one request turned into FILE:LINE.

    A rejected request adds none of its operations, so the message names the first line
    that was not enqueued. Rerunning the file after the fix is safe, because keys already
    stored are reported as already known.
    """
    data: dict[str, Any] = error.data if isinstance(error.data, dict) else {}
    field = str(data.get("field", ""))
    match = re.fullmatch(r"operations\[(\d+)\]\.?(.*)", field)
    if match is None:
        return error
    index = start + int(match.group(1))
    detail = error.message.split(": ", 1)[1] if ": " in error.message else error.message
    where = f"{path}:{numbers[index]}"
    field_name = match.group(2) or "operation"
    message = (f"{where}: {field_name}: {detail}. "
               f"{_what_was_enqueued(numbers[start], sent)}")
    return ControlError(error.code, message, {**data, "line": numbers[index]})


def stats_command(context: Context, args: argparse.Namespace) -> int:
    stats = context.call("outbox.stats")
    if context.json:
        context.print_json(stats)
        return 0
    keys = ("accepted", "pending", "in_flight", "done", "dead", "dropped")
    context.print(format_table(list(keys), [[stats[k] for k in keys]]))
    context.print(f"oldest pending: {stats['oldest_pending_age_seconds']:.0f}s; conserved: "
                  f"{'yes' if stats['conserved'] else 'NO'}; full: "
                  f"{'yes' if stats['full'] else 'no'}")
    if stats.get("blocked"):
        context.print(f"blocked: {_pending_wait(stats['blocked'])} behind dead operations "
                      "with the same ordering key; `walacorctl sync` names them")
    return 0


def list_command(context: Context, args: argparse.Namespace) -> int:
    result = context.call("outbox.list", {"state": args.state or [], "limit": args.limit,
                                          "after_id": args.after})
    if context.json:
        context.print_json(result)
        return 0
    rows = [[op["id"], _state_cell(op), op["sink"], op["target"], op["key"], op["attempts"],
             first_line(op["last_error"] or "")] for op in result["operations"]]
    context.print(format_table(["id", "state", "sink", "target", "key", "attempts",
                                "last error"], rows) if rows else "no operations")
    return 0


def _state_cell(operation: dict[str, Any]) -> str:
    """Return the state, with the dead operation that a blocked pending one waits behind."""
    blocked_by = operation.get("blocked_by")
    if blocked_by is None:
        return str(operation["state"])
    return f"{operation['state']} (blocked by {blocked_by})"


def _unblock_hint(op_id: str) -> str:
    """Tell the operator how to release the operations held back by dead operation `op_id`."""
    return (f"`walacorctl outbox show {op_id}` shows its last error. Fix the cause, then run "
            f"`walacorctl outbox retry {op_id}`, or drop it for good with `walacorctl outbox "
            f"drop {op_id} --yes`")


def show_command(context: Context, args: argparse.Namespace) -> int:
    if args.id is None and args.key is None:
        return _usage(context, UsageError("missing operation: pass an operation id or --key "
                                          "KEY"))
    if args.id is not None and args.key is not None:
        return _usage(context, UsageError("pass an operation id or --key KEY, not both"))
    params = {"id": args.id} if args.key is None else {"key": args.key}
    operation = context.call("outbox.show", params)
    if context.json:
        context.print_json(operation)
        return 0
    for field, value in operation.items():
        if field in ("payload", "receipt"):
            continue
        if field in TIME_FIELDS:
            value = _utc(value) if value else "-"
        context.print(f"{field + ':':17}{_shown(value)}")
    if operation.get("receipt") is not None:
        receipt = escape_json_text(orjson.dumps(operation["receipt"]).decode())
        context.print(f"{'receipt:':17}{receipt}")
    blocked_by = operation.get("blocked_by")
    if blocked_by is not None:
        context.print(f"blocked: waits behind dead operation {blocked_by}, which has the "
                      f"same ordering key. {_unblock_hint(str(blocked_by))}")
    context.print("payload:")
    payload = orjson.dumps(operation.get("payload"), option=orjson.OPT_INDENT_2).decode()
    context.print(escape_json_text(payload))
    return 0


def _shown(value: Any) -> str:
    """Return a field's value for `outbox show`, with control characters escaped.

    Keys come from the application and errors from the sinks, so either may contain
    escape sequences. A multi-line error keeps its lines, indented under the value.
    """
    if value is None:
        return ""
    lines = str(value).split("\n")
    return ("\n" + " " * 17).join(escape_control_characters(line) for line in lines)


# Fields of an operation that hold Unix times; `--json` keeps them as numbers.
TIME_FIELDS = ("created_at", "next_attempt_at", "updated_at")


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def retry_command(context: Context, args: argparse.Namespace) -> int:
    if args.all_dead == (args.id is not None):
        return _usage(context, UsageError("pass an operation id or --all-dead"))
    params = {"all_dead": True} if args.all_dead else {"id": args.id}
    result = context.call("outbox.retry", params)
    if context.json:
        context.print_json(result)
    else:
        context.print(f"returned {result['retried']} operations to pending")
    return 0


def drop_command(context: Context, args: argparse.Namespace) -> int:
    if not args.yes:
        return _usage(context, UsageError("dropping loses the operation for good; add --yes"))
    params = {"id": args.id, "confirm": True}
    if args.reason:
        params["reason"] = args.reason
    result = context.call("outbox.drop", params)
    if context.json:
        context.print_json(result)
    else:
        context.print(f"dropped operation {args.id} (key {result['dropped']['key']})")
    return 0


def export_command(context: Context, args: argparse.Namespace) -> int:
    after = 0
    while True:
        page = context.call("outbox.export", {"state": args.state or [], "after_id": after,
                                              "limit": EXPORT_PAGE})
        for operation in page["operations"]:
            context.stdout.write(escape_json_text(orjson.dumps(operation).decode()) + "\n")
        if page["next_after_id"] is None:
            return 0
        after = page["next_after_id"]


def sync_command(context: Context, args: argparse.Namespace) -> int:
    result = context.call("sync.run", {"all": True} if args.all else {}, progress=True)
    if context.json:
        context.print_json(result)
    else:
        stats = result["stats"]
        if args.all:
            context.print(f"made {result.get('made_due', 0)} waiting operations due")
        context.print(f"applied {result['applied']}, retrying {result['retried']}, dead "
                      f"{result['dead']}; {stats['pending']} pending")
        handled = result["applied"] + result["retried"] + result["dead"]
        if result.get("error"):
            context.print(f"sync stopped early: {result['error']}")
            return 1
        blockers = result.get("blockers") or {}
        blocked = int(blockers.get("blocked", 0))
        if blocked:
            context.print(_blocked_message(blockers))
        if handled == 0 and stats["pending"] > blocked:
            # Nothing was due: the other pending operations wait out a retry backoff.
            context.print("none was due: the pending operations wait for their next attempt "
                          "after earlier failures; `walacorctl outbox list` shows their last "
                          "error, and `walacorctl sync --all` retries them now")
    return 0


def _pending_wait(count: int) -> str:
    """Return "1 pending operation waits" or "N pending operations wait"."""
    return "1 pending operation waits" if count == 1 else f"{count} pending operations wait"


def _blocked_message(blockers: dict[str, Any]) -> str:
    """Describe the pending operations held back by dead ones, as `sync.run` counts them."""
    ids = [str(op_id) for op_id in blockers["ids"]]
    more = blockers["count"] - len(ids)
    if more > 0:
        ids.append(f"{more} more that `walacorctl outbox list --state dead` shows")
    if blockers["count"] == 1:
        behind, hint_id = f"dead operation {ids[0]}, which has", ids[0]
    else:
        behind, hint_id = f"dead operations {', '.join(ids)}, which have", "ID"
    return (f"blocked: {_pending_wait(blockers['blocked'])} behind {behind} the "
            "same ordering key. They stay pending, even with `sync --all`, until the dead "
            f"operations before them are retried or dropped. {_unblock_hint(hint_id)}")

