"""Request parsing and JSON responses shared by the emulator's handlers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from walacord.emulator.store import StoreError


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


async def json_body(request: web.Request, default: Any = None) -> Any:
    raw = await request.read()
    if not raw.strip():
        if default is not None:
            return default
        raise StoreError(400, "validation", "request body is missing")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise StoreError(400, "validation", f"request body is not valid JSON: {exc}") from None


def etid_header(request: web.Request) -> int:
    etid = int_header(request, "ETId")
    if etid is None:
        raise StoreError(400, "validation", "ETId header is required")
    return etid


def int_header(request: web.Request, name: str) -> int | None:
    value = request.headers.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise StoreError(400, "validation", f"{name} header must be an integer") from None


def int_param(request: web.Request, name: str, default: int, minimum: int | None = None) -> int:
    """Return query parameter `name` as an integer; raise a 400 StoreError when invalid."""
    value = request.query.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise StoreError(400, "validation", f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise StoreError(400, "validation",
                         f"invalid {name} {number}: must be an integer >= {minimum}")
    return number
