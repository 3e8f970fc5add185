"""The `walacord` command: run the daemon, check config, run the sandbox and tools.

Each subcommand lives in the module that owns it. This file only parses arguments and
imports that module when the subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from walacord import __version__

DEFAULT_CONFIG = "/etc/walacord/walacord.toml"

# subcommand name -> "module:function"; the function takes the parsed namespace and
# returns the exit code.
COMMANDS = {
    "run": "walacord.supervisor:command",
    "check-config": "walacord.config:command",
    "emulator": "walacord.emulator.cli:command",
    "dev": "walacord.dev:command",
    "setup-database": "walacord.db.setup:command",
    "migrate": "walacord.db.migrate:command",
}
# Modules that own a subcommand define `add_arguments(parser)` and `command(args)`, and
# add their line above: "emulator" -> walacord.emulator.cli, "dev" -> walacord.dev,
# "setup-database" -> walacord.db.setup, "migrate" -> walacord.db.migrate.


def default_config_path() -> str:
    """Return $WALACORD_CONFIG, or DEFAULT_CONFIG when it is unset or empty.

    An empty variable names no file, so it must not select the built-in defaults.
    """
    return os.environ.get("WALACORD_CONFIG") or DEFAULT_CONFIG


def config_path_type(text: str) -> str:
    """Reject an empty --config, which names no file."""
    if not text:
        raise argparse.ArgumentTypeError(
            f"empty path; give a configuration file, or leave the argument out to use "
            f"{default_config_path()}")
    return text


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=config_path_type,
        default=default_config_path(),
        metavar="PATH",
        help="configuration file (env WALACORD_CONFIG; default %(default)s)",
    )


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Build the parser; with `only`, import just that subcommand's module.

    Importing a subcommand's module can be costly (the emulator and the sandbox pull
    in test tooling), so `walacord run` skips the others and the daemon stays small.
    """
    parser = argparse.ArgumentParser(
        prog="walacord",
        description="Supervisor for a Walacor-backed financial integrity service.",
    )
    parser.add_argument("--version", action="version", version=f"walacord {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground (systemd runs this)")
    add_config_option(run)

    check = sub.add_parser("check-config", help="validate a configuration file and exit")
    add_config_option(check)
    check.add_argument("path", nargs="?", type=config_path_type,
                       help="file to check (overrides --config)")

    for name, module in COMMANDS.items():
        if name in ("run", "check-config"):
            continue
        if only is not None and name != only:
            sub.add_parser(name)
            continue
        target = importlib.import_module(module.split(":")[0])
        register = getattr(target, "add_arguments", None)
        help_text = (target.__doc__ or "").strip().splitlines()[0] if target.__doc__ else None
        child = sub.add_parser(name, help=help_text)
        if register is not None:
            register(child)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    chosen = next((word for word in arguments if not word.startswith("-")), None)
    parser = build_parser(chosen if chosen in COMMANDS else None)
    args = parser.parse_args(arguments)
    module_name, function_name = COMMANDS[args.command].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    try:
        return int(function(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
