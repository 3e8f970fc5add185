"""The outbox component: the store and the sync engine, started in order."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import anyio
import anyio.abc

from walacord.config import Config
from walacord.metrics import Metrics
from walacord.outbox.sinks import (
    ConnectionSource,
    PostgresSink,
    Sink,
    WalacorClientLike,
    WalacorSink,
)
from walacord.outbox.store import AlertCallback, OutboxStore
from walacord.outbox.sync import SyncEngine


def build_sinks(config: Config, *, walacor: WalacorClientLike | None = None,
                pool: ConnectionSource | None = None) -> dict[str, Sink]:
    """Return the sinks for the backends that are configured, keyed by sink name."""
    sinks: dict[str, Sink] = {}
    if walacor is not None:
        sinks["walacor"] = WalacorSink(walacor, timeout=config.outbox.apply_timeout)
    if pool is not None:
        sinks["postgres"] = PostgresSink(pool, config.outbox.statements,
                                         timeout=config.outbox.apply_timeout)
    return sinks


class Outbox:
    """Component that runs the store at `<state dir>/outbox.db` and the engine that drains
    it into `sinks`."""

    name = "outbox"

    def __init__(self, config: Config, sinks: Mapping[str, Sink], *,
                 metrics: Metrics | None = None, on_alert: AlertCallback | None = None,
                 extend_start_timeout: Callable[[float], None] | None = None) -> None:
        self.config = config.outbox
        # The record field where the walacor sink stores each operation's key.
        self.walacor_key_field = config.walacor.key_field
        self.store = OutboxStore(Path(config.state.dir) / "outbox.db", config.outbox,
                                 metrics=metrics, on_alert=on_alert,
                                 extend_start_timeout=extend_start_timeout)
        self.engine = SyncEngine(self.store, sinks, config.outbox, metrics=metrics)
        # The supervisor's start-up bound for this component: the integrity check may take
        # up to open_timeout on a large file.
        self.start_timeout = config.outbox.open_timeout + 30

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        async with anyio.create_task_group() as tasks:
            await tasks.start(self.store.run)
            # The store reports started unopened when its file system is full; the
            # engine then waits for it, while the rest of the daemon runs.
            if self.store.opened.is_set():
                await tasks.start(self.engine.run)
            else:
                tasks.start_soon(self._run_engine_once_open)
            task_status.started()

    async def _run_engine_once_open(self) -> None:
        await self.store.opened.wait()
        await self.engine.run()
