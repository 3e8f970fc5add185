"""Create walacord's role and database, grant it least privilege, apply migrations.

Every step checks first and changes only what is missing, so a second run changes
nothing and reports each step as unchanged. Each step prints one line,
"<object>: created | updated | granted | applied | unchanged".

Before the first change, the run checks that no other role owns schema walacord or
an object in it, because handing them over locks that role out. Only --take-over
hands them over.

Concurrent runs take turns on an advisory lock in the admin URL's database, so the
second finds the first one's work done instead of failing on a duplicate role or
database.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import psycopg
from psycopg import conninfo, sql

from walacord.control.arguments import DURATION_HELP, duration_type
from walacord.db.migrate import (
    MAX_TIMEOUT_SECONDS,
    SCHEMA,
    AppliedMigration,
    apply_migrations,
    libpq_url_type,
)
from walacord.db.ownership import SchemaOwnership, hand_over, read_ownership, rejection
from walacord.db.passwords import read_password, verifier_matches
from walacord.errors import DatabaseSetupError, MigrationError

DEFAULT_ROLE = "walacord"
# The database named by the default [database] url in walacord's configuration.
DEFAULT_DATABASE = "walacor_integrity"
DEFAULT_TIMEOUT_SECONDS = 60.0
CONNECT_TIMEOUT_SECONDS = 10

# Key of the session-level advisory lock that serialises setup-database runs. It
# differs from the migrators' key, which the same run takes later, possibly in the
# same database.
SETUP_LOCK_KEY = int.from_bytes(hashlib.sha256(b"walacord.setup-database").digest()[:8],
                                "big", signed=True)
LOCK_POLL_SECONDS = 0.1

# Attributes the role must have: it logs in and can do nothing cluster-wide.
ROLE_ATTRIBUTES = {
    "rolcanlogin": ("LOGIN", True),
    "rolsuper": ("NOSUPERUSER", False),
    "rolcreatedb": ("NOCREATEDB", False),
    "rolcreaterole": ("NOCREATEROLE", False),
    "rolreplication": ("NOREPLICATION", False),
    "rolbypassrls": ("NOBYPASSRLS", False),
}

Report = Callable[[str, str], None]
# Called once when another run holds the setup lock, with the admin URL's target.
LockWait = Callable[[str], None]


@dataclass(frozen=True)
class SetupOptions:
    """Role, database and options for one run; `password` None keeps the current password."""

    admin_url: str
    role: str = DEFAULT_ROLE
    database: str = DEFAULT_DATABASE
    password: str | None = None
    grant_read_all_data: bool = False
    grant_createdb: bool = False
    take_over: bool = False
    timeout: float = DEFAULT_TIMEOUT_SECONDS


@dataclass(frozen=True)
class AdminRights:
    """Role attributes of the admin role, read from pg_roles."""

    name: str
    superuser: bool
    createrole: bool
    createdb: bool


# --- connecting and error messages ----------------------------------------------


def describe_target(url: str) -> str:
    """Return "user@host:port/dbname" for `url`, never its password."""
    try:
        params = conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<invalid URL>"
    user = params.get("user", "<default user>")
    host = params.get("host", "<default host>")
    port = params.get("port", "5432")
    dbname = params.get("dbname", "<default database>")
    return f"{user}@{host}:{port}/{dbname}"


def redact(message: str, url: str) -> str:
    """Remove the URL's password from a libpq message, whatever its origin."""
    try:
        password = conninfo.conninfo_to_dict(url).get("password")
    except psycopg.ProgrammingError:
        # libpq could not parse the URL, so remove anything shaped like user:pass@.
        return re.sub(r"(://[^:/@\s]*):[^@\s]*@", r"\1:***@", message)
    if password:
        message = message.replace(str(password), "***")
    return message


