"""Validation of operations as the control channel receives them."""

from __future__ import annotations

import pytest

from tests.outbox.conftest import INSERT_ROW
from walacord.errors import OutboxInvalidOperation
from walacord.outbox.model import parse_operation, statement_parameters

STATEMENTS = {"insert_row": INSERT_ROW}


def parse(raw: object, max_bytes: int = 1024) -> object:
    return parse_operation(raw, statements=STATEMENTS, max_bytes=max_bytes)


@pytest.mark.parametrize(("raw", "field", "words"), [
    ([], "operation", "JSON object"),
    ({"sink": "kafka", "key": "k"}, "sink", "unknown sink 'kafka'"),
    ({"sink": "walacor", "etid": 10001, "data": {}}, "key", "missing idempotency key"),
    ({"sink": "walacor", "key": "", "etid": 10001, "data": {}}, "key", "missing"),
    ({"sink": "walacor", "key": "k" * 300, "etid": 1, "data": {}}, "key", "maximum is 256"),
    ({"sink": "walacor", "key": "k", "etid": "x", "data": {}}, "etid", "positive integer"),
    ({"sink": "walacor", "key": "k", "data": {}}, "etid", "missing ETId"),
    ({"sink": "walacor", "key": 5, "etid": 1, "data": {}}, "key",
     'key is int 5; pass it as a string, e.g. "5"'),
    ({"sink": "postgres", "key": "k", "statement": "insert_row", "data": {"amount": 1}},
     "params", "this operation has 'data', but a postgres operation carries it in 'params'"),
    ({"sink": "walacor", "key": "k", "etid": 10001}, "data", "missing payload"),
    ({"sink": "walacor", "key": "k", "etid": 10001, "data": "{not json"}, "data",
     "got a string that is not JSON"),
    ({"sink": "walacor", "key": "k", "etid": 10001, "data": [1, 2]}, "data", "JSON object"),
    ({"sink": "walacor", "key": "k", "etid": 10001, "data": {"x": "y" * 2000}}, "data",
     "maximum is 1024"),
    ({"sink": "postgres", "key": "k", "params": {}}, "statement", "missing statement"),
    ({"sink": "postgres", "key": "k", "statement": "drop_all", "params": {}}, "statement",
     "unknown statement 'drop_all'"),
    ({"sink": "postgres", "key": "k", "statement": "insert_row", "params": {},
      "ordering_key": 5}, "ordering_key", "non-empty string"),
    ({"sink": "postgres", "key": "k", "statement": "insert_row", "params": {}}, "params",
     "missing parameter(s) amount that statement 'insert_row' needs"),
    ({"sink": "postgres", "key": "k", "statement": "insert_row",
      "params": {"key": "other", "amount": 1}}, "params.key",
     "params.key is 'other' but the operation's key is 'k'"),
    ({"sink": "walacor", "key": "k", "etid": 10001, "data": {}, "ordering_kye": "a"},
     "ordering_kye", "unknown field 'ordering_kye'; a walacor operation has data, etid, "
                     "key, ordering_key, sink"),
    ({"sink": "walacor", "key": "k", "etid": 10001,
      "data": {"lines": [{"amount": 1.2345678901234568e+29}]}},
     "data.lines[0].amount", "too large to store exactly"),
    ({"sink": "walacor", "key": "k", "etid": 10001, "data": "{\"amount\": -1e19}"},
     "data.amount", "Send it as a string"),
    ({"sink": "walacor", "key": "k", "etid": 10001,
      "data": '{"amount": 1234567890123456.78}'}, "data",
     "the number 1234567890123456.78 has more significant digits"),
    # NUL: PostgreSQL text cannot store it, so no retry could ever apply the operation.
    ({"sink": "postgres", "key": "nul\0key", "statement": "insert_row",
      "params": {"amount": 1}}, "key", "key 'nul\\x00key' contains the character U+0000"),
    ({"sink": "postgres", "key": "k", "statement": "insert_row",
      "params": '{"amount": 1, "notes": ["ok", "a\\u0000b"]}'}, "params.notes[1]",
     "contains the character U+0000 (NUL), which PostgreSQL text cannot store"),
    ({"sink": "postgres", "key": "k", "statement": "insert_row",
      "params": {"amount": 1, "x\0": 2}}, "params", "U+0000"),
    # The walacor sink writes the key into this field, so another value would be lost.
    ({"sink": "walacor", "key": "t1", "etid": 10001,
      "data": {"amount": 2, "walacord_key": "zzz"}}, "data.walacord_key",
     "data.walacord_key is 'zzz' but the operation's key is 't1'; walacord stores the "
     "operation's key in the record's 'walacord_key' field ([walacor] key_field), so omit "
     "it from data or give the same value"),
])
def test_parse_operation_names_field(raw: object, field: str, words: str) -> None:
    with pytest.raises(OutboxInvalidOperation) as caught:
        parse(raw)
    assert caught.value.field == field
    assert words in str(caught.value)
    assert str(caught.value).startswith(f"{field}: ")


