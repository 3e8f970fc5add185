"""Fingerprints and label matchers."""

from __future__ import annotations

import pytest

from walacord.alerts.model import Matcher, fingerprint, parse_matchers


def test_fingerprint_ignores_label_order() -> None:
    a = fingerprint({"alertname": "X", "probe": "database", "severity": "critical"})
    b = fingerprint({"severity": "critical", "probe": "database", "alertname": "X"})

    assert a == b
    assert len(a) == 16


def test_fingerprint_separates_values() -> None:
    assert fingerprint({"a": "bc"}) != fingerprint({"ab": "c"})


@pytest.mark.parametrize(("text", "expected"), [
    ("alertname=WalacordProbeDown", [Matcher("alertname", "=", "WalacordProbeDown")]),
    ('{probe="database", severity!="info"}',
     [Matcher("probe", "=", "database"), Matcher("severity", "!=", "info")]),
    ('probe=~"data.*"', [Matcher("probe", "=~", "data.*")]),
    ('event="a,b"', [Matcher("event", "=", "a,b")]),
    ('event="a\\"b"', [Matcher("event", "=", 'a"b')]),
])
def test_parse_matchers_valid(text: str, expected: list[Matcher]) -> None:
    assert parse_matchers(text) == expected


@pytest.mark.parametrize("text", ["", "{}", "probe", "=x", 'probe=~"("', 'probe="',
                                  'probe="database', 'probe=data"base'])
def test_parse_matchers_invalid(text: str) -> None:
    with pytest.raises(ValueError, match=r"invalid|empty"):
        parse_matchers(text)


@pytest.mark.parametrize("text", ['event="a\\"b"', 'probe=~"data\\\\.base"', "probe=db"])
def test_matcher_text_parses_back(text: str) -> None:
    matcher = parse_matchers(text)[0]

    assert parse_matchers(str(matcher)) == [matcher]


@pytest.mark.parametrize(("matcher", "labels", "expected"), [
    ("probe=database", {"probe": "database"}, True),
    ("probe=database", {"probe": "databases"}, False),
    ("probe!=database", {"probe": "walacor"}, True),
    ("probe=~data", {"probe": "database"}, False),  # anchored, as in Alertmanager
    ("probe=~data.*", {"probe": "database"}, True),
    ("probe!~data.*", {"probe": "walacor"}, True),
    ("resource=", {"probe": "x"}, True),  # an absent label matches the empty string
])
def test_matcher_matches(matcher: str, labels: dict[str, str], expected: bool) -> None:
    assert parse_matchers(matcher)[0].matches(labels) is expected


def test_unclosed_quote_named() -> None:
    with pytest.raises(ValueError, match="a quote is not closed"):
        parse_matchers('probe="walacor')