def connect_hint(message: str) -> str:
    if "password authentication failed" in message:
        return "check the user name and password in the admin URL"
    if "Connection refused" in message or "No such file or directory" in message:
        return "check that PostgreSQL runs and listens at that host and port"
    if "does not exist" in message:
        return "check the database name in the admin URL"
    return "check the admin URL and the server's pg_hba.conf"


async def connect(url: str, **overrides: str) -> psycopg.AsyncConnection:
    """Open an autocommit connection; raise DatabaseSetupError without the password."""
    try:
        target = conninfo.make_conninfo(url, **overrides)
    except psycopg.ProgrammingError as exc:
        raise DatabaseSetupError(f"invalid admin URL: {redact(str(exc), url)}") from None
    try:
        return await psycopg.AsyncConnection.connect(
            target, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS
        )
    except psycopg.OperationalError as exc:
        message = redact(str(exc).strip(), url)
        raise DatabaseSetupError(
            f"cannot connect to {describe_target(target)}: {message}; {connect_hint(message)}"
        ) from None


async def fetch_one(conn: psycopg.AsyncConnection, query: str, *params: object) -> tuple | None:
    cursor = await conn.execute(query, params)
    return await cursor.fetchone()


async def execute(
    conn: psycopg.AsyncConnection, statement: sql.SQL | sql.Composed, action: str
) -> None:
    """Run one DDL statement; name the missing privilege when the server rejects it."""
    try:
        await conn.execute(statement)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise DatabaseSetupError(f"cannot {action}: {exc}") from None


def require(granted: bool, rights: AdminRights, privilege: str, action: str) -> None:
    if not granted:
        raise DatabaseSetupError(
            f"cannot {action}: admin role {rights.name!r} lacks the {privilege} privilege; "
            f"connect as a superuser or run ALTER ROLE {rights.name} {privilege}"
        )


# --- the steps ------------------------------------------------------------------


async def setup_database(
    options: SetupOptions, report: Report, on_lock_wait: LockWait | None = None
) -> int:
    """Bring role, database, schema and migrations to the wanted state.

    Returns how many steps changed something. Waits, within `options.timeout`, while
    another run holds the setup lock, and calls `on_lock_wait` once when it has to.
    Raises DatabaseSetupError with the failed step, the missing privilege or the
    unreachable server.
    """
    try:
        with anyio.fail_after(options.timeout):
            return await _setup(options, report, on_lock_wait)
    except psycopg.Error as exc:
        # A failure the steps do not name themselves, e.g. a dropped connection.
        message = redact(str(exc).strip(), options.admin_url)
        raise DatabaseSetupError(f"database error: {message}") from None
    except TimeoutError:
        raise DatabaseSetupError(
            f"setup-database did not finish within {options.timeout:g} s "
            "(another setup-database run may hold the lock, or the server is slow)"
        ) from None


async def acquire_setup_lock(
    conn: psycopg.AsyncConnection, target: str, on_lock_wait: LockWait | None
) -> None:
    """Take the session-level setup lock on `conn`. Closing `conn` releases it.

    A transaction-level lock does not fit because CREATE DATABASE cannot run inside a
    transaction block. Polling pg_try_advisory_lock, as the migrators do, keeps the
    wait cancellable by the caller's deadline.
    """
    # NOTE: advisory locks are scoped to one database, so two runs whose admin URLs
    # name different databases do not wait for each other.
    waited = False
    while True:
        row = await fetch_one(conn, "SELECT pg_try_advisory_lock(%s)", SETUP_LOCK_KEY)
        if row is not None and row[0]:
            return
        if not waited and on_lock_wait is not None:
            on_lock_wait(target)
        waited = True
        await anyio.sleep(LOCK_POLL_SECONDS)


