"""The bench helpers that write docs/benchmarks.md, and the chaos report renderer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import benchdoc  # noqa: E402
import chaos_report  # noqa: E402


def test_replace_section_appends_then_replaces(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    benchdoc.replace_section("detection", "first", doc)
    benchdoc.replace_section("scrape", "other", doc)
    benchdoc.replace_section("detection", "second", doc)

    text = doc.read_text()
    assert text.startswith("# Benchmarks")
    assert "first" not in text
    assert text.count("<!-- detection:start -->") == 1
    assert text.index("second") < text.index("other")
    assert "<!-- scrape:start -->\nother\n<!-- scrape:end -->" in text


def test_replace_section_keeps_foreign_sections(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- backup:start -->\nbackup figures\n"
                   "<!-- backup:end -->\n")
    benchdoc.replace_section("chaos", "chaos figures", doc)

    text = doc.read_text()
    assert "backup figures" in text
    assert text.index("backup figures") < text.index("chaos figures")


@pytest.mark.parametrize(("fraction", "expected"), [
    (0.0, 1.0), (0.5, 5.5), (0.95, 9.55), (1.0, 10.0),
])
def test_percentile_interpolates(fraction: float, expected: float) -> None:
    values = [float(value) for value in range(10, 0, -1)]
    assert benchdoc.percentile(values, fraction) == pytest.approx(expected)


def test_summary_of_runs() -> None:
    stats = benchdoc.summary([0.3, 0.1, 0.2])
    assert stats["n"] == 3
    assert stats["median"] == pytest.approx(0.2)
    assert stats["max"] == pytest.approx(0.3)


def test_chaos_report_renders_bounds_and_failures() -> None:
    document = {"scenarios": {
        "slow_stop": {"detection_s": 1.5, "detection_bound_s": 1.0, "recovery_s": None,
                      "recovery_bound_s": None, "mode_path": ["normal", "emergency"],
                      "expected_path": ["normal", "emergency"], "lost": None,
                      "duplicated": 0,
                      "failures": ["detection took 1.500 s, above the bound of 1 s"]},
        "fine": {"detection_s": 0.2, "detection_bound_s": 1.0, "mode_path": ["normal"],
                 "expected_path": ["normal"], "failures": []},
    }}
    text = chaos_report.render(document, "bench/run")

    assert "| fine | normal | 0.200 s (<= 1 s) | - |" in text
    assert "| slow_stop | normal -> emergency | 1.500 s (<= 1 s)" in text
    assert "not counted | 0 | FAIL: detection took 1.500 s" in text
    assert "1 of 2 scenarios within bounds." in text


def test_chaos_report_without_results() -> None:
    assert "No scenario results were recorded." in chaos_report.render({}, "bench/run")
