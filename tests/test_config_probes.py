"""The probes, modes and repair sections of the configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from walacord import config
from walacord.errors import ConfigError


def load_text(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "walacord.toml"
    path.write_text(text)
    return config.load(path, environ={})


def test_probe_timeout_must_be_below_interval(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, '[probes.walacor]\ninterval = "5s"\ntimeout = "5s"\n')
    problems = {p.key: p.message for p in caught.value.problems}
    assert "probes.walacor.timeout" in problems
    assert "not shorter than interval" in problems["probes.walacor.timeout"]


def test_probe_sections_parse(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, """
[probes.database]
interval = "1s"
timeout = "500ms"
[[probes.api.checks]]
url = "http://localhost:8000/api/health"
body_contains = "ok"
[modes]
hooks = [["/bin/true", "--mode"]]
[repair]
restart_command = ["systemctl", "restart", "walacor-integrity"]
""")
    assert cfg.probes.database.interval == 1.0
    assert cfg.probes.database.timeout == 0.5
    assert cfg.probes.api.checks[0].url == "http://localhost:8000/api/health"
    assert cfg.modes.hooks == [["/bin/true", "--mode"]]
    assert cfg.repair.restart_command[0] == "systemctl"


@pytest.mark.parametrize(("text", "key"), [
    ('[[probes.api.checks]]\nurl = "localhost:8000"\n', "probes.api.checks[0].url"),
    ('[modes]\nignore_probes = ["disk"]\n', "modes.ignore_probes"),
    ("[modes]\nhooks = [[]]\n", "modes.hooks[0]"),
    ("[probes.host]\ndisk_critical_percent = 30\n", "probes.host.disk_critical_percent"),
    ("[probes.database]\nlock_wait_warning = 100\nlock_wait_critical = 10\n",
     "probes.database.lock_wait_warning"),
])
def test_probe_sections_reject(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text)
    assert any(p.key == key for p in caught.value.problems), caught.value.problems


def test_example_config_shows_defaults() -> None:
    example = Path(__file__).resolve().parent.parent / "etc" / "walacord.toml"
    loaded = config.load(example, environ={})
    assert loaded.probes == config.ProbesConfig()
    assert loaded.modes == config.ModesConfig()
    assert loaded.repair == config.RepairConfig()
    assert "http://localhost:8000/api/health" in example.read_text()
