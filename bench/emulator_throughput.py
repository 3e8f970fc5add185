"""Measure how many records per second the Walacor emulator accepts in batches.

Starts `walacord emulator` as a subprocess on a free loopback port (or uses --url),
then submits batches with a few concurrent httpx connections and prints one JSON
line with the records per second.

    python bench/emulator_throughput.py --records 50000 --batch 500 --concurrency 4
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from typing import Any

import anyio
import httpx
import orjson

ETID = 10001
SCHEMA = {
    "ETId": 50,
    "SV": 1,
    "Schema": {
        "ETId": ETID,
        "TableName": "bench",
        "Fields": [
            {"FieldName": "walacord_key", "DataType": "TEXT", "Required": True},
            {"FieldName": "amount", "DataType": "INTEGER"},
        ],
    },
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_listening(port: int) -> None:
    with anyio.fail_after(15.0):
        while True:
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                await anyio.sleep(0.05)
            else:
                await stream.aclose()
                return


async def measure(url: str, records: int, batch: int, concurrency: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url + "/api", timeout=30.0) as http:
        login = await http.post("/auth/login", json={"userName": "admin", "password": "admin"})
        token = login.json()["api_token"]
        await http.post("/schemas/", json=SCHEMA, headers={"Authorization": token})
        headers = {"Authorization": token, "ETId": str(ETID), "Content-Type": "application/json"}
        bodies = [
            orjson.dumps(
                {"Data": [{"walacord_key": f"k{start + i}", "amount": i} for i in range(batch)]}
            )
            for start in range(0, records, batch)
        ]
        accepted = 0
        limiter = anyio.Semaphore(concurrency)

        async def send(body: bytes) -> None:
            nonlocal accepted
            async with limiter:
                response = await http.post("/envelopes/submit", content=body, headers=headers)
                response.raise_for_status()
                accepted += len(response.json()["data"]["UID"])

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for body in bodies:
                tg.start_soon(send, body)
        elapsed = time.perf_counter() - started

    return {
        "records": accepted,
        "batch": batch,
        "concurrency": concurrency,
        "seconds": round(elapsed, 3),
        "records_per_second": round(accepted / elapsed),
    }


def run(
    records: int, batch: int, concurrency: int, url: str | None = None, state: str | None = None
) -> dict[str, Any]:
    """Run one measurement, starting a private emulator unless `url` is given.

    `state` is the SQLite file of the private emulator; None keeps rows in memory.
    """
    if url is not None:
        return anyio.run(measure, url, records, batch, concurrency)

    port = free_port()
    command = [sys.executable, "-m", "walacord", "emulator", "--listen", f"127.0.0.1:{port}"]
    if state is not None:
        command += ["--state", state]
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        anyio.run(wait_listening, port)
        return anyio.run(measure, f"http://127.0.0.1:{port}", records, batch, concurrency)
    finally:
        process.terminate()
        process.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000, help="records to submit")
    parser.add_argument("--batch", type=int, default=500, help="records per envelope")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("--url", help="emulator base URL; default starts one on loopback")
    parser.add_argument("--state", help="SQLite state file for the emulator this script starts")
    args = parser.parse_args()
    result = run(args.records, args.batch, args.concurrency, args.url, args.state)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
