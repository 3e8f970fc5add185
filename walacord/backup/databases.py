"""CREATE, DROP and RENAME DATABASE for restores and drills, and the scratch databases
a killed walacord leaves behind.

Restores and drills work in scratch databases: `walacord_drill_<db>_<hex>` for a
drill and `<target>_restoring_<hex>` for a restore. A restore with force also renames
the database it replaces to `<target>_previous_<hex>`, in the same transaction that
renames the new copy into place, and drops it afterwards. When walacord is killed in
between, these databases stay, each a full copy of a database.

To tell a leftover from a database in use, the creator of a scratch database:

- takes the session-level advisory lock `scratch_lock_key(name)` before CREATE
  DATABASE or the rename, and holds it until the DROP or the rename that ends the
  scratch database. PostgreSQL releases a session's advisory locks when the session
  ends, so a killed walacord releases them too;
- sets a COMMENT that starts with SCRATCH_COMMENT right after CREATE DATABASE, and
  clears it in the transaction that renames the database into place;
- writes the name to its scratch journal (walacord.backup.journal), a file in its
  backups directory, before CREATE DATABASE, and removes it after the DROP or the
  rename. A kill between CREATE DATABASE and COMMENT leaves a database without the
  comment, and the journal is what proves that walacord created it.

At start-up, walacord drops a leftover whose lock is free and that has no sessions
when it carries the comment, or when it has no comment and the journal names it. A
replaced copy (`<target>_previous_<hex>`) is never journaled and never dropped here,
because it contains a user's data. Journal names whose database no longer exists are
removed from the journal.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import anyio
import psycopg
from psycopg import sql

if TYPE_CHECKING:
    from walacord.backup.journal import ScratchJournal

log = logging.getLogger(__name__)

MAX_IDENTIFIER_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1
SCRATCH_COMMENT = "walacord scratch database"
# Scratch names as scratch_name() builds them, for finding copies made before the
# comment was set (a kill right after CREATE DATABASE) and copies of replaced targets.
DRILL_NAME = r"^walacord_drill_.*_[0-9a-f]{8}$"
RESTORING_NAME = r"_restoring_[0-9a-f]{8}$"
PREVIOUS_NAME = r"_previous_[0-9a-f]{8}$"


def scratch_name(base: str, label: str = "") -> str:
    """Return a fresh name `<base>_<label>_<8 hex digits>` of at most 63 bytes.

    Without a label it is `<base>_<8 hex digits>`. Only `base` is shortened, at a
    character boundary, so the label and the random part stay whole.
    """
    tail = f"_{label}_{secrets.token_hex(4)}" if label else f"_{secrets.token_hex(4)}"
    room = MAX_IDENTIFIER_BYTES - len(tail.encode())
    return base.encode()[:room].decode(errors="ignore") + tail


def scratch_lock_key(name: str) -> int:
    """Return the advisory lock key (a signed bigint) the creator of `name` holds."""
    digest = hashlib.sha256(f"walacord.scratch/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@asynccontextmanager
async def scratch_locks(conninfo: str, names: Iterable[str],
                        time_limit: float) -> AsyncIterator[None]:
    """Hold the scratch locks of `names` in one session for the length of the block.

    The session must not be connected to a database that the block drops or renames,
    because PostgreSQL rejects both while other sessions use the database.
    """
    with anyio.fail_after(time_limit):
        conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
    try:
        with anyio.fail_after(time_limit):
            for name in names:
                await conn.execute("SELECT pg_advisory_lock(%s)", (scratch_lock_key(name),))
        yield
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(time_limit):
            await conn.close()


@dataclass(frozen=True)
class ConnectionSettings:
    """A database's ALLOW_CONNECTIONS and CONNECTION LIMIT, with its oid, which a rename
    keeps."""

    oid: int
    allow_connections: bool
    connection_limit: int

    def statement(self, name: str) -> sql.Composed:
        """Return the ALTER DATABASE that gives database `name` both settings."""
        return sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {} CONNECTION LIMIT {}").format(
            sql.Identifier(name), sql.Literal(self.allow_connections),
            sql.Literal(self.connection_limit))

    def reopen_statement(self, name: str) -> sql.Composed:
        """Return the ALTER DATABASE that gives database `name` this ALLOW_CONNECTIONS."""
        return sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
            sql.Identifier(name), sql.Literal(self.allow_connections))


@dataclass
class Admin:
    """Runs CREATE, DROP and ALTER DATABASE over short autocommit connections.

    With a journal, create() journals each name before CREATE DATABASE, and drop(),
    drop_unused() and rename_into_place() remove it once the database is gone.
    """

    conninfo: str  # a database other than the ones created or dropped
    timeout: float
    journal: ScratchJournal | None = None

    async def _execute(self, query: sql.Composed | str,
                       params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with anyio.fail_after(self.timeout):
            conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
            try:
                cursor = await conn.execute(query, params or None)
                return await cursor.fetchall() if cursor.description else []
            finally:
                await conn.close()

    def with_journal(self, journal: ScratchJournal) -> Admin:
        """Return a copy of this Admin that journals the databases it creates."""
        return replace(self, journal=journal)

    async def exists(self, name: str) -> bool:
        rows = await self._execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        return bool(rows)

    async def create(self, name: str, comment: str | None = None) -> None:
        """Create `name` from template0 and, when given, set its comment.

        CREATE DATABASE cannot run in a transaction, so a kill between the two
        statements leaves the database without its comment. With a journal, the name
        is journaled before the CREATE, so start-up cleanup can still tell that walacord
        created it. A journal that cannot be written does not stop the CREATE.
        """
        if self.journal is not None:
            await self.journal.add(name)
        await self._execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(
            sql.Identifier(name)))
        if comment is not None:
            await self._execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                sql.Identifier(name), sql.Literal(comment)))

    async def drop(self, name: str) -> None:
        # WITH (FORCE) ends other sessions on the database (PostgreSQL 13 and newer).
        await self._execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))
        await self._forget(name)

    async def drop_unused(self, name: str) -> None:
        """Drop `name`; unlike drop(), fail when any session uses it."""
        await self._execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        await self._forget(name)

    async def _forget(self, name: str) -> None:
        if self.journal is not None:
            await self.journal.discard(name)

    async def connection_settings(self, name: str) -> ConnectionSettings:
        """Return the oid, ALLOW_CONNECTIONS and CONNECTION LIMIT of database `name`."""
        rows = await self._execute(
            "SELECT oid, datallowconn, datconnlimit FROM pg_database WHERE datname = %s",
            (name,))
        if not rows:
            raise psycopg.errors.InvalidCatalogName(f'database "{name}" does not exist')
        oid, allow_connections, connection_limit = rows[0]
        return ConnectionSettings(int(oid), bool(allow_connections), int(connection_limit))

    async def block_connections(self, name: str) -> None:
        """Make PostgreSQL reject every new connection to database `name`.

        ALLOW_CONNECTIONS false rejects superusers too, unlike CONNECTION LIMIT 0, so
        a pool that logs in as a superuser cannot reconnect either. Both need the
        privilege that renaming the database needs as well: owning it, or being a
        superuser. Sessions connected already stay connected.
        """
        await self._execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(
            sql.Identifier(name)))

    async def reopen_connections(self, settings: ConnectionSettings) -> str | None:
        """Set ALLOW_CONNECTIONS back to `settings` on the database with its oid.

        Return the database's name now, or None when it no longer exists.
        """
        with anyio.fail_after(self.timeout):
            conn = await psycopg.AsyncConnection.connect(self.conninfo)
            try:
                async with conn.transaction():
                    cursor = await conn.execute(
                        "SELECT datname FROM pg_database WHERE oid = %s", (settings.oid,))
                    row = await cursor.fetchone()
                    if row is None:
                        return None
                    name = str(row[0])
                    await conn.execute(settings.reopen_statement(name))
            finally:
                await conn.close()
        return name

    async def rename_into_place(self, temporary: str, target: str, previous: str | None, *,
                                settings: ConnectionSettings | None = None,
                                ended: list[int] | None = None) -> None:
        """End the sessions on both databases, rename `temporary` to `target` and clear
        its scratch comment, in one transaction.

        With `previous`, the existing `target` is renamed to `previous` first, in the
        same transaction. PostgreSQL rolls back both renames when any statement
        fails, so `target` then keeps its old data under its own name. A pool,
        walacord's own among them, reconnects within milliseconds, so the caller blocks
        new connections to `target` first (see block_connections()). With `settings`,
        the database renamed to `target` gets that ALLOW_CONNECTIONS and CONNECTION
        LIMIT in the same transaction. The pids of the sessions on `target` that were
        ended are appended to `ended`. Raise SessionsInUse when sessions still use
        either database.
        """
        with anyio.fail_after(self.timeout):
            conn = await psycopg.AsyncConnection.connect(self.conninfo)
            try:
                async with conn.transaction():
                    remaining: list[int] = []
                    for name in (temporary, target) if previous is not None else (temporary,):
                        ended_here, remaining_here = await _end_sessions_now(conn, name)
                        remaining += remaining_here
                        if name == target and ended is not None:
                            ended += ended_here
                    try:
                        if previous is not None:
                            await conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                                sql.Identifier(target), sql.Identifier(previous)))
                        await conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                            sql.Identifier(temporary), sql.Identifier(target)))
                    except psycopg.errors.ObjectInUse as exc:
                        raise SessionsInUse(exc, remaining) from exc
                    await conn.execute(sql.SQL("COMMENT ON DATABASE {} IS NULL").format(
                        sql.Identifier(target)))
                    if settings is not None:
                        await conn.execute(settings.statement(target))
            finally:
                await conn.close()
        # Only after the commit: a rolled-back rename leaves `temporary` in place.
        await self._forget(temporary)


class SessionsInUse(Exception):
    """Other sessions kept a database in use, so a rename failed and rolled back."""

    def __init__(self, error: psycopg.errors.ObjectInUse, remaining: list[int]) -> None:
        super().__init__(str(error))
        self.error = error
        self.remaining = remaining  # pids of sessions walacord's role may not end


# Milliseconds that pg_terminate_backend waits for an ended session to exit.
TERMINATE_WAIT_MS = 2000


async def _end_sessions_now(conn: psycopg.AsyncConnection[Any],
                            name: str) -> tuple[list[int], list[int]]:
    """Terminate the other sessions on database `name` and wait until they have exited.

    Return the pids of the sessions ended and of those this role may not signal. Such
    a session (a superuser's, when walacord's role is not one) is logged and left
    running, and the rename that follows then fails and rolls back. Each attempt runs
    in a savepoint, so that failure does not end the caller's transaction.
    """
    ended = []
    remaining = []
    cursor = await conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        (name,))
    wait = conn.info.server_version >= 140000  # pg_terminate_backend(pid, timeout)
    for (pid,) in await cursor.fetchall():
        try:
            async with conn.transaction():
                if wait:
                    await conn.execute("SELECT pg_terminate_backend(%s, %s)",
                                       (pid, TERMINATE_WAIT_MS))
                else:
                    await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        except psycopg.errors.InsufficientPrivilege as exc:
            remaining.append(pid)
            log.warning("backup.session_not_terminated", extra={"fields": {
                "database": name, "pid": pid, "error": str(exc).strip()}})
        else:
            ended.append(pid)
    return ended, remaining


# --- leftovers -----------------------------------------------------------------------


@dataclass
class LeftoverDatabase:
    """A scratch database or replaced copy that no running restore or drill holds."""

    name: str
    kind: str  # "scratch", "previous" or "unmarked"; see describe()
    size_bytes: int | None  # None when walacord's role may not connect to it
    comment: str | None
    sessions: int
    dropped: bool = False
    journaled: bool = False  # this walacord's scratch journal names it

    @property
    def removable(self) -> bool:
        """Whether walacord may drop it: its own scratch database, with no sessions."""
        return self.kind == "scratch" and self.sessions == 0

    def describe(self) -> str:
        """Return a sentence on what the database is and what to do with it."""
        if self.dropped:
            return "a scratch database of a killed drill or restore; walacord dropped it"
        if self.kind == "previous":
            return ("probably the data a restore with --force replaced, left because "
                    "walacord stopped before dropping it; check it, then drop it by hand, "
                    "or rename it back to the original name")
        if self.kind == "scratch" and self.comment is None:
            return ("a scratch database of a drill or restore killed before it set the "
                    "database's comment; walacord's scratch journal names it, so walacord "
                    "drops it at start-up once no session uses it, or drop it by hand")
        if self.kind == "scratch":
            return (f"{self.comment}; a killed drill or restore left it, and walacord "
                    "drops it at start-up once no session uses it, or drop it by hand")
        if self.journaled:
            return ("walacord's scratch journal names it, but it has a comment walacord "
                    "did not set, so walacord does not drop it; check it, then drop it by "
                    "hand")
        return ("its name looks like a walacord scratch database, but it has no walacord "
                "comment and this walacord's scratch journal does not name it, so walacord "
                "does not drop it; drop it by hand if it is one")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "description": self.describe()}


LEFTOVER_QUERY = """
SELECT d.datname, shobj_description(d.oid, 'pg_database'),
       CASE WHEN has_database_privilege(d.oid, 'CONNECT')
            THEN pg_database_size(d.oid) END,
       (SELECT count(*) FROM pg_stat_activity a
         WHERE a.datname = d.datname AND a.pid <> pg_backend_pid())
  FROM pg_database d
 WHERE starts_with(coalesce(shobj_description(d.oid, 'pg_database'), ''), %(marker)s)
    OR d.datname ~ %(drill)s OR d.datname ~ %(restoring)s OR d.datname ~ %(previous)s
 ORDER BY d.datname
