import shutil
import ssl
import subprocess
from pathlib import Path

import certifi
import httpx
import pytest

from walacord.emulator import running_emulator
from walacord.tls import certifi_context, client_context


def test_client_context_shared() -> None:
    assert client_context() is client_context()
    assert client_context(certifi.where()) is client_context(certifi.where())


def test_client_context_per_bundle() -> None:
    assert client_context(certifi.where()) is not client_context()


def test_client_context_verifies() -> None:
    context = client_context()
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname


def test_ca_bundle_loaded_at_once() -> None:
    assert client_context(certifi.where()).cert_store_stats()["x509_ca"] > 0


def test_certifi_context_matches_default() -> None:
    context = certifi_context()
    default = ssl.create_default_context(cafile=certifi.where())
    assert context.protocol == default.protocol
    assert context.options == default.options
    assert context.verify_flags == default.verify_flags
    assert context.minimum_version == default.minimum_version


def test_certifi_loaded_on_first_wrap() -> None:
    context = certifi_context()
    assert not context.trust_loaded
    assert context.cert_store_stats()["x509_ca"] == 0

    context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="example.com")
    assert context.trust_loaded
    loaded = context.cert_store_stats()["x509_ca"]
    assert loaded == ssl.create_default_context(
        cafile=certifi.where()).cert_store_stats()["x509_ca"]

    context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="example.com")
    assert context.cert_store_stats()["x509_ca"] == loaded


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key, made with openssl(1)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl(1)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
               "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
               "-keyout", str(key), "-out", str(cert)]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


@pytest.mark.anyio
async def test_certifi_loaded_by_https_request(self_signed: tuple[str, str]) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(*self_signed)
    context = certifi_context()
    async with (
        running_emulator(ssl_context=server) as emulator,
        httpx.AsyncClient(verify=context, trust_env=False) as client,
    ):
        assert not context.trust_loaded
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.get(emulator.url + "/_emulator/faults")
    assert context.trust_loaded
