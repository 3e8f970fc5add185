"""Schema migrations under the advisory lock, against the real session cluster."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import anyio
import psycopg
import pytest
from psycopg import conninfo

from walacord.cli import main
from walacord.db.migrate import LOCK_KEY, Migration, apply_migrations, load_migrations
from walacord.errors import MigrationError
from walacord.pgcluster import free_port


def write_migrations(directory: Path, files: dict[str, str]) -> list[Migration]:
    directory.mkdir(exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return load_migrations(directory)


def test_load_migrations_packaged_files_in_order() -> None:
    migrations = load_migrations()

    assert migrations[0].version == 1
    assert migrations[0].name == "heartbeat"
    assert [m.version for m in migrations] == sorted(m.version for m in migrations)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"1_short.sql": "SELECT 1"}, "invalid migration file name '1_short.sql'"),
        ({"0001_a.sql": "SELECT 1", "0001_b.sql": "SELECT 1"}, "two migrations have version 1"),
    ],
)
def test_load_migrations_rejects_bad_files(
    tmp_path: Path, files: dict[str, str], message: str
) -> None:
    with pytest.raises(MigrationError, match=message):
        write_migrations(tmp_path / "m", files)


@pytest.mark.anyio
async def test_apply_migrations_creates_heartbeat_and_version(pg_db: str) -> None:
    applied = await apply_migrations(pg_db, timeout=30)

    assert [(m.version, m.name) for m in applied] == [(1, "heartbeat")]
    async with await psycopg.AsyncConnection.connect(pg_db) as conn:
        cursor = await conn.execute("SELECT version, name FROM walacord.schema_migrations")
        assert await cursor.fetchall() == [(1, "heartbeat")]
        cursor = await conn.execute("SELECT count(*) FROM walacord.heartbeat")
        assert await cursor.fetchone() == (0,)


@pytest.mark.anyio
async def test_apply_migrations_after_probe_made_heartbeat(pg_db: str) -> None:
    from walacord.probes.database import HEARTBEAT_DDL

    async with await psycopg.AsyncConnection.connect(pg_db, autocommit=True) as conn:
        await conn.execute("CREATE SCHEMA IF NOT EXISTS walacord")
        await conn.execute(HEARTBEAT_DDL)
        await conn.execute("INSERT INTO walacord.heartbeat VALUES ('h', now(), 1)")

    applied = await apply_migrations(pg_db, timeout=30)

    assert [m.version for m in applied] == [1]
    async with await psycopg.AsyncConnection.connect(pg_db) as conn:
        cursor = await conn.execute("SELECT host FROM walacord.heartbeat")
        assert await cursor.fetchall() == [("h",)]


@pytest.mark.anyio
async def test_apply_migrations_second_call_applies_nothing(pg_db: str) -> None:
    await apply_migrations(pg_db, timeout=30)

    assert await apply_migrations(pg_db, timeout=30) == []


@pytest.mark.anyio
async def test_apply_migrations_keeps_caller_connection(pg_db: str) -> None:
    async with await psycopg.AsyncConnection.connect(pg_db) as conn:
        applied = await apply_migrations(conn, timeout=30)

        assert len(applied) == 1
        assert conn.autocommit is False
        cursor = await conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        )
        assert await cursor.fetchone() == (0,)


@pytest.mark.anyio
async def test_apply_migrations_concurrent_migrators_apply_once(
    pg_db: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The first migration sleeps while it holds the lock, so the other migrators
    # must wait for it and then find nothing left to apply.
    migrations = write_migrations(tmp_path / "m", {
        "0001_slow.sql": "SELECT pg_sleep(0.5); CREATE TABLE public.slow (id int);",
        "0002_counted.sql": "CREATE TABLE public.counted (id int);",
    })
    results: list[list[int]] = []

    async def migrate() -> None:
        applied = await apply_migrations(pg_db, timeout=30, migrations=migrations)
        results.append([m.version for m in applied])

    with caplog.at_level(logging.INFO, logger="walacord.db.migrate"):
        async with anyio.create_task_group() as group:
            for _ in range(3):
                group.start_soon(migrate)

    assert sorted(results) == [[], [], [1, 2]]
    assert "migrate.lock_waiting" in [r.getMessage() for r in caplog.records]
    async with await psycopg.AsyncConnection.connect(pg_db) as conn:
        cursor = await conn.execute("SELECT version FROM walacord.schema_migrations ORDER BY 1")
        assert await cursor.fetchall() == [(1,), (2,)]


@pytest.mark.anyio
async def test_apply_migrations_failure_rolls_back_that_migration(
    pg_db: str, tmp_path: Path
) -> None:
    migrations = write_migrations(tmp_path / "m", {
        "0001_good.sql": "CREATE TABLE public.good (id int);",
        "0002_bad.sql": "CREATE TABLE public.half (id int); SELECT no_such_function();",
    })

    with pytest.raises(MigrationError, match="migration 0002_bad failed"):
        await apply_migrations(pg_db, timeout=30, migrations=migrations)

    async with await psycopg.AsyncConnection.connect(pg_db) as conn:
        cursor = await conn.execute("SELECT version FROM walacord.schema_migrations")
        assert await cursor.fetchall() == [(1,)]
        cursor = await conn.execute("SELECT to_regclass('public.half')")
        assert await cursor.fetchone() == (None,)


@pytest.mark.anyio
async def test_apply_migrations_rejects_newer_database(pg_db: str, tmp_path: Path) -> None:
    newer = write_migrations(tmp_path / "newer", {
        "0001_a.sql": "SELECT 1", "0002_b.sql": "SELECT 1",
    })
    await apply_migrations(pg_db, timeout=30, migrations=newer)

    with pytest.raises(MigrationError, match=r"0002_b.*upgrade this host's walacord"):
        await apply_migrations(pg_db, timeout=30, migrations=newer[:1])


@pytest.mark.anyio
async def test_apply_migrations_lock_wait_times_out(pg_db: str) -> None:
    async with await psycopg.AsyncConnection.connect(pg_db, autocommit=True) as holder:
        await holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))

        with anyio.fail_after(10), pytest.raises(MigrationError, match=r"within 0\.5 s"):
            await apply_migrations(pg_db, timeout=0.5)


def test_migrate_command_reads_config_url(
    pg_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    config = tmp_path / "walacord.toml"
    config.write_text(f'[database]\nurl = "{pg_db}"\n')

    assert main(["migrate", "--config", str(config)]) == 0
    assert "migration 0001_heartbeat: applied" in capsys.readouterr().out
    assert main(["migrate", "--config", str(config)]) == 0
    assert "migrations: unchanged" in capsys.readouterr().out


def test_migrate_command_env_overrides_config(
    pg_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "walacord.toml"
    config.write_text('[database]\nurl = "postgresql://nobody@127.0.0.1:1/none"\n')
    monkeypatch.setenv("DATABASE_URL", pg_db)

    assert main(["migrate", "--config", str(config)]) == 0
    assert "migration 0001_heartbeat: applied" in capsys.readouterr().out


def test_migrate_command_invalid_config_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    config = tmp_path / "walacord.toml"
    config.write_text("[database]\npool_min_size = 50\npool_max_size = 10\n")

    assert main(["migrate", "--config", str(config)]) == 1
    error = capsys.readouterr().err
    assert "walacord migrate: invalid configuration:" in error
    assert "database.pool_min_size" in error


def test_migrate_command_two_processes_at_once(pg_db: str) -> None:
    # Two `walacord migrate` processes stand for two hosts starting together.
    argv = [sys.executable, "-m", "walacord", "migrate", "--database-url", pg_db]
    processes = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=60) for process in processes]

    assert [process.returncode for process in processes] == [0, 0], outputs
    stdout = sorted(out for out, _ in outputs)
    assert stdout == [
        "migration 0001_heartbeat: applied\n",
        "migrations: unchanged, schema is current\n",
    ]


def test_migrate_command_missing_privilege_names_fix(
    pg_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The superuser owns schema walacord, so a role with only CONNECT lacks USAGE on it.
    assert main(["migrate", "--database-url", pg_db]) == 0
    database = conninfo.conninfo_to_dict(pg_db)["dbname"]
    role = f"{database}_reader"[:63]
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'reader-pw'")
    capsys.readouterr()
    role_url = conninfo.make_conninfo(pg_db, user=role, password="reader-pw")

    try:
        assert main(["migrate", "--database-url", role_url]) == 1
    finally:
        with psycopg.connect(pg_db, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")

    error = capsys.readouterr().err
    assert "cannot connect" not in error
    assert f"connected to database '{database}' as role '{role}'" in error
    assert "permission denied for schema walacord" in error
    assert "SQLSTATE 42501" in error
    fix = f"walacord setup-database --admin-url ADMIN_URL --role {role} --database {database}"
    assert fix in error


def test_migrate_command_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"postgresql://walacord@127.0.0.1:{free_port()}/walacor_integrity"

    assert main(["migrate", "--database-url", url, "--timeout", "10"]) == 1
    error = capsys.readouterr().err
    assert "walacord migrate: cannot connect to the database:" in error
    assert "Connection refused" in error


@pytest.mark.parametrize(("argv", "message"), [
    (["--timeout", "-1"], "argument --timeout: invalid duration '-1' (-1s): it must be above "
                          "0 and at most 1d"),
    (["--timeout", "0"], "argument --timeout: invalid duration '0' (0s): it must be above 0"),
    (["--timeout", "soon"], "argument --timeout: invalid duration 'soon': a duration is a "
                            "number of seconds"),
    (["--database-url", "garbage"],
     "argument --database-url: invalid libpq connection string: missing \"=\" after "
     "\"garbage\" in connection info string; use postgresql://USER@HOST:PORT/DB"),
    (["--database-url", ""], "argument --database-url: empty URL; give a libpq URL such as "
                             "postgresql://USER@HOST:PORT/DB, or leave the option out"),
    (["--database-url", "postgresql://walacord:s3cr3t-pw@db/walacor?sslmode=bogus"],
     "argument --database-url: invalid sslmode value 'bogus'"),
])
def test_migrate_command_invalid_arguments(argv: list[str], message: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["migrate", *argv])

    error = capsys.readouterr().err
    assert exited.value.code == 2
    assert message in error
    assert "s3cr3t-pw" not in error


def test_migrate_command_timeout_accepts_units() -> None:
    from walacord.cli import build_parser

    args = build_parser("migrate").parse_args(["migrate", "--timeout", "2m"])

    assert args.timeout == 120.0
