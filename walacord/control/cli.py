"""`walacorctl`: steer a running walacord through its control socket.

Exit codes: 0 success; 1 the daemon returned an error; 2 invalid command line;
3 the daemon could not be reached, refused this user, was busy, speaks another
protocol version or sent a response of another shape; 4 `backup now` started no backup
because another one is running. `check` uses the Nagios plugin codes
instead: 0 normal, 1 degraded, 2 emergency or offline, 3 unknown or unreachable.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NoReturn, TextIO

import orjson

from walacord import __version__
from walacord.control.arguments import DURATION_HELP, duration_type, non_empty
from walacord.control.client import ControlClient, ProgressCallback
from walacord.control.protocol import DEFAULT_SOCKET, SOCKET_ENVIRONMENT_VARIABLE, ErrorCode
from walacord.control.render import ProgressBar
from walacord.errors import ControlClientError, ControlError
from walacord.terminal import escape_control_characters, escape_json_text

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
# `backup now` found another backup of the database running and started none.
EXIT_SKIPPED = 4
EXIT_NAGIOS_UNKNOWN = 3
DEFAULT_TIMEOUT = 10.0
# A socket timeout must be finite. Each read waits at most this long, and every
# progress line restarts the wait, so one day is plenty.
MAX_TIMEOUT = 86400.0
timeout_type = duration_type(maximum=MAX_TIMEOUT)
socket_path_type = non_empty("path", "give the control socket's path, such as "
                                     f"{DEFAULT_SOCKET}")
# Errors that mean walacorctl may not or cannot talk to this daemon at all.
CONNECTION_ERRORS = (ErrorCode.PERMISSION_DENIED, ErrorCode.VERSION_MISMATCH, ErrorCode.BUSY)

# Modules that add a family of commands; each defines `add_commands(subparsers)`, whose
# parsers set `handler=function(context, args) -> exit code`. The outbox, sync, backup
# and alerts families add their module here.
FAMILIES = (
    "walacord.control.commands",
    "walacord.alerts.commands",
    "walacord.backup.commands",
    "walacord.outbox.commands",
)

Handler = Callable[["Context", argparse.Namespace], int]


@dataclass
class Context:
    """The client, output mode and output streams that a command uses."""

    client: ControlClient
    json: bool
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    # None reads sys.stdin, looked up only when a command reads it.
    stdin: BinaryIO | None = None

    def call(self, method: str, params: dict[str, Any] | None = None, *,
             progress: bool = False) -> Any:
        """Call `method`; with `progress`, draw a bar on a terminal unless --json is set."""
        bar = ProgressBar(self.stderr) if progress and self.shows_progress() else None
        callback: ProgressCallback | None = bar
        try:
            return self.client.call(method, params, on_progress=callback)
        finally:
            if bar is not None:
                bar.finish()

    def call_object(self, method: str, params: dict[str, Any] | None = None, *,
                    progress: bool = False) -> dict[str, Any]:
        """Call `method`, whose result must be a JSON object; raise ControlClientError
        when it is not, as from a daemon of another release."""
        result = self.call(method, params, progress=progress)
        if not isinstance(result, dict):
            received = escape_control_characters(orjson.dumps(result).decode())
            if len(received) > 60:
                received = received[:57] + "..."
            raise ControlClientError(
                f"the daemon sent an unexpected response to {method}: expected a JSON "
                f"object, got {received}; install walacorctl and walacord from the same "
                "release")
        return result

    def shows_progress(self) -> bool:
        return not self.json and self.stderr.isatty()

    def print_json(self, document: Any) -> None:
        text = orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        self.stdout.write(escape_json_text(text.decode()) + "\n")

    def print(self, text: str) -> None:
        self.stdout.write(text + "\n")


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors explain how to pass a value that starts with '-'.

    argparse reads `--for -1h` as an option without its value, because "-1h" looks
    like an option, and its message does not explain why. Subcommand parsers are of
    this class too.
    """

    def error(self, message: str) -> NoReturn:
        option = _OPTION_WITHOUT_VALUE.fullmatch(message)
        if option:
            names = option.group(1).split("/")
            name = next((each for each in names if each.startswith("--")), names[0])
            message += (f"; a value that starts with '-' is written with '=', as in "
                        f"{name}=VALUE")
        super().error(message)


