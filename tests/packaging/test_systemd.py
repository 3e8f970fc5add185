"""The shipped systemd unit, sysusers.d and tmpfiles.d files, checked by systemd's tools.

`systemd-analyze verify` checks that ExecStart= exists, so the unit is verified inside
a throwaway root that contains stand-in executables at the unit's paths and copies of
the host's own unit files; the shipped unit is checked as it is, unedited.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "walacord.service"
SYSUSERS = REPO / "systemd" / "walacord.sysusers"
TMPFILES = REPO / "systemd" / "walacord.tmpfiles"
HOST_UNITS = Path("/usr/lib/systemd/system")
MAX_EXPOSURE = 2.0

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian package: systemd)",
)


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Return every Key=value of a unit file; keys may repeat, so values are lists."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def make_verify_root(root: Path, unit_text: str) -> None:
    """Lay out a root where every path the unit names exists."""
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree(HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    for executable in ("usr/bin/walacord", "bin/kill"):
        target = root / executable
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy("/bin/true", target)
    (root / "etc/systemd/system/walacord.service").write_text(unit_text)


def verify(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "/etc/systemd/system/walacord.service"],
        capture_output=True, text=True, timeout=60,
    )


@needs_systemd_analyze
def test_unit_verify_is_clean(tmp_path: Path) -> None:
    make_verify_root(tmp_path, UNIT.read_text())

    result = verify(tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == ""


@needs_systemd_analyze
def test_unit_verify_catches_broken_unit(tmp_path: Path) -> None:
    # Proves the clean result above means something: the same check flags a typo.
    make_verify_root(tmp_path, UNIT.read_text().replace("ProtectHome=", "ProtectHomee="))

    result = verify(tmp_path)

    assert "Unknown key 'ProtectHomee'" in result.stderr


def exposure(unit: Path) -> float:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60,
    )
    match = re.search(r"Overall exposure level for walacord\.service: (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    return float(match[1])


@needs_systemd_analyze
def test_unit_security_exposure_at_most_two() -> None:
    assert exposure(UNIT) <= MAX_EXPOSURE


@needs_systemd_analyze
def test_unit_security_rates_bare_unit_exposed(tmp_path: Path) -> None:
    # Proves the rating is parsed: a unit without hardening scores far above 2.0.
    bare = tmp_path / "walacord.service"
    bare.write_text("[Service]\nExecStart=/usr/bin/walacord run\n")

    assert exposure(bare) > MAX_EXPOSURE


def test_unit_keeps_required_settings() -> None:
    settings = unit_settings(UNIT)

    expected = {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "WatchdogSec": ["30"],
        "Restart": ["on-failure"],
        "User": ["walacord"],
        "Group": ["walacord"],
        "RuntimeDirectory": ["walacord"],
        "LogsDirectory": ["walacord"],
        "ConfigurationDirectory": ["walacord"],
        "ExecStart": ["/usr/bin/walacord run --config /etc/walacord/walacord.toml"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],
        "ProtectSystem": ["strict"],
        "CapabilityBoundingSet": [""],
        "NoNewPrivileges": ["yes"],
        "MemoryDenyWriteExecute": ["yes"],
    }
    for key, value in expected.items():
        assert settings.get(key) == value, key
    assert "walacord/backups" in settings["StateDirectory"][0].split()
    assert "StartLimitIntervalSec" in settings
    assert "StartLimitBurst" in settings
    assert settings["LoadCredential"] == [
        "database-password:/etc/walacord/credentials/database-password",
        "walacor-password:/etc/walacord/credentials/walacor-password",
    ]
    assert settings["SystemCallFilter"][0] == "@system-service"


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers absent")
def test_sysusers_creates_walacord_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()

    result = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)],
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 0, result.stderr
    passwd = (tmp_path / "etc/passwd").read_text()
    assert re.search(r"^walacord:x:\d+:\d+:[^:]*:/var/lib/walacord:/usr/sbin/nologin$",
                     passwd, re.MULTILINE), passwd
    assert re.search(r"^walacord:x:\d+:", (tmp_path / "etc/group").read_text(), re.MULTILINE)


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="systemd-tmpfiles absent")
@pytest.mark.skipif(os.geteuid() != 0, reason="tmpfiles sets owners, which needs root")
def test_tmpfiles_creates_directories(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)], check=True, timeout=60
    )

    result = subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(TMPFILES)],
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    modes = {
        "var/lib/walacord": 0o750,
        "var/lib/walacord/backups": 0o750,
        "var/log/walacord": 0o750,
        "etc/walacord/credentials": 0o700,
    }
    for path, mode in modes.items():
        assert (tmp_path / path).stat().st_mode & 0o777 == mode, path
