"""walacord's PostgreSQL connection pool, which can be replaced whole ("recycled").

Every connection gets its client settings from `DatabaseConfig.conninfo()`: connect
timeout, TCP keepalives, tcp_user_timeout, and statement, lock and idle-in-transaction
timeouts as a server-side backstop. Connections are in autocommit, so walacord never
leaves a session idle in a transaction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import anyio
import psycopg
from anyio.abc import TaskGroup
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from walacord.config import DatabaseConfig

log = logging.getLogger(__name__)

# How long closing a replaced pool may take before walacord stops waiting for it.
CLOSE_TIMEOUT = 5.0
# The pool retries a failed connection attempt, with backoff, for this long.
RECONNECT_TIMEOUT = 3600.0
# How long pausing every user of the database may take; the caller goes ahead after it.
PAUSE_TIMEOUT = 15.0


class DatabasePaused(psycopg.OperationalError):
    """walacord keeps its own connections off the database for a while (see pause())."""


class DatabasePool:
    """Owns the current `AsyncConnectionPool` and replaces it on `recycle()`."""

    def __init__(self, config: DatabaseConfig) -> None:
        self.config = config
        # The config and its libpq string: parsing and building the string costs about
        # 0.15 ms of CPU, and the database probe opens a new connection every few seconds.
        self._conninfo: tuple[DatabaseConfig | None, str] = (None, "")
        self.generation = 0
        self.pool = self._new_pool()
        self._tg: TaskGroup | None = None
        self.closing: set[AsyncConnectionPool[Any]] = set()
        # Why the pool is closed on purpose, until resume(); see pause().
        self.paused: str | None = None
        # Set when run() ends: the daemon is stopping, so no pool opens again.
        self.stopped = False

    def _new_pool(self) -> AsyncConnectionPool[Any]:
        self.generation += 1
        cfg = self.config
        return AsyncConnectionPool(
            self.conninfo(), min_size=cfg.pool_min_size, max_size=cfg.pool_max_size,
            timeout=cfg.checkout_timeout, kwargs={"autocommit": True},
            reconnect_timeout=RECONNECT_TIMEOUT, name=f"walacord-{self.generation}",
            open=False)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Open the pool without waiting for the server, and close pools on the way out."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await self.pool.open(wait=False)
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._tg = None
                self.stopped = True
                with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                    await self.pool.close(timeout=CLOSE_TIMEOUT)

    def stats(self) -> dict[str, int]:
        """Return the pool's counters (psycopg_pool's names) without resetting them."""
        return dict(self.pool.get_stats())

    def connections(self) -> dict[str, int]:
        """Return connection counts by state: idle, used and the size of the pool."""
        stats = self.pool.get_stats()
        size = stats.get("pool_size", 0)
        idle = stats.get("pool_available", 0)
        return {"idle": idle, "used": max(0, size - idle), "size": size,
                "waiting": stats.get("requests_waiting", 0)}

    async def recycle(self) -> dict[str, int]:
        """Replace every connection with a new pool; return the old pool's stats.

        The old pool is closed in the background: its idle connections close at once,
        and connections still checked out close when they come back.
        """
        old = self.pool
        before = dict(old.get_stats())
        self.pool = self._new_pool()
        if self.paused is None and not self.stopped:
            # While paused, the new pool stays closed until resume() opens it.
            await self.pool.open(wait=False)
        self.closing.add(old)
        if self._tg is not None:
            self._tg.start_soon(self._close_old, old)
        return before

    async def _close_old(self, old: AsyncConnectionPool[Any]) -> None:
        began = time.monotonic()
        with anyio.move_on_after(CLOSE_TIMEOUT) as scope:
            await old.close(timeout=CLOSE_TIMEOUT)
        self.closing.discard(old)
        if scope.cancelled_caught:
            log.warning("pool.close_timed_out", extra={"fields": {
                "pool": old.name, "timeout_seconds": CLOSE_TIMEOUT}})
        else:
            log.debug("pool.closed", extra={"fields": {
                "pool": old.name, "duration_seconds": round(time.monotonic() - began, 3)}})

    async def release(self) -> dict[str, int]:
        """Close every pooled connection and keep the pool closed until `reopen()`.

        Used when the server is shutting down (SQLSTATE 57P03): a smart shutdown waits
        for every session, so walacord must not hold any.
        """
        before = dict(self.pool.get_stats())
        old = self.pool
        self.pool = self._new_pool()
        self.closing.add(old)
        await self._close_old(old)
        return before

    async def reopen(self) -> None:
        if self.pool.closed and self.paused is None and not self.stopped:
            await self.pool.open(wait=False)

    async def pause(self, reason: str) -> dict[str, int]:
        """Close every connection and open none until resume(); return the pool's stats.

        Connections checked out are closed when they come back, within CLOSE_TIMEOUT.
        Meanwhile `connect()` raises DatabasePaused and checkouts fail with PoolClosed.
        PostgreSQL renames or drops a database only while no session uses it, so a
        restore over the supervised database needs this.
        """
        self.paused = reason
        return await self.release()

    async def resume(self) -> None:
        """Open the pool again after pause()."""
        self.paused = None
        await self.reopen()

    async def connect(self, **params: Any) -> AsyncConnection[Any]:
        """Open a brand-new connection outside the pool, with the same settings.

        `params` are libpq connection parameters that replace the configured ones.
        Raise DatabasePaused while the pool is paused.
        """
        if self.paused is not None:
            raise DatabasePaused(f"walacord keeps its connections off the database: "
                                 f"{self.paused}")
        return await AsyncConnection.connect(self.conninfo(), autocommit=True, **params)

    def conninfo(self) -> str:
        """Return `config.conninfo()`, built again only after the config is replaced."""
        config, conninfo = self._conninfo
        if config is not self.config:
            config, conninfo = self.config, self.config.conninfo()
            self._conninfo = (config, conninfo)
        return conninfo


class PausesDatabase(Protocol):
    """A part of the daemon that keeps connections to the supervised database."""

    async def pause_database(self, reason: str) -> None: ...

    async def resume_database(self) -> None: ...


class DatabasePause:
    """Keeps walacord's own connections off the supervised database while any caller
    of `paused()` is inside it.

    The first caller pauses every user, and the last one to leave resumes them, so two
    restores that overlap never resume the users while one of them still swaps.
    """

    def __init__(self, users: Sequence[PausesDatabase]) -> None:
        self.users = list(users)
        self._holders = 0
        self._lock = anyio.Lock()
        self._paused: list[PausesDatabase] = []

    @asynccontextmanager
    async def paused(self, reason: str) -> AsyncIterator[None]:
        """Pause the users for the body, then resume them, also when the body fails or
        is cancelled.

        When pausing takes longer than PAUSE_TIMEOUT, the body runs anyway and a warning
        is logged. What the body needs (a database without sessions) may then fail, so
        it must fail safely.
        """
        async with self._lock:
            self._holders += 1
            if self._holders == 1:
                try:
                    await self._pause(reason)
                except BaseException:
                    # Cancelled while pausing: resume what was paused, then leave.
                    with anyio.CancelScope(shield=True):
                        self._holders -= 1
                        await self._resume(reason)
                    raise
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                async with self._lock:
                    self._holders -= 1
                    if self._holders == 0:
                        await self._resume(reason)

    async def _pause(self, reason: str) -> None:
        with anyio.move_on_after(PAUSE_TIMEOUT) as scope:
            for user in self.users:
                self._paused.append(user)
                await user.pause_database(reason)
        if scope.cancelled_caught:
            log.warning("database.pause_timed_out", extra={"fields": {
                "reason": reason, "timeout_seconds": PAUSE_TIMEOUT}})

    async def _resume(self, reason: str) -> None:
        paused, self._paused = self._paused, []
        for user in reversed(paused):
            try:
                await user.resume_database()
            except Exception:
                log.exception("database.resume_failed", extra={"fields": {
                    "reason": reason, "user": type(user).__name__}})
