"""Client TLS contexts, one per CA bundle, shared by every HTTP client in the process.

httpx builds a new `ssl.SSLContext` for each client and loads certifi's CA bundle into
it, which costs about 0.7 MiB of memory per client (measured with httpx 0.29 on
Python 3.11). The daemon keeps several clients (the Walacor probe, the outbox's Walacor client, the
API probe, alert sinks), so they share these contexts instead. An `SSLContext` may be
used by many connections at once. Settings on a shared context must not be changed.

The default context loads certifi's bundle on its first TLS connection, not when it is
built, so a daemon that reaches Walacor and its checks over plain HTTP never parses the
bundle. That saved about 1.4 MiB of RSS in bench/footprint_bench.py (Python 3.11,
OpenSSL 3.0).
"""

from __future__ import annotations

import os
import ssl
import sys
import threading
from functools import cache
from typing import Any


class DeferredTrustContext(ssl.SSLContext):
    """Client context that loads its CA file when it wraps its first connection.

    anyio (4.x, `TLSStream.wrap`) calls `wrap_bio` of an `SSLContext` subclass in a worker
    thread, because it may block, so the file is read off the event loop. That costs a
    thread hop on each new TLS connection, which pooled connections make rare.
    """

    cafile: str
    _trust_loaded: bool
    _trust_lock: threading.Lock

    def __new__(cls, cafile: str) -> DeferredTrustContext:
        context = super().__new__(cls, ssl.PROTOCOL_TLS_CLIENT)
        context.cafile = cafile
        context._trust_loaded = False
        context._trust_lock = threading.Lock()
        return context

    def __init__(self, cafile: str) -> None:
        # SSLContext takes its protocol in __new__. The settings below are those of
        # ssl.create_default_context() for verifying servers (Python 3.11).
        super().__init__()
        self.verify_mode = ssl.CERT_REQUIRED
        self.check_hostname = True
        keylog = os.environ.get("SSLKEYLOGFILE")
        if keylog and not sys.flags.ignore_environment:
            # As ssl.create_default_context does, for debugging with Wireshark.
            self.keylog_filename = keylog

    @property
    def trust_loaded(self) -> bool:
        """Whether the CA file has been loaded."""
        return self._trust_loaded

    def load_trust(self) -> None:
        """Load the CA file on the first call. Later calls return at once."""
        if self._trust_loaded:
            return
        with self._trust_lock:
            if not self._trust_loaded:
                self.load_verify_locations(cafile=self.cafile)
                self._trust_loaded = True

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        self.load_trust()
        return super().wrap_bio(*args, **kwargs)

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        self.load_trust()
        return super().wrap_socket(*args, **kwargs)


def certifi_context() -> DeferredTrustContext:
    """Return a new context that trusts certifi's bundle, as httpx does by default."""
    # Imported on use, as httpx does, so a process that never verifies a server skips it.
    import certifi

    return DeferredTrustContext(certifi.where())


@cache
def client_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """Return the shared context that verifies servers against `ca_bundle`.

    Without `ca_bundle` the context trusts certifi's bundle, as httpx does by default,
    and loads it on its first TLS connection. A `ca_bundle` is loaded at once, so a bad
    file fails here. SSL_CERT_FILE and SSL_CERT_DIR are ignored, as with httpx's
    `trust_env=False`.
    """
    if ca_bundle:
        return ssl.create_default_context(cafile=ca_bundle)
    return certifi_context()
