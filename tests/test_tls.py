import ssl

import certifi

from walacord.tls import client_context


def test_client_context_shared() -> None:
    assert client_context() is client_context()
    assert client_context(certifi.where()) is client_context(certifi.where())


def test_client_context_per_bundle() -> None:
    assert client_context(certifi.where()) is not client_context()


def test_client_context_verifies() -> None:
    context = client_context()
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.cert_store_stats()["x509_ca"] > 0