_OPTION_WITHOUT_VALUE = re.compile(r"argument ([\w/-]+): expected one argument")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="walacorctl",
        description="Query and steer a running walacord daemon through its control socket.",
        epilog="Exit codes: 0 ok, 1 the daemon returned an error, 2 usage error, "
               "3 daemon unreachable. `check` follows the Nagios plugin codes.")
    parser.add_argument("--version", action="version", version=f"walacorctl {__version__}")
    parser.add_argument(
        "--socket", metavar="PATH", type=socket_path_type,
        default=os.environ.get(SOCKET_ENVIRONMENT_VARIABLE) or DEFAULT_SOCKET,
        help=f"control socket (env {SOCKET_ENVIRONMENT_VARIABLE}; default %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print machine-readable JSON with a stable shape")
    parser.add_argument("--timeout", type=timeout_type, default=DEFAULT_TIMEOUT,
                        metavar="DURATION",
                        help="how long to wait for each read from the daemon, at most 1d: "
                             f"{DURATION_HELP} (default %(default)ss)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in FAMILIES:
        importlib.import_module(module).add_commands(commands)
    return parser


def _check_utf8(words: Sequence[str]) -> None:
    """Exit with a usage error when an argument is not valid UTF-8.

    Python keeps such bytes in `sys.argv` as lone surrogates, which the JSON encoder
    of the control protocol rejects with a traceback.
    """
    for word in words:
        try:
            word.encode("utf-8")
        except UnicodeEncodeError:
            shown = escape_control_characters(word.encode("utf-8", "surrogateescape")
                                              .decode("utf-8", "backslashreplace"))
            sys.stderr.write(f"walacorctl: error: argument '{shown}' contains bytes that are "
                             "not valid UTF-8 (shown as \\xNN); pass text in UTF-8\n")
            raise SystemExit(EXIT_USAGE) from None


def _command_word(words: Sequence[str]) -> str | None:
    """Return the command in `words`, skipping the global options before it."""
    position = 0
    while position < len(words):
        word = words[position]
        if word in ("--socket", "--timeout"):
            position += 2
        elif word.startswith("-"):
            position += 1
        else:
            return word
    return None


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None,
         stderr: TextIO | None = None, stdin: BinaryIO | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        _check_utf8(words)
        args = build_parser().parse_args(words)
    except SystemExit as exc:
        if exc.code == EXIT_USAGE and _command_word(words) == "check":
            # Monitoring reads 2 from a Nagios plugin as CRITICAL. Bad arguments are
            # UNKNOWN (3) there, because the check never ran. The monitoring system
            # shows the first line of standard output.
            (stdout or sys.stdout).write("WALACORD UNKNOWN - invalid arguments for "
                                         "walacorctl check; see walacorctl check --help\n")
            raise SystemExit(EXIT_NAGIOS_UNKNOWN) from None
        raise
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    handler: Handler = args.handler
    with ControlClient(args.socket, args.timeout) as client:
        context = Context(client, args.json, out, err, stdin)
        try:
            return handler(context, args)
        except ControlClientError as exc:
            if context.json:
                # Scripts read one JSON document on standard output for every failure.
                context.print_json({"error": error_document(exc)})
            else:
                err.write(f"walacorctl: {exc}\n")
            return EXIT_UNREACHABLE
        except ControlError as exc:
            report_error(context, exc)
            return EXIT_UNREACHABLE if exc.code in CONNECTION_ERRORS else EXIT_FAILED
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:
            # The reader went away (`walacorctl outbox export | head`): stop quietly, as
            # other Unix tools do, and keep Python from failing again when it flushes.
            if out is sys.stdout:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            return 128 + signal.SIGPIPE


def error_document(error: ControlError | ControlClientError) -> dict[str, Any]:
    """Return the value of "error" in the documents that --json prints for `error`.

    An error that no daemon sent, because walacorctl could not reach one or read its
    response, has code null and data {"reason": "unreachable"}.
    """
    if isinstance(error, ControlError):
        return {"code": error.code, "message": error.message, "data": error.data}
    return {"code": None, "message": str(error), "data": {"reason": "unreachable"}}


def report_error(context: Context, error: ControlError) -> None:
    """Print a daemon error: JSON on stdout with --json, a sentence on stderr otherwise."""
    if context.json:
        context.print_json({"error": error_document(error)})
        return
    context.stderr.write(f"walacorctl: {error.message}\n")
    problems = error.data.get("problems") if isinstance(error.data, dict) else None
    for problem in problems or []:
        context.stderr.write(f"  {problem}\n")


if __name__ == "__main__":
    sys.exit(main())
