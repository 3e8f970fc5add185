"""Encoding of walacord.client's requests and decoding of walacord's responses.

The control protocol is newline-delimited JSON, one request or response per line.
Encoding checks what orjson would reject or change, so the error names the field.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson

from walacord.errors import ControlError, RequestEncodeError, WalacordError

PROTOCOL_VERSION = 1
# orjson (3.13) rejects lists and objects nested 255 deep, so the search for the
# value it rejected reports a deeper one as nested too deeply.
MAX_JSON_DEPTH = 255


def _check_finite(value: Any, where: str) -> None:
    """Raise RequestEncodeError naming the field when `value` contains NaN or an infinity.

    orjson would send them as null, so the stored payload would differ from the one given.
    """
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise RequestEncodeError(where, f"is {value!r}, which JSON cannot carry; send "
                                     "a number, a string or null instead")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_finite(item, f"{where}[{index}]")


def _find_unencodable(value: Any, where: str, depth: int = 0,
                      parents: tuple[int, ...] = ()) -> RequestEncodeError | None:
    """Return an error naming the first part of `value` that orjson rejects, or None."""
    if isinstance(value, (dict, list, tuple)):
        if id(value) in parents:
            return RequestEncodeError(where, "contains itself, which JSON cannot carry; "
                                      "send a copy without the cycle")
        if depth >= MAX_JSON_DEPTH - 3:  # the request's own levels count too
            path = where if len(where) <= 120 else f"{where[:60]}...{where[-20:]}"
            return RequestEncodeError(path, "nests lists or objects more deeply than JSON "
                                      f"encoding allows (about {MAX_JSON_DEPTH - 5} levels); "
                                      "flatten the payload")
        parents = (*parents, id(value))
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return RequestEncodeError(where, f"has the key {key!r}, but JSON object "
                                          "keys must be strings; convert it with str()")
            if not _is_utf8(key):
                return RequestEncodeError(where, f"has the key {key!r}, which is not valid "
                                          "UTF-8 text (it holds a lone surrogate, as a file "
                                          "name decoded with surrogateescape does); decode "
                                          "its bytes with errors='replace' or send base64")
            found = _find_unencodable(item, f"{where}.{key}", depth + 1, parents)
            if found is not None:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _find_unencodable(item, f"{where}[{index}]", depth + 1, parents)
            if found is not None:
                return found
        return None
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        return RequestEncodeError(where, _unencodable_hint(value, exc))
    return None


def _unencodable_hint(value: Any, exc: orjson.JSONEncodeError) -> str:
    """Say why orjson rejected the single value `value` and what to send instead."""
    if isinstance(value, Decimal):
        return ("is a Decimal, which cannot be sent as JSON; send the amount as a string, "
                "such as str(value), or as an int or float that fits in 64 bits")
    if isinstance(value, int):
        return ("is an integer outside the 64-bit range, which cannot be sent as JSON; "
                "send it as a string")
    if isinstance(value, str):
        return ("is not valid UTF-8 text (it holds a lone surrogate, as a file name decoded "
                "with surrogateescape does); decode its bytes with errors='replace', or "
                "send them as base64")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return (f"is {type(value).__name__}, which cannot be sent as JSON; send it as "
                "text, such as base64")
    return (f"is a {type(value).__name__}, which cannot be sent as JSON ({exc}); send a "
            "string, a number that fits in 64 bits, a boolean, null, a list or an object")


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def encode_request(request_id: int, method: str, params: dict[str, Any]) -> bytes:
    """Encode one request line, or raise RequestEncodeError naming a value JSON cannot carry."""
    try:
        encoded = orjson.dumps({"id": request_id, "method": method, "params": params,
                                "version": PROTOCOL_VERSION}) + b"\n"
    except orjson.JSONEncodeError as exc:
        error = _find_unencodable(params, "params")
        if error is None:
            error = RequestEncodeError("params", f"cannot be sent as JSON: {exc}")
        raise error from None
    # orjson writes NaN and the infinities as null, so only a request that contains
    # null needs the walk over every value.
    if b"null" in encoded:
        _check_finite(params, "params")
    return encoded


def parse_response(line: bytes) -> dict[str, Any]:
    try:
        response = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise WalacordError(f"invalid response from walacord: {exc}") from None
    if not isinstance(response, dict):
        raise WalacordError(f"invalid response from walacord: {line[:200]!r}")
    return response


def is_progress(response: dict[str, Any]) -> bool:
    """Tell a progress line, which a long call sends before its response, from the rest."""
    return "progress" in response and "result" not in response and "error" not in response


def check_response_id(response: dict[str, Any], request_id: int) -> None:
    """Raise WalacordError unless `response` belongs to request `request_id`."""
    # A request the server could not read (too long, say) gets an error without an id.
    # Responses come in request order, so it belongs to the request waiting first.
    unread = response.get("id") is None and isinstance(response.get("error"), dict)
    if response.get("id") != request_id and not unread:
        raise WalacordError(f"response does not match request {request_id}: "
                            f"{str(response)[:200]}")


def response_result(response: dict[str, Any]) -> Any:
    """Return the result of a response that passed `check_response_id`, or raise its
    ControlError."""
    error = response.get("error")
    if error is not None:
        raise ControlError(int(error.get("code", 0)), str(error.get("message", "")),
                           error.get("data"))
    return response.get("result")
