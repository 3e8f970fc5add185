"""The emulator accepts more than 5,000 records per second in batches.

Client and emulator share one event loop here, so the client's cost counts against
the emulator; bench/emulator_throughput.py measures the emulator in its own process.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import orjson
import pytest

from walacord.emulator import running_emulator

pytestmark = pytest.mark.anyio

SCHEMA = {
    "ETId": 50,
    "SV": 1,
    "Schema": {
        "ETId": 10001,
        "TableName": "bench",
        "Fields": [{"FieldName": "walacord_key", "DataType": "TEXT", "Required": True}],
    },
}


@pytest.mark.parametrize("use_state_file", [False, True])
async def test_emulator_accepts_5000_records_per_second(
    tmp_path: Path, use_state_file: bool
) -> None:
    state = str(tmp_path / "state.sqlite") if use_state_file else None
    async with (
        running_emulator(state_path=state) as emulator,
        httpx.AsyncClient(base_url=emulator.url + "/api", timeout=30.0) as http,
    ):
        login = await http.post("/auth/login", json={"userName": "admin", "password": "admin"})
        token = login.json()["api_token"]
        await http.post("/schemas/", json=SCHEMA, headers={"Authorization": token})
        headers = {"Authorization": token, "ETId": "10001", "Content-Type": "application/json"}
        bodies = [
            orjson.dumps({"Data": [{"walacord_key": f"k{b}-{i}"} for i in range(500)]})
            for b in range(40)
        ]

        started = time.perf_counter()
        for body in bodies:
            response = await http.post("/envelopes/submit", content=body, headers=headers)
            assert response.status_code == 200
        elapsed = time.perf_counter() - started

        assert emulator.store.record_count == 20_000
    rate = 20_000 / elapsed
    assert rate > 5000, f"{rate:.0f} records/s"
