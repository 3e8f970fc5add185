"""Prometheus text exposition that formats each series once and then only its value.

prometheus_client's `generate_latest` escapes and validates every metric name, label name
and label value on every scrape, although they only change when a series is new.
`TextExposition` produces the same bytes but keeps the formatted text of each family header
and each sample line between renders. A render then formats only the number of a sample
whose value moved and the whole line of a series it has not seen before. A family usually
returns its series in the same order on each collect, so a sample is first compared (name
and labels) with the line at its own position, and looked up by key only when they differ.

The text it keeps is produced by `generate_latest` itself, applied to one family or one
sample, so names and labels are escaped exactly as the installed prometheus_client does.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

# Samples that the text format moves out of their family into a gauge family of their
# own, in this suffix order after the family's other samples, as generate_latest does.
SPLIT_SUFFIXES = ("_created", "_gsum", "_gcount")


class _OneMetric(Collector):
    """A collector that returns one prepared metric, to format it with generate_latest."""

    def __init__(self, metric: Metric) -> None:
        self.metric = metric

    def collect(self) -> Iterable[Metric]:
        return [self.metric]


def _render_alone(metric: Metric, samples: list[Sample], name: str | None = None,
                  kind: str | None = None) -> str:
    """Return generate_latest's text for a copy of `metric` with other samples or name."""
    alone = copy.copy(metric)
    alone.samples = samples
    if name is not None:
        alone.name = name
    if kind is not None:
        alone.type = kind
    return generate_latest(_OneMetric(alone)).decode("utf-8")


@dataclass
class _Family:
    """Formatted header lines of one metric family and of the families split from it."""

    header: str
    # "_created" -> the HELP and TYPE lines of the gauge family "<name>_created", formatted
    # when the family first has such a sample.
    split_headers: dict[str, str] = field(default_factory=dict)
    # The sample lines of the last render, in the order of the family's samples.
    lines: list[_Line] = field(default_factory=list)

    def split_header(self, metric: Metric, suffix: str) -> str:
        header = self.split_headers.get(suffix)
        if header is None:
            header = _render_alone(metric, [], name=metric.name + suffix, kind="gauge")
            self.split_headers[suffix] = header
        return header


@dataclass
class _Line:
    """Formatted sample line of one series, with the value and timestamp it shows."""

    name: str  # The sample's name and labels, unescaped, to match later samples.
    labels: dict[str, str]
    prefix: str  # Metric name and labels, escaped, without the separating space.
    split_suffix: str | None
    value: float = float("nan")
    timestamp: object = None
    text: str = ""

    def format(self, sample: Sample) -> str:
        value = sample.value
        # 0.0 and -0.0 compare equal but print differently, so a zero also needs the same
        # sign. NaN never compares equal, so it is formatted every time.
        if value == self.value and sample.timestamp == self.timestamp and (
                value != 0 or math.copysign(1, value) == math.copysign(1, self.value)):
            return self.text
        timestamp = ""
        if sample.timestamp is not None:
            # Milliseconds, as generate_latest writes them.
            timestamp = f" {int(float(sample.timestamp) * 1000):d}"
        self.value = value
        self.timestamp = sample.timestamp
        self.text = f"{self.prefix} {floatToGoString(value)}{timestamp}\n"
        return self.text


class TextExposition:
    """Renders a registry in the Prometheus text format, byte for byte as generate_latest.

    Formatted text is kept for the families and series of the last render only, so
    series that stop being exported are forgotten. Not safe for concurrent `render` calls.
    """

    def __init__(self, registry: Collector) -> None:
        self.registry = registry
        self._families: dict[tuple[str, str, str, str], _Family] = {}

    def render(self) -> bytes:
        output: list[str] = []
        families: dict[tuple[str, str, str, str], _Family] = {}
        for metric in self.registry.collect():
            family_key = (metric.name, metric.type, metric.documentation, metric.unit)
            family = self._families.get(family_key) or families.get(family_key)
            if family is None:
                family = _Family(_render_alone(metric, []))
            families[family_key] = family
            output.append(family.header)

            split: dict[str, list[str]] = {}
            previous = family.lines
            by_key: dict[tuple[str, tuple[tuple[str, str], ...]], _Line] | None = None
            lines: list[_Line] = []
            for index, sample in enumerate(metric.samples):
                line = previous[index] if index < len(previous) else None
                if line is None or line.name != sample.name or line.labels != sample.labels:
                    # A series was added or removed before this one, so look it up by key.
                    if by_key is None:
                        by_key = {(old.name, tuple(old.labels.items())): old for old in previous}
                    line = by_key.get((sample.name, tuple(sample.labels.items())))
                    if line is None:
                        line = self._format_line(metric, sample)
                lines.append(line)
                if line.split_suffix is None:
                    output.append(line.format(sample))
                else:
                    split.setdefault(line.split_suffix, []).append(line.format(sample))
            family.lines = lines

            for suffix, texts in sorted(split.items()):
                output.append(family.split_header(metric, suffix))
                output.extend(texts)

        self._families = families
        return "".join(output).encode("utf-8")

    @staticmethod
    def _format_line(metric: Metric, sample: Sample) -> _Line:
        split_suffix = None
        for suffix in SPLIT_SUFFIXES:
            if sample.name == metric.name + suffix:
                split_suffix = suffix
                break
        # Formatted with value 0 and no timestamp, the sample's line is the last line of
        # the output and ends in " 0.0".
        text = _render_alone(metric, [sample._replace(value=0.0, timestamp=None)])
        last = text.rstrip("\n").rpartition("\n")[2]
        return _Line(sample.name, sample.labels, last.removesuffix(" 0.0"), split_suffix)