async def _setup(options: SetupOptions, report: Report, on_lock_wait: LockWait | None) -> int:
    changes = 0

    def step(subject: str, outcome: str) -> None:
        nonlocal changes
        if outcome != "unchanged":
            changes += 1
        report(subject, outcome)

    admin = await connect(options.admin_url)
    async with admin:
        # Every check below reads the state this lock protects, so it comes first. The
        # admin session stays open until the last step to keep the lock.
        await acquire_setup_lock(admin, describe_target(options.admin_url), on_lock_wait)
        rights = await read_rights(admin)
        await check_role_is_unprivileged(admin, rights, options.role)
        if await fetch_one(admin, "SELECT 1 FROM pg_database WHERE datname = %s",
                           options.database):
            await check_schema_ownership(options, rights)
        role_outcome = await ensure_role(admin, rights, options)
        step(f"role {options.role}", role_outcome)
        if options.password is not None:
            # CREATE ROLE above already set the password of a new role.
            password_outcome = (
                "set" if role_outcome == "created"
                else await ensure_password(admin, rights, options)
            )
            step(f"password of role {options.role}", password_outcome)
        step(
            f"membership of {options.role} in pg_monitor",
            await ensure_member(admin, rights, options.role, "pg_monitor"),
        )
        if options.grant_read_all_data:
            step(
                f"membership of {options.role} in pg_read_all_data",
                await ensure_member(admin, rights, options.role, "pg_read_all_data"),
            )
        step(f"database {options.database}", await ensure_database(admin, rights, options))

        applied = await _setup_database_contents(options, rights, step)

    for migration in applied:
        step(f"migration {migration.version:04d}_{migration.name}", "applied")
    if not applied:
        step("migrations", "unchanged")
    return changes


async def _setup_database_contents(
    options: SetupOptions, rights: AdminRights, step: Report
) -> list[AppliedMigration]:
    app = await connect(options.admin_url, dbname=options.database)
    async with app:
        step(
            f"CONNECT on database {options.database} for {options.role}",
            await ensure_connect(app, options),
        )
        if not rights.superuser:
            # Creating the role's schema and applying migrations as the role require
            # membership in it. Before PostgreSQL 16 a CREATEROLE admin is not a member
            # of the roles it creates, so it grants itself membership.
            step(
                f"membership of {rights.name} in {options.role}",
                await ensure_admin_is_member(app, rights, options.role),
            )
        step(f"schema {SCHEMA} owned by {options.role}", await ensure_schema(app, options))

        # Migrations run as the role so that it owns every table it creates.
        await execute(
            app, sql.SQL("SET ROLE {}").format(sql.Identifier(options.role)),
            f"switch to role {options.role!r} to apply migrations",
        )
        try:
            applied = await apply_migrations(app, timeout=options.timeout)
        except MigrationError as exc:
            raise DatabaseSetupError(str(exc)) from None
        await app.execute("RESET ROLE")
    return applied


async def read_rights(conn: psycopg.AsyncConnection) -> AdminRights:
    row = await fetch_one(
        conn,
        "SELECT rolname, rolsuper, rolcreaterole, rolcreatedb FROM pg_roles "
        "WHERE rolname = current_user",
    )
    assert row is not None, "current_user is always in pg_roles"
    return AdminRights(str(row[0]), bool(row[1]), bool(row[2]), bool(row[3]))


def role_attributes(options: SetupOptions) -> dict[str, tuple[str, bool]]:
    """Return pg_roles column -> (keyword, wanted value) for walacord's role."""
    attributes = dict(ROLE_ATTRIBUTES)
    if options.grant_createdb:
        # Backup restore drills and `walacorctl backup restore` create databases.
        attributes["rolcreatedb"] = ("CREATEDB", True)
    return attributes


