-- The database probe's write check upserts one row per host and reads it back.
-- Schema walacord itself exists already: the migrator creates it, with the version
-- table, before it applies the first migration. IF NOT EXISTS: the database probe
-- creates the same table when it runs before the first migration.
CREATE TABLE IF NOT EXISTS walacord.heartbeat (
    host text PRIMARY KEY,
    beat_at timestamptz NOT NULL,
    counter bigint NOT NULL
);