def test_parse_operation_keeps_64_bit_numbers() -> None:
    operation = parse({"sink": "walacor", "key": "k", "etid": 10001,
                       "data": {"max": 2**64 - 1, "min": -(2**63), "rate": 1.5e18}})
    assert operation.payload == b'{"max":18446744073709551615,"min":-9223372036854775808,' \
                                b'"rate":1.5e+18}'


def test_parse_operation_accepts_both_forms() -> None:
    walacor = parse_operation({"sink": "walacor", "etid": 10001, "key": "a",
                               "data": '{"amount": 5}', "ordering_key": "acct-1"},
                              statements=STATEMENTS, max_bytes=1024)
    postgres = parse_operation({"sink": "postgres", "statement": "insert_row", "key": "b",
                                "params": {"key": "b", "amount": 2}},
                               statements=STATEMENTS, max_bytes=1024)
    assert (walacor.sink, walacor.target, walacor.payload) == ("walacor", "10001",
                                                               b'{"amount":5}')
    assert walacor.ordering_key == "acct-1"
    assert (postgres.sink, postgres.target) == ("postgres", "insert_row")
    assert postgres.payload == b'{"key":"b","amount":2}'


def test_parse_operation_key_fills_key_parameter() -> None:
    operation = parse({"sink": "postgres", "statement": "insert_row", "key": "p1",
                       "params": {"amount": 5}})
    assert operation.payload == b'{"amount":5}'


@pytest.mark.parametrize(("sql", "names"), [
    ("INSERT INTO t VALUES (%(key)s, %(amount)s)", {"key", "amount"}),
    ("SELECT %(raw)b, %(text)t, %(key)s, %(key)s", {"raw", "text", "key"}),
    ("SELECT '100%%(x)s', %(y)s", {"y"}),
    ("SELECT 1", set()),
])
def test_statement_parameters_finds_placeholders(sql: str, names: set[str]) -> None:
    assert statement_parameters(sql) == names


def test_parse_accepts_escapes_and_own_key() -> None:
    """A literal backslash-u0000 text is not NUL, a walacor record may repeat its own key,
    and a NUL is fine in a walacor record, which PostgreSQL never receives."""
    postgres = parse({"sink": "postgres", "key": "k", "statement": "insert_row",
                      "params": {"amount": 1, "note": "\\u0000"}})
    assert postgres.payload == b'{"amount":1,"note":"\\\\u0000"}'
    walacor = parse({"sink": "walacor", "key": "t1", "etid": 10001,
                     "data": {"walacord_key": "t1", "note": "a\0b"}})
    assert walacor.payload == b'{"walacord_key":"t1","note":"a\\u0000b"}'
    renamed = parse_operation({"sink": "walacor", "key": "t1", "etid": 10001,
                               "data": {"walacord_key": "other"}},
                              statements=STATEMENTS, max_bytes=1024, key_field="record_key")
    assert renamed.payload == b'{"walacord_key":"other"}'
