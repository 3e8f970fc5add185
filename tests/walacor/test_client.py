"""WalacorClient against the emulator: base URLs, API calls and the token cache."""

from __future__ import annotations

import anyio
import pytest
from aiohttp import web

from walacord.emulator import Emulator, running_emulator
from walacord.errors import WalacorAuthError, WalacorValidationError
from walacord.pgcluster import free_port
from walacord.walacor import WalacorClient, api_root

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("walacor.example", "https://walacor.example/api"),
        ("https://walacor.example/", "https://walacor.example/api"),
        ("https://walacor.example/api", "https://walacor.example/api"),
        ("https://walacor.example/api/", "https://walacor.example/api"),
        ("http://10.0.0.5:8080", "http://10.0.0.5:8080/api"),
        ("http://10.0.0.5:8080/prefix/api", "http://10.0.0.5:8080/prefix/api"),
    ],
)
def test_api_root_accepts_host_or_api_url(base: str, expected: str) -> None:
    assert api_root(base) == expected


def test_api_root_rejects_other_scheme() -> None:
    with pytest.raises(ValueError, match="invalid Walacor base URL"):
        api_root("ftp://walacor.example")


def test_from_env_reads_walacor_variables() -> None:
    env = {"WALACOR_HOST": "http://127.0.0.1:9", "WALACOR_USERNAME": "u", "WALACOR_PASSWORD": "p"}
    client = WalacorClient.from_env(env, request_timeout=2.0)
    assert client.api == "http://127.0.0.1:9/api"
    assert client.request_timeout == 2.0


def test_from_env_names_missing_variables() -> None:
    with pytest.raises(ValueError, match="WALACOR_PASSWORD"):
        WalacorClient.from_env({"WALACOR_HOST": "h", "WALACOR_USERNAME": "u"})


async def test_login_keeps_bearer_token(client: WalacorClient) -> None:
    token = await client.login()
    assert token.startswith("Bearer ")


async def test_envelope_types_lists_custom_type(client: WalacorClient, etid: int) -> None:
    types = await client.envelope_types()
    assert etid in [t["ETId"] for t in types]


async def test_create_schema_then_submit_and_query(client: WalacorClient) -> None:
    fields = [{"FieldName": "name", "DataType": "TEXT", "Required": True, "MaxLength": 20}]
    receipt = await client.create_schema(10050, "people", fields)
    assert receipt.etid == 50
    assert len(receipt.uids) == 1

    submitted = await client.submit(10050, [{"name": "ada"}, {"name": "bob"}])
    assert submitted.etid == 10050
    assert len(submitted.uids) == 2
    assert isinstance(submitted.es, int)

    result = await client.query(10050, {"name": "bob"})
    assert result.total == 1
    assert [row["UID"] for row in result.rows] == [submitted.uids[1]]
    assert result.rows[0]["EId"] == submitted.eid


async def test_submit_missing_required_field_is_validation(client: WalacorClient) -> None:
    fields = [{"FieldName": "name", "DataType": "TEXT", "Required": True}]
    await client.create_schema(10051, "named", fields)
    with pytest.raises(WalacorValidationError) as caught:
        await client.submit(10051, [{"other": 1}])
    assert caught.value.status == 400
    assert "name" in str(caught.value)


async def test_query_pages_are_one_based(client: WalacorClient, etid: int) -> None:
    await client.submit(etid, [{"amount": i} for i in range(5)])

    first = await client.query(etid, {}, page_no=1, page_size=2)
    third = await client.query(etid, {}, page_no=3, page_size=2)
    everything = await client.query(etid, {}, page_no=0, page_size=0)

    assert [r["amount"] for r in first.rows] == [0, 1]
    assert [r["amount"] for r in third.rows] == [4]
    assert first.total == 5
    assert len(everything.rows) == 5


async def test_submit_with_uid_updates_row(client: WalacorClient, etid: int) -> None:
    receipt = await client.submit(etid, [{"amount": 1}])
    uid = receipt.uids[0]
    await client.submit(etid, [{"UID": uid, "amount": 2}])

    latest = await client.query(etid, {"UID": uid})
    versions = await client.query(etid, {"UID": uid}, from_summary=False)

    assert [r["amount"] for r in latest.rows] == [2]
    assert [r["amount"] for r in versions.rows] == [1, 2]


async def test_wrong_password_is_auth_error() -> None:
    async with (
        running_emulator(users={"ops": "secret"}) as emulator,
        WalacorClient(emulator.url, username="ops", password="wrong") as client,
    ):
        with pytest.raises(WalacorAuthError) as caught:
            await client.envelope_types()
    assert caught.value.reason == "auth"
    assert caught.value.status == 401


async def test_expired_token_triggers_one_relogin() -> None:
    async with running_emulator(token_ttl=0.2) as emulator:
        async with WalacorClient(emulator.url, username="admin", password="admin") as client:
            await client.envelope_types()
            await anyio.sleep(0.3)
            await client.envelope_types()
        assert emulator.logins == 2
        assert emulator.stats()["requests"]["/api/schemas/envelopeTypes"] == {"200": 2, "401": 1}


async def test_concurrent_401s_cause_one_login(emulator: Emulator, client: WalacorClient) -> None:
    await client.login()
    emulator.expire_tokens()
    # A slow login keeps the refresh open while every caller receives its 401.
    emulator.set_faults(latency_ms=200, path="/api/auth/login")

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(client.envelope_types)

    assert emulator.logins == 2
    counts = emulator.stats()["requests"]["/api/schemas/envelopeTypes"]
    assert counts["401"] == 20
    assert counts["200"] == 20


async def test_rejected_retry_raises_auth_error(emulator: Emulator, client: WalacorClient) -> None:
    emulator.set_faults(status=401, path="/api/schemas/envelopeTypes")
    with pytest.raises(WalacorAuthError):
        await client.envelope_types()
    assert emulator.logins == 2


async def test_client_sends_back_cookie_server_set() -> None:
    # A load balancer in front of Walacor may pin a client to a node with a cookie.
    received: list[str | None] = []

    async def login(request: web.Request) -> web.Response:
        return web.json_response({"success": True, "api_token": "Bearer token"})

    async def envelope_types(request: web.Request) -> web.Response:
        received.append(request.cookies.get("affinity"))
        response = web.json_response({"success": True, "data": []})
        response.set_cookie("affinity", "node-2")
        return response

    app = web.Application()
    app.router.add_post("/api/auth/login", login)
    app.router.add_get("/api/schemas/envelopeTypes", envelope_types)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with WalacorClient(f"http://127.0.0.1:{port}", username="ops",
                                 password="secret") as client:
            for _ in range(3):
                await client.envelope_types()
    finally:
        await runner.cleanup()
    assert received == [None, "node-2", "node-2"]
