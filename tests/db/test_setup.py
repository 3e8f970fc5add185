"""`walacord setup-database` against the real session cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from db_names import Names

from walacord.cli import main
from walacord.db.setup import SETUP_LOCK_KEY
from walacord.pgcluster import PgCluster, free_port

ROLE_PASSWORD = "s3cret-Role-pw"


def run_setup(admin_url: str, names: Names, *extra: str) -> list[str]:
    return [
        "setup-database", "--admin-url", admin_url,
        "--role", names.role, "--database", names.database, *extra,
    ]


def outcomes(output: str) -> dict[str, str]:
    lines = [line.rsplit(": ", 1) for line in output.splitlines() if ": " in line]
    return {subject: outcome for subject, outcome in lines}


def test_setup_database_twice_creates_then_unchanged(
    pg_cluster: PgCluster, names: Names, password_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = run_setup(pg_cluster.url(), names, "--password-file", str(password_file))

    assert main(argv) == 0
    first = outcomes(capsys.readouterr().out)
    assert first[f"role {names.role}"] == "created"
    assert first[f"membership of {names.role} in pg_monitor"] == "granted"
    assert first[f"database {names.database}"] == "created"
    assert first[f"schema walacord owned by {names.role}"] == "created"
    assert first["migration 0001_heartbeat"] == "applied"

    assert main(argv) == 0
    second_output = capsys.readouterr().out
    second = outcomes(second_output)
    changed = {subject: o for subject, o in second.items() if o != "unchanged"}
    assert changed == {"setup-database": "nothing changed"}
    assert second[f"password of role {names.role}"] == "unchanged"
    assert ROLE_PASSWORD not in second_output


def test_setup_two_processes_at_once(
    pg_cluster: PgCluster, names: Names, password_file: Path
) -> None:
    # Without a lock both runs find the database missing, and the second CREATE
    # DATABASE fails on pg_database's unique index.
    argv = [
        sys.executable, "-m", "walacord",
        *run_setup(pg_cluster.url(), names, "--password-file", str(password_file)),
    ]
    processes = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=120) for process in processes]

    assert [process.returncode for process in processes] == [0, 0], outputs
    for _, stderr in outputs:
        lines = stderr.splitlines()
        assert all("holds the setup lock" in line for line in lines), stderr
    reports = [outcomes(stdout) for stdout, _ in outputs]
    database = sorted(report[f"database {names.database}"] for report in reports)
    assert database == ["created", "unchanged"]
    summaries = sorted(report["setup-database"] for report in reports)
    assert summaries[0].endswith(" changes")
    assert summaries[1] == "nothing changed"


def test_setup_waits_for_lock_then_times_out(
    pg_cluster: PgCluster, names: Names, capsys: pytest.CaptureFixture[str]
) -> None:
    with psycopg.connect(pg_cluster.url(), autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (SETUP_LOCK_KEY,))

        assert main(run_setup(pg_cluster.url(), names, "--timeout", "0.5")) == 1

    error = capsys.readouterr().err
    assert "another setup-database run holds the setup lock in postgres@" in error
    assert "did not finish within 0.5 s" in error
    assert pg_cluster.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{names.role}'") == ""


def test_setup_role_writes_heartbeat_not_createdb(
    pg_cluster: PgCluster, names: Names, password_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(run_setup(pg_cluster.url(), names, "--password-file", str(password_file))) == 0
    role_url = pg_cluster.url(names.database, user=names.role, password=ROLE_PASSWORD)

    with psycopg.connect(role_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO walacord.heartbeat (host, beat_at, counter) VALUES ('h1', now(), 1) "
            "ON CONFLICT (host) DO UPDATE SET beat_at = now(), counter = heartbeat.counter + 1"
        )
        row = conn.execute("SELECT counter FROM walacord.heartbeat WHERE host = 'h1'").fetchone()
        assert row == (1,)
        monitor = conn.execute("SELECT pg_has_role('pg_monitor', 'MEMBER')").fetchone()
        assert monitor == (True,)

        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f'CREATE DATABASE "{names.database}_other"')
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE SCHEMA other_schema")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE ROLE other_role")

    owners = pg_cluster.psql(
        "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class "
        "WHERE relnamespace = 'walacord'::regnamespace",
        dbname=names.database,
    )
    assert owners == names.role


def test_setup_password_change_reported_updated(
    pg_cluster: PgCluster, names: Names, password_file: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(run_setup(pg_cluster.url(), names, "--password-file", str(password_file))) == 0
    capsys.readouterr()

    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "database-password").write_text("new-Role-pw")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    assert main(run_setup(pg_cluster.url(), names)) == 0

    assert outcomes(capsys.readouterr().out)[f"password of role {names.role}"] == "updated"
    role_url = pg_cluster.url(names.database, user=names.role, password="new-Role-pw")
    with psycopg.connect(role_url) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (names.role,)


def test_setup_read_all_data_is_opt_in(
    pg_cluster: PgCluster, names: Names, password_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = run_setup(pg_cluster.url(), names, "--password-file", str(password_file))
    assert main(base) == 0
    member = f"SELECT pg_has_role('{names.role}', 'pg_read_all_data', 'MEMBER')"
    assert pg_cluster.psql(member) == "f"

    assert main([*base, "--grant-read-all-data"]) == 0
    assert outcomes(capsys.readouterr().out)[
        f"membership of {names.role} in pg_read_all_data"
    ] == "granted"
    assert pg_cluster.psql(member) == "t"


def test_setup_createdb_is_opt_in(
    pg_cluster: PgCluster, names: Names, password_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = run_setup(pg_cluster.url(), names, "--password-file", str(password_file))
    assert main(base) == 0
    createdb = f"SELECT rolcreatedb FROM pg_roles WHERE rolname = '{names.role}'"
    assert pg_cluster.psql(createdb) == "f"

    capsys.readouterr()
    assert main([*base, "--grant-createdb"]) == 0
    assert outcomes(capsys.readouterr().out)[f"role {names.role}"] == "updated"
    assert pg_cluster.psql(createdb) == "t"

    assert main([*base, "--grant-createdb"]) == 0
    assert outcomes(capsys.readouterr().out)[f"role {names.role}"] == "unchanged"


def test_setup_createrole_admin_without_superuser(
    pg_cluster: PgCluster, names: Names, password_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    admin = f"{names.role}_admin"
    names.extra_roles.append(admin)
    pg_cluster.psql(f"CREATE ROLE {admin} LOGIN CREATEROLE CREATEDB PASSWORD 'admin-pw'")
    admin_url = pg_cluster.url(user=admin, password="admin-pw")
    argv = run_setup(admin_url, names, "--password-file", str(password_file))

    assert main(argv) == 0
    assert outcomes(capsys.readouterr().out)["migration 0001_heartbeat"] == "applied"
    assert main(argv) == 0
    assert "setup-database: nothing changed" in capsys.readouterr().out


def test_setup_createrole_admin_after_superuser_run(
    pg_cluster: PgCluster, names: Names, password_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    password = ["--password-file", str(password_file)]
    assert main(run_setup(pg_cluster.url(), names, *password)) == 0
    admin = f"{names.role}_admin"
    names.extra_roles.append(admin)
    pg_cluster.psql(f"CREATE ROLE {admin} LOGIN CREATEROLE CREATEDB PASSWORD 'admin-pw'")
    capsys.readouterr()

    assert main(run_setup(pg_cluster.url(user=admin, password="admin-pw"), names, *password)) == 0

    changed = {s: o for s, o in outcomes(capsys.readouterr().out).items() if o != "unchanged"}
    assert changed == {
        f"membership of {admin} in {names.role}": "granted",
        "setup-database": "1 change",
    }


def test_setup_unreachable_url_names_server(
    names: Names, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    url = f"postgresql://admin:hidden-pw@127.0.0.1:{port}/postgres"

    assert main(run_setup(url, names)) == 1
    error = capsys.readouterr().err
    assert f"cannot connect to admin@127.0.0.1:{port}/postgres" in error
    assert "Connection refused" in error
    assert "hidden-pw" not in error


def test_setup_wrong_password_hides_password(
    pg_cluster: PgCluster, names: Names, capsys: pytest.CaptureFixture[str]
) -> None:
    url = pg_cluster.url(password="Wrong-Secret-42")

    assert main(run_setup(url, names)) == 1
    error = capsys.readouterr().err
    assert "password authentication failed" in error
    assert "check the user name and password" in error
    assert "Wrong-Secret-42" not in error


def test_setup_invalid_url_hides_password(
    names: Names, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "postgresql://admin:Odd-Secret-7@127.0.0.1:notaport/postgres"

    # The URL is checked while the arguments are parsed: a usage error, exit 2.
    with pytest.raises(SystemExit) as exited:
        main(run_setup(url, names))
    error = capsys.readouterr().err
    assert exited.value.code == 2
    assert "walacord setup-database: error: argument --admin-url:" in error
    assert "Odd-Secret-7" not in error


@pytest.mark.parametrize(
    ("attributes", "missing"),
    [("CREATEDB", "CREATEROLE"), ("CREATEROLE", "CREATEDB")],
)
def test_setup_admin_without_privilege_names_it(
    pg_cluster: PgCluster, names: Names, password_file: Path,
    attributes: str, missing: str, capsys: pytest.CaptureFixture[str],
) -> None:
    admin = f"{names.role}_limited"
    names.extra_roles.append(admin)
    pg_cluster.psql(f"CREATE ROLE {admin} LOGIN {attributes} PASSWORD 'limited-pw'")
    url = pg_cluster.url(user=admin, password="limited-pw")

    assert main(run_setup(url, names, "--password-file", str(password_file))) == 1
    error = capsys.readouterr().err
    assert f"lacks the {missing} privilege" in error
    assert f"ALTER ROLE {admin} {missing}" in error


def test_setup_missing_password_file_fails(
    pg_cluster: PgCluster, names: Names, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "absent"

    assert main(run_setup(pg_cluster.url(), names, "--password-file", str(missing))) == 1
    assert f"cannot read password file {missing}" in capsys.readouterr().err
    assert pg_cluster.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{names.role}'") == ""


def relation_owners(pg_cluster: PgCluster, database: str) -> set[str]:
    return set(pg_cluster.psql(
        "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class "
        "WHERE relnamespace = 'walacord'::regnamespace",
        dbname=database,
    ).splitlines())


def schema_owner(pg_cluster: PgCluster, database: str) -> str:
    return pg_cluster.psql(
        "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'walacord'",
        dbname=database,
    )


def write_heartbeat(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO walacord.heartbeat (host, beat_at, counter) VALUES ('h1', now(), 1) "
            "ON CONFLICT (host) DO UPDATE SET beat_at = now(), counter = heartbeat.counter + 1"
        )


def test_setup_other_role_schema_rejected(
    pg_cluster: PgCluster, names: Names, password_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    password = ["--password-file", str(password_file)]
    assert main(run_setup(pg_cluster.url(), names, *password)) == 0
    other = f"{names.role}_other"
    names.extra_roles.append(other)
    capsys.readouterr()

    other_names = Names(role=other, database=names.database, extra_roles=[])
    assert main(run_setup(pg_cluster.url(), other_names, *password)) == 1

    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"owned by role '{names.role}', not '{other}'" in captured.err
    assert "nothing was changed" in captured.err
    assert f"--role {names.role}" in captured.err
    assert "--take-over" in captured.err
    assert pg_cluster.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{other}'") == ""
    assert schema_owner(pg_cluster, names.database) == names.role
    assert relation_owners(pg_cluster, names.database) == {names.role}
    write_heartbeat(pg_cluster.url(names.database, user=names.role, password=ROLE_PASSWORD))
    assert main(["migrate", "--database-url", pg_cluster.url(
        names.database, user=names.role, password=ROLE_PASSWORD,
    )]) == 0


def test_setup_take_over_hands_schema_and_tables(
    pg_cluster: PgCluster, names: Names, password_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    password = ["--password-file", str(password_file)]
    assert main(run_setup(pg_cluster.url(), names, *password)) == 0
    with psycopg.connect(pg_cluster.url(names.database), autocommit=True) as conn:
        # One object of each kind the take-over alters besides the migrations' tables.
        conn.execute(f'SET ROLE "{names.role}"')
        conn.execute("CREATE SEQUENCE walacord.counter_seq")
        conn.execute("CREATE TABLE walacord.events (id bigserial PRIMARY KEY)")
        conn.execute("CREATE VIEW walacord.recent AS SELECT host FROM walacord.heartbeat")
        conn.execute("CREATE FUNCTION walacord.answer(int) RETURNS int LANGUAGE sql "
                     "AS 'SELECT $1'")
        conn.execute("CREATE DOMAIN walacord.positive AS int CHECK (VALUE > 0)")
        conn.execute("CREATE TYPE walacord.level AS ENUM ('low', 'high')")
        conn.execute("CREATE TYPE walacord.span AS RANGE (subtype = int)")
    other = f"{names.role}_other"
    names.extra_roles.append(other)
    other_names = Names(role=other, database=names.database, extra_roles=[])
    capsys.readouterr()

    take_over = run_setup(pg_cluster.url(), other_names, *password, "--take-over")
    assert main(take_over) == 0
    assert outcomes(capsys.readouterr().out)[f"schema walacord owned by {other}"] == "updated"
    assert schema_owner(pg_cluster, names.database) == other
    assert relation_owners(pg_cluster, names.database) == {other}
    type_owners = pg_cluster.psql(
        "SELECT DISTINCT pg_get_userbyid(typowner) FROM pg_type "
        "WHERE typnamespace = 'walacord'::regnamespace",
        dbname=names.database,
    )
    assert type_owners == other
    function_owner = pg_cluster.psql(
        "SELECT pg_get_userbyid(proowner) FROM pg_proc WHERE oid = 'walacord.answer'::regproc",
        dbname=names.database,
    )
    assert function_owner == other
    write_heartbeat(pg_cluster.url(names.database, user=other, password=ROLE_PASSWORD))

    assert main(take_over) == 0
    assert "setup-database: nothing changed" in capsys.readouterr().out
    assert main(run_setup(pg_cluster.url(), other_names, *password)) == 0
    assert "setup-database: nothing changed" in capsys.readouterr().out


def test_setup_superuser_schema_rejected_then_taken(
    pg_cluster: PgCluster, names: Names, password_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `walacord migrate` run as the superuser before setup-database leaves the schema
    # and its tables owned by postgres.
    pg_cluster.psql(f'CREATE DATABASE "{names.database}"')
    assert main(["migrate", "--database-url", pg_cluster.url(names.database)]) == 0
    password = ["--password-file", str(password_file)]
    capsys.readouterr()

    assert main(run_setup(pg_cluster.url(), names, *password)) == 1
    error = capsys.readouterr().err
    assert f"owned by role 'postgres', not '{names.role}'" in error
    assert "table walacord.schema_migrations (postgres)" in error
    # Rerunning with --role postgres would take SUPERUSER away, so it is not offered.
    assert "rerun with --role postgres" not in error
    assert relation_owners(pg_cluster, names.database) == {"postgres"}

    assert main(run_setup(pg_cluster.url(), names, *password, "--take-over")) == 0
    output = outcomes(capsys.readouterr().out)
    assert output[f"schema walacord owned by {names.role}"] == "updated"
    assert output["migrations"] == "unchanged"
    assert relation_owners(pg_cluster, names.database) == {names.role}
    write_heartbeat(pg_cluster.url(names.database, user=names.role, password=ROLE_PASSWORD))


@pytest.mark.parametrize("role", ["postgres", "walacord_test_super"])
def test_setup_refuses_superuser_or_admin_role(
    pg_cluster: PgCluster, names: Names, capsys: pytest.CaptureFixture[str], role: str,
) -> None:
    """setup-database makes its role unprivileged, so --role naming the admin or another
    superuser is refused before anything changes, and the role keeps SUPERUSER."""
    pg_cluster.psql(f'CREATE ROLE "{role}" SUPERUSER' if role != "postgres" else "SELECT 1")
    try:
        code = main(["setup-database", "--admin-url", pg_cluster.url(), "--role", role,
                     "--database", names.database])
        error = capsys.readouterr().err
        attributes = pg_cluster.psql(
            f"SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = "
            f"'{role}'")
        created = pg_cluster.psql(
            f"SELECT count(*) FROM pg_database WHERE datname = '{names.database}'")
    finally:
        if role != "postgres":
            pg_cluster.psql(f'DROP ROLE "{role}"')

    assert code == 1
    kind = "the role this command connects as" if role == "postgres" else "a superuser"
    assert f"--role {role} is {kind}; walacord needs a role of its own" in error
    assert "Nothing was changed" in error
    assert attributes.startswith("t|")
    assert created == "0"


def test_setup_foreign_table_in_schema_rejected(
    pg_cluster: PgCluster, names: Names, password_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    password = ["--password-file", str(password_file)]
    assert main(run_setup(pg_cluster.url(), names, *password)) == 0
    pg_cluster.psql("CREATE TABLE walacord.stray (id int)", dbname=names.database)
    capsys.readouterr()

    assert main(run_setup(pg_cluster.url(), names, *password)) == 1
    error = capsys.readouterr().err
    assert f"role '{names.role}' owns schema walacord" in error
    assert "table walacord.stray (postgres)" in error
    assert "--take-over" in error

    assert main(run_setup(pg_cluster.url(), names, *password, "--take-over")) == 0
    assert relation_owners(pg_cluster, names.database) == {names.role}


def test_setup_take_over_needs_admin_in_old_owner(
    pg_cluster: PgCluster, names: Names, password_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    password = ["--password-file", str(password_file)]
    assert main(run_setup(pg_cluster.url(), names, *password)) == 0
    admin = f"{names.role}_admin"
    other = f"{names.role}_other"
    names.extra_roles.extend([admin, other])
    pg_cluster.psql(f"CREATE ROLE {admin} LOGIN CREATEROLE CREATEDB PASSWORD 'admin-pw'")
    admin_url = pg_cluster.url(user=admin, password="admin-pw")
    other_names = Names(role=other, database=names.database, extra_roles=[])
    capsys.readouterr()

    assert main(run_setup(admin_url, other_names, *password, "--take-over")) == 1

    error = capsys.readouterr().err
    assert f"GRANT {names.role} TO {admin}" in error
    assert f"GRANT CREATE ON DATABASE {names.database} TO {admin}" in error
    assert pg_cluster.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{other}'") == ""
    assert schema_owner(pg_cluster, names.database) == names.role


def test_setup_take_over_repairs_split_owners(
    pg_cluster: PgCluster, names: Names, password_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Earlier walacord versions handed only the schema to a second role and left the
    # tables with the first, which locked both roles out.
    password = ["--password-file", str(password_file)]
    assert main(run_setup(pg_cluster.url(), names, *password)) == 0
    other = f"{names.role}_other"
    names.extra_roles.append(other)
    pg_cluster.psql(f"CREATE ROLE {other} LOGIN")
    pg_cluster.psql(f"ALTER SCHEMA walacord OWNER TO {other}", dbname=names.database)
    role_url = pg_cluster.url(names.database, user=names.role, password=ROLE_PASSWORD)
    capsys.readouterr()

    assert main(["migrate", "--database-url", role_url]) == 1
    assert "permission denied for schema walacord" in capsys.readouterr().err
    assert main(run_setup(pg_cluster.url(), names, *password)) == 1
    assert f"owned by role '{other}', not '{names.role}'" in capsys.readouterr().err

    assert main(run_setup(pg_cluster.url(), names, *password, "--take-over")) == 0
    assert schema_owner(pg_cluster, names.database) == names.role
    assert relation_owners(pg_cluster, names.database) == {names.role}
    write_heartbeat(role_url)


def test_setup_take_over_by_createrole_admin(
    pg_cluster: PgCluster, names: Names, password_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    admin = f"{names.role}_admin"
    other = f"{names.role}_other"
    names.extra_roles.extend([admin, other])
    pg_cluster.psql(f"CREATE ROLE {admin} LOGIN CREATEROLE CREATEDB PASSWORD 'admin-pw'")
    admin_url = pg_cluster.url(user=admin, password="admin-pw")
    password = ["--password-file", str(password_file)]
    # The admin creates the database, so it has CREATE on it, and becomes a member of
    # the first role.
    assert main(run_setup(admin_url, names, *password)) == 0
    other_names = Names(role=other, database=names.database, extra_roles=[])
    capsys.readouterr()

    assert main(run_setup(admin_url, other_names, *password, "--take-over")) == 0

    assert outcomes(capsys.readouterr().out)[f"schema walacord owned by {other}"] == "updated"
    assert schema_owner(pg_cluster, names.database) == other
    assert relation_owners(pg_cluster, names.database) == {other}


@pytest.mark.parametrize(("argv", "message"), [
    (["--timeout", "-1"], "argument --timeout: invalid duration '-1' (-1s): it must be above "
                          "0 and at most 1d"),
    (["--admin-url", "garbage"],
     "argument --admin-url: invalid libpq connection string: missing \"=\" after "
     "\"garbage\" in connection info string"),
    (["--admin-url", ""], "argument --admin-url: empty URL; give a libpq URL such as "
                          "postgresql://postgres@HOST:PORT/postgres"),
    (["--admin-url", "postgresql://postgres:s3cr3t-pw@db/postgres?sslmode=bogus"],
     "argument --admin-url: invalid sslmode value 'bogus'"),
])
def test_setup_command_invalid_arguments(argv: list[str], message: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    if "--admin-url" not in argv:
        argv = ["--admin-url", "postgresql://postgres@127.0.0.1/postgres", *argv]
    with pytest.raises(SystemExit) as exited:
        main(["setup-database", *argv])

    error = capsys.readouterr().err
    assert exited.value.code == 2
    assert message in error
    assert "s3cr3t-pw" not in error
