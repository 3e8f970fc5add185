"""Encoding control responses whose text is not valid UTF-8."""

from __future__ import annotations

import os
from pathlib import Path

import orjson

from walacord.control.protocol import encode_error, encode_progress, encode_result

# How Python keeps the byte 0xff of a file name that is not UTF-8.
NAME = os.fsdecode(b"zz\xff__h.json")


def test_result_with_non_utf8_name_is_escaped() -> None:
    line = encode_result(7, {"unreadable": [{"path": NAME, "error": None}],
                             "paths": (Path(NAME),), NAME: 1})

    assert line.endswith(b"\n")
    assert orjson.loads(line) == {"id": 7, "result": {
        "unreadable": [{"path": "zz\\xff__h.json", "error": None}],
        "paths": ["zz\\xff__h.json"], "zz\\xff__h.json": 1}}


def test_error_and_progress_escape_non_utf8() -> None:
    error = orjson.loads(encode_error(3, -32000, f"cannot read {NAME}", {"path": NAME}))
    progress = orjson.loads(encode_progress(3, 1, 2, f"hashing {NAME}"))

    assert error["error"]["message"] == "cannot read zz\\xff__h.json"
    assert error["error"]["data"] == {"path": "zz\\xff__h.json"}
    assert progress["progress"]["message"] == "hashing zz\\xff__h.json"
