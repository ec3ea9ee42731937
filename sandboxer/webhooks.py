"""Webhooks for consumers that cannot speak NATS.

Registered per account with event-type filters. Each webhook has its own durable
consumer (the subscription helper), so a slow or dead receiver only delays its own
deliveries, never the lifecycle or another webhook. Deliveries are signed the way
the major providers do it: header `Sandboxer-Signature: t=<unix time>,v1=<hex
HMAC-SHA256(secret, "<t>.<body>")>`; retried with back-off; every attempt is
recorded (`WebhookDeliveryAttempted`). At least once: receivers dedupe on the
`Sandboxer-Event-Id` header to be exactly once in effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import msgspec
from nats.aio.client import Client as NatsClient

from events import (
    ALL_EVENTS,
    EventMeta,
    WebhookDeliveryAttempted,
    WebhookRegistered,
    WebhookRemoved,
)
from sandboxer.event_store import JetStreamEventStore
from sandboxer.read_model import ProjectionRunner
from sandboxer.subscriptions import Delivery, subscribe

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Sandboxer-Signature"
TOLERANCE_SECONDS = 300
_KINDS = {t.type_name(): t.KIND for t in ALL_EVENTS if t.KIND != "webhook"}


class WebhookError(ValueError):
    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    ts = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


def verify(secret: str, header: str, body: bytes, now: float | None = None) -> bool:
    """What a receiver does: check the MAC and that the timestamp is recent."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        ts = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs((now or time.time()) - ts) > TOLERANCE_SECONDS:
        return False
    return hmac.compare_digest(sign(secret, body, ts), header)


class WebhookOut(msgspec.Struct):
    id: str
    account: str
    url: str
    event_types: list[str]
    secret: str | None = None  # shown once, at registration


class Webhooks:
    def __init__(
        self,
        nc: NatsClient,
        store: JetStreamEventStore,
        runner: ProjectionRunner,
        data_dir: Path,
        environ: Mapping[str, str],
    ) -> None:
        self.nc = nc
        self.store = store
        self.runner = runner
        self.key = _master_key(data_dir / "webhook.key")
        self.registrations: dict[str, WebhookRegistered] = {}
        self._tasks: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = {}
        self.max_attempts = int(environ.get("SANDBOXER_WEBHOOK_MAX_ATTEMPTS", "8"))
        raw = environ.get("SANDBOXER_WEBHOOK_BACKOFF", "1,2,5,10,30,60")
        self.backoff = [float(x) for x in raw.split(",") if x]
        self.timeout = float(environ.get("SANDBOXER_WEBHOOK_TIMEOUT", "10"))
        self._http: aiohttp.ClientSession | None = None

    def secret(self, webhook_id: str) -> str:
        return hmac.new(self.key, webhook_id.encode(), hashlib.sha256).hexdigest()

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        async for recorded in self.store.read(1, "sandboxer.webhook.>"):
            event = recorded.event
            if isinstance(event, WebhookRegistered):
                self.registrations[event.aggregate_id] = event
            elif isinstance(event, WebhookRemoved):
                self.registrations.pop(event.aggregate_id, None)
        for registration in self.registrations.values():
            self._start(registration)

    async def stop(self) -> None:
        for task, stop in self._tasks.values():
            stop.set()
            task.cancel()
        for task, _ in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._http is not None:
            await self._http.close()

    async def register(
        self, account: str, url: str, event_types: list[str], meta: EventMeta
    ) -> WebhookOut:
        try:
            parsed = urlparse(url)
            parsed.port  # noqa: B018 - parses the port: ValueError when it is not a number
        except ValueError as exc:  # e.g. "http://[" or a port that is not a number
            raise WebhookError(f"url is not a valid URL: {exc}", "url") from None
        if parsed.scheme not in ("http", "https") or not parsed.netloc or len(url) > 2000:
            raise WebhookError("url must be an http(s) URL", "url")
        unknown = [t for t in event_types if t not in _KINDS]
        if not event_types or unknown:
            raise WebhookError(
                f"event_types must name event types; unknown: {unknown}", "event_types"
            )
        webhook_id = f"wh-{secrets.token_hex(6)}"
        event = WebhookRegistered.create(
            webhook_id, meta, account=account, url=url, event_types=sorted(set(event_types))
        )
        await self.store.append([event], 0)
        self.registrations[webhook_id] = event
        self._start(event)
        return WebhookOut(webhook_id, account, url, event.event_types, self.secret(webhook_id))

    async def remove(self, webhook_id: str, meta: EventMeta) -> bool:
        if webhook_id not in self.registrations:
            return False
        await self.store.append([WebhookRemoved.create(webhook_id, meta, reason="removed")], None)
        self.registrations.pop(webhook_id, None)
        task, stop = self._tasks.pop(webhook_id, (None, None))
        if stop is not None and task is not None:
            stop.set()
            task.cancel()
        return True

    def list(self, account: str) -> list[WebhookOut]:
        return [
            WebhookOut(r.aggregate_id, r.account, r.url, r.event_types)
            for r in self.registrations.values()
            if r.account == account
        ]

    def _start(self, registration: WebhookRegistered) -> None:
        webhook_id = registration.aggregate_id
        subjects = [f"sandboxer.{_KINDS[t]}.*.{t}" for t in registration.event_types]
        stop = asyncio.Event()

        async def handler(delivery: Delivery) -> None:
            await self._deliver(registration, delivery)

        task = asyncio.create_task(
            subscribe(
                self.nc.jetstream(),
                f"webhook-{webhook_id}",
                subjects,
                handler,
                max_attempts=self.max_attempts,
                backoff=self.backoff,
                ack_wait=self.timeout * 3,
                stop=stop,
            ),
            name=f"webhook-{webhook_id}",
        )
        self._tasks[webhook_id] = (task, stop)

    async def _deliver(self, registration: WebhookRegistered, delivery: Delivery) -> None:
        if self.runner.account_of(delivery.subject, delivery.event) != registration.account:
            return  # another account's sandbox: not for this webhook
        webhook_id = registration.aggregate_id
        body = msgspec.json.encode(
            {"seq": delivery.seq, "subject": delivery.subject, "event": delivery.event}
        )
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.secret(webhook_id), body),
            "Sandboxer-Event-Id": delivery.key,
            "Sandboxer-Webhook-Id": webhook_id,
            "Sandboxer-Delivery-Attempt": str(delivery.attempt),
        }
        status: int | None = None
        error = ""
        assert self._http is not None
        try:
            async with self._http.post(registration.url, data=body, headers=headers) as resp:
                status = resp.status
                ok = 200 <= resp.status < 300
                if not ok:
                    error = f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok = False
            error = f"{type(exc).__name__}: {exc}"[:500]
        final = not ok and delivery.attempt >= self.max_attempts
        meta = EventMeta(
            actor="system:webhooks",
            correlation_id=delivery.event.correlation_id,
            causation_id=delivery.key,
        )
        attempt = WebhookDeliveryAttempted.create(
            webhook_id,
            meta,
            event_id=f"{webhook_id}.{delivery.key}.{delivery.attempt}",
            delivered_event_id=delivery.key,
            delivered_seq=delivery.seq,
            attempt=delivery.attempt,
            ok=ok,
            status=status,
            error=error,
            final=final,
        )
        await self.store.append([attempt], None)
        if not ok:
            raise RuntimeError(f"webhook {webhook_id}: {error}")


def _master_key(path: Path) -> bytes:
    """The key webhook secrets derive from; created once, readable by the owner only."""
    if path.exists():
        return bytes.fromhex(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex())
    return key
