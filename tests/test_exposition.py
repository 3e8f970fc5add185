"""TextExposition against prometheus_client's generate_latest, render after render."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Enum, Gauge, Info, Summary, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
    StateSetMetricFamily,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector

from walacord.exposition import TextExposition
from walacord.metrics import Metrics


class OddSeries(Collector):
    """Series that need escaping, timestamps, special values and split-off families."""

    def __init__(self) -> None:
        self.value = 1.0

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("odd_gauge", 'Help with \\ and\nnewline and "quotes".',
                                  labels=["a", "b"])
        gauge.add_metric(['x"y', "back\\slash\nnewline"], self.value)
        gauge.add_metric(["ü", ""], -0.0)
        gauge.add_metric(["zero", "stamped"], 0.0, timestamp=1234.5678)
        gauge.add_metric(["nan", "nan"], float("nan"))
        gauge.add_metric(["inf", "inf"], float("inf"))
        gauge.add_metric(["big", "big"], 12345678901.0)
        gauge.add_metric(["int", "int"], 7)
        yield gauge
        yield CounterMetricFamily("odd_counter", "Counter with a created time.", value=3,
                                  created=100.0)
        yield GaugeHistogramMetricFamily("odd_gauge_histogram", "Gauge histogram.",
                                         buckets=[("1.0", 2), ("+Inf", 3)], gsum_value=4.5)
        yield StateSetMetricFamily("odd_state", "State set.", {"on": True, "off": False})
        yield UnknownMetricFamily("odd_unknown", "Unknown type.", value=self.value)
        dotted = Metric("odd.dotted-name", "Name outside the legacy character set.", "gauge")
        dotted.add_sample("odd.dotted-name", {"label.name": "v"}, self.value)
        yield dotted
        yield GaugeMetricFamily("odd_empty", "A family with no samples.", labels=["x"])


def assert_same_as_generate_latest(registry: CollectorRegistry,
                                   exposition: TextExposition) -> None:
    rendered = exposition.render().decode()
    expected = generate_latest(registry).decode()
    different = [(got, want) for got, want in
                 zip(rendered.splitlines(), expected.splitlines(), strict=False) if got != want]
    assert different == []
    assert rendered == expected


def test_exposition_matches_daemon_metrics() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    exposition = TextExposition(registry)

    for step in range(4):
        metrics.mode.labels(mode="normal").set(step % 2)
        metrics.up.set(step)
        metrics.probe_duration.labels(probe="database").observe(0.003 * step)
        metrics.probe_failures.labels(probe=f"probe{step}", reason="timeout").inc()
        metrics.outbox_oldest_pending_age.set(0.1 * step)

        assert_same_as_generate_latest(registry, exposition)


def test_exposition_matches_odd_series() -> None:
    registry = CollectorRegistry()
    odd = OddSeries()
    registry.register(odd)
    Info("odd_build", "Info metric.", registry=registry).info({"version": "1"})
    Enum("odd_enum", "Enum metric.", states=["a", "b"], registry=registry).state("b")
    Summary("odd_summary", "Summary metric.", ["l"], registry=registry).labels("x").observe(2)
    exposition = TextExposition(registry)

    for value in (1.0, 2.0, -0.0, 0.0, float("nan"), 1e20, 1e20):
        odd.value = value

        assert_same_as_generate_latest(registry, exposition)


def test_exposition_forgets_removed_series() -> None:
    registry = CollectorRegistry()
    gauge = Gauge("churn", "Series that come and go.", ["id"], registry=registry)
    exposition = TextExposition(registry)

    for index in range(50):
        gauge.labels(id=str(index)).set(index)
        exposition.render()
        gauge.remove(str(index))
    gauge.labels(id="0").set(5)
    text = exposition.render().decode()

    assert 'churn{id="0"} 5.0' in text
    assert 'churn{id="49"}' not in text
    # Only the one series left is kept, not the 50 that were exported at some point.
    assert sum(len(family.lines) for family in exposition._families.values()) == 1
