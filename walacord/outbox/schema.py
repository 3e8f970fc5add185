"""The outbox database schema and its migrations, versioned with `PRAGMA user_version`."""

from __future__ import annotations

import aiosqlite

from walacord.errors import OutboxError

# MIGRATIONS[n] brings a database from version n to version n + 1. Append, never edit.
# A line containing only "--" separates two statements.
MIGRATIONS = [
    """
    CREATE TABLE operations (
        id INTEGER PRIMARY KEY,
        key TEXT NOT NULL UNIQUE,
        sink TEXT NOT NULL,
        target TEXT NOT NULL,
        payload BLOB NOT NULL,
        size INTEGER NOT NULL,
        ordering_key TEXT,
        created_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        last_error TEXT,
        state TEXT NOT NULL DEFAULT 'pending'
            CHECK (state IN ('pending', 'in_flight', 'done', 'dead')),
        receipt TEXT,
        updated_at REAL NOT NULL
    );
    --
    CREATE INDEX operations_state ON operations (state, id);
    --
    CREATE INDEX operations_ordering ON operations (ordering_key, id)
        WHERE ordering_key IS NOT NULL;
    --
    CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    --
    INSERT INTO counters (name, value) VALUES ('accepted', 0), ('compacted', 0), ('dropped', 0);
    --
    -- Counting in a trigger keeps "accepted" exact for every insert path, in the
    -- inserting transaction, and saves the enqueue a statement.
    CREATE TRIGGER operations_accepted AFTER INSERT ON operations BEGIN
        UPDATE counters SET value = value + 1 WHERE name = 'accepted';
    END;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


async def migrate(db: aiosqlite.Connection) -> tuple[int, int]:
    """Apply pending migrations, each in its own transaction; return (from, to) versions."""
    async with db.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    current = int(row[0]) if row else 0

    if current > SCHEMA_VERSION:
        raise OutboxError(f"outbox database schema version {current} is newer than this "
                          f"walacord supports ({SCHEMA_VERSION}); upgrade walacord")

    for version in range(current, SCHEMA_VERSION):
        await db.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[version].split("\n    --\n"):
                if statement.strip():
                    await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {version + 1}")
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
    return current, SCHEMA_VERSION
