"""Alert sinks: alerts.log, Alertmanager's v2 API and command hooks.

alerts.log is written directly for every notification. Alertmanager and hooks receive
only paged notifications, from the durable queue in alerts.db. Their `deliver` raises
`AlertDeliveryError` when the receiver did not accept a batch. With `permanent=True`
the same request would be rejected again, so the rows are dropped instead of retried.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any, Protocol

import anyio
import httpx
import orjson

from walacord.alerts.engine import Notification
from walacord.alerts.model import rfc3339
from walacord.alerts.store import Delivery
from walacord.errors import AlertDeliveryError
from walacord.logs import ALERT_LOGGER
from walacord.processes import run_in_group
from walacord.tls import client_context

alert_log = logging.getLogger(ALERT_LOGGER)

ALERTMANAGER = "alertmanager"
# The only variables a hook inherits from walacord: its environment may carry
# credentials such as DATABASE_URL or WALACOR_PASSWORD.
HOOK_INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "HOME")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
# A firing alert sent to Alertmanager ends by itself after this many repeat intervals
# without another send, so a walacord that stopped for good does not leave it open.
# A walacord that restarts resolves it itself (see `[alerts] restore_grace`).
ALERTMANAGER_ENDS_AFTER_REPEATS = 3


def write_alert_log(notification: Notification) -> None:
    """Write one JSON line to alerts.log (and the main log) for a notification."""
    alert = notification.alert
    level = logging.INFO if notification.kind == "resolved" else logging.WARNING
    alert_log.log(level, f"alert.{notification.kind}", extra={
        "fields": {
            "fingerprint": alert["fingerprint"],
            "alertname": alert["labels"]["alertname"],
            "severity": alert["labels"]["severity"],
            "labels": alert["labels"],
            "annotations": alert["annotations"],
            "startsAt": alert["startsAt"],
            "endsAt": alert["endsAt"],
            "value": alert.get("value"),
            "paged": notification.page,
            "held_by": alert.get("heldBy"),
        },
        # Each line is one alert event; the repeat filter must never fold two together.
        "no_collapse": True,
    })


class Sink(Protocol):
    """A receiver fed from the delivery queue."""

    name: str
    kind: str  # the bounded `sink` label of walacord_alert_deliveries_total
    batch_size: int

    async def deliver(self, batch: Sequence[Delivery]) -> None:
        """Send the batch in order; raise AlertDeliveryError unless all were accepted."""


class AlertmanagerSink:
    """POST /api/v2/alerts, one request per batch of distinct alerts."""

    kind = ALERTMANAGER
    name = ALERTMANAGER
    batch_size = 64

    def __init__(self, url: str, timeout: float, repeat_interval: float) -> None:
        self.url = url.rstrip("/") + "/api/v2/alerts"
        self.timeout = timeout
        self.repeat_interval = repeat_interval
        # Proxy variables in walacord's environment are meant for other clients, and
        # Alertmanager is normally reached directly.
        self.client = httpx.AsyncClient(timeout=timeout, verify=client_context(),
                                        trust_env=False)

    def body(self, batch: Sequence[Delivery], now: float) -> list[dict[str, Any]]:
        alerts = []
        for delivery in batch:
            payload = delivery.payload
            ends_at = payload.get("endsAt")
            if payload.get("status") != "resolved":
                ends_at = rfc3339(now + ALERTMANAGER_ENDS_AFTER_REPEATS * self.repeat_interval)
            alerts.append({
                "labels": payload["labels"],
                "annotations": payload["annotations"],
                "startsAt": payload["startsAt"],
                "endsAt": ends_at,
            })
        return alerts

    async def deliver(self, batch: Sequence[Delivery]) -> None:
        body = orjson.dumps(self.body(batch, time.time()))
        try:
            with anyio.fail_after(self.timeout):
                response = await self.client.post(
                    self.url, content=body, headers={"Content-Type": "application/json"})
        except TimeoutError:
            raise AlertDeliveryError(f"POST {self.url} timed out after {self.timeout:g}s") \
                from None
        except httpx.HTTPError as exc:
            raise AlertDeliveryError(f"POST {self.url} failed: {exc!r}") from None
        if response.status_code >= 300:
            text = response.text[:200].strip()
            # 400 and 422 reject the content itself; other codes may pass on a retry.
            raise AlertDeliveryError(
                f"POST {self.url} returned {response.status_code}: {text}",
                permanent=response.status_code in (400, 422))

    async def aclose(self) -> None:
        await self.client.aclose()


class HookSink:
    """Run a command per notification: argv without a shell, JSON on stdin and in env.

    The command gets only `HOOK_INHERITED_ENV` from walacord's environment. It runs in
    its own process group, which is killed when the command times out.
    """

    kind = "hook"
    batch_size = 1

    def __init__(self, index: int, argv: Sequence[str], timeout: float) -> None:
        self.name = f"hook{index}"
        self.argv = list(argv)
        self.timeout = timeout

    async def deliver(self, batch: Sequence[Delivery]) -> None:
        for delivery in batch:
            document = orjson.dumps({"kind": delivery.kind, **delivery.payload})
            env = {name: os.environ[name] for name in HOOK_INHERITED_ENV if name in os.environ}
            env.setdefault("PATH", DEFAULT_PATH)
            env["WALACORD_ALERT"] = document.decode()
            env["WALACORD_ALERT_KIND"] = delivery.kind
            try:
                result = await run_in_group(self.argv, self.timeout, env, input=document)
            except TimeoutError:
                raise AlertDeliveryError(f"hook {self.argv[0]} timed out after "
                                         f"{self.timeout:g}s") from None
            except OSError as exc:
                raise AlertDeliveryError(f"hook {self.argv[0]} could not start: "
                                         f"{exc.strerror}") from None
            if result.returncode != 0:
                stderr = result.stderr.decode(errors="replace")[-200:].strip()
                raise AlertDeliveryError(f"hook {self.argv[0]} exited with "
                                         f"{result.returncode}: {stderr}")

    async def aclose(self) -> None:
        return None