async def ensure_role(
    conn: psycopg.AsyncConnection, rights: AdminRights, options: SetupOptions
) -> str:
    attributes = role_attributes(options)
    columns = ", ".join(attributes)
    row = await fetch_one(conn, f"SELECT {columns} FROM pg_roles WHERE rolname = %s", options.role)
    role = sql.Identifier(options.role)

    if row is None:
        action = f"create role {options.role!r}"
        require(rights.superuser or rights.createrole, rights, "CREATEROLE", action)
        keywords = [keyword for keyword, _ in attributes.values()]
        statement = sql.SQL("CREATE ROLE {} {}").format(role, sql.SQL(" ".join(keywords)))
        if options.password is not None:
            verifier = encrypt_password(conn, options.role, options.password)
            statement = sql.SQL("{} PASSWORD {}").format(statement, sql.Literal(verifier))
        await execute(conn, statement, action)
        return "created"

    wrong = [
        keyword
        for value, (keyword, wanted) in zip(row, attributes.values(), strict=True)
        if bool(value) != wanted
    ]
    if not wrong:
        return "unchanged"
    action = f"set {' '.join(wrong)} on role {options.role!r}"
    require(rights.superuser or rights.createrole, rights, "CREATEROLE", action)
    await execute(conn, sql.SQL("ALTER ROLE {} {}").format(role, sql.SQL(" ".join(wrong))), action)
    return "updated"


def encrypt_password(conn: psycopg.AsyncConnection, role: str, password: str) -> str:
    """Return the SCRAM verifier computed by libpq, so the password never reaches the server."""
    verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256")
    return verifier.decode()


async def ensure_password(
    conn: psycopg.AsyncConnection, rights: AdminRights, options: SetupOptions
) -> str:
    assert options.password is not None
    if await password_is_current(conn, rights, options):
        return "unchanged"

    action = f"set the password of role {options.role!r}"
    require(rights.superuser or rights.createrole, rights, "CREATEROLE", action)
    verifier = encrypt_password(conn, options.role, options.password)
    statement = sql.SQL("ALTER ROLE {} PASSWORD {}").format(
        sql.Identifier(options.role), sql.Literal(verifier)
    )
    await execute(conn, statement, action)
    return "updated"


async def password_is_current(
    conn: psycopg.AsyncConnection, rights: AdminRights, options: SetupOptions
) -> bool:
    assert options.password is not None
    if rights.superuser:
        row = await fetch_one(
            conn, "SELECT rolpassword FROM pg_authid WHERE rolname = %s", options.role
        )
        if row is None or row[0] is None:
            return False
        return verifier_matches(str(row[0]), options.role, options.password)

    # Only a superuser may read pg_authid, so try to log in as the role instead.
    # NOTE: where pg_hba.conf trusts the connection, any password logs in and this
    # reports the password unchanged.
    try:
        probe = await psycopg.AsyncConnection.connect(
            conninfo.make_conninfo(
                options.admin_url, user=options.role, password=options.password
            ),
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
        )
    except psycopg.OperationalError:
        return False
    await probe.close()
    return True


async def ensure_member(
    conn: psycopg.AsyncConnection, rights: AdminRights, role: str, group: str
) -> str:
    row = await fetch_one(conn, "SELECT pg_has_role(%s, %s, 'MEMBER')", role, group)
    if row is not None and row[0]:
        return "unchanged"
    action = f"grant {group} to {role!r}"
    require(rights.superuser or rights.createrole, rights, "CREATEROLE", action)
    await execute(
        conn, sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(role)), action
    )
    return "granted"


async def ensure_database(
    conn: psycopg.AsyncConnection, rights: AdminRights, options: SetupOptions
) -> str:
    if await fetch_one(conn, "SELECT 1 FROM pg_database WHERE datname = %s", options.database):
        return "unchanged"
    # The admin owns the database; walacord's role owns only its schema inside it.
    action = f"create database {options.database!r}"
    require(rights.superuser or rights.createdb, rights, "CREATEDB", action)
    await execute(
        conn, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(options.database)), action
    )
    return "created"


async def ensure_connect(conn: psycopg.AsyncConnection, options: SetupOptions) -> str:
    row = await fetch_one(
        conn, "SELECT has_database_privilege(%s, %s, 'CONNECT')", options.role, options.database
    )
    if row is not None and row[0]:
        return "unchanged"
    action = f"grant CONNECT on database {options.database!r} to {options.role!r}"
    statement = sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
        sql.Identifier(options.database), sql.Identifier(options.role)
    )
    await execute(conn, statement, action)
    return "granted"


