"""The control protocol: newline-delimited JSON requests and responses, encoded with orjson.

A request is one line holding a JSON object:

    {"id": 7, "method": "mode.set", "params": {"mode": "emergency", ...}, "version": 1}

`id` is a string, an integer or null and is echoed back. `params` is an object and may be
left out. `version` is the protocol version the client speaks. A response is one line:

    {"id": 7, "result": ...}
    {"id": 7, "error": {"code": -32602, "message": "...", "data": ...}}

Methods that report progress send lines of the form
`{"id": 7, "progress": {"done": 40, "total": 100, "message": "..."}}` before the response.
Errors about the connection itself, such as an idle timeout, carry `"id": null`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import orjson

from walacord.errors import ControlError
from walacord.jsonkeys import duplicate_key
from walacord.numbers import inexact_number
from walacord.terminal import utf8_document, utf8_text

PROTOCOL_VERSION = 1
DEFAULT_SOCKET = "/run/walacord/control.sock"
SOCKET_ENVIRONMENT_VARIABLE = "WALACORD_CONTROL_SOCKET"

RequestId = str | int | None
REQUEST_FIELDS = frozenset({"id", "method", "params", "version"})


class ErrorCode(IntEnum):
    """Error codes: the JSON-RPC 2.0 range for protocol errors, -32000 and below for ours."""

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    PERMISSION_DENIED = -32001
    VERSION_MISMATCH = -32002
    REQUEST_TOO_LARGE = -32003
    BUSY = -32004
    IDLE_TIMEOUT = -32005
    REQUEST_TIMEOUT = -32006
    UNAVAILABLE = -32007
    CALL_TIMEOUT = -32008
    OPERATION_FAILED = -32009
    STOPPING = -32010
    TARGET_EXISTS = -32011
    EVICTED = -32012
    CHECKSUM_MISMATCH = -32013


@dataclass(frozen=True)
class Request:
    """One decoded request line; `error` is set when the line is not a valid request."""

    id: RequestId
    method: str
    params: dict[str, Any]
    error: ControlError | None = None


def decode_request(line: bytes) -> Request:
    """Decode one request line; an invalid line gives a Request whose `error` is set."""
    try:
        document = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as bad:
            return _invalid(None, ErrorCode.PARSE_ERROR,
                            f"invalid request: byte {bad.start} is not valid UTF-8; encode "
                            "requests as UTF-8 text")
        return _invalid(None, ErrorCode.PARSE_ERROR,
                        f"invalid JSON: {exc}; send one JSON object per line")
    if not isinstance(document, dict):
        return _invalid(None, ErrorCode.INVALID_REQUEST,
                        "a request must be a JSON object with id, method, params and version")

    request_id = document.get("id")
    if not _valid_id(request_id):
        return _invalid(None, ErrorCode.INVALID_REQUEST,
                        "invalid id: use a string of at most 200 characters, an integer or null")

    version = document.get("version")
    if version is None:
        return _invalid(request_id, ErrorCode.VERSION_MISMATCH,
                        f"missing version: send \"version\": {PROTOCOL_VERSION} with each "
                        "request", {"supported_versions": [PROTOCOL_VERSION]})
    if version != PROTOCOL_VERSION:
        return _invalid(
            request_id, ErrorCode.VERSION_MISMATCH,
            f"protocol version {_short_repr(version)} is not supported; this daemon speaks "
            f"version {PROTOCOL_VERSION}: use a walacorctl from the same walacord release",
            {"supported_versions": [PROTOCOL_VERSION]})

    method = document.get("method")
    if method is None or method == "":
        return _invalid(request_id, ErrorCode.INVALID_REQUEST,
                        "missing method: give the method name as a string")
    if not isinstance(method, str):
        return _invalid(request_id, ErrorCode.INVALID_REQUEST,
                        f"invalid method {_short_repr(method)}: give the method name as a "
                        "string")

    if not REQUEST_FIELDS.issuperset(document):
        unknown = document.keys() - REQUEST_FIELDS
        return _invalid(request_id, ErrorCode.INVALID_REQUEST,
                        f"unknown request field(s) {_short_repr(sorted(unknown))}; a request "
                        "has only id, method, params and version")

    params = document.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        return _invalid(request_id, ErrorCode.INVALID_PARAMS,
                        f"invalid params for {_short_repr(method)}: expected an object")
    problem = inexact_number(line)
    if problem is not None:
        return _invalid(request_id, ErrorCode.INVALID_PARAMS, problem, {"field": "params"})
    problem = duplicate_key(line, document)
    if problem is not None:
        return _invalid(request_id, ErrorCode.INVALID_PARAMS, problem)
    return Request(request_id, method, params)


def _invalid(request_id: RequestId, code: ErrorCode, message: str,
             data: object = None) -> Request:
    return Request(request_id, "", {}, ControlError(code, message, data))


def _short_repr(value: object, limit: int = 80) -> str:
    """Return repr(value) cut to `limit` characters, so an error never echoes a huge input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _valid_id(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    return value is None or (isinstance(value, str) and len(value) <= 200)


def encode_request(request_id: RequestId, method: str, params: dict[str, Any] | None = None,
                   *, version: int = PROTOCOL_VERSION) -> bytes:
    document = {"id": request_id, "method": method, "params": params or {}, "version": version}
    return orjson.dumps(document) + b"\n"


def encode_result(request_id: RequestId, result: Any) -> bytes:
    return _encode_line({"id": request_id, "result": result})


def encode_error(request_id: RequestId, code: int, message: str, data: Any = None) -> bytes:
    error = {"code": int(code), "message": message, "data": data}
    return _encode_line({"id": request_id, "error": error})


def encode_progress(request_id: RequestId, done: float, total: float | None,
                    message: str) -> bytes:
    progress = {"done": done, "total": total, "message": message}
    return _encode_line({"id": request_id, "progress": progress})


def _encode_line(document: dict[str, Any]) -> bytes:
    """Encode one response line.

    A string with lone surrogates, such as a file name that is not UTF-8, makes orjson
    fail. Such a document is encoded again with those strings escaped, so the caller
    gets its response instead of a dropped connection.
    """
    try:
        return orjson.dumps(document, option=orjson.OPT_NON_STR_KEYS, default=_default) + b"\n"
    except orjson.JSONEncodeError:
        return orjson.dumps(utf8_document(document), option=orjson.OPT_NON_STR_KEYS,
                            default=_default) + b"\n"


def _default(value: object) -> object:
    if isinstance(value, set | frozenset | tuple):
        return utf8_document(list(value))
    return utf8_text(str(value))