"""

# pg_locks splits a bigint advisory key into classid (high 32 bits) and objid (low 32
# bits) and marks it with objsubid 1. pg_locks lists the locks of every database.
HELD_LOCKS_QUERY = """
SELECT classid::bigint, objid::bigint FROM pg_locks
 WHERE locktype = 'advisory' AND objsubid = 1 AND granted
"""


def _lock_parts(key: int) -> tuple[int, int]:
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


# The journaled names that exist as databases, read after HELD_LOCKS_QUERY.
EXISTING_QUERY = "SELECT datname FROM pg_database WHERE datname = ANY(%s)"


async def find_leftover_databases(conninfo: str, time_limit: float,
                                  journal: ScratchJournal | None = None,
                                  ) -> list[LeftoverDatabase]:
    """Return the scratch databases and replaced copies whose creator has gone.

    A database whose scratch lock some session holds belongs to a restore or drill
    that is running now, on this host or another, so it is not returned. A database
    without a comment counts as a scratch database when `journal` names it. Names in
    `journal` whose database does not exist and whose lock is free are removed from it.
    """
    journaled = await journal.read() if journal is not None else frozenset()
    existing: set[str] = set()
    with anyio.fail_after(time_limit):
        conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
        try:
            cursor = await conn.execute(LEFTOVER_QUERY, {
                "marker": SCRATCH_COMMENT, "drill": DRILL_NAME,
                "restoring": RESTORING_NAME, "previous": PREVIOUS_NAME})
            rows = await cursor.fetchall()
            # Read after the database list: a creator locks before it creates, so a
            # listed database whose lock is free here has lost its creator.
            cursor = await conn.execute(HELD_LOCKS_QUERY)
            held = {(int(a), int(b)) for a, b in await cursor.fetchall()}
            # Read after the locks: the creator of a name whose lock is free here has
            # ended, so a database missing now is never created under that name.
            if journaled:
                cursor = await conn.execute(EXISTING_QUERY, (sorted(journaled),))
                existing = {name for (name,) in await cursor.fetchall()}
        finally:
            await conn.close()

    gone = [name for name in sorted(journaled)
            if name not in existing and _lock_parts(scratch_lock_key(name)) not in held]
    if journal is not None and gone:
        await journal.discard(*gone)
        log.info("backup.scratch_journal_pruned", extra={"fields": {
            "databases": gone, "reason": "these databases no longer exist"}})

    leftovers = []
    for name, comment, size, sessions in rows:
        if _lock_parts(scratch_lock_key(name)) in held:
            continue
        if comment is not None and comment.startswith(SCRATCH_COMMENT):
            kind = "scratch"
        elif re.search(PREVIOUS_NAME, name):
            kind = "previous"
        elif comment is None and name in journaled:
            # Created by this walacord, which was killed before COMMENT ON DATABASE.
            kind = "scratch"
        else:
            kind = "unmarked"
        leftovers.append(LeftoverDatabase(name, kind, size, comment, int(sessions),
                                          journaled=name in journaled))
    return leftovers


async def drop_leftover_databases(admin: Admin) -> list[LeftoverDatabase]:
    """Drop the leftovers walacord can prove are its own and unused; log every leftover.

    A database is dropped only when all three hold:

    - it carries SCRATCH_COMMENT, which walacord sets only on its scratch databases,
      or it has no comment and `admin.journal` names it, which this walacord does
      only for the scratch databases it creates;
    - no session holds its scratch lock, so its creator has ended (see the module
      docstring). This is what keeps a drill or restore running on another walacord
      host safe;
    - no session is connected to it. The DROP runs without FORCE, so a session that
      connects meanwhile makes it fail instead of being cut off.

    A replaced copy (`<target>_previous_<hex>`) contains a user's data, so it is only
    logged, never dropped here. Dropping a journaled database removes its name from
    the journal.
    """
    leftovers = await find_leftover_databases(admin.conninfo, admin.timeout, admin.journal)
    for leftover in leftovers:
        if leftover.removable:
            try:
                await admin.drop_unused(leftover.name)
                leftover.dropped = True
            except psycopg.Error as exc:
                log.warning("backup.leftover_drop_failed", extra={"fields": {
                    "database": leftover.name, "error": str(exc).strip()}})
        log.warning("backup.leftover_database", extra={"fields": {
            "database": leftover.name, "size_bytes": leftover.size_bytes,
            "kind": leftover.kind, "dropped": leftover.dropped,
            "action": leftover.describe()}})
    return leftovers