async def check_role_is_unprivileged(conn: psycopg.AsyncConnection, rights: AdminRights,
                                     role: str) -> None:
    """Raise DatabaseSetupError, before any change, when `role` is the admin role or a
    superuser: ensure_role would take SUPERUSER, CREATEROLE and CREATEDB away from it."""
    row = await fetch_one(conn, "SELECT rolsuper FROM pg_roles WHERE rolname = %s", role)
    if role == rights.name or (row is not None and row[0]):
        kind = "the role this command connects as" if role == rights.name else "a superuser"
        raise DatabaseSetupError(
            f"--role {role} is {kind}; walacord needs a role of its own without "
            "superuser, which setup-database would make of it by taking SUPERUSER, "
            "CREATEROLE and CREATEDB away. Nothing was changed. Pass another name, such as "
            "--role walacord, and setup-database creates that role")


async def check_schema_ownership(options: SetupOptions, rights: AdminRights) -> None:
    """Raise DatabaseSetupError, before any change, when ensure_schema could not finish.

    It could not finish when another role owns the schema or an object in it and
    --take-over is absent, or when the admin may not change those owners.
    """
    async with await connect(options.admin_url, dbname=options.database) as conn:
        ownership = await read_ownership(conn, options.role)
        if ownership is None or ownership.complete:
            return
        row = await fetch_one(conn, "SELECT rolsuper FROM pg_roles WHERE rolname = %s",
                              ownership.schema_owner)
        owner_usable = ownership.schema_owner != rights.name and not (row and row[0])
        require_take_over(ownership, options, owner_usable=owner_usable)
        if not rights.superuser:
            await check_admin_can_take_over(conn, rights, ownership, options.database)


def require_take_over(ownership: SchemaOwnership, options: SetupOptions, *,
                      owner_usable: bool = True) -> None:
    if not options.take_over:
        raise DatabaseSetupError(rejection(ownership, options.database,
                                           owner_usable=owner_usable))


async def check_admin_can_take_over(
    conn: psycopg.AsyncConnection, rights: AdminRights, ownership: SchemaOwnership,
    database: str,
) -> None:
    # A non-superuser may change an owner only with the old owner's privileges, and
    # PostgreSQL 15 also requires CREATE on the database for ALTER SCHEMA ... OWNER
    # from the user who runs it. Membership in the new role is granted later, by
    # ensure_admin_is_member.
    missing = []
    for owner in ownership.other_owners:
        row = await fetch_one(conn, "SELECT pg_has_role(current_user, %s, 'USAGE')", owner)
        if row is None or not row[0]:
            missing.append(f"GRANT {owner} TO {rights.name}")
    if ownership.schema_owner != ownership.role:
        row = await fetch_one(
            conn, "SELECT has_database_privilege(current_user, %s, 'CREATE')", database
        )
        if row is None or not row[0]:
            missing.append(f"GRANT CREATE ON DATABASE {database} TO {rights.name}")
    if missing:
        raise DatabaseSetupError(
            f"cannot take over schema {SCHEMA!r} and its objects from "
            f"{', '.join(ownership.other_owners)}: admin role {rights.name!r} lacks the "
            f"privileges to change their owner; nothing was changed. "
            f"Connect as a superuser or run {'; '.join(missing)}"
        )


async def ensure_schema(conn: psycopg.AsyncConnection, options: SetupOptions) -> str:
    ownership = await read_ownership(conn, options.role)
    if ownership is not None and ownership.complete:
        return "unchanged"

    if ownership is None:
        action = f"create schema {SCHEMA!r} owned by {options.role!r}"
        statement = sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(
            sql.Identifier(SCHEMA), sql.Identifier(options.role)
        )
        await execute(conn, statement, action)
        return "created"

    # check_schema_ownership ran before the first change, but the owners may have
    # changed since, so check again before handing anything over.
    require_take_over(ownership, options)
    try:
        await hand_over(conn, ownership)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise DatabaseSetupError(
            f"cannot take over schema {SCHEMA!r} and its objects from "
            f"{', '.join(ownership.other_owners)} for {options.role!r}: {exc}; "
            f"nothing in schema {SCHEMA!r} was changed"
        ) from None
    return "updated"


