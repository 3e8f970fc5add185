"""Loading, validation and overrides of walacord's TOML configuration."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import psycopg
import pytest

from walacord import config
from walacord.errors import ConfigError
from walacord.settings import parse_duration

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "walacord.toml"
    path.write_text(text)
    return path


def problems(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config.load(path, environ or {})
    return [str(p) for p in caught.value.problems]


def test_example_config_is_valid() -> None:
    loaded = config.load(ROOT / "etc" / "walacord.toml", {})
    assert loaded.database.pool_min_size == 10
    assert loaded.database.pool_max_size == 30
    assert loaded.http.listen == "127.0.0.1:9877"
    assert loaded.control.socket == "/run/walacord/control.sock"
    assert loaded.state.dir == "/var/lib/walacord"
    assert loaded.logging.dir == "/var/log/walacord"


def test_defaults_without_file() -> None:
    loaded = config.load(None, {})
    assert loaded.database.pool_min_size == 10
    assert loaded.logging.level == "info"


def test_unknown_key_suggests_close_name(tmp_path: Path) -> None:
    found = problems(write(tmp_path, "[database]\npool_max_sise = 3\n"))
    assert len(found) == 1
    assert "database.pool_max_sise" in found[0]
    assert "did you mean 'pool_max_size'" in found[0]


def test_unknown_section_suggests_close_name(tmp_path: Path) -> None:
    found = problems(write(tmp_path, "[databse]\nurl = 'x'\n"))
    assert "did you mean 'database'" in found[0]


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    found = problems(write(tmp_path, "[database]\npool_min_size = \"ten\"\n"))
    assert "database.pool_min_size" in found[0]
    assert "'ten'" in found[0]
    assert "expected an integer" in found[0]


def test_range_violation_gives_fix(tmp_path: Path) -> None:
    found = problems(write(tmp_path, "[database]\npool_max_size = 0\n"))
    assert "database.pool_max_size" in found[0]
    assert "set it to 1 or more" in found[0]


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    text = "[database]\npool_min_size = 'a'\n[logging]\nlevel = 'loud'\n[http]\nlisten = 'x'\n"
    found = problems(write(tmp_path, text))
    assert len(found) == 3


def test_choice_suggests_close_value(tmp_path: Path) -> None:
    found = problems(write(tmp_path, "[logging]\nlevel = 'warn'\n"))
    assert "did you mean 'warning'" in found[0]


def test_cross_field_pool_sizes(tmp_path: Path) -> None:
    found = problems(write(tmp_path, "[database]\npool_min_size = 40\npool_max_size = 30\n"))
    assert "database.pool_min_size" in found[0]


def test_cross_field_walacor_timeouts(tmp_path: Path) -> None:
    text = "[walacor]\nconnect_timeout = '10s'\nrequest_timeout = '5s'\n"
    found = problems(write(tmp_path, text))
    assert "walacor.request_timeout" in found[0]


def test_durations_accept_units(tmp_path: Path) -> None:
    text = "[database]\nconnect_timeout = '1m'\ncheckout_timeout = '250ms'\n"
    loaded = config.load(write(tmp_path, text), {})
    assert loaded.database.connect_timeout == 60.0
    assert loaded.database.checkout_timeout == 0.25


@pytest.mark.parametrize(("text", "seconds"), [
    ("1e3", 1000.0), ("1.5e3ms", 1.5), (".5m", 30.0), ("5.s", 5.0), ("+2h", 7200.0),
    (" 7d ", 604800.0), ("-1s", -1.0),
])
def test_duration_forms(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "message"), [
    ("1_000", "a duration is a number of seconds"),
    ("\u0665s", "a duration is a number of seconds"),  # ARABIC-INDIC DIGIT FIVE
    ("inf", "a duration is a number of seconds"),
    ("nan", "a duration is a number of seconds"),
    ("1e3x", "a duration is a number of seconds"),
    ("1e400", "a duration must be a finite number of seconds"),
    ("1e306d", "a duration must be a finite number of seconds"),
])
def test_duration_invalid_forms(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(text)


def test_config_duration_with_exponent(tmp_path: Path) -> None:
    text = "[database]\nconnect_timeout = '1.2e1'\ncheckout_timeout = '2.5e2ms'\n"
    loaded = config.load(write(tmp_path, text), {})
    assert loaded.database.connect_timeout == 12.0
    assert loaded.database.checkout_timeout == 0.25


def test_paths_are_normalised(tmp_path: Path) -> None:
    """A trailing slash or a "./" does not make a different path, so a reload that only
    adds one does not ask for a restart."""
    file = tmp_path / "walacord.toml"
    file.write_text('[state]\ndir = "/var/lib/walacord/"\n[logging]\ndir = "/var/log/./walacord"\n'
                    '[backup]\ndir = ""\n')
    cfg = config.load(file, {})
    assert cfg.state.dir == "/var/lib/walacord"
    assert cfg.logging.dir == "/var/log/walacord"
    assert cfg.backup.dir == ""

    from walacord.supervisor import restart_required
    assert restart_required(config.load(None, {}), cfg) == []


def test_invalid_toml_names_file(tmp_path: Path) -> None:
    found = problems(write(tmp_path, "[database\n"))
    assert str(tmp_path / "walacord.toml") in found[0]
    assert "invalid TOML" in found[0]


def test_missing_file_says_how_to_choose(tmp_path: Path) -> None:
    found = problems(tmp_path / "absent.toml")
    assert "--config" in found[0]


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[database]\nurl = 'postgresql://a@h/db'\n")
    loaded = config.load(path, {
        "DATABASE_URL": "postgresql://b@h2/db2",
        "WALACOR_HOST": "https://walacor.example",
        "WALACOR_USERNAME": "svc",
        "WALACOR_PASSWORD": "pw-from-env",
        "LOG_LEVEL": "WARNING",
        "ENVIRONMENT": "staging",
    })
    assert loaded.database.url == "postgresql://b@h2/db2"
    assert loaded.walacor.url == "https://walacor.example"
    assert loaded.walacor.username == "svc"
    assert loaded.walacor.password == "pw-from-env"
    assert loaded.logging.level == "warning"
    assert loaded.environment == "staging"


def test_debug_sets_level(tmp_path: Path) -> None:
    loaded = config.load(None, {"DEBUG": "true"})
    assert loaded.logging.level == "debug"


def test_invalid_env_value_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(None, {"LOG_LEVEL": "chatty"})
    assert "logging.level" in str(caught.value)


def test_secret_file_key(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    loaded = config.load(write(tmp_path, f"[walacor]\npassword_file = '{secret}'\n"), {})
    assert loaded.walacor.password == "from-file"


def test_secret_file_missing(tmp_path: Path) -> None:
    found = problems(write(tmp_path, "[walacor]\npassword_file = '/nonexistent/pw'\n"))
    assert "walacor.password_file" in found[0]
    assert "/nonexistent/pw" in found[0]


@pytest.mark.parametrize("content", ["", "\n", "  \n\n"])
@pytest.mark.parametrize(("section", "key"), [("walacor", "password"), ("database", "password"),
                                              ("database", "url")])
def test_secret_file_empty_rejected(tmp_path: Path, content: str, section: str,
                                    key: str) -> None:
    """An empty file would set an empty secret, so walacord would run without it."""
    secret = tmp_path / "secret"
    secret.write_text(content)

    [found] = problems(write(tmp_path, f"[{section}]\n{key}_file = '{secret}'\n"))

    assert f"{section}.{key}_file: secret file {str(secret)!r} is empty" in found
    assert f"write the {key} into it, or remove {key}_file" in found


def test_secret_and_file_both_set(tmp_path: Path) -> None:
    found = problems(write(tmp_path, "[walacor]\npassword = 'a'\npassword_file = '/x'\n"))
    assert "not both" in found[0]


def test_env_file_variant(tmp_path: Path) -> None:
    secret = tmp_path / "url"
    secret.write_text("postgresql://u:pw@h/db\n")
    loaded = config.load(None, {"DATABASE_URL_FILE": str(secret)})
    assert loaded.database.url == "postgresql://u:pw@h/db"


def test_systemd_credentials(tmp_path: Path) -> None:
    (tmp_path / "database-password").write_text("cred-db\n")
    (tmp_path / "walacor-password").write_text("cred-walacor\n")
    loaded = config.load(None, {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert loaded.database.password == "cred-db"
    assert loaded.walacor.password == "cred-walacor"
    assert "cred-db" in loaded.secrets()


def test_conninfo_merges_password_and_timeouts() -> None:
    loaded = config.load(None, {"DATABASE_URL": "postgresql://u@h:5433/db"})
    database = config.DatabaseConfig(url=loaded.database.url, password="p w")
    info = database.conninfo()
    assert "password='p w'" in info
    assert "connect_timeout=5" in info
    assert "tcp_user_timeout=10000" in info
    assert "statement_timeout=30000" in info


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "walacord", "check-config", "--config", str(path)],
        capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("text", "key", "value"), [
    ("[state]\ndir = 'state'\n", "state.dir", "state"),
    ("[logging]\ndir = './logs/'\n", "logging.dir", "./logs/"),
    ("[control]\nsocket = 'run/control.sock'\n", "control.socket", "run/control.sock"),
    ("[backup]\ndir = 'backups'\n", "backup.dir", "backups"),
    ("[backup]\npg_bindir = 'pg/bin'\n", "backup.pg_bindir", "pg/bin"),
    ("[walacor]\nca_bundle = 'ca.pem'\n", "walacor.ca_bundle", "ca.pem"),
    ("[probes.host]\ndirs = ['/srv', 'data']\n", "probes.host.dirs[1]", "data"),
    ("[walacor]\npassword_file = 'pw'\n", "walacor.password_file", "pw"),
    ("[database]\nurl_file = '../url'\n", "database.url_file", "../url"),
])
def test_relative_paths_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 text: str, key: str, value: str) -> None:
    # The relative paths exist here, so only the check for a relative path can fail.
    work = tmp_path / "work"
    for directory in ("state", "logs", "run", "backups", "pg/bin", "data"):
        (work / directory).mkdir(parents=True)
    for file in ("ca.pem", "pw"):
        (work / file).write_text("x\n")
    (tmp_path / "url").write_text("postgresql://u@h/db\n")
    monkeypatch.chdir(work)

    found = problems(write(tmp_path, text))

    assert len(found) == 1, found
    assert f"{key}: {value!r} is a relative path" in found[0]
    assert "give an absolute path" in found[0]


def test_check_config_rejects_relative_state_dir(tmp_path: Path) -> None:
    result = check_config(write(tmp_path, "[state]\ndir = 'var/state'\n"))

    assert result.returncode == 2
    assert "state.dir: 'var/state' is a relative path" in result.stderr
    assert "give an absolute path" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_command_exit_codes(tmp_path: Path) -> None:
    good = check_config(ROOT / "etc" / "walacord.toml")
    bad = check_config(write(tmp_path, "[database]\npool_min_size = 'x'\nbogus = 1\n"))
    empty = check_config(write(tmp_path, "# emptied by a failed copy\n"))

    assert good.returncode == 0, good.stderr
    assert "sets nothing" not in good.stdout
    assert bad.returncode == 2
    assert "database.pool_min_size" in bad.stderr
    assert "database.bogus" in bad.stderr
    assert empty.returncode == 0
    assert "valid, but it sets nothing" in empty.stdout


@pytest.mark.parametrize("text", [
    "[probes.host]\ninterval = nan\n",
    "[probes.walacor]\ntimeout = nan\n",
    "[probes.host]\njitter = nan\n",
    "[lifecycle]\ndrain_timeout = inf\n",
])
def test_non_finite_numbers_rejected(tmp_path: Path, text: str) -> None:
    found = problems(write(tmp_path, text))
    assert any("finite" in p for p in found), found


@pytest.mark.parametrize("url", [
    "postgresql://walacord:s3cr3t-pw%zz@h/db",
    "postgresql://walacord:s3cr3t-pw@[::1",
    "host=h password='s3cr3t-pw",
])
def test_invalid_dsn_error_hides_password(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(None, {"DATABASE_URL": url})
    message = str(caught.value)
    assert "database.url" in message
    assert "s3cr3t-pw" not in message


def test_problem_names_environment_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(None, {"LOG_LEVEL": "verbose"})
    assert str(caught.value.problems[0]).startswith("environment LOG_LEVEL: logging.level")


def test_directory_as_config_file(tmp_path: Path) -> None:
    found = problems(tmp_path)
    assert "a directory; point --config at a TOML file" in found[0]


def test_fifo_as_config_file(tmp_path: Path) -> None:
    fifo = tmp_path / "walacord.toml"
    os.mkfifo(fifo)
    found = problems(fifo)  # would block forever if it opened the FIFO
    assert "not a regular file, and a FIFO, device or socket can block" in found[0]


def test_device_as_config_file() -> None:
    found = problems(Path("/dev/zero"))
    assert "not a regular file" in found[0]


def test_oversized_config_file(tmp_path: Path) -> None:
    path = tmp_path / "walacord.toml"
    path.write_text("# padding\n" * (config.MAX_CONFIG_BYTES // 10 + 1))
    found = problems(path)
    assert "larger than 1024 KiB" in found[0]


def test_non_utf8_config_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes("environment = 'caf\xe9'\n".encode("latin-1"))
    found = problems(path)
    assert "not UTF-8" in found[0]


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("")
    found = problems(write(tmp_path, f"[state]\ndir = '{blocker}'\n"))
    assert "state.dir" in found[0]
    assert "not a directory" in found[0]


@pytest.mark.parametrize(("sql", "accepted"), [
    ("INSERT INTO p (key) VALUES (%(key)s) ON CONFLICT DO NOTHING", True),
    ("insert into p values (%(key)s)\n  on  conflict (key) do nothing", True),
    ("INSERT INTO p (note) VALUES ('it''s') ON CONFLICT (key) DO NOTHING", True),
    ("/* upsert */ MERGE INTO p USING s ON p.k = s.k WHEN NOT MATCHED THEN INSERT "
     "VALUES (s.k)", True),
    ("INSERT INTO p (key) VALUES (%(key)s) -- ON CONFLICT", False),
    ("INSERT INTO p (key) VALUES (%(key)s || 'ON CONFLICT')", False),
    ('INSERT INTO "on conflict" VALUES (%(key)s)', False),
    ("INSERT INTO p VALUES ($tag$ ON CONFLICT $tag$)", False),
    # ON CONFLICT belongs to INSERT, and each INSERT needs its own.
    ("SELECT 1 ON CONFLICT", False),
    ("UPDATE p SET n = n + 1 WHERE key = %(key)s RETURNING 'x' ON CONFLICT", False),
    ("WITH moved AS (INSERT INTO audit (key) VALUES (%(key)s) RETURNING key) "
     "INSERT INTO p (key) SELECT key FROM moved ON CONFLICT DO NOTHING", False),
    ("WITH moved AS (INSERT INTO audit (key) VALUES (%(key)s) ON CONFLICT DO NOTHING "
     "RETURNING key) INSERT INTO p (key) SELECT key FROM moved ON CONFLICT DO NOTHING",
     True),
    ("WITH v (key) AS (VALUES (%(key)s)) INSERT INTO p SELECT key FROM v "
     "ON CONFLICT DO NOTHING", True),
    ("  -- note\n  INSERT INTO p (key) VALUES (%(key)s) ON CONFLICT DO NOTHING", True),
    # An update computed from the row's own value applies twice on a replay.
    ("INSERT INTO payments (key, amount) VALUES (%(key)s, %(amount)s) ON CONFLICT (key) "
     "DO UPDATE SET amount = payments.amount + EXCLUDED.amount", False),
    ("INSERT INTO payments AS p (key, n) VALUES (%(key)s, 1) ON CONFLICT (key) DO\n"
     "  UPDATE SET n = n + 1", False),
    ("INSERT INTO payments (key, amount) VALUES (%(key)s, %(amount)s) ON CONFLICT (key) "
     "DO UPDATE SET amount = EXCLUDED.amount, seen = now() WHERE payments.amount <> "
     "EXCLUDED.amount", True),
    ("MERGE INTO payments p USING (SELECT %(key)s AS key) s ON p.key = s.key "
     "WHEN MATCHED THEN UPDATE SET amount = p.amount + %(amount)s "
     "WHEN NOT MATCHED THEN INSERT (key, amount) VALUES (s.key, %(amount)s)", False),
    ("MERGE INTO payments p USING (SELECT %(key)s AS key, %(amount)s AS amount) s "
     "ON p.key = s.key WHEN MATCHED THEN UPDATE SET amount = s.amount "
     "WHEN NOT MATCHED THEN INSERT (key, amount) VALUES (s.key, s.amount)", True),
    # PostgreSQL 15 allows WITH before MERGE; the MERGE's INSERT is its action.
    ("WITH src AS (SELECT %(key)s AS key) MERGE INTO payments p USING src ON "
     "p.key = src.key WHEN NOT MATCHED THEN INSERT (key) VALUES (src.key)", True),
    # Other statements in a WITH clause run again on a replay.
    ("WITH bump AS (UPDATE payments SET amount = amount + 1 WHERE key = 'total' "
     "RETURNING 1) INSERT INTO p (key) VALUES (%(key)s) ON CONFLICT (key) DO NOTHING",
     False),
    ("WITH gone AS (DELETE FROM queue WHERE key = %(key)s RETURNING key) INSERT INTO p "
     "SELECT key FROM gone ON CONFLICT DO NOTHING", False),
    # Block comments nest, so the second ON CONFLICT is inside a comment.
    ("WITH a AS (INSERT INTO audit (key) VALUES (%(key)s) RETURNING key) INSERT INTO p "
     "SELECT key FROM a ON CONFLICT DO NOTHING /* x /* y */ ON CONFLICT */", False),
    ("/* outer /* inner */ still comment */ INSERT INTO p (key) VALUES (%(key)s) "
     "ON CONFLICT DO NOTHING", True),
    # CASE WHEN inside the SET list, quoted names and a row assignment hide nothing.
    ("INSERT INTO payments (key, amount) VALUES (%(key)s, %(amount)s) ON CONFLICT (key) "
     "DO UPDATE SET amount = CASE WHEN true THEN payments.amount + EXCLUDED.amount END",
     False),
    ('INSERT INTO payments (key, amount) VALUES (%(key)s, %(amount)s) ON CONFLICT (key) '
     'DO UPDATE SET "amount" = payments."amount" + EXCLUDED.amount', False),
    ("INSERT INTO payments (key, amount) VALUES (%(key)s, %(amount)s) ON CONFLICT (key) "
     "DO UPDATE SET (amount) = (payments.amount + EXCLUDED.amount)", False),
    ('INSERT INTO "payments" AS p (key, amount) VALUES (%(key)s, %(amount)s) ON CONFLICT '
     '(key) DO UPDATE SET amount = p.amount + EXCLUDED.amount', False),
    # A dollar quote ends only at its own tag, so this ON CONFLICT is inside the string.
    ("INSERT INTO notes (key, body) VALUES (%(key)s, $a$ $$) ON CONFLICT DO NOTHING -- "
     "$a$)", False),
    ("INSERT INTO payments (key, amount) VALUES (%(key)s, %(amount)s) ON CONFLICT (key) "
     "DO UPDATE SET amount = CASE WHEN EXCLUDED.amount > 0 THEN EXCLUDED.amount END",
     True),
])
def test_statement_idempotency_check(tmp_path: Path, sql: str, accepted: bool) -> None:
    path = tmp_path / "walacord.toml"
    path.write_text(f"[outbox.statements.insert_payment]\nsql = '''{sql}'''\n")

    if accepted:
        assert config.load(path, {}).outbox.statements["insert_payment"].sql == sql
    else:
        assert "statement does not look idempotent" in problems(path)[0]


@pytest.mark.parametrize(("sql", "accepted"), [
    ("INSERT INTO p (key) VALUES (%(key)s) ON CONFLICT DO NOTHING;", True),
    ("INSERT INTO p (key) VALUES (%(key)s) ON CONFLICT DO NOTHING ;  -- done\n", True),
    ("INSERT INTO p (note) VALUES ('a;b') ON CONFLICT DO NOTHING", True),
    ('INSERT INTO "a;b" (key) VALUES (%(key)s) ON CONFLICT DO NOTHING', True),
    ("INSERT INTO p (note) VALUES ($$a;b$$) ON CONFLICT DO NOTHING", True),
    ("INSERT INTO p (note) VALUES ($x$a;b$x$) ON CONFLICT DO NOTHING", True),
    ("INSERT INTO p (key) VALUES (%(key)s) /* a; b */ ON CONFLICT DO NOTHING", True),
    ("INSERT INTO p (note) VALUES (E'it\\'s; ok') ON CONFLICT DO NOTHING", True),
    ("UPDATE payments SET amount = amount + 1 WHERE key = %(key)s; SELECT 1 ON CONFLICT",
     False),
    ("INSERT INTO p (key) VALUES (%(key)s) ON CONFLICT DO NOTHING;;", False),
    ("DELETE FROM p; INSERT INTO p (key) VALUES (%(key)s) ON CONFLICT DO NOTHING", False),
    # E'\'' is one quote in PostgreSQL, so the DELETE is code, not part of a literal.
    ("INSERT INTO p (note) VALUES (E'\\''); DELETE FROM p; SELECT ' ON CONFLICT'", False),
])
def test_statement_count_check(tmp_path: Path, sql: str, accepted: bool) -> None:
    path = tmp_path / "walacord.toml"
    path.write_text(f"[outbox.statements.insert_payment]\nsql = '''{sql}'''\n")

    if accepted:
        assert config.load(path, {}).outbox.statements["insert_payment"].sql == sql
    else:
        found = problems(path)
        assert len(found) == 1
        assert "statements.insert_payment.sql" in found[0]
        assert "more than one SQL statement" in found[0]
        assert "one INSERT ... ON CONFLICT statement" in found[0]


@pytest.mark.parametrize(("sql", "problem"), [
    ("INSERT INTO p (key, pct) VALUES (%(key)s, 100%) ON CONFLICT DO NOTHING",
     "'%)' at character 46 is not a placeholder; write %(name)s for a parameter, and %% "
     "for a literal percent sign (also inside quotes and comments)"),
    ("INSERT INTO p (key, note) VALUES (%(key)s, '5%') ON CONFLICT DO NOTHING",
     "\"%'\" at character 46 is not a placeholder"),
    ("INSERT INTO p (key, amount) VALUES (%(key)s, %s) ON CONFLICT DO NOTHING",
     "'%s' at character 46 is a positional placeholder; outbox statements take named "
     "ones filled from params, such as %(amount)s"),
    ("INSERT INTO p (key) VALUES (%(key)d) ON CONFLICT DO NOTHING",
     "'%(key)d' at character 29 is not a placeholder"),
    ("INSERT INTO p (key) VALUES (%(key)s) ON CONFLICT DO NOTHING -- 100%", "'%' at"),
    ("INSERT INTO p (key) VALUES (%()s) ON CONFLICT DO NOTHING",
     "'%()s' at character 29 has no parameter name; write %(name)s"),
    ("INSERT INTO p (key, a, b) VALUES (%(key)s, %(a)s, %(a)t) ON CONFLICT DO NOTHING",
     "'%(a)t' at character 51 uses parameter 'a' with format %t, after %s earlier"),
])
def test_statement_placeholders_checked(tmp_path: Path, sql: str, problem: str) -> None:
    """psycopg refuses these placeholders at run time, so every operation would go dead:
    they are refused at load instead. psycopg reads percent signs in quotes and comments
    too."""
    path = tmp_path / "walacord.toml"
    path.write_text(f"[outbox.statements.insert_payment]\nsql = '''{sql}'''\n")

    [found] = problems(path)

    assert "statements.insert_payment.sql" in found
    assert problem in found


def test_statement_placeholders_accepted(tmp_path: Path) -> None:
    sql = ("INSERT INTO p (key, a, b, note) VALUES (%(key)s, %(a)b, %(b)t, '100%%') "
           "ON CONFLICT DO NOTHING")
    path = tmp_path / "walacord.toml"
    path.write_text(f"[outbox.statements.insert_payment]\nsql = '''{sql}'''\n")

    assert config.load(path, {}).outbox.statements["insert_payment"].sql == sql


def test_statement_vouched_multiple_rejected(tmp_path: Path) -> None:
    path = tmp_path / "walacord.toml"
    path.write_text("[outbox.statements.set_total]\n"
                    "sql = 'UPDATE t SET total = 1 WHERE key = %(key)s; DELETE FROM t'\n"
                    "idempotent = true\n")

    found = problems(path)

    assert "statements.set_total.sql" in found[0]
    assert "more than one SQL statement" in found[0]


def test_deeply_nested_value_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "walacord.toml"
    path.write_text("x = " + "[" * 500 + "]" * 500 + "\n")

    found = problems(path)

    assert "nested too deeply for the TOML parser" in found[0]


@pytest.mark.parametrize("text", ["", "# only a comment\n", "[backup]\n",
                                  "[probes.database]\n[outbox]\n"])
def test_reload_of_file_without_settings_rejected(tmp_path: Path, text: str) -> None:
    path = tmp_path / "walacord.toml"
    path.write_text(text)

    with pytest.raises(ConfigError) as caught:
        config.load(path, {}, reload=True)

    assert "the file contains no settings" in str(caught.value)


@pytest.mark.parametrize(("url", "problem"), [
    ("http://[::1:49603", "Invalid IPv6 URL; write an IPv6 address in brackets, as in "
                          "http://[::1]:8080/PATH"),
    ("http://local host:8000", "its host part 'local host:8000' contains ' ', which a host "
                               "name cannot contain"),
    ("http://walacor:99999/api", "Port out of range 0-65535; give a port from 1 to 65535"),
    ("http://walacor:http/api", "Port could not be cast to integer value as 'http'; give "
                                "a port from 1 to 65535"),
    ("http://walacor:0/api", "port 0 is not a port a server listens on"),
    ("http:///api", "it has no host name"),
    ("http://walacor\t/api", "it contains the control character '\\t' at position 15"),
    ("walacor:8080/api", "it must start with http:// or https://"),
    ("http://\u2603.net/", "httpx rejects it: Invalid IDNA hostname"),
    ("http://[::1]x/health", "httpx rejects it: Invalid port: 'x'"),
    ("http://256.1.1.1/", "httpx rejects it: Invalid IPv4 address"),
])
@pytest.mark.parametrize("key", ["walacor.url", "alerts.alertmanager_url",
                                 "probes.api.checks"])
def test_unusable_urls_rejected(tmp_path: Path, url: str, problem: str, key: str) -> None:
    """A URL that httpx cannot use is rejected at load, where check-config and a reload
    see it, instead of failing the next start or every probe run."""
    section, _, name = key.rpartition(".")
    if name == "checks":
        text = f"[[probes.api.checks]]\nurl = {orjson.dumps(url).decode()}\n"
    else:
        text = f"[{section}]\n{name} = {orjson.dumps(url).decode()}\n"

    [found] = problems(write(tmp_path, text))

    assert f"invalid URL {url!r}: {problem}" in found


@pytest.mark.parametrize("url", ["http://[::1]:8080/api", "https://walacor.example.com",
                                 "https://user:p%40ss@walacor.example.com:443/api/",
                                 "http://127.0.0.1:9093", "http://[fe80::1%25eth0]:8080/",
                                 "HTTPS://walacor.example.com/", "https://m\u00fcnchen.de/"])
def test_usable_urls_accepted(tmp_path: Path, url: str) -> None:
    text = f"[walacor]\nurl = {orjson.dumps(url).decode()}\n"

    assert config.load(write(tmp_path, text), {}).walacor.url == url


@pytest.mark.parametrize(("argv", "problem"), [
    (["/nonexistent/notify"], "program '/nonexistent/notify' does not exist; give the path "
                              "of an executable file"),
    (["/etc/passwd"], "program '/etc/passwd' is not executable; run chmod +x on it"),
    (["/etc"], "program '/etc' is not a file"),
    (["walacord-no-such-program", "x"], "program 'walacord-no-such-program' is not in PATH"),
    (["bin/notify"], "program 'bin/notify' is a relative path"),
])
@pytest.mark.parametrize("key", ["modes.hooks", "alerts.hooks", "repair.restart_command"])
def test_commands_that_cannot_run_rejected(tmp_path: Path, argv: list[str], problem: str,
                                           key: str) -> None:
    """A hook or restart command that cannot start fails check-config, not the next mode
    change or outage."""
    section, name = key.split(".")
    value = orjson.dumps(argv if name == "restart_command" else [argv]).decode()

    [found] = problems(write(tmp_path, f"[{section}]\n{name} = {value}\n"))

    assert key in found
    assert problem in found


def test_commands_that_can_run_accepted(tmp_path: Path) -> None:
    text = ('[modes]\nhooks = [["sh", "-c", "true"], ["/bin/true"]]\n'
            '[repair]\nrestart_command = ["systemctl", "restart", "app"]\n')
    if shutil.which("systemctl") is None:
        text = text.replace('"systemctl"', '"true"')

    loaded = config.load(write(tmp_path, text), {})

    assert loaded.modes.hooks[1] == ["/bin/true"]


@pytest.mark.parametrize(("listen", "problem"), [
    ("999.1.1.1:80", "'999.1.1.1' is not a valid IPv4 address"),
    ("127.1:9877", "'127.1' is not a valid IPv4 address"),
    ("[::g]:9877", "'::g' is not a valid IPv6 address"),
    ("*:9877", "'*' is not a host; use 0.0.0.0 for every IPv4 address"),
    ("metrics..example:9877", "'metrics..example' is not a valid host name"),
    ("metrics host:9877", "'metrics host' is not a valid host name"),
])
def test_http_listen_invalid_host_rejected(tmp_path: Path, listen: str, problem: str) -> None:
    """walacord run fails to bind such a host, so load rejects it and check-config
    reports it."""
    [found] = problems(write(tmp_path, f"[http]\nlisten = '{listen}'\n"))

    assert "http.listen" in found
    assert f"invalid address {listen!r}" in found
    assert problem in found


@pytest.mark.parametrize("listen", ["127.0.0.1:9877", "0.0.0.0:80", "[::1]:9877", "[::]:80",
                                    "[fe80::1%eth0]:9877", "localhost:9877",
                                    "metrics.example.internal.:9877", "host-1_a:9877"])
def test_http_listen_valid_hosts_accepted(tmp_path: Path, listen: str) -> None:
    # Names are not resolved at load, so a name that does not resolve passes here.
    assert config.load(write(tmp_path, f"[http]\nlisten = '{listen}'\n"), {}).http.listen == listen


def test_control_socket_path_too_long_rejected(tmp_path: Path) -> None:
    """Linux's sun_path takes 107 bytes, and the socket is first bound under a temporary
    name up to 13 bytes longer, so 94 bytes is the longest path that binds."""
    longest = "/run/walacord/" + "x" * 80
    too_long = longest + "y"

    [found] = problems(write(tmp_path, f"[control]\nsocket = '{too_long}'\n"))

    assert config.load(write(tmp_path, f"[control]\nsocket = '{longest}'\n"), {})
    assert f"control.socket: {too_long!r} is 95 bytes, longer than the 94 bytes" in found
    assert "choose a shorter path" in found


@pytest.mark.parametrize(("query", "problem"), [
    ("sslmode=bogus", "invalid sslmode value 'bogus'; use one of disable, allow, prefer, "
                      "require, verify-ca, verify-full"),
    ("sslmode=", "invalid sslmode value ''"),
    ("target_session_attrs=READ-WRITE", "invalid target_session_attrs value 'READ-WRITE'; use "
                                        "one of any, read-write, read-only, primary, standby, "
                                        "prefer-standby"),
    ("load_balance_hosts=yes", "invalid load_balance_hosts value 'yes'; use one of disable, "
                               "random"),
    ("channel_binding=on", "invalid channel_binding value 'on'; use one of disable, prefer, "
                           "require"),
    ("gssencmode=allow", "invalid gssencmode value 'allow'"),
    ("sslcertmode=prefer", "invalid sslcertmode value 'prefer'"),
    ("sslnegotiation=tls", "invalid sslnegotiation value 'tls'"),
    ("sslmode=prefer&sslnegotiation=direct", "sslnegotiation=direct needs sslmode require, "
                                             "verify-ca or verify-full, not 'prefer'"),
    ("sslrootcert=system&sslmode=require", "sslrootcert=system needs sslmode verify-full, "
                                           "not 'require'"),
    ("connect_timeout=5s", "invalid connect_timeout value '5s'; use a whole number"),
    ("keepalives_idle=often", "invalid keepalives_idle value 'often'; use a whole number"),
])
@pytest.mark.parametrize("section", ["database", "backup"])
def test_libpq_parameter_values_rejected(tmp_path: Path, query: str, problem: str,
                                         section: str) -> None:
    """libpq checks these values only when it connects, so the daemon would start and
    fail every connection. Load rejects them instead."""
    url = f"postgresql://walacord:s3cr3t-pw@db.example.internal:5432/walacor?{query}"

    [found] = problems(write(tmp_path, f"[{section}]\nurl = '{url}'\n"))

    assert f"{section}.url" in found
    assert problem in found
    assert "s3cr3t-pw" not in found


@pytest.mark.parametrize(("url", "problem"), [
    ("postgresql://walacord@db:abc/walacor", "invalid port 'abc'; use a port from 1 to 65535"),
    ("postgresql://walacord@db:99999/walacor", "invalid port '99999'"),
    ("host=db1,db2 port=5432,x dbname=walacor", "invalid port 'x'"),
])
def test_libpq_port_rejected(tmp_path: Path, url: str, problem: str) -> None:
    [found] = problems(write(tmp_path, f"[database]\nurl = '{url}'\n"))

    assert "database.url" in found
    assert problem in found


@pytest.mark.parametrize("query", [
    "sslmode=verify-full&target_session_attrs=read-write&channel_binding=require",
    "sslmode=require&sslnegotiation=direct&load_balance_hosts=random",
    "sslrootcert=system&sslmode=verify-full&gssencmode=disable&sslcertmode=allow",
    "connect_timeout=10&keepalives=1&port=5433",
])
def test_libpq_parameter_values_accepted(tmp_path: Path, query: str) -> None:
    url = f"postgresql://walacord@db1:5432,db2:5432/walacor?{query}"

    assert config.load(write(tmp_path, f"[database]\nurl = '{url}'\n"), {}).database.url == url


def test_libpq_choices_match_libpq(tmp_path: Path) -> None:
    """The bundled libpq accepts every value of LIBPQ_CHOICES and rejects another one.

    The host is a directory without a socket, so libpq checks the options and then fails
    to connect without reaching any server.
    """
    def connect_error(options: str) -> str:
        with pytest.raises(psycopg.Error) as caught:
            psycopg.connect(f"host={tmp_path} {options}")
        return str(caught.value)

    for name, choices in config.LIBPQ_CHOICES.items():
        # sslnegotiation=direct needs a strong sslmode.
        strong = " sslmode=require" if name == "sslnegotiation" else ""
        for value in choices:
            assert "invalid" not in connect_error(f"{name}={value}{strong}"), (name, value)
        assert f'invalid {name} value: "bogus"' in connect_error(f"{name}=bogus")


def test_check_config_warns_of_missing_group(tmp_path: Path) -> None:
    """The daemon starts without the group, so the file stays valid, but check-config
    prints who can then use the control socket."""
    result = check_config(write(tmp_path, "[control]\ngroup = 'walacord-no-such-group'\n"))

    assert result.returncode == 0, result.stderr
    assert "valid; 1 warning on standard error" in result.stdout
    assert ("warning: control.group: group 'walacord-no-such-group' not found on this host"
            in result.stderr)
    assert "only root and walacord's user can use the control socket" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_no_warning_without_socket(tmp_path: Path) -> None:
    text = "[control]\nsocket = ''\ngroup = 'walacord-no-such-group'\n"

    result = check_config(write(tmp_path, text))

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@pytest.mark.parametrize("command", ["run", "check-config", "migrate"])
def test_empty_walacord_config_means_default(monkeypatch: pytest.MonkeyPatch,
                                             command: str) -> None:
    """An empty WALACORD_CONFIG, as from `WALACORD_CONFIG= walacord run`, names no file,
    like an unset one. It used to select the built-in defaults without a word."""
    from walacord.cli import DEFAULT_CONFIG, build_parser

    monkeypatch.setenv("WALACORD_CONFIG", "")

    assert build_parser(command).parse_args([command]).config == DEFAULT_CONFIG


@pytest.mark.parametrize("command", ["run", "check-config", "migrate"])
def test_empty_config_option_rejected(command: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from walacord.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser(command).parse_args([command, "--config", ""])

    assert exited.value.code == 2
    assert "argument --config: empty path; give a configuration file" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "check-config", "migrate"])
def test_walacord_config_names_file(monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    from walacord.cli import build_parser

    monkeypatch.setenv("WALACORD_CONFIG", "/srv/walacord.toml")

    assert build_parser(command).parse_args([command]).config == "/srv/walacord.toml"


@pytest.mark.parametrize(("text", "key", "example"), [
    ('[modes]\nhooks = "/usr/local/bin/notify --mode"\n', "modes.hooks",
     '[["/usr/local/bin/notify", "--mode"]]'),
    ('[modes]\nhooks = ["/usr/local/bin/notify", "--mode"]\n', "modes.hooks[0]",
     '["/usr/local/bin/notify", "--mode"]'),
    ('[alerts]\nhooks = "/usr/local/bin/page --team db"\n', "alerts.hooks",
     '[["/usr/local/bin/page", "--team", "db"]]'),
    ('[repair]\nrestart_command = "systemctl restart walacor-integrity"\n',
     "repair.restart_command", '["systemctl", "restart", "walacor-integrity"]'),
])
def test_argv_string_error_gives_example(tmp_path: Path, text: str, key: str,
                                         example: str) -> None:
    # Each string in a list of argv lists is a problem of its own; the first one shows.
    found = problems(write(tmp_path, text))[0]

    assert f"{key}: expected a list, got a string" in found
    assert f"write a list such as {example}" in found
