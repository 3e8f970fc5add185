"""A key repeated in one JSON object is found, not silently dropped."""

from __future__ import annotations

import orjson
import pytest

from walacord.control.protocol import decode_request
from walacord.errors import OutboxInvalidOperation
from walacord.jsonkeys import duplicate_key
from walacord.outbox.model import parse_operation


@pytest.mark.parametrize(("document", "key"), [
    (b'{"amount": 10, "amount": 1000}', "amount"),
    (b'{"at": "12:00:00", "data": {"a": 1, "b": "x:y", "a": 2}}', "a"),
    (b'[{"k": 1}, {"k": 1, "k": 1}]', "k"),
    (b'{"caf\\u00e9": 1, "caf\xc3\xa9": 2}', "caf\u00e9"),
    (b'{"q\\"": 1, "q\\"": 2}', 'q"'),
])
def test_repeated_key_named(document: bytes, key: str) -> None:
    problem = duplicate_key(document, orjson.loads(document))

    assert problem is not None
    assert problem.startswith(f"the key {key!r} appears twice in one object")
    assert "send each key once" in problem


@pytest.mark.parametrize("document", [
    b'{"amount": 10, "currency": "EUR"}',
    b'{"at": "2026-12-05T09:00:00Z", "url": "https://example.com:8443/a"}',
    b'{"a": {"a": {"a": 1}}, "b": [{"a": 1}, {"a": 2}]}',
    b'{"colon\\": key": 1, "other": "::"}',
    b'[1, "two", 3.0, null]',
    b'"just a string: with a colon"',
    b'{}',
])
def test_distinct_keys_pass(document: bytes) -> None:
    assert duplicate_key(document, orjson.loads(document)) is None


def test_long_key_is_cut() -> None:
    key = "k" * 500
    document = orjson.dumps({key: 1})[:-1] + b',"' + key.encode() + b'":2}'

    problem = duplicate_key(document, orjson.loads(document))

    assert problem is not None
    assert len(problem) < 200
    assert "k" * 57 + "..." in problem


def test_str_document_accepted() -> None:
    assert duplicate_key('{"a": 1, "a": 2}', {"a": 2}) is not None


def test_request_with_repeated_key_is_rejected() -> None:
    line = (b'{"id": 7, "method": "outbox.enqueue", "version": 1, "params": {"sink": '
            b'"walacor", "etid": 1, "key": "k", "key": "k2", "data": {"amount": 1}}}')
    request = decode_request(line)

    assert request.error is not None
    assert request.id == 7
    assert "the key 'key' appears twice in one object" in request.error.message


def test_string_payload_with_repeated_key_is_rejected() -> None:
    with pytest.raises(OutboxInvalidOperation) as caught:
        parse_operation({"sink": "walacor", "etid": 1, "key": "k",
                         "data": '{"amount": 1, "amount": 2}'},
                        statements={}, max_bytes=1024)

    assert caught.value.field == "data"
    assert "the key 'amount' appears twice" in str(caught.value)
