"""The Walacor probe: a login with a cached token, then GET /api/schemas/envelopeTypes.

The reason class of a failure comes from the client's exception (`.reason`: auth,
timeout, server_error, rate_limited, success_false, ...). For https it also reports
the days until the server's TLS certificate expires.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import anyio
from anyio.streams.tls import TLSAttribute

from walacord.config import WalacorConfig, WalacorProbeConfig
from walacord.errors import WalacorError
from walacord.probes.base import ProbeResult, Status

# The certificate is read again after this many seconds.
TLS_RECHECK_SECONDS = 3600.0


class WalacorProbe:
    """Logs in once, then times the authenticated envelope-types request each run."""

    name = "walacor"

    def __init__(self, settings: Callable[[], WalacorProbeConfig],
                 walacor: Callable[[], WalacorConfig]) -> None:
        self._settings = settings
        self._walacor = walacor
        self._client: Any = None
        self._client_key: tuple[str, ...] = ()
        self._tls_checked_at = -float("inf")
        self.tls_days: float | None = None

    def settings(self) -> WalacorProbeConfig:
        return self._settings()

    def configured(self) -> bool:
        return bool(self._walacor().url)

    def _client_for(self, cfg: WalacorConfig) -> Any:
        from walacord.walacor.client import WalacorClient

        key = (cfg.url, cfg.username, cfg.password, cfg.ca_bundle)
        if self._client is None or key != self._client_key:
            self._client = WalacorClient(
                cfg.url, username=cfg.username, password=cfg.password,
                ca_bundle=cfg.ca_bundle or None, connect_timeout=cfg.connect_timeout,
                read_timeout=cfg.read_timeout, request_timeout=cfg.request_timeout,
                max_connections=2)
            self._client_key = key
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def check(self) -> ProbeResult:
        cfg = self._walacor()
        settings = self.settings()
        client = self._client_for(cfg)
        details: dict[str, Any] = {}

        # Step 1: log in once; later runs reuse the cached token, and the client logs
        # in again by itself when Walacor rejects it with a 401.
        try:
            if client.login_count == 0:
                began = time.monotonic()
                await client.login()
                details["login_seconds"] = round(time.monotonic() - began, 6)
            began = time.monotonic()
            types = await client.envelope_types()
            details["envelope_types_seconds"] = round(time.monotonic() - began, 6)
            details["envelope_types"] = len(types)
        except WalacorError as exc:
            return ProbeResult(Status.CRITICAL, exc.reason, f"Walacor {exc}", details=details)

        # Step 2: the certificate's remaining days, at most once an hour.
        warning = None
        if client.scheme == "https":
            await self._check_tls(cfg, settings)
            details["tls_days_left"] = self.tls_days
            if self.tls_days is not None and self.tls_days < settings.tls_expiry_warning_days:
                warning = f"the TLS certificate expires in {self.tls_days:.1f} days"
        if warning:
            return ProbeResult(Status.WARNING, "tls_expiry", warning, details=details)
        return ProbeResult(Status.OK, "ok", "login and GET schemas/envelopeTypes pass",
                           details=details)

    async def _check_tls(self, cfg: WalacorConfig, settings: WalacorProbeConfig) -> None:
        now = time.monotonic()
        if now - self._tls_checked_at < TLS_RECHECK_SECONDS:
            return
        self._tls_checked_at = now
        parts = urlsplit(cfg.url)
        host = parts.hostname or ""
        context = ssl.create_default_context(cafile=cfg.ca_bundle or None)
        try:
            with anyio.fail_after(cfg.connect_timeout):
                stream = await anyio.connect_tcp(host, parts.port or 443, tls=True,
                                                 ssl_context=context, tls_hostname=host)
                async with stream:
                    cert = stream.extra(TLSAttribute.peer_certificate)
        except (OSError, ssl.SSLError, TimeoutError, anyio.BrokenResourceError):
            self.tls_days = None
            return
        if cert and "notAfter" in cert:
            expires = ssl.cert_time_to_seconds(str(cert["notAfter"]))
            self.tls_days = round((expires - datetime.now(UTC).timestamp()) / 86400, 2)
