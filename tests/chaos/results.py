"""The chaos results file: each scenario's measured figures and the bounds they must meet.

Every scenario records detection and recovery times in seconds, the mode path it
observed, and how many operations were lost or duplicated. The record is written
first and checked second, so a broken bound still leaves its figures in the file for
`bench/chaos_report.py` to show. The file is JSON:

    {"scenarios": {"NAME": {"detection_s": 0.21, "detection_bound_s": 1.0, ...}}}
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

RESULTS_ENV = "WALACORD_CHAOS_RESULTS"


@dataclass
class ScenarioResult:
    """One scenario's figures, its bounds and the mode path it expects."""

    scenario: str
    description: str = ""
    detection_s: float | None = None
    detection_bound_s: float | None = None
    recovery_s: float | None = None
    recovery_bound_s: float | None = None
    mode_path: list[str] = field(default_factory=list)
    expected_path: list[str] = field(default_factory=list)
    # Other paths that also pass, such as recovery that steps down through degraded.
    also_accepted: list[list[str]] = field(default_factory=list)
    # None means the scenario did not count operations.
    lost: int | None = None
    duplicated: int | None = None
    notes: str = ""
    recorded_at: str = ""
    failures: list[str] = field(default_factory=list)

    def check(self) -> list[str]:
        """Return one sentence for each broken bound; an empty list means it passed."""
        failures = []
        failures += _check_time("detection", self.detection_s, self.detection_bound_s)
        failures += _check_time("recovery", self.recovery_s, self.recovery_bound_s)
        accepted = [self.expected_path, *self.also_accepted]
        if self.expected_path and self.mode_path not in accepted:
            expected = " or ".join(" -> ".join(path) for path in accepted)
            failures.append(f"mode path was {' -> '.join(self.mode_path) or '(none)'}, "
                            f"expected {expected}")
        if self.lost:
            failures.append(f"{self.lost} acknowledged operations were lost")
        if self.duplicated:
            failures.append(f"{self.duplicated} operations were applied more than once")
        return failures


def _check_time(name: str, measured: float | None, bound: float | None) -> list[str]:
    if bound is None:
        return []
    if measured is None:
        return [f"{name} was not observed within the scenario (bound {bound:g} s)"]
    if measured > bound:
        return [f"{name} took {measured:.3f} s, above the bound of {bound:g} s"]
    return []


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load(path: Path) -> dict[str, Any]:
    """Read a results file; a missing file is an empty one."""
    try:
        document = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return {"scenarios": {}}
    document.setdefault("scenarios", {})
    return dict(document)


class ResultsFile:
    """A JSON results file that scenarios add to, safe against concurrent writers."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def write(self, result: ScenarioResult) -> None:
        """Store `result` under its scenario name, replacing an earlier run of it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path):
            document = load(self.path)
            document["machine"] = {
                "uname": " ".join(platform.uname()),
                "nproc": os.cpu_count(),
            }
            document["scenarios"][result.scenario] = asdict(result)
            handle, temporary = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
            with os.fdopen(handle, "wb") as out:
                out.write(orjson.dumps(document, option=orjson.OPT_INDENT_2))
            os.replace(temporary, self.path)

    def record(self, scenario: str, *, description: str = "",
               detection_s: float | None = None, detection_bound_s: float | None = None,
               recovery_s: float | None = None, recovery_bound_s: float | None = None,
               mode_path: Sequence[str] = (), expected_path: Sequence[str] = (),
               also_accepted: Sequence[Sequence[str]] = (),
               lost: int | None = None, duplicated: int | None = None,
               notes: str = "") -> ScenarioResult:
        """Write the scenario's figures, then raise AssertionError if a bound is broken."""
        result = ScenarioResult(
            scenario=scenario, description=description,
            detection_s=_rounded(detection_s), detection_bound_s=detection_bound_s,
            recovery_s=_rounded(recovery_s), recovery_bound_s=recovery_bound_s,
            mode_path=list(mode_path), expected_path=list(expected_path),
            also_accepted=[list(path) for path in also_accepted],
            lost=lost, duplicated=duplicated, notes=notes,
            recorded_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        result.failures = result.check()
        self.write(result)
        if result.failures:
            raise AssertionError(f"scenario {scenario}: " + "; ".join(result.failures))
        return result


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def default_path(base: Path) -> Path:
    """Return the results path: $WALACORD_CHAOS_RESULTS, else a file under `base`."""
    configured = os.environ.get(RESULTS_ENV)
    return Path(configured) if configured else base / "chaos-results.json"
