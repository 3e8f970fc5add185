"""walacord's own PostgreSQL schema: migrations and the one-time database setup."""
