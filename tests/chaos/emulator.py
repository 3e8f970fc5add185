"""The Walacor emulator as a separate process, with its faults driven over HTTP, and the
envelope type that outbox scenarios write to and count rows in.

Scenarios run it with the same command as the daemon (`walacord emulator`) and change
its faults through `PUT /_emulator/faults`, so the daemon meets them over real sockets.
"""

from __future__ import annotations

import http.client
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from walacord.pgcluster import free_port
from walacord.walacor.client import WalacorClient

USER = ("chaos", "chaos-password")
# The envelope type the outbox scenarios write to, keyed by walacord's idempotency field.
ETID = 10001
FIELDS = [
    {"FieldName": "walacord_key", "DataType": "TEXT", "Required": False, "MaxLength": 128},
    {"FieldName": "amount", "DataType": "INTEGER", "Required": False},
]


async def create_schema(url: str) -> None:
    async with WalacorClient(url, username=USER[0], password=USER[1]) as client:
        await client.create_schema(ETID, "chaos_payments", FIELDS)


async def rows_per_key(url: str) -> Counter[str]:
    async with WalacorClient(url, username=USER[0], password=USER[1]) as client:
        result = await client.query(ETID, {}, page_no=0, page_size=0)
    return Counter(str(row.get("walacord_key")) for row in result.rows)


class EmulatorProcess:
    """`walacord emulator` on 127.0.0.1 at a free port, for one test."""

    def __init__(self, command: list[str], workdir: Path, token_ttl: float = 3600.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.argv = [*command, "emulator", "--listen", f"127.0.0.1:{self.port}",
                     "--user", ":".join(USER), "--token-ttl", str(token_ttl)]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> EmulatorProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / "emulator.log", "ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.request("GET", "/_emulator/faults")
                return self
            except OSError:
                time.sleep(0.05)
        try:
            log_tail = (self.workdir / "emulator.log").read_text()[-2000:]
        except FileNotFoundError:
            log_tail = "(no log)"
        raise TimeoutError(f"the emulator did not listen on port {self.port} in {timeout}s; "
                           f"its log:\n{log_tail}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            payload = None if body is None else orjson.dumps(body)
            headers = {} if body is None else {"Content-Type": "application/json"}
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        if response.status >= 400:
            raise AssertionError(f"{method} {path} answered {response.status}: {data[:300]!r}")
        return orjson.loads(data) if data else None

    def set_faults(self, *rules: dict[str, Any]) -> None:
        """Replace the fault rules; each rule is a FaultSpec JSON object."""
        # A single rule goes as an object, which every emulator version accepts.
        self.request("PUT", "/_emulator/faults", rules[0] if len(rules) == 1 else list(rules))

    def clear_faults(self) -> None:
        self.request("DELETE", "/_emulator/faults")

    def expire_tokens(self) -> int:
        return int(self.request("POST", "/_emulator/tokens/expire")["expired"])

    def stats(self) -> dict[str, Any]:
        return dict(self.request("GET", "/_emulator/stats"))