async def ensure_admin_is_member(
    conn: psycopg.AsyncConnection, rights: AdminRights, role: str
) -> str:
    row = await fetch_one(conn, "SELECT pg_has_role(current_user, %s, 'MEMBER')", role)
    if row is not None and row[0]:
        return "unchanged"
    action = f"grant role {role!r} to admin role {rights.name!r}"
    require(rights.createrole, rights, "CREATEROLE", action)
    await execute(
        conn, sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), sql.Identifier(rights.name)),
        action,
    )
    return "granted"


# --- `walacord setup-database` ----------------------------------------------------


admin_url_type = libpq_url_type(
    "give a libpq URL such as postgresql://postgres@HOST:PORT/postgres")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin-url",
        required=True,
        metavar="URL",
        type=admin_url_type,
        help="libpq URL of a superuser, or of a role with CREATEROLE and CREATEDB",
    )
    parser.add_argument(
        "--role", default=DEFAULT_ROLE, help="role walacord logs in as (default %(default)s)"
    )
    parser.add_argument(
        "--database",
        default=DEFAULT_DATABASE,
        metavar="NAME",
        help="database that contains walacord's schema (default %(default)s)",
    )
    parser.add_argument(
        "--password-file",
        metavar="PATH",
        help="file holding the role's password (else env WALACORD_DB_PASSWORD_FILE, "
        "else the credential database-password in $CREDENTIALS_DIRECTORY)",
    )
    parser.add_argument(
        "--grant-read-all-data",
        action="store_true",
        help="also grant pg_read_all_data (PostgreSQL 14+), which pg_dump backups of "
        "tables walacord does not own need",
    )
    parser.add_argument(
        "--grant-createdb",
        action="store_true",
        help="also let the role create databases, which backup restore drills and "
        "`walacorctl backup restore` need",
    )
    parser.add_argument(
        "--take-over",
        action="store_true",
        help="make --role the owner of an existing schema walacord and of every object "
        "in it, even when another role owns them; walacord instances that log in as the "
        "old owner then lose access to the schema",
    )
    parser.add_argument(
        "--timeout",
        type=duration_type(maximum=MAX_TIMEOUT_SECONDS),
        default=DEFAULT_TIMEOUT_SECONDS,
        metavar="DURATION",
        help=f"give up after this long, at most 1d: {DURATION_HELP} (default %(default)gs)",
    )


def command(args: argparse.Namespace) -> int:
    """Run `walacord setup-database`; return 0 on success, 1 on failure."""

    def report(subject: str, outcome: str) -> None:
        print(f"{subject}: {outcome}", flush=True)

    def report_lock_wait(target: str) -> None:
        print(
            f"walacord setup-database: another setup-database run holds the setup lock "
            f"in {target}; waiting up to {args.timeout:g} s for it to finish",
            file=sys.stderr, flush=True,
        )

    try:
        password = read_password(args.password_file)
        if password is None:
            print("password: none given, the role's password is left as it is", flush=True)
        options = SetupOptions(
            admin_url=args.admin_url,
            role=args.role,
            database=args.database,
            password=password[0] if password else None,
            grant_read_all_data=args.grant_read_all_data,
            grant_createdb=args.grant_createdb,
            take_over=args.take_over,
            timeout=args.timeout,
        )
        changes = anyio.run(setup_database, options, report, report_lock_wait)
    except DatabaseSetupError as exc:
        print(f"walacord setup-database: {exc}", file=sys.stderr)
        return 1

    if changes == 0:
        print("setup-database: nothing changed")
    else:
        print(f"setup-database: {changes} {'change' if changes == 1 else 'changes'}")
    return 0
