"""The chaos results file and its bound checks."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.chaos.results import RESULTS_ENV, ResultsFile, default_path


def read(path: Path) -> dict:
    return orjson.loads(path.read_bytes())


def test_record_writes_passing_scenario(tmp_path: Path) -> None:
    results = ResultsFile(tmp_path / "results.json")
    results.record("pg_immediate_stop", detection_s=0.21234567, detection_bound_s=1.0,
                   recovery_s=0.8, recovery_bound_s=3.0,
                   mode_path=["normal", "emergency", "normal"],
                   expected_path=["normal", "emergency", "normal"])

    stored = read(tmp_path / "results.json")["scenarios"]["pg_immediate_stop"]
    assert stored["detection_s"] == 0.2123
    assert stored["recovery_bound_s"] == 3.0
    assert stored["failures"] == []
    assert stored["lost"] is None


def test_record_fails_and_keeps_broken_bound(tmp_path: Path) -> None:
    results = ResultsFile(tmp_path / "results.json")
    with pytest.raises(AssertionError, match=r"detection took 2\.500 s, above the bound of 1 s"):
        results.record("slow", detection_s=2.5, detection_bound_s=1.0)

    stored = read(tmp_path / "results.json")["scenarios"]["slow"]
    assert stored["failures"] == ["detection took 2.500 s, above the bound of 1 s"]


def test_record_fails_on_unobserved_recovery(tmp_path: Path) -> None:
    results = ResultsFile(tmp_path / "results.json")
    with pytest.raises(AssertionError, match="recovery was not observed"):
        results.record("stuck", recovery_s=None, recovery_bound_s=3.0)


def test_record_fails_on_wrong_mode_path(tmp_path: Path) -> None:
    results = ResultsFile(tmp_path / "results.json")
    with pytest.raises(AssertionError, match="mode path was normal -> offline"):
        results.record("path", mode_path=["normal", "offline"],
                       expected_path=["normal", "emergency"])


def test_record_accepts_alternative_path(tmp_path: Path) -> None:
    results = ResultsFile(tmp_path / "results.json")
    results.record("stepped", mode_path=["normal", "emergency", "degraded", "normal"],
                   expected_path=["normal", "emergency", "normal"],
                   also_accepted=[["normal", "emergency", "degraded", "normal"]])

    with pytest.raises(AssertionError, match="or normal -> emergency -> degraded -> normal"):
        results.record("other", mode_path=["normal", "offline", "normal"],
                       expected_path=["normal", "emergency", "normal"],
                       also_accepted=[["normal", "emergency", "degraded", "normal"]])


def test_record_fails_on_lost_and_duplicated(tmp_path: Path) -> None:
    results = ResultsFile(tmp_path / "results.json")
    with pytest.raises(AssertionError) as raised:
        results.record("outbox", lost=2, duplicated=1)

    assert "2 acknowledged operations were lost" in str(raised.value)
    assert "1 operations were applied more than once" in str(raised.value)


def test_record_keeps_other_scenarios(tmp_path: Path) -> None:
    results = ResultsFile(tmp_path / "results.json")
    results.record("first", detection_s=0.1)
    results.record("second", detection_s=0.2)
    results.record("first", detection_s=0.3)

    scenarios = read(tmp_path / "results.json")["scenarios"]
    assert sorted(scenarios) == ["first", "second"]
    assert scenarios["first"]["detection_s"] == 0.3


def test_default_path_reads_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RESULTS_ENV, raising=False)
    assert default_path(tmp_path) == tmp_path / "chaos-results.json"

    monkeypatch.setenv(RESULTS_ENV, str(tmp_path / "elsewhere.json"))
    assert default_path(tmp_path) == tmp_path / "elsewhere.json"
