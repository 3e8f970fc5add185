"""The `[alerts]` configuration section."""

from __future__ import annotations

from pathlib import Path

import pytest

from walacord import config
from walacord.config import AlertsConfig
from walacord.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "walacord.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        config.load(path, {})
    return [str(p) for p in caught.value.problems]


def test_alerts_example_config_matches_defaults() -> None:
    loaded = config.load(ROOT / "etc" / "walacord.toml", {})

    assert loaded.alerts == AlertsConfig()


def test_alerts_config_reads_hooks_and_durations(tmp_path: Path) -> None:
    path = tmp_path / "walacord.toml"
    path.write_text('[alerts]\nalertmanager_url = "http://127.0.0.1:9093"\n'
                    'hooks = [["/usr/bin/logger", "-t", "walacord"]]\n'
                    'repeat_interval = "4h"\nprobe_down_for = "500ms"\n')

    alerts = config.load(path, {}).alerts

    assert alerts.alertmanager_url == "http://127.0.0.1:9093"
    assert alerts.hooks == [["/usr/bin/logger", "-t", "walacord"]]
    assert alerts.repeat_interval == 4 * 3600
    assert alerts.probe_down_for == 0.5


@pytest.mark.parametrize(("text", "expected"), [
    ('alertmanager_url = "127.0.0.1:9093"', "alerts.alertmanager_url: invalid URL"),
    ("hooks = [[]]", "alerts.hooks[0]: empty command"),
    ('retry_initial = "10s"\nretry_max = "1s"', "alerts.retry_max: 1s is shorter"),
    ("rate_limit = 0", "alerts.rate_limit: value 0 is below the minimum 1"),
    ('repeat_interval = "400d"', "alerts.repeat_interval: value 34560000s (400d) is above "
                                 "the maximum"),
    ('hooks = "page"', "alerts.hooks: expected a list"),
    ('repeat_interval = "-1h"', "alerts.repeat_interval: value -3600s"),
])
def test_alerts_config_rejects_invalid(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(tmp_path, f"[alerts]\n{text}\n")

    assert any(expected in p for p in found), found
