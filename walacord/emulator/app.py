"""The Walacor emulator's HTTP server: the API surface, fault injection and control.

API paths live under /api as on the real service. Control paths live under
/_emulator: `PUT|GET|DELETE /_emulator/faults`, `POST /_emulator/tokens/expire` and
`GET /_emulator/stats`. Faults and stats apply only to /api paths.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
from aiohttp import web

from walacord.emulator.faults import (
    FaultSpec,
    FaultState,
    error_body,
    reset_connection,
    trickle,
    wait_for_disconnect,
)
from walacord.emulator.parsing import (
    etid_header,
    int_header,
    int_param,
    json_body,
    json_response,
)
from walacord.emulator.store import ENVELOPE_STATUS, SCHEMA_ETID, Store, StoreError

log = logging.getLogger(__name__)

DEFAULT_USERS = {"admin": "admin"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Emulator:
    """One emulated Walacor service: users, tokens, a store and the active fault."""

    def __init__(
        self,
        *,
        users: Mapping[str, str] | None = None,
        state_path: str | None = None,
        token_ttl: float | None = 3600.0,
        faults: FaultSpec | list[FaultSpec] | None = None,
        seed: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.users = dict(users) if users else dict(DEFAULT_USERS)
        self.default_users = not users
        self.token_ttl = token_ttl
        self.store = Store(state_path)
        self.faults = FaultState(faults, seed=seed)
        self.ssl_context = ssl_context
        self.url = ""
        self.logins = 0
        self.requests: defaultdict[str, Counter[str]] = defaultdict(Counter)
        # token -> monotonic expiry time, or None for no expiry
        self._tokens: dict[str, float | None] = {}
        self._runner: web.AppRunner | None = None
        self.app = self._build_app()

    # --- direct control, also used by the /_emulator endpoints ---------------------

    def set_faults(self, spec: FaultSpec | list[FaultSpec] | None = None, **settings: Any) -> None:
        """Replace the active faults with `spec` (one rule or a list tried in order),
        or with one rule built from keyword settings."""
        if spec is None:
            spec = FaultSpec.from_json(settings)
        rules = [spec] if isinstance(spec, FaultSpec) else list(spec)
        for rule in rules:
            rule.validate()
        self.faults.set(rules)
        log.info("emulator.faults.set", extra={"fields": {"rules": [r.to_json() for r in rules]}})

    def clear_faults(self) -> None:
        self.faults.set(None)
        log.info("emulator.faults.cleared")

    def expire_tokens(self) -> int:
        """Invalidate every issued token now; return how many there were."""
        count = len(self._tokens)
        self._tokens.clear()
        log.info("emulator.tokens.expired", extra={"fields": {"tokens": count}})
        return count

    def stats(self) -> dict[str, Any]:
        return {
            "requests": {path: dict(counts) for path, counts in self.requests.items()},
            "logins": self.logins,
            "records": self.store.record_count,
            "tokens": len(self._tokens),
        }

    def reset_stats(self) -> None:
        self.requests.clear()
        self.logins = 0

    # --- lifecycle --------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Open the store, bind the listener and return the base URL (without /api)."""
        await self.store.open()
        self._runner = web.AppRunner(
            self.app, access_log=None, shutdown_timeout=1.0, handler_cancellation=True
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=1024, ssl_context=self.ssl_context)
        await site.start()
        bound = self._runner.addresses[0]
        bound_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        scheme = "https" if self.ssl_context is not None else "http"
        self.url = f"{scheme}://{bound_host}:{bound[1]}"
        if self.default_users:
            log.warning(
                "emulator.default_user",
                extra={"fields": {"user": "admin", "note": "admin:admin is for local use only"}},
            )
        log.info("emulator.started", extra={"fields": {"url": self.url}})
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.store.close()
        log.info("emulator.stopped", extra={"fields": {"url": self.url}})

    async def run(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; report the base URL as started once it listens."""
        try:
            url = await self.start(host, port)
            task_status.started(url)
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await self.stop()

    # --- HTTP plumbing ----------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        app.router.add_post("/api/auth/login", self._login)
        app.router.add_get("/api/schemas/envelopeTypes", self._envelope_types)
        app.router.add_post("/api/schemas/", self._create_schema)
        app.router.add_post("/api/schemas", self._create_schema)
        app.router.add_post("/api/envelopes/submit", self._submit)
        app.router.add_post("/api/query/get", self._query_get)
        app.router.add_post("/api/query/getcomplex", self._query_complex)
        app.router.add_put("/_emulator/faults", self._put_faults)
        app.router.add_get("/_emulator/faults", self._get_faults)
        app.router.add_delete("/_emulator/faults", self._delete_faults)
        app.router.add_post("/_emulator/tokens/expire", self._expire_tokens)
        app.router.add_get("/_emulator/stats", self._get_stats)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if not path.startswith("/api/"):
            return await self._run_handler(request, handler)

        spec = self.faults.decide(path)
        if spec is None:
            response = await self._run_handler(request, handler)
            self.requests[path][str(response.status)] += 1
            return response
        return await self._apply_fault(request, handler, spec)

    async def _run_handler(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except StoreError as exc:
            return json_response(error_body(exc.status, exc.message, exc.reason), exc.status)
        except web.HTTPException as exc:
            return json_response(error_body(exc.status, exc.reason), exc.status)

    async def _apply_fault(
        self, request: web.Request, handler: Handler, spec: FaultSpec
    ) -> web.StreamResponse:
        path = request.path
        if spec.latency_ms:
            await asyncio.sleep(spec.latency_ms / 1000)

        status = spec.effective_status
        if status is not None:
            self.requests[path][str(status)] += 1
            headers = {}
            if spec.retry_after is not None:
                headers["Retry-After"] = str(spec.retry_after)
            body = spec.body if spec.body is not None else error_body(status, "injected fault")
            return json_response(body, status, headers)

        mode = spec.mode
        if mode is None:
            response = await self._run_handler(request, handler)
            self.requests[path][str(response.status)] += 1
            return response
        self.requests[path][mode] += 1

        if mode == "success_false":
            body = {"success": False, "error": {"reason": "internal", "message": "injected fault"}}
            return json_response(body)
        if mode == "reset":
            reset_connection(request)
            return await wait_for_disconnect(request)
        if mode == "hang":
            return await wait_for_disconnect(request)

        # The remaining modes run the request, so a submit is committed.
        response = await self._run_handler(request, handler)
        if mode == "drop_after_commit":
            reset_connection(request)
            return await wait_for_disconnect(request)
        return await trickle(request, response, spec.trickle_interval_ms / 1000)

    # --- authentication ---------------------------------------------------------

    def _authorize(self, request: web.Request) -> None:
        token = request.headers.get("Authorization")
        if token is None:
            raise StoreError(401, "unauthorized", "Authorization header is missing")
        expires = self._tokens.get(token, 0.0)
        if expires is not None and expires <= time.monotonic():
            self._tokens.pop(token, None)
            raise StoreError(401, "unauthorized", "token is invalid or expired: log in again")

    async def _login(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        if not isinstance(body, dict):
            raise StoreError(400, "validation", "body must be {userName, password}")
        user, password = body.get("userName"), body.get("password")
        if not isinstance(user, str) or not isinstance(password, str):
            raise StoreError(400, "validation", "userName and password are required")
        expected = self.users.get(user)
        if expected is None or not secrets.compare_digest(expected, password):
            raise StoreError(401, "unauthorized", "invalid user name or password")
        token = "Bearer " + secrets.token_urlsafe(32)
        ttl = self.token_ttl
        now = time.monotonic()
        expired = [
            t for t, expires in self._tokens.items() if expires is not None and expires <= now
        ]
        for old_token in expired:
            del self._tokens[old_token]
        self._tokens[token] = now + ttl if ttl else None
        self.logins += 1
        return json_response({"api_token": token})

    # --- API handlers -----------------------------------------------------------

    async def _envelope_types(self, request: web.Request) -> web.Response:
        self._authorize(request)
        return json_response({"success": True, "data": self.store.envelope_types()})

    async def _create_schema(self, request: web.Request) -> web.Response:
        self._authorize(request)
        body = await json_body(request)
        if not isinstance(body, dict) or body.get("ETId") != SCHEMA_ETID:
            raise StoreError(400, "validation", f"body must be {{ETId: {SCHEMA_ETID}, SV, Schema}}")
        eid, uid = await self.store.create_schema(body.get("SV", 1), body.get("Schema"))
        data = {"EId": eid, "ETId": SCHEMA_ETID, "ES": ENVELOPE_STATUS, "UID": [uid]}
        return json_response({"success": True, "data": data})

    async def _submit(self, request: web.Request) -> web.Response:
        self._authorize(request)
        etid = etid_header(request)
        sv = int_header(request, "SV")
        body = await json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("Data"), list):
            raise StoreError(400, "validation", 'body must be {"Data": [record, ...]}')
        if not body["Data"]:
            raise StoreError(400, "validation", "Data must hold at least one record")
        eid, uids = await self.store.submit(etid, body["Data"], sv)
        data = {"EId": eid, "ETId": etid, "ES": ENVELOPE_STATUS, "UID": uids}
        return json_response({"success": True, "data": data})

    async def _query_get(self, request: web.Request) -> web.Response:
        self._authorize(request)
        etid = etid_header(request)
        # 0, like a missing parameter, returns every match; negative values are invalid.
        page_no = int_param(request, "pageNo", 0, minimum=0)
        page_size = int_param(request, "pageSize", 0, minimum=0)
        from_summary = request.query.get("fromSummary", "false").lower() == "true"
        total_req = request.query.get("totalReq", "false").lower() == "true"
        condition = await json_body(request, default={})
        if not isinstance(condition, dict):
            raise StoreError(400, "validation", "body must be an equality filter object")

        rows = self.store.query(etid, condition, from_summary=from_summary)
        total = len(rows)
        if page_no > 0 and page_size > 0:
            start = (page_no - 1) * page_size
            rows = rows[start : start + page_size]
        body: dict[str, Any] = {"success": True, "data": rows}
        if total_req:
            body["total"] = total
        return json_response(body)

    async def _query_complex(self, request: web.Request) -> web.Response:
        self._authorize(request)
        etid = etid_header(request)
        pipeline = await json_body(request)
        if not isinstance(pipeline, list):
            raise StoreError(400, "validation", "body must be an aggregation pipeline (array)")
        rows, total = self.store.aggregate(etid, pipeline)
        return json_response({"success": True, "data": rows, "total": total})

    # --- control handlers -------------------------------------------------------

    async def _put_faults(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        try:
            if isinstance(body, list):
                rules = [FaultSpec.from_json(item) for item in body]
            else:
                rules = [FaultSpec.from_json(body)]
        except (TypeError, ValueError) as exc:
            raise StoreError(400, "validation", str(exc)) from None
        self.set_faults(rules)
        return json_response(self._faults_document())

    async def _get_faults(self, request: web.Request) -> web.Response:
        return json_response(self._faults_document())

    def _faults_document(self) -> dict[str, Any]:
        """Return `{"faults": rule}` for one rule, or a list of rules for several."""
        rules = [rule.to_json() for rule in self.faults.rules]
        if not rules:
            return {"faults": None}
        return {"faults": rules[0] if len(rules) == 1 else rules}

    async def _delete_faults(self, request: web.Request) -> web.Response:
        self.clear_faults()
        return json_response({"faults": None})

    async def _expire_tokens(self, request: web.Request) -> web.Response:
        return json_response({"expired": self.expire_tokens()})

    async def _get_stats(self, request: web.Request) -> web.Response:
        return json_response(self.stats())


@asynccontextmanager
async def running_emulator(
    host: str = "127.0.0.1", port: int = 0, **options: Any
) -> AsyncIterator[Emulator]:
    """Run an emulator for the duration of the block; `emulator.url` is its base URL."""
    emulator = Emulator(**options)
    await emulator.start(host, port)
    try:
        yield emulator
    finally:
        with anyio.CancelScope(shield=True):
            await emulator.stop()
