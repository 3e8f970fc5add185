"""Client TLS contexts, one per CA bundle, shared by every HTTP client in the process.

httpx builds a new `ssl.SSLContext` for each client and loads certifi's CA bundle into
it, which costs about 0.7 MiB of memory per client (measured with httpx 0.29 on
Python 3.11). The daemon keeps several clients (the Walacor probe, the outbox's Walacor client, the
API probe, alert sinks), so they share these contexts instead. An `SSLContext` may be
used by many connections at once. Settings on a shared context must not be changed.
"""

from __future__ import annotations

import ssl
from functools import cache

import httpx


@cache
def client_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """Return the shared context that verifies servers against `ca_bundle`.

    Without `ca_bundle` the context trusts certifi's bundle, as httpx does by default.
    SSL_CERT_FILE and SSL_CERT_DIR are ignored, as with httpx's `trust_env=False`.
    """
    if ca_bundle:
        return ssl.create_default_context(cafile=ca_bundle)
    return httpx.create_ssl_context(trust_env=False)
