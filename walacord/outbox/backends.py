"""The outbox's own connections to its sinks: a small PostgreSQL pool and a Walacor client.

They are separate from the monitor's, so a pool recycle or a probe's abandoned call
never touches an operation being applied.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import TaskStatus
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from walacord.config import Config
from walacord.walacor.client import WalacorClient

log = logging.getLogger(__name__)

POOL_MAX_SIZE = 4
CLOSE_TIMEOUT = 5.0


class SinkPool:
    """The postgres sink's connection pool, which pause_database() closes and
    resume_database() replaces.

    psycopg_pool cannot open a pool again once it is closed, so resume_database() opens
    a new one. While paused, `connection()` waits for the resume (callers bound the wait
    with their own deadline), so the sink opens no connection to the database meanwhile.
    """

    def __init__(self, conninfo: str, *, checkout_timeout: float) -> None:
        self._conninfo = conninfo
        self._checkout_timeout = checkout_timeout
        self._generation = 0
        self.pool = self._new_pool()
        self.paused: str | None = None
        self._resumed: anyio.Event | None = None
        # Set by close(): the daemon is stopping, so no pool opens again.
        self._stopped = False
        # Set by stop_waiting(): checkouts that wait for a resume give up.
        self._stopping = False

    def _new_pool(self) -> AsyncConnectionPool[Any]:
        self._generation += 1
        suffix = f"-{self._generation}" if self._generation > 1 else ""
        # open=False: the pool connects in the background once opened, so a database
        # that is down at start-up does not block the daemon.
        return AsyncConnectionPool(
            self._conninfo, min_size=1, max_size=POOL_MAX_SIZE, open=False,
            timeout=self._checkout_timeout, name=f"walacord-outbox{suffix}")

    async def open(self) -> None:
        if self.paused is None and not self._stopped:
            await self.pool.open(wait=False)

    async def close(self) -> None:
        self._stopped = True
        await self.pool.close(timeout=CLOSE_TIMEOUT)

    @asynccontextmanager
    async def connection(self, timeout: float | None = None  # noqa: ASYNC109 - as the pool
                         ) -> AsyncIterator[AsyncConnection[Any]]:
        """Check out a connection as `AsyncConnectionPool.connection()` does."""
        while self._resumed is not None:
            if self._stopping:
                raise PoolTimeout("walacord is stopping while its connections to the "
                                  f"database are paused ({self.paused}); the operation "
                                  "is applied after the restart")
            await self._resumed.wait()
        async with self.pool.connection(timeout=timeout) as conn:
            yield conn

    async def pause_database(self, reason: str) -> None:
        """Close every connection, waiting up to CLOSE_TIMEOUT for those in use."""
        self.paused = reason
        if self._resumed is None:
            self._resumed = anyio.Event()
        old, self.pool = self.pool, self._new_pool()
        with anyio.move_on_after(CLOSE_TIMEOUT) as scope:
            await old.close(timeout=CLOSE_TIMEOUT)
        if scope.cancelled_caught:
            log.warning("outbox.pool_close_timed_out", extra={"fields": {
                "pool": old.name, "timeout_seconds": CLOSE_TIMEOUT, "reason": reason}})

    def stop_waiting(self) -> None:
        """Make checkouts that wait for a resume give up now, because the daemon is
        stopping and its drain would otherwise wait for them until drain_timeout."""
        self._stopping = True
        if self._resumed is not None:
            self._resumed.set()  # wakes the waiters; the event is replaced on resume

    async def resume_database(self) -> None:
        self.paused = None
        await self.open()
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.set()


class OutboxBackends:
    """Component that opens the sink connections before the outbox starts, and closes them."""

    name = "outbox.backends"

    def __init__(self, config: Config) -> None:
        self.walacor: WalacorClient | None = None
        self.pool: SinkPool | None = None
        walacor = config.walacor
        if walacor.url:
            self.walacor = WalacorClient(
                walacor.url, username=walacor.username, password=walacor.password,
                ca_bundle=walacor.ca_bundle or None, connect_timeout=walacor.connect_timeout,
                read_timeout=walacor.read_timeout, request_timeout=walacor.request_timeout,
                key_field=walacor.key_field)
        if config.outbox.statements:
            self.pool = SinkPool(config.database.conninfo(),
                                 checkout_timeout=config.database.checkout_timeout)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            if self.pool is not None:
                await self.pool.open()
            task_status.started()
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                if self.pool is not None:
                    await self.pool.close()
                if self.walacor is not None:
                    await self.walacor.aclose()

    async def drain(self) -> None:
        """At shutdown, let the sink's checkouts that wait for a resume give up, so the
        outbox's drain can end."""
        if self.pool is not None:
            self.pool.stop_waiting()

    async def pause_database(self, reason: str) -> None:
        """Close the postgres sink's connections until resume_database()."""
        if self.pool is not None:
            await self.pool.pause_database(reason)

    async def resume_database(self) -> None:
        if self.pool is not None:
            await self.pool.resume_database()
