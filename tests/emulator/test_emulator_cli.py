"""`walacord emulator` as a subprocess: the curl-like flow, fault flags and shutdown."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

SCHEMA = {
    "ETId": 50,
    "SV": 1,
    "Schema": {
        "ETId": 10001,
        "TableName": "payments",
        "Fields": [{"FieldName": "walacord_key", "DataType": "TEXT", "Required": True}],
    },
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_emulator(*flags: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "walacord", "emulator", "--listen", f"127.0.0.1:{port}", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"emulator exited early: {process.communicate()[1]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process, base
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise AssertionError("emulator did not listen within 15 s")


def stop_emulator(
    process: subprocess.Popen[str], signum: signal.Signals = signal.SIGTERM
) -> tuple[int, str]:
    process.send_signal(signum)
    try:
        _, stderr = process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process.returncode, stderr


@pytest.fixture
def emulator_process() -> Iterator[str]:
    process, base = start_emulator()
    try:
        yield base
    finally:
        if process.poll() is None:
            stop_emulator(process)


def test_cli_login_submit_and_query(emulator_process: str) -> None:
    with httpx.Client(base_url=emulator_process + "/api", timeout=5.0) as http:
        login = http.post("/auth/login", json={"userName": "admin", "password": "admin"})
        token = login.json()["api_token"]
        schema = http.post("/schemas/", json=SCHEMA, headers={"Authorization": token})
        headers = {"Authorization": token, "ETId": "10001"}
        submitted = http.post(
            "/envelopes/submit",
            json={"Data": [{"walacord_key": "a"}, {"walacord_key": "b"}]},
            headers=headers,
        )
        found = http.post(
            "/query/get",
            params={"pageNo": 1, "pageSize": 50, "fromSummary": "true", "totalReq": "true"},
            json={"walacord_key": "b"},
            headers=headers,
        )

    assert login.status_code == 200
    assert token.startswith("Bearer ")
    assert schema.status_code == 200
    assert submitted.status_code == 200
    uids = submitted.json()["data"]["UID"]
    assert len(uids) == 2
    assert found.json()["total"] == 1
    assert found.json()["data"][0]["UID"] == uids[1]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_signal_exits_cleanly(signum: signal.Signals) -> None:
    process, _ = start_emulator()
    returncode, stderr = stop_emulator(process, signum)
    assert returncode == 0
    assert "for local use only" in stderr


def test_cli_users_and_fault_flags() -> None:
    process, base = start_emulator(
        "--user", "ops:secret", "--fault-status", "503", "--fault-path", "/api/schemas"
    )
    try:
        with httpx.Client(base_url=base + "/api", timeout=5.0) as http:
            rejected = http.post("/auth/login", json={"userName": "admin", "password": "admin"})
            login = http.post("/auth/login", json={"userName": "ops", "password": "secret"})
            token = login.json()["api_token"]
            faulted = http.get("/schemas/envelopeTypes", headers={"Authorization": token})
    finally:
        returncode, stderr = stop_emulator(process)

    assert rejected.status_code == 401
    assert login.status_code == 200
    assert faulted.status_code == 503
    assert returncode == 0
    assert "for local use only" not in stderr


def test_cli_rejects_bad_listen_address() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "walacord", "emulator", "--listen", "nowhere"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "HOST:PORT" in result.stderr


@pytest.mark.parametrize(("options", "message"), [
    (["--listen", "127.0.0.1:99999"], "the port must be from 0 to 65535"),
    (["--token-ttl", "-1"], "invalid --token-ttl -1"),
    (["--fault-ratio", "5"], "invalid --fault-ratio 5"),
    (["--fault-latency-ms", "nan"], "invalid --fault-latency-ms nan"),
    (["--state", "/tmp"], "it is a directory"),
    (["--state", "/nonexistent-dir/emulator.db"], "does not exist"),
])
def test_cli_rejects_out_of_range_option(options: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "walacord", "emulator", *options],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
