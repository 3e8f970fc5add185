"""Fingerprints and label matchers."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from walacord.alerts.model import (
    Matcher,
    Silence,
    contradicting_pairs,
    fingerprint,
    parse_matchers,
)


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


def test_regex_matcher_linear_time() -> None:
    # Python's backtracking re needs several seconds of CPU for this value, and each
    # further "a" doubles that. RE2 takes microseconds.
    matcher = parse_matchers('event=~"(a+)+$"')[0]
    started = time.process_time()

    matched = matcher.matches({"event": "a" * 27 + "b"})

    assert matched is False
    assert time.process_time() - started < 0.5


@pytest.mark.parametrize("pattern", [r"(a)\1", "(?=data)base", "(?<!data)base", "a++"])
def test_parse_matchers_rejects_non_re2(pattern: str) -> None:
    quoted = pattern.replace("\\", "\\\\")
    with pytest.raises(ValueError, match="RE2 syntax") as caught:
        parse_matchers(f'probe=~"{quoted}"')

    assert repr(pattern) in str(caught.value)


def test_matcher_accepts_re2_syntax() -> None:
    # \pL (any letter) is RE2 and Go syntax that Python's re rejects.
    matcher = parse_matchers(r'probe=~"\\pL+"')[0]

    assert matcher.matches({"probe": "database"}) is True
    assert matcher.matches({"probe": "db1"}) is False


def test_regex_matcher_keeps_full_match() -> None:
    matcher = parse_matchers('probe=~"data|walacor"')[0]

    assert matcher.matches({"probe": "data"}) is True
    assert matcher.matches({"probe": "walacor"}) is True
    assert matcher.matches({"probe": "database"}) is False
    assert matcher.matches({"probe": "xwalacor"}) is False


def test_regex_matcher_counts_characters() -> None:
    # "." is one character, so it matches the two UTF-8 bytes of "é".
    matcher = parse_matchers('event=~"d.sque"')[0]

    assert matcher.matches({"event": "dísque"}) is True
    assert matcher.matches({"event": "dsque"}) is False
    assert parse_matchers('event!~"caf."')[0].matches({"event": "café"}) is False


def test_matcher_imports_re2_lazily() -> None:
    script = (
        "import sys\n"
        "from walacord.alerts.model import parse_matchers\n"
        "parse_matchers('probe=database,alertname!=X')\n"
        "print('re2' in sys.modules)\n"
        "parse_matchers('probe=~\"data.*\"')\n"
        "print('re2' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, check=False)

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]


@pytest.mark.parametrize(("reason", "named"), [
    ("disk swap \x1b[2J\x1b]0;owned\x07", "'\\x1b' (U+001B) at position 10"),
    ("line one\nline two", "'\\n' (U+000A) at position 8"),
    ("tab\there", "'\\t' (U+0009) at position 3"),
    ("c1 \x9b31m", "'\\x9b' (U+009B) at position 3"),
    ("bidi \u202egnp.exe", "'\\u202e' (U+202E) at position 5"),
])
def test_silence_rejects_control_characters(reason: str, named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"invalid reason: control character {named}")):
        Silence.create(parse_matchers("probe=walacor"), 60, reason, 0.0)


# Characters that print nothing or change how the rest of the text displays, so a
# matcher that contains one looks right and never matches.
INVISIBLE_CHARACTERS = [
    ("\u200b", "U+200B (ZERO WIDTH SPACE)"),
    ("\u200d", "U+200D (ZERO WIDTH JOINER)"),
    ("\u2060", "U+2060 (WORD JOINER)"),
    ("\ufeff", "U+FEFF (ZERO WIDTH NO-BREAK SPACE)"),
    ("\u00ad", "U+00AD (SOFT HYPHEN)"),
    ("\u2028", "U+2028 (LINE SEPARATOR)"),
    ("\u2029", "U+2029 (PARAGRAPH SEPARATOR)"),
    ("\u034f", "U+034F (COMBINING GRAPHEME JOINER)"),
    ("\u3164", "U+3164 (HANGUL FILLER)"),
    ("\ufe0f", "U+FE0F (VARIATION SELECTOR-16)"),
    ("\U000e0041", "U+E0041 (TAG LATIN CAPITAL LETTER A)"),
]


@pytest.mark.parametrize(("character", "named"), INVISIBLE_CHARACTERS)
def test_silence_reason_rejects_invisible(character: str, named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(
            f"invalid reason: invisible character {named} at position 4")):
        Silence.create(parse_matchers("probe=walacor"), 60, f"disk{character} swap", 0.0)


@pytest.mark.parametrize("reason", [
    "done \u2764\ufe0f", "\U0001f469\U0001f3fd\u200d\U0001f4bb on call",
    "\U0001f3f3\ufe0f\u200d\U0001f308 pride week", "fixed \u2705\ufe0e",
    "step 1\ufe0f\u20e3 and #\ufe0f\u20e3", "\u203c\ufe0f urgent", "\u2139\ufe0f note",
    "\u2194\ufe0f swap", "\u303d\ufe0f", "\u2934\ufe0f up",
    "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f match",
])
def test_silence_reason_accepts_emoji(reason: str) -> None:
    silence = Silence.create(parse_matchers("probe=walacor"), 60, reason, 0.0)
    assert silence.reason == reason


@pytest.mark.parametrize("reason", [
    "step 1\ufe0f done", "tag \U000e0067 alone", "flag\U000e0067", "digit 1\u200d2",
    "a\ufe0f letter", "double \u2764\ufe0f\ufe0f", "space \ufe0f", "mark e\u0301\ufe0f",
    # Tag runs that are not a flag could hide text.
    "\U0001f3f4" + "".join(chr(0xE0000 + ord(c)) for c in "drop the database") + " x",
    "\U0001f3f4\U000e0067\U000e0062\U000e007f\U000e0041\U000e0042",
    "\U0001f3f4\U000e007f", "\U0001f3f4\U000e0067\U000e0062 no cancel tag",
])
def test_silence_reason_rejects_stray_emoji_parts(reason: str) -> None:
    with pytest.raises(ValueError, match="invalid reason: invisible character"):
        Silence.create(parse_matchers("probe=walacor"), 60, reason, 0.0)


@pytest.mark.parametrize("character", ["\u200d", "\ufe0f"])
def test_matcher_rejects_emoji_joiner(character: str) -> None:
    with pytest.raises(ValueError, match="invalid matcher: invisible character"):
        parse_matchers(f'probe="\u2764{character}"')


@pytest.mark.parametrize(("character", "named"), INVISIBLE_CHARACTERS)
def test_matcher_rejects_invisible(character: str, named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(
            f"invalid matcher: invisible character {named} at position 15")):
        parse_matchers(f'probe="database{character}"')


@pytest.mark.parametrize("reason", [
    "planned maintenance", "Wartung der Datenbank", "メンテナンス", "café ✓ 🔧",
    "نافذة الصيانة", "x" * 1000,
])
def test_silence_accepts_visible_text(reason: str) -> None:
    silence = Silence.create(parse_matchers(f'probe="{reason[:20]}"'), 60, reason, 0.0)
    assert silence.reason == reason


def test_silence_reason_length_limit() -> None:
    matchers = parse_matchers("probe=walacor")
    Silence.create(matchers, 60, "x" * 1000, 0.0)

    with pytest.raises(ValueError, match="invalid reason: 1001 characters, over the limit "
                                         "of 1000"):
        Silence.create(matchers, 60, "x" * 1001, 0.0)
    with pytest.raises(ValueError, match="invalid reason: 100000 characters"):
        Silence.create(matchers, 60, "x" * 100_000, 0.0)


def test_silence_creator_checked_like_reason() -> None:
    matchers = parse_matchers("probe=walacor")

    with pytest.raises(ValueError, match="invalid created_by: 1001 characters"):
        Silence.create(matchers, 60, "maintenance", 0.0, "u" * 1001)
    with pytest.raises(ValueError, match="invalid created_by: control character"):
        Silence.create(matchers, 60, "maintenance", 0.0, "uid=0\x1b[2J")


def test_contradicting_pairs_each_pair_once() -> None:
    matchers = parse_matchers('x="a",y="b",x="c",x!~"[ac]",y=~"b"')

    pairs = [(str(first), str(second)) for first, second in contradicting_pairs(matchers)]

    assert pairs == [('x="a"', 'x="c"'), ('x="a"', 'x!~"[ac]"'), ('x="c"', 'x!~"[ac]"')]


@pytest.mark.parametrize(("text", "value"), [
    ('alertname=~"Walacord\\w+"', "Walacord\\w+"),
    ("alertname=~Walacord\\w+", "Walacord\\w+"),
    ('probe=~"a\\.b"', "a\\.b"),
    ('reason="say \\"hi\\""', 'say "hi"'),
    ('path="C:\\\\temp"', "C:\\temp"),
    ("path=C:\\\\temp", "C:\\temp"),
    ('end="a\\\\"', "a\\"),
    ('probe=a\\"b', 'a"b'),
    ('probe=bar\\"', 'bar"'),
    ("probe=bar\\", "bar\\"),
])
def test_matcher_escapes_as_alertmanager(text: str, value: str) -> None:
    """\\" and \\\\ stand for the character, and any other backslash stays."""
    [matcher] = parse_matchers(text)
    assert matcher.value == value
    # The printed form parses back to the same value.
    assert parse_matchers(str(matcher))[0].value == value


def test_matcher_escaped_line_feed_rejected() -> None:
    with pytest.raises(ValueError, match="matchers cannot contain line breaks"):
        parse_matchers('probe="a\\nb"')


def test_regex_matcher_keeps_backslash_class() -> None:
    [matcher] = parse_matchers('alertname=~"Walacord\\w+"')
    assert matcher.matches({"alertname": "WalacordProbeDown"})
    assert not matcher.matches({"alertname": "Walacord-1"})
