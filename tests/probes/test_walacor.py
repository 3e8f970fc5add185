"""The Walacor probe against the project's emulator."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import anyio
import pytest

from tests.conftest import WALACOR_USER
from walacord.config import WalacorConfig, WalacorProbeConfig
from walacord.emulator import Emulator, running_emulator
from walacord.probes.base import Status
from walacord.probes.walacor import WalacorProbe

pytestmark = pytest.mark.anyio


def make_probe(url: str, password: str = WALACOR_USER[1]) -> WalacorProbe:
    walacor = WalacorConfig(url=url, username=WALACOR_USER[0], password=password,
                            connect_timeout=1, read_timeout=1, request_timeout=2)
    return WalacorProbe(lambda: WalacorProbeConfig(), lambda: walacor)


async def test_walacor_probe_ok_reuses_token(walacor_emulator: Emulator) -> None:
    probe = make_probe(walacor_emulator.url)
    try:
        first = await probe.check()
        second = await probe.check()
    finally:
        await probe.aclose()
    assert first.status is Status.OK, first.message
    assert "login_seconds" in first.details
    assert "login_seconds" not in second.details
    assert walacor_emulator.logins == 1


async def test_walacor_probe_wrong_password(walacor_emulator: Emulator) -> None:
    probe = make_probe(walacor_emulator.url, password="wrong-secret")
    try:
        result = await probe.check()
    finally:
        await probe.aclose()
    assert result.status is Status.CRITICAL
    assert result.reason == "auth"
    assert "wrong-secret" not in result.message


@pytest.mark.parametrize(("fault", "reason"), [
    ({"status": 503}, "server_error"),
    ({"status": 429, "retry_after": 5}, "rate_limited"),
    ({"mode": "success_false"}, "success_false"),
])
async def test_walacor_probe_fault_reasons(walacor_emulator: Emulator, fault: dict[str, object],
                                           reason: str) -> None:
    probe = make_probe(walacor_emulator.url)
    try:
        assert (await probe.check()).status is Status.OK
        walacor_emulator.set_faults(path="/api/schemas", **fault)
        result = await probe.check()
    finally:
        await probe.aclose()
    assert result.status is Status.CRITICAL
    assert result.reason == reason


async def test_walacor_probe_hang_times_out(walacor_emulator: Emulator) -> None:
    probe = make_probe(walacor_emulator.url)
    walacor_emulator.set_faults(mode="hang")
    try:
        with anyio.fail_after(5):
            result = await probe.check()
    finally:
        await probe.aclose()
    assert result.status is Status.CRITICAL
    assert result.reason == "timeout"


def test_walacor_probe_not_configured() -> None:
    probe = WalacorProbe(lambda: WalacorProbeConfig(), lambda: WalacorConfig(url=""))
    assert probe.configured() is False


def make_certificate(directory: Path, days: int) -> tuple[str, str]:
    """Return a self-signed certificate for 127.0.0.1 valid `days` days, and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl(1)")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(days),
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


@pytest.mark.parametrize(("days", "expected"), [(3, Status.WARNING), (90, Status.OK)])
async def test_walacor_probe_tls_expiry(tmp_path: Path, days: int, expected: Status) -> None:
    cert, key = make_certificate(tmp_path, days)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async with running_emulator(ssl_context=context, users=dict([WALACOR_USER])) as emulator:
        walacor = WalacorConfig(url=emulator.url, username=WALACOR_USER[0],
                                password=WALACOR_USER[1], ca_bundle=cert,
                                connect_timeout=1, read_timeout=1, request_timeout=2)
        probe = WalacorProbe(lambda: WalacorProbeConfig(), lambda: walacor)
        try:
            result = await probe.check()
        finally:
            await probe.aclose()
    assert result.status is expected, result.message
    assert days - 1 <= result.details["tls_days_left"] <= days
    if expected is Status.WARNING:
        assert result.reason == "tls_expiry"
