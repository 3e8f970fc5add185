"""The [backup] configuration section and how a manager is built from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from walacord.backup import BackupManager
from walacord.config import load
from walacord.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "walacord.toml"
    path.write_text(text)
    return path


def test_backup_section_defaults() -> None:
    config = load(None, environ={})

    assert config.backup.format == "custom"
    assert config.backup.keep_days == 30
    assert config.backup.max_age == 26 * 3600
    assert config.backup.drill_interval == 7 * 86400


def test_backup_section_parses_durations(tmp_path: Path) -> None:
    path = write(tmp_path, '[backup]\ndaily_at = "23:05"\njitter = "10m"\n'
                           'max_age = "30h"\nformat = "plain-gzip"\nkeep_weekly = 4\n')

    backup = load(path, environ={}).backup

    assert backup.daily_at == "23:05"
    assert backup.jitter == 600
    assert backup.max_age == 30 * 3600
    assert backup.format == "plain-gzip"
    assert backup.keep_weekly == 4


@pytest.mark.parametrize(("line", "message"), [
    ('daily_at = "25:00"', "invalid time '25:00'"),
    ('daily_at = "2:5"', "invalid time '2:5'"),
    ('format = "zip"', "invalid value 'zip'"),
    ("keep_days = 0", "below the minimum 1"),
    ('url = "host=db dbname"', "invalid libpq connection string"),
])
def test_backup_section_rejects_invalid(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, f"[backup]\n{line}\n")

    with pytest.raises(ConfigError) as raised:
        load(path, environ={})

    assert message in str(raised.value)
    assert "backup." in str(raised.value)


def test_backup_url_password_is_secret(tmp_path: Path) -> None:
    path = write(tmp_path, '[backup]\nurl = "postgresql://dumper:s3cret@db/app"\n')

    assert "s3cret" in load(path, environ={}).secrets()


def test_manager_from_config_uses_database_password(tmp_path: Path) -> None:
    path = write(tmp_path, '[database]\nurl = "postgresql://walacord@db1:5433/ledger"\n'
                           'password = "pw1"\n'
                           f'[backup]\ndir = "{tmp_path / "b"}"\n'
                           'url = "postgresql://dumper@db2/ledger"\n')

    manager = BackupManager.from_config(load(path, environ={}))

    assert manager.database == "ledger"
    assert manager.server_host == "db2"
    assert manager.password == "pw1"
    assert "pw1" not in manager.client_conninfo
    assert manager.directory == tmp_path / "b"


def test_manager_from_config_defaults_to_database(tmp_path: Path) -> None:
    path = write(tmp_path, '[database]\nurl = "postgresql://walacord:pw2@db1:5433/ledger"\n')

    manager = BackupManager.from_config(load(path, environ={}))

    assert manager.server_host == "db1"
    assert manager.password == "pw2"
    assert "statement_timeout" not in manager.client_conninfo
    assert "application_name=walacord-backup" in manager.client_conninfo
