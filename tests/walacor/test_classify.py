"""Each Walacor failure class, produced by real sockets and the emulator's faults.

Every test checks the error class, its `reason`, `maybe_committed`, and that the
error arrived within the configured deadline plus a scheduling margin.
"""

from __future__ import annotations

import email.utils
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from walacord.emulator import Emulator, running_emulator
from walacord.errors import (
    WalacorConnectionResetError,
    WalacorConnectRefusedError,
    WalacorConnectTimeoutError,
    WalacorError,
    WalacorRateLimitedError,
    WalacorServerError,
    WalacorSuccessFalseError,
    WalacorTimeoutError,
    WalacorTLSError,
    WalacorValidationError,
)
from walacord.walacor import WalacorClient
from walacord.walacor.classify import parse_retry_after

pytestmark = [pytest.mark.anyio, pytest.mark.chaos]

# Time allowed beyond a deadline for scheduling on a busy machine.
MARGIN = 1.0


def client_for(url: str, **timeouts: float) -> WalacorClient:
    settings = {"connect_timeout": 1.0, "read_timeout": 1.0, "request_timeout": 3.0}
    settings.update(timeouts)
    return WalacorClient(url, username="admin", password="admin", **settings)


async def expect_error(client: WalacorClient, deadline: float) -> tuple[WalacorError, float]:
    started = time.monotonic()
    with pytest.raises(WalacorError) as caught:
        await client.envelope_types()
    elapsed = time.monotonic() - started
    assert elapsed < deadline + MARGIN, f"took {elapsed:.2f} s, deadline {deadline} s"
    return caught.value, elapsed


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def full_backlog_port() -> Iterator[int]:
    """A loopback port whose accept queue is full, so new SYNs are dropped unanswered."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    # Linux queues backlog + 1 connections; these fill the queue and are never accepted.
    fillers = []
    for _ in range(2):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.05)
    try:
        yield port
    finally:
        for filler in fillers:
            filler.close()
        server.close()


def test_parse_retry_after_reads_seconds_and_dates() -> None:
    now = 1_800_000_000.0
    in_thirty = email.utils.formatdate(now + 30, usegmt=True)
    in_past = email.utils.formatdate(now - 30, usegmt=True)

    assert parse_retry_after("120", now=now) == 120.0
    assert parse_retry_after(in_thirty, now=now) == 30.0
    assert parse_retry_after(in_past, now=now) == 0.0
    assert parse_retry_after("soon", now=now) is None
    assert parse_retry_after(None) is None


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_dns_failure_is_dns() -> None:
    # In a fresh network namespace the resolver cannot send a query anywhere, so the
    # lookup fails at once and no DNS packet leaves the machine.
    script = textwrap.dedent(
        """
        import anyio
        from walacord.errors import WalacorError
        from walacord.walacor import WalacorClient

        async def main():
            async with WalacorClient(
                "https://walacor.invalid", username="u", password="p", request_timeout=5
            ) as client:
                try:
                    await client.envelope_types()
                except WalacorError as exc:
                    print(exc.reason, exc.maybe_committed)

        anyio.run(main)
        """
    )
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {probe.stderr.decode().strip()}")

    result = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["dns", "False"]


async def test_closed_port_is_refused(closed_port: int) -> None:
    async with client_for(f"http://127.0.0.1:{closed_port}") as client:
        error, _ = await expect_error(client, 1.0)
    assert isinstance(error, WalacorConnectRefusedError)
    assert error.reason == "refused"
    assert error.maybe_committed is False


async def test_full_backlog_is_connect_timeout(full_backlog_port: int) -> None:
    async with client_for(f"http://127.0.0.1:{full_backlog_port}", connect_timeout=0.5) as client:
        error, elapsed = await expect_error(client, 0.5)
    assert isinstance(error, WalacorConnectTimeoutError)
    assert error.reason == "connect_timeout"
    assert error.maybe_committed is False
    assert elapsed >= 0.45


async def test_https_to_plain_http_is_tls(emulator: Emulator) -> None:
    url = emulator.url.replace("http://", "https://")
    async with client_for(url) as client:
        error, _ = await expect_error(client, 1.0)
    assert isinstance(error, WalacorTLSError)
    assert error.reason == "tls"
    assert error.maybe_committed is False


async def test_hang_is_read_timeout(emulator: Emulator) -> None:
    emulator.set_faults(mode="hang", path="/api/schemas")
    async with client_for(emulator.url, read_timeout=0.5, request_timeout=5.0) as client:
        error, elapsed = await expect_error(client, 0.5)
    assert isinstance(error, WalacorTimeoutError)
    assert error.reason == "timeout"
    assert error.maybe_committed is True
    assert elapsed >= 0.45


async def test_trickle_is_cut_at_request_deadline(emulator: Emulator) -> None:
    # One byte per second never trips the 1.5 s read timeout; only the whole-request
    # deadline of 2.5 s ends the call.
    emulator.set_faults(mode="trickle", trickle_interval_ms=1000, path="/api/schemas")
    async with client_for(emulator.url, read_timeout=1.5, request_timeout=2.5) as client:
        error, elapsed = await expect_error(client, 2.5)
    assert isinstance(error, WalacorTimeoutError)
    assert "whole-request deadline" in str(error)
    assert error.maybe_committed is True
    assert elapsed >= 2.4


async def test_reset_is_reset(emulator: Emulator) -> None:
    emulator.set_faults(mode="reset", path="/api/schemas")
    async with client_for(emulator.url) as client:
        error, _ = await expect_error(client, 1.0)
    assert isinstance(error, WalacorConnectionResetError)
    assert error.reason == "reset"
    assert error.maybe_committed is True


async def test_status_400_is_validation(emulator: Emulator) -> None:
    emulator.set_faults(status=400, path="/api/schemas")
    async with client_for(emulator.url) as client:
        error, _ = await expect_error(client, 1.0)
    assert isinstance(error, WalacorValidationError)
    assert error.reason == "validation"
    assert error.status == 400
    assert "injected fault" in str(error)


@pytest.mark.parametrize("retry_after", [7, "date"])
async def test_status_429_is_rate_limited(emulator: Emulator, retry_after: int | str) -> None:
    if retry_after == "date":
        header: int | str = email.utils.formatdate(time.time() + 30, usegmt=True)
        low, high = 25.0, 31.0
    else:
        header = retry_after
        low = high = 7.0
    emulator.set_faults(status=429, retry_after=header, path="/api/schemas")

    async with client_for(emulator.url) as client:
        error, _ = await expect_error(client, 1.0)

    assert isinstance(error, WalacorRateLimitedError)
    assert error.reason == "rate_limited"
    assert error.retry_after is not None
    assert low <= error.retry_after <= high


async def test_status_503_is_server_error(emulator: Emulator) -> None:
    emulator.set_faults(status=503, path="/api/schemas")
    async with client_for(emulator.url) as client:
        error, _ = await expect_error(client, 1.0)
    assert isinstance(error, WalacorServerError)
    assert error.reason == "server_error"
    assert error.status == 503
    assert "injected fault" in str(error)


async def test_success_false_is_failure(emulator: Emulator) -> None:
    emulator.set_faults(mode="success_false", path="/api/schemas")
    async with client_for(emulator.url) as client:
        error, _ = await expect_error(client, 1.0)
    assert isinstance(error, WalacorSuccessFalseError)
    assert error.reason == "success_false"
    assert error.maybe_committed is False
    assert "injected fault" in str(error)


async def test_latency_beyond_read_timeout_is_timeout(emulator: Emulator) -> None:
    emulator.set_faults(latency_ms=1500, path="/api/schemas")
    async with client_for(emulator.url, read_timeout=0.5) as client:
        error, _ = await expect_error(client, 0.5)
    assert isinstance(error, WalacorTimeoutError)


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key, made with openssl(1)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl(1)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    command += ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    command += ["-keyout", str(key), "-out", str(cert)]
    subprocess.run(
        command,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return str(cert), str(key)


async def test_ca_bundle_trusts_private_ca(self_signed: tuple[str, str]) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*self_signed)
    async with (
        running_emulator(ssl_context=context) as emulator,
        WalacorClient(
            emulator.url, username="admin", password="admin", ca_bundle=self_signed[0]
        ) as client,
    ):
        types = await client.envelope_types()
    assert emulator.url.startswith("https://")
    assert types[0]["ETId"] == 50


async def test_untrusted_certificate_is_tls(self_signed: tuple[str, str]) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*self_signed)
    async with (
        running_emulator(ssl_context=context) as emulator,
        client_for(emulator.url) as client,
    ):
        error, _ = await expect_error(client, 1.0)
    assert isinstance(error, WalacorTLSError)
    assert "certificate" in str(error).lower()
