"""Numbers that would change on their way through walacord are found before they do."""

from __future__ import annotations

import pytest

from walacord.control.protocol import decode_request
from walacord.numbers import inexact_number


@pytest.mark.parametrize(("document", "number"), [
    (b'{"amount": 1234567890123456.78}', "1234567890123456.78"),
    (b'{"amount": 0.1000000000000000055511151231257827}',
     "0.1000000000000000055511151231257827"),
    (b'{"n": [1, 9223372036854775808]}', "9223372036854775808"),
    (b'{"n": -9223372036854775809}', "-9223372036854775809"),
    (b'{"n": 1e400}', "1e400"),
])
def test_inexact_numbers_are_named(document: bytes, number: str) -> None:
    problem = inexact_number(document)
    assert problem is not None
    assert problem.startswith(f"the number {number} ")
    assert "send amounts like this one as strings" in problem


@pytest.mark.parametrize("document", [
    b'{"amount": 12.5, "account": "DE89370400440532013000"}',
    b'{"note": "paid 12345678901234567890 units"}',
    b'{"max": 9223372036854775807, "min": -9223372036854775808}',
    b'{"a": 0.30000000000000004, "b": 1.50, "c": 1e-7, "d": 1.5e300}',
    b'not json 1234567890123456.78',
])
def test_exact_numbers_pass(document: bytes) -> None:
    assert inexact_number(document) is None


def test_request_with_inexact_number_is_rejected() -> None:
    line = (b'{"id": 7, "method": "outbox.enqueue", "version": 1, "params": {"sink": '
            b'"walacor", "etid": 1, "key": "k", "data": {"amount": 1234567890123456.78}}}')
    request = decode_request(line)

    assert request.error is not None
    assert request.id == 7
    assert "the number 1234567890123456.78" in request.error.message
