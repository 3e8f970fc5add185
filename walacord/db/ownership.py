"""Read who owns schema walacord and the objects in it, and hand them to another role.

walacord's role must own the schema and every object in it, because migrations run
as that role and alter its tables. `ALTER SCHEMA ... OWNER` alone leaves the tables
with their old owner, which then loses USAGE on the schema, so both roles end up
locked out. A take-over therefore changes the owner of the schema and of each object
in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from walacord.db.migrate import SCHEMA

# Objects in the schema whose owner differs from the role, with the keyword that
# ALTER ... OWNER TO takes for each. Indexes, TOAST tables, row types of tables and
# sequences owned by a column follow their table, and array types their element type.
# A range type's constructor functions belong to the bootstrap superuser and depend
# on the type internally, so they are skipped. Its multirange type does not follow it
# (checked on PostgreSQL 15), so it is listed.
# NOTE: operators, operator classes, collations, conversions and text search objects
# are not listed, so a take-over leaves them with their owner. walacord's migrations
# create none of them.
FOREIGN_OBJECTS_QUERY = """
SELECT keyword, name, arguments, owner FROM (
    SELECT CASE c.relkind
               WHEN 'v' THEN 'VIEW'
               WHEN 'm' THEN 'MATERIALIZED VIEW'
               WHEN 'f' THEN 'FOREIGN TABLE'
               WHEN 'S' THEN 'SEQUENCE'
               ELSE 'TABLE'
           END AS keyword,
           c.relname AS name, NULL AS arguments, pg_get_userbyid(c.relowner) AS owner
    FROM pg_class c
    WHERE c.relnamespace = %(schema)s::regnamespace
      AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
      AND NOT EXISTS (
          SELECT 1 FROM pg_depend d
          WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
            AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i'))
    UNION ALL
    SELECT CASE p.prokind WHEN 'p' THEN 'PROCEDURE' WHEN 'a' THEN 'AGGREGATE'
                          ELSE 'FUNCTION' END,
           p.proname, pg_get_function_identity_arguments(p.oid), pg_get_userbyid(p.proowner)
    FROM pg_proc p
    WHERE p.pronamespace = %(schema)s::regnamespace
      AND NOT EXISTS (
          SELECT 1 FROM pg_depend d
          WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'i')
    UNION ALL
    SELECT CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END,
           t.typname, NULL, pg_get_userbyid(t.typowner)
    FROM pg_type t
    LEFT JOIN pg_class c ON c.oid = t.typrelid
    WHERE t.typnamespace = %(schema)s::regnamespace
      AND t.typtype IN ('c', 'd', 'e', 'r', 'm')
      AND (t.typrelid = 0 OR c.relkind = 'c')
) objects
WHERE owner <> %(role)s
ORDER BY keyword, name, arguments
"""


@dataclass(frozen=True)
class SchemaObject:
    """An object in schema walacord, with the keyword that ALTER ... OWNER TO takes for it."""

    keyword: str
    name: str
    arguments: str | None
    owner: str

    def describe(self) -> str:
        """Return e.g. "table walacord.heartbeat (postgres)" for error messages."""
        signature = "" if self.arguments is None else f"({self.arguments})"
        return f"{self.keyword.lower()} {SCHEMA}.{self.name}{signature} ({self.owner})"

    def alter_owner(self, role: str) -> sql.Composed:
        target: sql.Composable = sql.Identifier(SCHEMA, self.name)
        if self.arguments is not None:
            # The identity argument list comes from the server, already quoted.
            target = sql.SQL("{}({})").format(target, sql.SQL(self.arguments))
        return sql.SQL("ALTER {} {} OWNER TO {}").format(
            sql.SQL(self.keyword), target, sql.Identifier(role)
        )


@dataclass(frozen=True)
class SchemaOwnership:
    """The owner of schema walacord and the objects in it that another role owns."""

    role: str
    schema_owner: str
    foreign_objects: tuple[SchemaObject, ...]

    @property
    def complete(self) -> bool:
        """True when `role` owns the schema and every object in it."""
        return self.schema_owner == self.role and not self.foreign_objects

    @property
    def other_owners(self) -> list[str]:
        owners = {obj.owner for obj in self.foreign_objects}
        if self.schema_owner != self.role:
            owners.add(self.schema_owner)
        return sorted(owners)


async def read_ownership(conn: psycopg.AsyncConnection, role: str) -> SchemaOwnership | None:
    """Read the owners in `conn`'s database, or return None when schema walacord is missing."""
    cursor = await conn.execute(
        "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = %s", (SCHEMA,)
    )
    row = await cursor.fetchone()
    if row is None:
        return None

    cursor = await conn.execute(FOREIGN_OBJECTS_QUERY, {"schema": SCHEMA, "role": role})
    objects = tuple(
        SchemaObject(str(keyword), str(name), arguments, str(owner))
        for keyword, name, arguments, owner in await cursor.fetchall()
    )
    return SchemaOwnership(role, str(row[0]), objects)


def rejection(ownership: SchemaOwnership, database: str, *, owner_usable: bool = True) -> str:
    """Explain why setup-database stopped and how to proceed, naming every role involved.

    `owner_usable` is False when the schema's owner may not become walacord's role (a
    superuser, or the admin), so the message does not offer to rerun with it.
    """
    role = ownership.role
    listed = ", ".join(obj.describe() for obj in ownership.foreign_objects[:10])
    if len(ownership.foreign_objects) > 10:
        listed += f" and {len(ownership.foreign_objects) - 10} more"

    if ownership.schema_owner != role:
        problem = (
            f"schema {SCHEMA} in database {database} is owned by role "
            f"{ownership.schema_owner!r}, not {role!r}"
        )
        if listed:
            problem += f", and so are objects in it: {listed}"
    else:
        problem = (
            f"role {role!r} owns schema {SCHEMA} in database {database}, "
            f"but other roles own objects in it: {listed}"
        )

    others = ", ".join(ownership.other_owners)
    keep = ""
    if owner_usable and ownership.schema_owner != role \
            and ownership.other_owners == [ownership.schema_owner]:
        owner = ownership.schema_owner
        keep = f"To keep {owner} as the owner, rerun with --role {owner}. "
    return (
        f"{problem}; nothing was changed. {keep}"
        f"To make {role} the owner, stop every walacord that logs in as {others} and rerun "
        f"with --take-over, which hands the schema and every object in it to {role}"
    )


async def hand_over(conn: psycopg.AsyncConnection, ownership: SchemaOwnership) -> None:
    """Make `ownership.role` the owner of the schema and its objects, all or nothing.

    Raises psycopg.errors.InsufficientPrivilege when the connected role may not
    change an owner, and then changes nothing.
    """
    role = ownership.role
    async with conn.transaction():
        if ownership.schema_owner != role:
            # The schema goes first, because ALTER TABLE ... OWNER requires the new
            # owner to have CREATE on the table's schema.
            await conn.execute(
                sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(
                    sql.Identifier(SCHEMA), sql.Identifier(role)
                )
            )
        for obj in ownership.foreign_objects:
            await conn.execute(obj.alter_owner(role))
