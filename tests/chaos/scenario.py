"""A running walacord daemon under test, with the clocks and probes a scenario measures.

A scenario injects a fault, then queries this object for when the daemon's mode left
normal (detection), when it came back (recovery) and which modes it went through.
Times are monotonic seconds from the moment the scenario took with `mark()`.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from tests.chaos.daemon import ModeWatcher, WalacordDaemon


@dataclass(frozen=True)
class Bounds:
    """The maximum seconds a scenario may take to detect its fault and to recover."""

    detection: float
    recovery: float


@dataclass
class Fault:
    """One fault's timeline, from `Scenario.fault()` on: detection, then recovery.

    `began` is taken before the fault is injected and `removed` when `wait_recovered`
    is called, just after the test removed the fault, so both figures err long.
    """

    scenario: Scenario
    began: float
    detection: float | None = None
    removed: float | None = None
    recovery: float | None = None

    def wait_detected(self, timeout: float = 15.0,
                      accept: str | Callable[[str], bool] = lambda mode: mode != "normal"
                      ) -> float | None:
        """Wait for a mode matching `accept` (default: not normal); return the seconds."""
        self.detection = self.scenario.detect(self.began, timeout, accept)
        return self.detection

    def wait_recovered(self, timeout: float = 20.0) -> float | None:
        """Mark the fault removed, wait for mode normal and return the seconds."""
        self.removed = self.scenario.mark()
        self.recovery = self.scenario.recover(self.removed, timeout)
        return self.recovery

    def path(self) -> list[str]:
        return self.scenario.path(self.began)

    def measured(self, bounds: Bounds) -> dict[str, Any]:
        """Return the figures and bounds as keyword arguments of `ResultsFile.record`."""
        return {"detection_s": self.detection, "detection_bound_s": bounds.detection,
                "recovery_s": self.recovery, "recovery_bound_s": bounds.recovery,
                "mode_path": self.path()}


@dataclass
class Scenario:
    """The daemon, its mode watcher and the measurements of one fault."""

    daemon: WalacordDaemon
    watcher: ModeWatcher
    metrics_latencies: list[float] = field(default_factory=list)

    @staticmethod
    def mark() -> float:
        return time.monotonic()

    def fault(self) -> Fault:
        """Start a fault's timeline now; inject the fault right after."""
        return Fault(self, self.mark())

    def wait_normal(self, timeout: float = 30.0) -> None:
        """Wait until the daemon is in mode normal, for a clean start of the fault."""
        seen = self.watcher.wait_for("normal", since=0.0, timeout=timeout)
        deadline = time.monotonic() + timeout
        while self.watcher.current() != "normal" and time.monotonic() < deadline:
            time.sleep(0.01)
        if seen is None or self.watcher.current() != "normal":
            raise AssertionError(f"walacord did not reach mode normal within {timeout}s; "
                                 f"health: {self.health_summary()}")

    def detect(self, since: float, timeout: float,
               accept: str | Callable[[str], bool] = lambda mode: mode != "normal"
               ) -> float | None:
        """Return seconds from `since` until a mode matching `accept` (default: not
        normal) was first seen, or None when it was not seen within `timeout`."""
        seen = self.watcher.wait_for(accept, since=since, timeout=timeout)
        return None if seen is None else seen.monotonic - since

    def recover(self, since: float, timeout: float) -> float | None:
        """Return seconds from `since` until mode normal was seen, or None."""
        return self.detect(since, timeout, "normal")

    def path(self, since: float) -> list[str]:
        return self.watcher.path(since)

    def probe(self, name: str) -> dict[str, Any]:
        """Return one probe's section of /api/health."""
        _, document = self.daemon.health()
        return dict(document.get("probes", {}).get(name, {}))

    def health_summary(self) -> str:
        try:
            status, document = self.daemon.health()
        except (OSError, ValueError) as exc:
            return f"unavailable ({exc}); stderr:\n{self.daemon.stderr_tail()}"
        probes = {name: (probe.get("state"), probe.get("reason"))
                  for name, probe in document.get("probes", {}).items()}
        return f"{status} mode={document.get('mode')} reason={document.get('reason')!r} " \
               f"probes={probes}"

    def scrape_metrics(self) -> float:
        """GET /metrics once and return its latency; keep it for `metrics_max()`."""
        connection = http.client.HTTPConnection("127.0.0.1", self.daemon.http_port, timeout=5)
        began = time.monotonic()
        try:
            connection.request("GET", "/metrics")
            response = connection.getresponse()
            response.read()
        finally:
            connection.close()
        elapsed = time.monotonic() - began
        if response.status != 200:
            raise AssertionError(f"/metrics answered {response.status}")
        self.metrics_latencies.append(elapsed)
        return elapsed

    def metrics_value(self, name: str, **labels: str) -> float:
        """Return the sum of the /metrics samples called `name` that carry `labels`."""
        status, body = self.daemon.get("/metrics")
        assert status == 200, f"/metrics answered {status}"
        total = 0.0
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == name and all(
                        sample.labels.get(key) == value for key, value in labels.items()):
                    total += sample.value
        return total

    def wait_for_counter(self, name: str, above: float, *, since: float, timeout: float,
                         **labels: str) -> float | None:
        """Return seconds from `since` until the counter rises above `above`, or None."""
        deadline = since + timeout
        while time.monotonic() < deadline:
            if self.metrics_value(name, **labels) > above:
                return time.monotonic() - since
            time.sleep(0.02)
        return None

    def hold(self, seconds: float, every: float = 0.25) -> None:
        """Keep the fault for `seconds` while scraping /metrics every `every` seconds."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.scrape_metrics()
            time.sleep(every)

    def events(self, name: str) -> list[dict[str, Any]]:
        return self.daemon.events(name)

    def document(self) -> dict[str, Any]:
        status, body = self.daemon.get("/api/health")
        return dict(orjson.loads(body), http_status=status)
