"""The Walacor probe against the project's emulator."""

from __future__ import annotations

import anyio
import pytest

from tests.conftest import WALACOR_USER
from walacord.config import WalacorConfig, WalacorProbeConfig
from walacord.emulator import Emulator
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
