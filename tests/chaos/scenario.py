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


@dataclass
class Scenario:
    """The daemon, its mode watcher and the measurements of one fault."""

    daemon: WalacordDaemon
    watcher: ModeWatcher
    metrics_latencies: list[float] = field(default_factory=list)

    @staticmethod
    def mark() -> float:
        return time.monotonic()

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
