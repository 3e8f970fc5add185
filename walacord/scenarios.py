"""Scripted stories for `walacord dev --scenario NAME`, printed as a timeline.

Each story drives the sandbox's own PostgreSQL and emulator and waits, with a bound,
for the mode the daemon should reach. A step that runs out of time is printed as a
failure and the story goes on, so one run shows every step.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from walacord.dev import Sandbox

# Maximum wait for each expected mode, in seconds.
STEP_LIMIT = 30.0


class Timeline:
    """Steps printed with the seconds since the story began."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.began = time.monotonic()
        self.failures = 0

    def say(self, text: str) -> None:
        erase = "\r\x1b[K" if self.sandbox.out.isatty() else ""
        print(f"{erase}  +{time.monotonic() - self.began:6.2f}s  {text}",
              file=self.sandbox.out, flush=True)

    async def expect(self, mode: str, limit: float = STEP_LIMIT) -> None:
        monitor = self.sandbox.monitor
        began = time.monotonic()
        with anyio.move_on_after(limit):
            while monitor.modes.mode.value != mode:
                await monitor.modes.wait_changed()
        took = time.monotonic() - began
        if monitor.modes.mode.value == mode:
            self.say(f"mode {mode} after {took:.2f}s: {monitor.modes.reason}")
        else:
            self.failures += 1
            self.say(f"FAILED: mode still {monitor.modes.mode.value}, not {mode}, after "
                     f"{limit:g}s: {monitor.modes.reason}")


async def outage(sandbox: Sandbox) -> None:
    """Run the outage story: normal, PostgreSQL stops, Walacor fails too, both recover."""
    timeline = Timeline(sandbox)
    monitor = sandbox.monitor
    print("\noutage scenario", file=sandbox.out, flush=True)

    # Step 1: everything healthy.
    await timeline.expect("normal")

    # Step 2: PostgreSQL stops at once, as in a crash.
    timeline.say("stopping PostgreSQL (pg_ctl stop -m immediate)")
    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, lambda: sandbox.cluster.stop("immediate"))
        await timeline.expect("emergency")

    # Step 3: operations would queue in the outbox here.
    # NOTE: this build has no outbox, so no operations are enqueued or drained.
    timeline.say("operations would queue now (no outbox in this build)")

    # Step 4: Walacor returns 503 as well.
    timeline.say("Walacor emulator now returns 503 to every request")
    sandbox.emulator.set_faults(status=503)
    monitor.runners["walacor"].trigger()
    await timeline.expect("offline")

    # Step 5: both recover.
    timeline.say("starting PostgreSQL and clearing the Walacor fault")
    sandbox.emulator.clear_faults()
    await anyio.to_thread.run_sync(sandbox.cluster.start)
    monitor.runners["walacor"].trigger()
    await timeline.expect("normal")

    verdict = "every step reached its mode" if not timeline.failures else (
        f"{timeline.failures} step(s) missed their mode")
    timeline.say(f"done: {verdict}")
    sandbox.failures = timeline.failures


SCENARIOS: dict[str, Callable[[Sandbox], Awaitable[None]]] = {"outage": outage}
