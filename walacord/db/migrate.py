"""Apply pending schema migrations to walacord's database (schema `walacord`).

Migrations are the files `migrations/NNNN_name.sql` beside this module, applied in
version order. A PostgreSQL advisory lock serialises migrators, so several hosts can
start at once: the first applies what is pending and the others then find nothing to do.
Each migration runs in its own transaction together with its row in
`walacord.schema_migrations`, so a failed migration leaves no trace.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import anyio
import psycopg
from psycopg import sql

from walacord import config
from walacord.cli import config_path_type, default_config_path
from walacord.control.arguments import DURATION_HELP, duration_type
from walacord.errors import ConfigError, MigrationError, MigrationPrivilegeError

log = logging.getLogger(__name__)

SCHEMA = "walacord"
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
MIGRATION_FILE = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")

# Key of the session-level advisory lock that serialises migrators: the bytes of
# "walacord" read as a big-endian signed 64-bit integer.
LOCK_KEY = int.from_bytes(b"walacord", "big", signed=True)
LOCK_POLL_SECONDS = 0.1
DEFAULT_TIMEOUT_SECONDS = 60.0

BOOTSTRAP_TABLE = """
CREATE TABLE IF NOT EXISTS walacord.schema_migrations (
    version int PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file."""

    version: int
    name: str
    sql: str


@dataclass(frozen=True)
class AppliedMigration:
    """A migration this call applied, with the server's commit time."""

    version: int
    name: str
    applied_at: datetime


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Read the migration files in `directory`, sorted by version.

    Raises MigrationError for a file whose name does not match NNNN_name.sql and for
    two files with the same version.
    """
    migrations: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix != ".sql":
            continue
        match = MIGRATION_FILE.match(path.name)
        if match is None:
            raise MigrationError(
                f"invalid migration file name {path.name!r}: expected NNNN_name.sql"
            )
        version = int(match["version"])
        if version in migrations:
            raise MigrationError(
                f"two migrations have version {version}: "
                f"{migrations[version].name!r} and {match['name']!r}"
            )
        migrations[version] = Migration(version, match["name"], path.read_text())
    return [migrations[v] for v in sorted(migrations)]


async def apply_migrations(
    conn_or_url: psycopg.AsyncConnection | str,
    *,
    timeout: float,  # noqa: ASYNC109 - the daemon passes its configured start-up deadline
    migrations: list[Migration] | None = None,
) -> list[AppliedMigration]:
    """Apply every pending migration and return those this call applied, in order.

    `timeout` bounds the whole call in seconds, waiting for another migrator's lock
    included. A connection passed in must be idle; it is left in its original
    autocommit mode and without the lock. Raises MigrationError when a migration
    fails, when the database has a newer schema than this walacord supports, when a URL
    does not connect, or on timeout, and MigrationPrivilegeError when the role lacks a
    privilege.
    """
    if migrations is None:
        migrations = load_migrations()
    try:
        with anyio.fail_after(timeout):
            if isinstance(conn_or_url, str):
                async with await _connect(conn_or_url) as conn:
                    return await _apply_locked(conn, migrations)

            conn = conn_or_url
            autocommit_before = conn.autocommit
            await conn.set_autocommit(True)
            try:
                return await _apply_locked(conn, migrations)
            finally:
                await conn.set_autocommit(autocommit_before)
    except TimeoutError:
        raise MigrationError(
            f"migrations did not finish within {timeout:g} s "
            "(another migrator may hold the lock, or the server is slow)"
        ) from None


async def _connect(url: str) -> psycopg.AsyncConnection:
    try:
        return await psycopg.AsyncConnection.connect(url, autocommit=True)
    except psycopg.OperationalError as exc:
        raise MigrationError(f"cannot connect to the database: {exc}") from None


async def _privilege_error(
    conn: psycopg.AsyncConnection, exc: psycopg.errors.InsufficientPrivilege, prefix: str
) -> MigrationPrivilegeError:
    # current_user, not the login user: setup-database migrates after SET ROLE.
    cursor = await conn.execute("SELECT current_user, current_database()")
    row = await cursor.fetchone()
    assert row is not None
    role, database = str(row[0]), str(row[1])
    return MigrationPrivilegeError(
        f"{prefix}connected to database {database!r} as role {role!r}, but the role "
        f"lacks a privilege: {exc.diag.message_primary} (SQLSTATE {exc.sqlstate})",
        role=role,
        database=database,
    )


async def _apply_locked(
    conn: psycopg.AsyncConnection, migrations: list[Migration]
) -> list[AppliedMigration]:
    await _acquire_lock(conn)
    try:
        try:
            await _create_version_table(conn)
            applied = await _applied_versions(conn)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise await _privilege_error(conn, exc, "") from exc
        _check_not_newer(applied, migrations)

        done = []
        for migration in migrations:
            if migration.version in applied:
                continue
            done.append(await _apply_one(conn, migration))
        return done
    finally:
        # The lock belongs to the session; a closed connection releases it as well,
        # so a failed unlock on a broken connection needs no second attempt.
        if not conn.closed:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))


async def _acquire_lock(conn: psycopg.AsyncConnection) -> None:
    # Polling with pg_try_advisory_lock keeps the wait cancellable by the caller's
    # deadline without relying on a server-side cancel of a blocked pg_advisory_lock.
    waited = False
    while True:
        cursor = await conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,))
        row = await cursor.fetchone()
        if row is not None and row[0]:
            if waited:
                log.info("migrate.lock_acquired", extra={"fields": {"key": LOCK_KEY}})
            return
        if not waited:
            log.info("migrate.lock_waiting", extra={"fields": {"key": LOCK_KEY}})
            waited = True
        await anyio.sleep(LOCK_POLL_SECONDS)


async def _create_version_table(conn: psycopg.AsyncConnection) -> None:
    # CREATE SCHEMA IF NOT EXISTS checks the database's CREATE privilege even when the
    # schema exists, so look first: `setup-database` makes the schema for a role that
    # owns the schema but may not create schemas.
    cursor = await conn.execute(
        "SELECT 1 FROM pg_namespace WHERE nspname = %s", (SCHEMA,)
    )
    if await cursor.fetchone() is None:
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)))
    await conn.execute(BOOTSTRAP_TABLE)


async def _applied_versions(conn: psycopg.AsyncConnection) -> dict[int, str]:
    cursor = await conn.execute("SELECT version, name FROM walacord.schema_migrations")
    return {int(version): str(name) for version, name in await cursor.fetchall()}


def _check_not_newer(applied: dict[int, str], migrations: list[Migration]) -> None:
    known = {m.version for m in migrations}
    unknown = sorted(set(applied) - known)
    if unknown:
        raise MigrationError(
            f"the database has migrations unknown to this walacord "
            f"({', '.join(f'{v:04d}_{applied[v]}' for v in unknown)}): "
            "it was migrated by a newer walacord; upgrade this host's walacord"
        )


async def _apply_one(conn: psycopg.AsyncConnection, migration: Migration) -> AppliedMigration:
    label = f"{migration.version:04d}_{migration.name}"
    try:
        async with conn.transaction():
            # The file may hold several statements, which psycopg sends with the simple
            # query protocol only when the call has no parameters.
            await conn.execute(sql.SQL(migration.sql))
            cursor = await conn.execute(
                "INSERT INTO walacord.schema_migrations (version, name) VALUES (%s, %s) "
                "RETURNING applied_at",
                (migration.version, migration.name),
            )
            row = await cursor.fetchone()
    except psycopg.errors.InsufficientPrivilege as exc:
        raise await _privilege_error(conn, exc, f"migration {label} failed: ") from exc
    except psycopg.Error as exc:
        raise MigrationError(f"migration {label} failed: {exc}") from exc

    assert row is not None
    log.info(
        "migrate.applied",
        extra={"fields": {"version": migration.version, "name": migration.name}},
    )
    return AppliedMigration(migration.version, migration.name, row[0])


# --- `walacord migrate` -------------------------------------------------------------


# Maximum --timeout in seconds: far beyond any migration, and still a finite deadline.
MAX_TIMEOUT_SECONDS = 86400.0


def libpq_url_type(empty_hint: str) -> Callable[[str], str]:
    """Return an argparse type that checks a URL as `walacord check-config` checks
    [database] url; an empty URL gets "empty URL; {empty_hint}"."""

    def url(text: str) -> str:
        if not text:
            raise argparse.ArgumentTypeError(f"empty URL; {empty_hint}")
        problems = config.conninfo_problems(text)
        if problems:
            # conninfo_problems leaves the password out, and argparse shows only this text.
            raise argparse.ArgumentTypeError("; ".join(problems))
        return text

    return url


database_url_type = libpq_url_type(
    "give a libpq URL such as postgresql://USER@HOST:PORT/DB, or leave the option out to "
    "use --config")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--database-url",
        metavar="URL",
        type=database_url_type,
        help="libpq URL of walacord's database (overrides env DATABASE_URL and --config)",
    )
    source.add_argument(
        "--config",
        metavar="PATH",
        type=config_path_type,
        default=default_config_path(),
        help="configuration file to read [database] from (env WALACORD_CONFIG; "
        "default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=duration_type(maximum=MAX_TIMEOUT_SECONDS),
        default=DEFAULT_TIMEOUT_SECONDS,
        metavar="DURATION",
        help=f"give up after this long, lock wait included, at most 1d: {DURATION_HELP} "
        "(default %(default)gs)",
    )


def database_url_from(args: argparse.Namespace) -> str:
    """Pick the URL: --database-url, else the configuration file's [database] settings.

    The configuration applies env DATABASE_URL and the systemd credentials
    database-url and database-password the same way `walacord run` does.
    """
    if args.database_url:
        return str(args.database_url)
    try:
        return config.load(args.config).database.conninfo()
    except ConfigError as exc:
        problems = "; ".join(str(problem) for problem in exc.problems)
        raise MigrationError(f"invalid configuration: {problems}") from None


def command(args: argparse.Namespace) -> int:
    """Run `walacord migrate`; return 0 when the schema is current, 1 on failure."""
    try:
        url = database_url_from(args)
        applied = anyio.run(lambda: apply_migrations(url, timeout=args.timeout))
    except MigrationPrivilegeError as exc:
        print(
            f"walacord migrate: {exc}. To grant walacord's privileges, run as an "
            f"administrator: walacord setup-database --admin-url ADMIN_URL "
            f"--role {exc.role} --database {exc.database}",
            file=sys.stderr,
        )
        return 1
    except MigrationError as exc:
        print(f"walacord migrate: {exc}", file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        # The connection failed after it was made, e.g. the server restarted.
        print(f"walacord migrate: database error: {exc}", file=sys.stderr)
        return 1

    if not applied:
        print("migrations: unchanged, schema is current")
    for migration in applied:
        print(f"migration {migration.version:04d}_{migration.name}: applied")
    return 0
