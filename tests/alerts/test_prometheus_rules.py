"""The shipped Prometheus rules pass `promtool check rules` and `promtool test rules`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from walacord.alerts import rules

RULES_DIR = Path(__file__).resolve().parents[2] / "packaging" / "prometheus"
RULES = RULES_DIR / "walacord-rules.yml"
RULE_TESTS = RULES_DIR / "walacord-rules.test.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool not found: install the Debian package prometheus")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120,
                          cwd=RULES_DIR)


def test_prometheus_rules_pass_check() -> None:
    result = promtool("check", "rules", str(RULES))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_prometheus_rules_pass_unit_tests() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))

    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_rules_each_tested() -> None:
    defined = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"]
               for rule in group["rules"]}
    tested = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}

    assert defined - tested == set()


def test_prometheus_rules_share_engine_alert_names() -> None:
    defined = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"]
               for rule in group["rules"]}
    shared = {rules.PROBE_DOWN, rules.SLOW_PROBE, rules.MODE_NOT_NORMAL,
              rules.OUTBOX_PENDING_TOO_OLD, rules.DEAD_OPERATIONS, rules.BACKUP_TOO_OLD,
              rules.BACKUP_FAILED, rules.BACKUP_DAMAGED}

    assert shared <= defined


ALERTMANAGER_CONFIG = RULES_DIR / "alertmanager-walacord.yml"


def test_alertmanager_example_passes_amtool() -> None:
    binary = shutil.which("amtool")
    if binary is None:
        pytest.fail("amtool not found: install the Debian package prometheus-alertmanager")

    result = subprocess.run([binary, "check-config", str(ALERTMANAGER_CONFIG)],
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_inhibits_mirror_dependencies() -> None:
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    inhibits = [(" ".join(rule["target_matchers"]), " ".join(rule["source_matchers"]))
                for rule in config["inhibit_rules"]]

    for dependency in rules.DEPENDENCIES:
        covered = [
            (target, source) for target, source in inhibits
            if dependency.dependent in target and dependency.cause in source
            and all(value in source for value in dependency.cause_labels.values())
        ]
        assert covered, f"no inhibit rule for {dependency}"
