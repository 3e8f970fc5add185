-- The database probe's write check upserts one row per host and reads it back.
-- Schema walacord itself exists already: the migrator creates it, with the version
-- table, before it applies the first migration.
CREATE TABLE walacord.heartbeat (
    host text PRIMARY KEY,
    beat_at timestamptz NOT NULL,
    counter bigint NOT NULL
);
