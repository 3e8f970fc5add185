"""The outbox's own connections to its sinks: a small PostgreSQL pool and a Walacor client.

They are separate from the monitor's, so a pool recycle or a probe's abandoned call
never touches an operation being applied.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
from anyio.abc import TaskStatus
from psycopg_pool import AsyncConnectionPool

from walacord.config import Config
from walacord.walacor.client import WalacorClient

log = logging.getLogger(__name__)

POOL_MAX_SIZE = 4
CLOSE_TIMEOUT = 5.0


class OutboxBackends:
    """Component that opens the sink connections before the outbox starts, and closes them."""

    name = "outbox.backends"

    def __init__(self, config: Config) -> None:
        self.walacor: WalacorClient | None = None
        self.pool: AsyncConnectionPool[Any] | None = None
        walacor = config.walacor
        if walacor.url:
            self.walacor = WalacorClient(
                walacor.url, username=walacor.username, password=walacor.password,
                ca_bundle=walacor.ca_bundle or None, connect_timeout=walacor.connect_timeout,
                read_timeout=walacor.read_timeout, request_timeout=walacor.request_timeout,
                key_field=walacor.key_field)
        if config.outbox.statements:
            # open=False: the pool connects in the background once run() opens it, so a
            # database that is down at start-up does not block the daemon.
            self.pool = AsyncConnectionPool(
                config.database.conninfo(), min_size=1, max_size=POOL_MAX_SIZE, open=False,
                timeout=config.database.checkout_timeout, name="walacord-outbox")

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            if self.pool is not None:
                await self.pool.open(wait=False)
            task_status.started()
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                if self.pool is not None:
                    await self.pool.close(timeout=CLOSE_TIMEOUT)
                if self.walacor is not None:
                    await self.walacor.aclose()
