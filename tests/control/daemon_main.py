"""Run the real supervisor with the control server, a stand-in monitor and test methods.

Usage: python daemon_main.py CONFIG. Logs are JSON lines on stderr, as in production.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).parents[2]))

from tests.control.standins import StandInMonitor, StandInPool, register_test_methods
from walacord import config as config_module
from walacord import logs
from walacord.control.server import ControlServer
from walacord.runtime import Component, Runtime
from walacord.supervisor import Supervisor


def components(runtime: Runtime) -> list[Component]:
    register_test_methods(runtime.methods)
    return [ControlServer(runtime), StandInMonitor(), StandInPool()]


def main() -> None:
    path = sys.argv[1]
    config = config_module.load(path)
    logs.setup(config.logging.level, None, repeat_window=config.logging.repeat_window)
    try:
        anyio.run(Supervisor(config, path, components=components).run, backend="asyncio")
    finally:
        logs.shutdown()


if __name__ == "__main__":
    main()
