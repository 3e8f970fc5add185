"""The emulator's API surface over real HTTP, checked with a plain httpx client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from walacord.emulator import Emulator, running_emulator
from walacord.emulator.store import Store

pytestmark = pytest.mark.anyio

ETID = 10001
SCHEMA = {
    "ETId": 50,
    "SV": 1,
    "Schema": {
        "ETId": ETID,
        "TableName": "payments",
        "Family": "payments",
        "DoSummary": True,
        "Fields": [
            {"FieldName": "walacord_key", "DataType": "TEXT", "Required": True, "MaxLength": 64},
            {"FieldName": "amount", "DataType": "INTEGER", "Required": False},
        ],
        "Indexes": [],
    },
}


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    async with running_emulator(seed=3) as emulator:
        yield emulator


@pytest.fixture
async def http(emulator: Emulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=emulator.url, timeout=5.0) as http:
        yield http


async def login(http: httpx.AsyncClient, user: str = "admin", password: str = "admin") -> str:
    response = await http.post("/api/auth/login", json={"userName": user, "password": password})
    assert response.status_code == 200, response.text
    return str(response.json()["api_token"])


async def ready(http: httpx.AsyncClient) -> dict[str, str]:
    """Log in, create the payments schema and return headers for ETId 10001."""
    token = await login(http)
    response = await http.post("/api/schemas/", json=SCHEMA, headers={"Authorization": token})
    assert response.status_code == 200, response.text
    return {"Authorization": token, "ETId": str(ETID)}


async def submit(http: httpx.AsyncClient, headers: dict[str, str], *records: Any) -> Any:
    response = await http.post(
        "/api/envelopes/submit", json={"Data": list(records)}, headers=headers
    )
    assert response.status_code == 200, response.text
    return response.json()["data"]


async def test_login_token_has_bearer_prefix(http: httpx.AsyncClient) -> None:
    token = await login(http)
    assert token.startswith("Bearer ")
    assert len(token) > len("Bearer ") + 16


async def test_login_bad_password_is_401(http: httpx.AsyncClient) -> None:
    response = await http.post("/api/auth/login", json={"userName": "admin", "password": "x"})
    assert response.status_code == 401
    assert response.json()["errors"][0]["reason"] == "unauthorized"


@pytest.mark.parametrize("token", [None, "Bearer not-issued", "not-a-bearer"])
async def test_request_without_valid_token_is_401(
    http: httpx.AsyncClient, token: str | None
) -> None:
    headers = {"Authorization": token} if token else {}
    response = await http.get("/api/schemas/envelopeTypes", headers=headers)
    assert response.status_code == 401
    body = response.json()
    assert body["code"] == 401
    assert body["errors"][0]["message"]


async def test_token_without_bearer_prefix_is_401(http: httpx.AsyncClient) -> None:
    token = await login(http)
    bare = token.removeprefix("Bearer ")
    response = await http.get("/api/schemas/envelopeTypes", headers={"Authorization": bare})
    assert response.status_code == 401


async def test_submit_requires_etid_header(http: httpx.AsyncClient) -> None:
    headers = await ready(http)
    del headers["ETId"]
    response = await http.post("/api/envelopes/submit", json={"Data": [{}]}, headers=headers)
    assert response.status_code == 400
    assert "ETId" in response.json()["errors"][0]["message"]


async def test_query_requires_etid_header(http: httpx.AsyncClient) -> None:
    headers = await ready(http)
    del headers["ETId"]
    response = await http.post("/api/query/get", json={}, headers=headers)
    assert response.status_code == 400


async def test_submit_returns_uid_per_record(http: httpx.AsyncClient) -> None:
    headers = await ready(http)
    data = await submit(http, headers, {"walacord_key": "a"}, {"walacord_key": "b"})

    assert set(data) == {"EId", "ETId", "ES", "UID"}
    assert data["ETId"] == ETID
    assert isinstance(data["ES"], int)
    assert isinstance(data["UID"], list)
    assert len(data["UID"]) == 2
    assert len(set(data["UID"])) == 2


async def test_submit_unknown_etid_is_400(http: httpx.AsyncClient) -> None:
    headers = await ready(http)
    headers["ETId"] = "10999"
    response = await http.post("/api/envelopes/submit", json={"Data": [{}]}, headers=headers)
    assert response.status_code == 400
    assert "no schema" in response.json()["errors"][0]["message"]


async def test_schema_below_10000_is_400(http: httpx.AsyncClient) -> None:
    token = await login(http)
    body = {"ETId": 50, "SV": 1, "Schema": {**SCHEMA["Schema"], "ETId": 99}}  # type: ignore[dict-item]
    response = await http.post("/api/schemas/", json=body, headers={"Authorization": token})
    assert response.status_code == 400


async def test_envelope_types_lists_created_schema(http: httpx.AsyncClient) -> None:
    headers = await ready(http)
    response = await http.get("/api/schemas/envelopeTypes", headers=headers)
    assert response.status_code == 200
    types = response.json()["data"]
    assert {"ETId": ETID, "TableName": "payments", "SV": 1} in types


async def test_query_rows_carry_system_fields(http: httpx.AsyncClient) -> None:
    headers = await ready(http)
    data = await submit(http, headers, {"walacord_key": "a", "amount": 3})
    response = await http.post(
        "/api/query/get",
        params={"pageNo": 1, "pageSize": 10, "fromSummary": "true", "totalReq": "true"},
        json={"walacord_key": "a"},
        headers=headers,
    )
    body = response.json()
    row = body["data"][0]

    assert body["success"] is True
    assert body["total"] == 1
    assert row["UID"] == data["UID"][0]
    assert row["EId"] == data["EId"]
    assert row["IsDeleted"] is False
    assert row["SV"] == 1
    assert isinstance(row["CreatedAt"], int)
    assert row["UpdatedAt"] >= row["CreatedAt"]
    assert row["amount"] == 3


async def test_query_total_only_when_requested(http: httpx.AsyncClient) -> None:
    headers = await ready(http)
    await submit(http, headers, {"walacord_key": "a"})
    response = await http.post("/api/query/get", json={}, headers=headers)
    assert "total" not in response.json()


async def test_query_filter_distinguishes_true_from_one(http: httpx.AsyncClient) -> None:
    headers = await ready(http)
    await submit(
        http, headers, {"walacord_key": "a", "flag": True}, {"walacord_key": "b", "flag": 1}
    )
    response = await http.post("/api/query/get", json={"flag": True}, headers=headers)
    assert [r["walacord_key"] for r in response.json()["data"]] == ["a"]


async def test_getcomplex_matches_in_list(http: httpx.AsyncClient) -> None:
    headers = await ready(http)
    await submit(http, headers, *({"walacord_key": k, "amount": i} for i, k in enumerate("abcd")))
    pipeline = [
        {"$match": {"walacord_key": {"$in": ["b", "d", "z"]}}},
        {"$sort": {"amount": -1}},
        {"$limit": 1},
    ]
    response = await http.post("/api/query/getcomplex", json=pipeline, headers=headers)
    body = response.json()
    assert [r["walacord_key"] for r in body["data"]] == ["d"]
    assert body["total"] == 2


async def test_getcomplex_unknown_stage_is_400(http: httpx.AsyncClient) -> None:
    headers = await ready(http)
    response = await http.post("/api/query/getcomplex", json=[{"$group": {}}], headers=headers)
    assert response.status_code == 400
    assert "$group" in response.json()["errors"][0]["message"]


TYPED_ETID = 10002
TYPED_SCHEMA = {
    "ETId": 50,
    "SV": 1,
    "Schema": {
        "ETId": TYPED_ETID,
        "TableName": "typed",
        "Fields": [
            {"FieldName": "key", "DataType": "TEXT", "Required": True, "MaxLength": 8},
            {"FieldName": "amt", "DataType": "INTEGER"},
            {"FieldName": "price", "DataType": "DECIMAL"},
            {"FieldName": "flag", "DataType": "BOOLEAN"},
            {"FieldName": "at", "DataType": "DATETIME(EPOCH)"},
            {"FieldName": "tags", "DataType": "ARRAY"},
        ],
    },
}


async def typed_ready(http: httpx.AsyncClient) -> dict[str, str]:
    token = await login(http)
    response = await http.post("/api/schemas/", json=TYPED_SCHEMA,
                               headers={"Authorization": token})
    assert response.status_code == 200, response.text
    return {"Authorization": token, "ETId": str(TYPED_ETID)}


@pytest.mark.parametrize(("record", "message"), [
    ({"key": "a", "amt": "notint"}, "field amt is INTEGER and expects an integer, got string"),
    ({"key": "a", "amt": 1.5}, "field amt is INTEGER"),
    ({"key": "a", "amt": True}, "field amt is INTEGER"),
    ({"key": "a", "price": "9.99"}, "field price is DECIMAL and expects a number"),
    ({"key": "a", "flag": 1}, "field flag is BOOLEAN and expects true or false"),
    ({"key": "a", "at": "2026-12-04"}, "field at is DATETIME(EPOCH)"),
    ({"key": "a", "tags": "x,y"}, "field tags is ARRAY and expects an array"),
    ({"key": 7}, "field key is TEXT and expects a string, got integer 7"),
    ({"key": "123456789"}, "field key is longer than its MaxLength 8"),
    ({"amt": 1}, "required field key is missing"),
    ({"key": None}, "required field key is null"),
])
async def test_submit_wrong_type_is_400(http: httpx.AsyncClient, record: dict[str, Any],
                                        message: str) -> None:
    headers = await typed_ready(http)
    response = await http.post("/api/envelopes/submit", json={"Data": [record]},
                               headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()["errors"][0]
    assert error["reason"] == "validation"
    assert message in error["message"]
    stored = await http.post("/api/query/get", json={}, headers=headers)
    assert stored.json()["data"] == []


async def test_submit_typed_fields_accepted(http: httpx.AsyncClient) -> None:
    headers = await typed_ready(http)
    record = {"key": "a", "amt": -3, "price": 9.99, "flag": False, "at": 1_780_000_000_000,
              "tags": ["x"], "extra": "undeclared"}
    data = await submit(http, headers, record, {"key": "b", "amt": None, "price": 2})
    update = await http.post("/api/envelopes/submit", headers=headers,
                             json={"Data": [{"UID": data["UID"][0], "amt": "x"}]})
    assert len(data["UID"]) == 2
    assert update.status_code == 400
    assert "field amt is INTEGER" in update.json()["errors"][0]["message"]


@pytest.mark.parametrize("params", [{"pageNo": "-1", "pageSize": "1"},
                                    {"pageNo": "1", "pageSize": "-1"}])
async def test_query_negative_page_is_400(http: httpx.AsyncClient,
                                          params: dict[str, str]) -> None:
    headers = await ready(http)
    await submit(http, headers, {"walacord_key": "a"}, {"walacord_key": "b"})
    response = await http.post("/api/query/get", params=params, json={}, headers=headers)
    assert response.status_code == 400
    error = response.json()["errors"][0]
    assert error["reason"] == "validation"
    name = "pageNo" if params["pageNo"] == "-1" else "pageSize"
    assert error["message"] == f"invalid {name} -1: must be an integer >= 0"


@pytest.mark.parametrize(("condition", "operator"), [
    ({"walacord_key": {"$regex": "^a"}}, "$regex"),
    ({"walacord_key": {"$in": ["a"], "$ne": "b"}}, "$ne"),
    ({"$or": [{"walacord_key": "a"}]}, "$or"),
])
async def test_getcomplex_unsupported_operator_is_400(http: httpx.AsyncClient,
                                                      condition: dict[str, Any],
                                                      operator: str) -> None:
    headers = await ready(http)
    await submit(http, headers, {"walacord_key": "a"})
    pipeline = [{"$match": condition}]
    complex_response = await http.post("/api/query/getcomplex", json=pipeline, headers=headers)
    get_response = await http.post("/api/query/get", json=condition, headers=headers)
    for response in (complex_response, get_response):
        assert response.status_code == 400
        message = response.json()["errors"][0]["message"]
        assert message.startswith(f"unsupported query operator {operator}")


@pytest.mark.parametrize(("stage", "message"), [
    ({"$limit": -1}, "invalid $limit -1: must be a positive integer"),
    ({"$limit": 0}, "invalid $limit 0: must be a positive integer"),
    ({"$limit": "5"}, "invalid $limit '5': must be a positive integer"),
    ({"$skip": -2}, "invalid $skip -2: must be 0 or a positive integer"),
])
async def test_getcomplex_invalid_count_is_400(http: httpx.AsyncClient, stage: dict[str, Any],
                                               message: str) -> None:
    headers = await ready(http)
    response = await http.post("/api/query/getcomplex", json=[stage], headers=headers)
    assert response.status_code == 400
    assert response.json()["errors"][0]["message"] == message


async def test_state_file_survives_restart(tmp_path: Path) -> None:
    state = str(tmp_path / "walacor.sqlite")
    async with (
        running_emulator(state_path=state) as emulator,
        httpx.AsyncClient(base_url=emulator.url) as http,
    ):
        headers = await ready(http)
        data = await submit(http, headers, {"walacord_key": "kept"})
        await submit(http, headers, {"UID": data["UID"][0], "amount": 9})

    async with (
        running_emulator(state_path=state) as emulator,
        httpx.AsyncClient(base_url=emulator.url) as http,
    ):
        headers = {"Authorization": await login(http), "ETId": str(ETID)}
        latest = await http.post(
            "/api/query/get", params={"fromSummary": "true"}, json={}, headers=headers
        )
        history = await http.post(
            "/api/query/get", params={"fromSummary": "false"}, json={}, headers=headers
        )

    assert [(r["walacord_key"], r["amount"]) for r in latest.json()["data"]] == [("kept", 9)]
    assert len(history.json()["data"]) == 2


async def test_fault_endpoint_rejects_unknown_mode(http: httpx.AsyncClient) -> None:
    response = await http.put("/_emulator/faults", json={"mode": "explode"})
    assert response.status_code == 400
    assert "mode" in response.json()["errors"][0]["message"]


@pytest.mark.parametrize("value", ["soon", "", -5, True, [1]])
async def test_fault_endpoint_rejects_bad_retry_after(http: httpx.AsyncClient,
                                                      value: object) -> None:
    response = await http.put("/_emulator/faults", json={"retry_after": value})
    assert response.status_code == 400
    assert "retry_after must be seconds >= 0 or an HTTP-date" in (
        response.json()["errors"][0]["message"])
    assert (await http.get("/_emulator/faults")).json()["faults"] is None


@pytest.mark.parametrize("value", [0, 2.5, "120", "Wed, 21 Oct 2026 07:28:00 GMT"])
async def test_fault_endpoint_accepts_retry_after(http: httpx.AsyncClient,
                                                  value: object) -> None:
    response = await http.put("/_emulator/faults", json={"retry_after": value})
    assert response.status_code == 200, response.text


async def test_fault_count_and_path_limit_scope(http: httpx.AsyncClient) -> None:
    headers = await ready(http)
    fault = {"status": 500, "path": "/api/envelopes/submit", "count": 2}
    assert (await http.put("/_emulator/faults", json=fault)).status_code == 200

    statuses = []
    for _ in range(3):
        response = await http.post(
            "/api/envelopes/submit", json={"Data": [{"walacord_key": "x"}]}, headers=headers
        )
        statuses.append(response.status_code)
    envelope_types = await http.get("/api/schemas/envelopeTypes", headers=headers)

    assert statuses == [500, 500, 200]
    assert envelope_types.status_code == 200
    stats = (await http.get("/_emulator/stats")).json()
    assert stats["requests"]["/api/envelopes/submit"] == {"500": 2, "200": 1}


async def test_fault_ratio_affects_a_share(emulator: Emulator, http: httpx.AsyncClient) -> None:
    headers = await ready(http)
    emulator.set_faults(status=503, ratio=0.5)
    statuses = [
        (await http.get("/api/schemas/envelopeTypes", headers=headers)).status_code
        for _ in range(200)
    ]
    assert 60 < statuses.count(503) < 140
    assert statuses.count(200) + statuses.count(503) == 200


async def test_server_error_body_has_error_text(http: httpx.AsyncClient) -> None:
    headers = await ready(http)
    await http.put("/_emulator/faults", json={"status": 502})
    response = await http.get("/api/schemas/envelopeTypes", headers=headers)
    assert response.status_code == 502
    assert response.json() == {"error": "injected fault"}


async def test_retry_after_alone_means_429(http: httpx.AsyncClient) -> None:
    headers = await ready(http)
    await http.put("/_emulator/faults", json={"retry_after": 4})
    response = await http.get("/api/schemas/envelopeTypes", headers=headers)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "4"


async def test_delete_faults_restores_service(http: httpx.AsyncClient) -> None:
    headers = await ready(http)
    await http.put("/_emulator/faults", json={"status": 500})
    assert (await http.delete("/_emulator/faults")).status_code == 200
    response = await http.get("/api/schemas/envelopeTypes", headers=headers)
    assert response.status_code == 200
    assert (await http.get("/_emulator/faults")).json() == {"faults": None}


async def test_drop_after_commit_stores_then_resets(http: httpx.AsyncClient) -> None:
    headers = await ready(http)
    await http.put(
        "/_emulator/faults", json={"mode": "drop_after_commit", "path": "/api/envelopes"}
    )
    with pytest.raises(httpx.TransportError):
        await http.post(
            "/api/envelopes/submit", json={"Data": [{"walacord_key": "d"}]}, headers=headers
        )
    await http.delete("/_emulator/faults")

    response = await http.post("/api/query/get", json={"walacord_key": "d"}, headers=headers)
    assert len(response.json()["data"]) == 1


async def test_success_false_answers_200(http: httpx.AsyncClient) -> None:
    headers = await ready(http)
    await http.put("/_emulator/faults", json={"mode": "success_false", "path": "/api/envelopes"})
    response = await http.post(
        "/api/envelopes/submit", json={"Data": [{"walacord_key": "s"}]}, headers=headers
    )
    await http.delete("/_emulator/faults")
    rows = await http.post("/api/query/get", json={}, headers=headers)

    assert response.status_code == 200
    assert response.json()["success"] is False
    assert rows.json()["data"] == []


async def test_expire_tokens_rejects_old_token(http: httpx.AsyncClient) -> None:
    headers = await ready(http)
    response = await http.post("/_emulator/tokens/expire")
    assert response.json() == {"expired": 1}
    rejected = await http.get("/api/schemas/envelopeTypes", headers=headers)
    assert rejected.status_code == 401


async def test_stats_count_requests_and_logins(http: httpx.AsyncClient) -> None:
    headers = await ready(http)
    await http.get("/api/schemas/envelopeTypes", headers=headers)
    await http.get("/api/schemas/envelopeTypes")
    stats = (await http.get("/_emulator/stats")).json()

    assert stats["logins"] == 1
    assert stats["requests"]["/api/schemas/envelopeTypes"] == {"200": 1, "401": 1}
    assert stats["requests"]["/api/auth/login"] == {"200": 1}
    assert "/_emulator/stats" not in stats["requests"]


async def test_fault_rules_apply_in_order(http: httpx.AsyncClient) -> None:
    headers = await ready(http)
    rules = [
        {"status": 503, "path": "/api/schemas", "count": 1},
        {"status": 429, "retry_after": 1, "path": "/api/schemas"},
    ]
    put = await http.put("/_emulator/faults", json=rules)
    first = await http.get("/api/schemas/envelopeTypes", headers=headers)
    second = await http.get("/api/schemas/envelopeTypes", headers=headers)
    query = await http.post("/api/query/get", json={}, headers=headers)

    assert put.status_code == 200
    assert [rule["status"] for rule in put.json()["faults"]] == [503, 429]
    assert first.status_code == 503
    assert second.status_code == 429
    assert query.status_code == 200


async def test_run_reports_url_and_stops_on_cancel(tmp_path: Path) -> None:
    emulator = Emulator(state_path=str(tmp_path / "state.sqlite"))
    async with anyio.create_task_group() as tg:
        url = await tg.start(emulator.run)
        async with httpx.AsyncClient(base_url=url) as http:
            token = await login(http)
        tg.cancel_scope.cancel()

    assert token.startswith("Bearer ")
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(base_url=url) as http:
            await http.post("/api/auth/login", json={"userName": "admin", "password": "admin"})


async def test_cancelled_submit_keeps_file_and_memory_equal(tmp_path: Path) -> None:
    """A client that disconnects cancels its submit at any await. Whatever the file
    committed, the API must serve too, also before the emulator restarts."""
    state = str(tmp_path / "state.sqlite")
    store = Store(state)
    await store.open()
    schema = {"ETId": 10001, "TableName": "payments",
              "Fields": [{"FieldName": "amount", "DataType": "INTEGER"}]}
    await store.create_schema(1, schema)
    try:
        for step in range(40):
            task = asyncio.ensure_future(store.submit(10001, [{"amount": step}], None))
            for _ in range(step):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Let shielded writes that outlived their cancelled callers finish.
        async with store._write_lock:
            served = store.record_count
    finally:
        await store.close()

    reopened = Store(state)
    await reopened.open()
    try:
        stored = reopened.record_count
    finally:
        await reopened.close()
    assert served == stored
    assert 0 < stored < 40
