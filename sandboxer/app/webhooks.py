"""Webhooks for consumers that cannot speak NATS.

Registered per account with event-type filters. Each webhook has its own durable
consumer (the subscription helper), so a slow or dead receiver only delays its own
deliveries, never the lifecycle or another webhook. Deliveries are signed the way
the major providers do it: header `Sandboxer-Signature: t=<unix time>,v1=<hex
HMAC-SHA256(secret, "<t>.<body>")>`; retried with back-off, one event at a time;
each delivery's outcome (success, or failure after the last attempt) is recorded
once (`WebhookDeliveryAttempted`). At least once: receivers dedupe on the
`Sandboxer-Event-Id` header to be exactly once in effect.

What a member can make the service do is bounded: targets must be public addresses
(webhook_targets), an account has at most SANDBOXER_WEBHOOK_MAX_PER_ACCOUNT webhooks,
a new webhook gets new events only unless it asks for the history, and after
SANDBOXER_WEBHOOK_DISABLE_AFTER deliveries in a row finally failed the webhook is
disabled (`WebhookDisabled`) until it is removed and registered again.
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
import nats.js.errors
from nats.aio.client import Client as NatsClient

from events import (
    ALL_EVENTS,
    EventMeta,
    WebhookDeliveryAttempted,
    WebhookDisabled,
    WebhookRegistered,
    WebhookRemoved,
    envelope,
)
from events.subjects import Aggregate, type_filter
from events.webhooks import WebhookEvent
from projections.webhooks import WebhookState, fold
from sandboxer.app.read_model import ProjectionRunner
from sandboxer.app.subscriptions import Delivery, subscribe
from sandboxer.app.webhook_settings import check_env
from sandboxer.app.webhook_targets import (
    PolicyResolver,
    TargetPolicy,
    TargetRefused,
)
from sandboxer.errors import InvalidInput
from sandboxer.metrics import Metrics
from sandboxer.store.event_store import STREAM_NAME, JetStreamEventStore, append_decided

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Sandboxer-Signature"
TOLERANCE_SECONDS = 300
_TYPES = {t.type_name(): t for t in ALL_EVENTS if t.KIND != "webhook"}


class WebhookError(InvalidInput, ValueError):
    """A registration refused: 400 naming the field, or 409 at the account's limit."""

    def __init__(self, message: str, field: str, status: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.status = status
        self.code = "invalid_body" if status == 400 else "limit_reached"


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


START_FROM = ("new", "beginning")


class WebhookOut(msgspec.Struct):
    id: str
    account: str
    url: str
    event_types: list[str]
    secret: str | None = None  # shown once, at registration
    from_: str = msgspec.field(default="new", name="from")
    disabled: bool = False
    disabled_reason: str | None = None


class Webhooks:
    def __init__(
        self,
        nc: NatsClient,
        store: JetStreamEventStore,
        runner: ProjectionRunner,
        data_dir: Path,
        environ: Mapping[str, str],
        metrics: Metrics | None = None,
    ) -> None:
        self.nc = nc
        self.metrics = metrics or Metrics()  # delivery attempts by outcome
        self.store = store
        self.runner = runner
        self.key = _master_key(data_dir / "webhook.key")
        self.state = WebhookState()  # registrations, disabled ones, failure streaks
        self._tasks: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = {}
        self._registering = asyncio.Lock()  # the per-account limit holds under races
        self.max_attempts = int(environ.get("SANDBOXER_WEBHOOK_MAX_ATTEMPTS", "8"))
        raw = environ.get("SANDBOXER_WEBHOOK_BACKOFF", "1,2,5,10,30,60")
        self.backoff = [float(x) for x in raw.split(",") if x]
        self.timeout = float(environ.get("SANDBOXER_WEBHOOK_TIMEOUT", "10"))
        self.max_per_account, self.disable_after, allow = check_env(environ)
        self.policy = TargetPolicy(allow, resolve_timeout=min(self.timeout, 5.0))
        self._http: aiohttp.ClientSession | None = None

    def secret(self, webhook_id: str) -> str:
        return hmac.new(self.key, webhook_id.encode(), hashlib.sha256).hexdigest()

    async def start(self) -> None:
        # Every connection resolves through the policy (no DNS cache: each delivery
        # resolves anew) and goes to an address it checked.
        connector = aiohttp.TCPConnector(resolver=PolicyResolver(self.policy), use_dns_cache=False)
        self._http = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout)
        )
        # What the read models folded (from their snapshot and the tail): no second
        # read of the stream. From here on this node folds what it appends itself.
        folded = self.runner.webhooks.state
        self.state = WebhookState(
            registrations=dict(folded.registrations),
            disabled=dict(folded.disabled),
            failures=dict(folded.failures),
        )
        for webhook_id, registration in self.registrations.items():
            if webhook_id not in self.disabled:
                self._start(registration)

    def _fold(self, event: object) -> None:
        fold(self.state, event)

    @property
    def registrations(self) -> dict[str, WebhookRegistered]:
        return self.state.registrations

    @property
    def disabled(self) -> dict[str, WebhookDisabled]:
        return self.state.disabled

    @property
    def failures(self) -> dict[str, int]:
        """Deliveries in a row that finally failed, per webhook."""
        return self.state.failures

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
        self,
        account: str,
        url: str,
        event_types: list[str],
        meta: EventMeta,
        start_from: str = "new",
    ) -> WebhookOut:
        try:
            parsed = urlparse(url)
            parsed.port  # noqa: B018 - parses the port: ValueError when it is not a number
        except ValueError as exc:  # e.g. "http://[" or a port that is not a number
            raise WebhookError(f"url is not a valid URL: {exc}", "url") from None
        if parsed.scheme not in ("http", "https") or not parsed.netloc or len(url) > 2000:
            raise WebhookError("url must be an http(s) URL", "url")
        unknown = [t for t in event_types if t not in _TYPES]
        if not event_types or unknown:
            raise WebhookError(
                f"event_types must name event types; unknown: {unknown}", "event_types"
            )
        if start_from not in START_FROM:
            raise WebhookError(f"from must be one of {list(START_FROM)}", "from")
        try:
            await self.policy.check_url(url)  # last: it may resolve a name
        except TargetRefused as exc:
            raise WebhookError(str(exc), "url") from None
        async with self._registering:
            owned = sum(1 for r in self.registrations.values() if r.account == account)
            if owned >= self.max_per_account:
                raise WebhookError(
                    f"account {account!r} has {owned} webhooks, the most allowed "
                    f"(SANDBOXER_WEBHOOK_MAX_PER_ACCOUNT={self.max_per_account}); "
                    "remove one first",
                    "account",
                    status=409,
                )
            # "new": from the next event on; events appended meanwhile count as new.
            start_seq = await self.store.last_seq() + 1 if start_from == "new" else 0
            webhook_id = f"wh-{secrets.token_hex(6)}"
            event = WebhookRegistered(
                **envelope(webhook_id, meta),
                account=account,
                url=url,
                event_types=sorted(set(event_types)),
                start_seq=start_seq,
            )
            await self.store.append([event], 0)
            self.registrations[webhook_id] = event
        self._start(event)
        out = self._out(event)
        out.secret = self.secret(webhook_id)
        return out

    def _out(self, registration: WebhookRegistered) -> WebhookOut:
        disabled = self.disabled.get(registration.aggregate_id)
        return WebhookOut(
            registration.aggregate_id,
            registration.account,
            registration.url,
            registration.event_types,
            from_="new" if registration.start_seq > 0 else "beginning",
            disabled=disabled is not None,
            disabled_reason=disabled.reason if disabled else None,
        )

    async def remove(self, webhook_id: str, meta: EventMeta) -> bool:
        if webhook_id not in self.registrations:
            return False
        removed = WebhookRemoved(**envelope(webhook_id, meta), reason="removed")
        await self._append(removed)
        self._fold(removed)
        task, stop = self._tasks.pop(webhook_id, (None, None))
        if stop is not None and task is not None:
            stop.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Its durable consumer goes too (a disabled webhook's as well): nothing
        # would consume it again, and the server would keep its state forever.
        for durable in (self.durable(webhook_id), _legacy_durable(webhook_id)):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self.nc.jetstream().delete_consumer(STREAM_NAME, durable)
        return True

    def durable(self, webhook_id: str) -> str:
        """The webhook's durable consumer: named from the service's key, so a reader
        (who sees webhook ids in the stream but cannot list consumers) cannot guess
        it and pull or ack its deliveries."""
        digest = hmac.new(self.key, f"durable/{webhook_id}".encode(), hashlib.sha256)
        return f"webhook-{digest.hexdigest()[:24]}"

    async def _consume(self, registration: WebhookRegistered, stop: asyncio.Event) -> None:
        webhook_id = registration.aggregate_id
        js = self.nc.jetstream()
        start_seq = registration.start_seq
        legacy = _legacy_durable(webhook_id)
        try:
            # Named after the id by earlier releases: go on where it stood.
            info = await js.consumer_info(STREAM_NAME, legacy)
            start_seq = info.ack_floor.stream_seq + 1 if info.ack_floor else start_seq
        except nats.js.errors.NotFoundError:
            legacy = ""

        async def handler(delivery: Delivery) -> None:
            await self._deliver(registration, delivery)

        consuming = asyncio.create_task(
            subscribe(
                js,
                self.durable(webhook_id),
                [type_filter(_TYPES[t]) for t in registration.event_types],
                handler,
                max_attempts=self.max_attempts,
                backoff=self.backoff,
                ack_wait=self.timeout * 3,
                stop=stop,
                start_seq=start_seq,
                max_ack_pending=1,  # a failing receiver holds back its own queue only
            )
        )
        try:
            if legacy:
                await self._drop_legacy(legacy, self.durable(webhook_id))
            await consuming
        finally:
            consuming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consuming

    async def _drop_legacy(self, legacy: str, durable: str) -> None:
        """Delete the old-named consumer once its successor exists (a crash between
        the two leaves the old one, and the next start does this again)."""
        js = self.nc.jetstream()
        async with asyncio.timeout(30):
            while True:
                try:
                    await js.consumer_info(STREAM_NAME, durable)
                    break
                except nats.js.errors.NotFoundError:
                    await asyncio.sleep(0.1)  # the consumer task creates it first
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_consumer(STREAM_NAME, legacy)

    def list(self, account: str) -> list[WebhookOut]:
        return [self._out(r) for r in self.registrations.values() if r.account == account]

    def _start(self, registration: WebhookRegistered) -> None:
        webhook_id = registration.aggregate_id
        stop = asyncio.Event()
        task = asyncio.create_task(self._consume(registration, stop), name=f"webhook-{webhook_id}")
        self._tasks[webhook_id] = (task, stop)

    async def _deliver(self, registration: WebhookRegistered, delivery: Delivery) -> None:
        webhook_id = registration.aggregate_id
        if webhook_id in self.disabled or webhook_id not in self.registrations:
            raise RuntimeError(f"webhook {webhook_id} is disabled or removed: not sent")
        if self.runner.account_of(delivery.subject, delivery.event) != registration.account:
            return  # another account's sandbox: not for this webhook
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
        status, error = await self._post(registration.url, body, headers)
        ok = not error
        final = not ok and delivery.attempt >= self.max_attempts
        self.metrics.webhook_deliveries.labels("ok" if ok else "final" if final else "failed").inc()
        if not ok and not final:
            # A retry is coming: not recorded, or a dead receiver floods the stream.
            raise RuntimeError(f"webhook {webhook_id}: {error}")
        meta = EventMeta(
            actor="system:webhooks",
            correlation_id=delivery.event.correlation_id,
            causation_id=delivery.key,
        )
        attempt = WebhookDeliveryAttempted(
            **envelope(webhook_id, meta, f"{webhook_id}.{delivery.key}.{delivery.attempt}"),
            delivered_event_id=delivery.key,
            delivered_seq=delivery.seq,
            attempt=delivery.attempt,
            ok=ok,
            status=status,
            error=error,
            final=final,
        )
        await self._append(attempt)
        self._fold(attempt)
        if ok:
            return
        if self.failures.get(webhook_id, 0) >= self.disable_after:
            await self._disable(webhook_id, error, meta)
        raise RuntimeError(f"webhook {webhook_id}: {error}")

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int | None, str]:
        """POST once: (status, "") on a 2xx, else (status or None, why it failed).
        The target is checked first: a refused one gets no request at all."""
        try:
            await self.policy.check_url(url)
        except TargetRefused as exc:
            return None, f"target refused, not sent: {exc}"[:500]
        assert self._http is not None
        try:
            async with self._http.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                if 200 <= resp.status < 300:
                    return resp.status, ""
                return resp.status, f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return None, f"{type(exc).__name__}: {exc}"[:500]

    async def _disable(self, webhook_id: str, error: str, meta: EventMeta) -> None:
        """Stop delivering for good: recorded, so a restart does not start it again."""
        failures = self.failures.get(webhook_id, 0)
        disabled = WebhookDisabled(
            **envelope(webhook_id, meta, f"{webhook_id}.disabled"),
            reason=f"{failures} deliveries in a row failed; last: {error}"[:500],
            failures=failures,
        )
        await self._append(disabled)
        self._fold(disabled)
        log.warning("webhook %s disabled: %s", webhook_id, disabled.reason)
        _, stop = self._tasks.get(webhook_id, (None, None))
        if stop is not None:
            stop.set()  # the consumer loop ends after this event; no cancel from inside

    async def _append(self, event: WebhookEvent) -> None:
        """At the webhook's current version: several nodes deliver through one
        durable consumer, so its events come from several writers."""
        await append_decided(self.store, Aggregate.of(event), lambda: [event])


def _legacy_durable(webhook_id: str) -> str:
    """What earlier releases named a webhook's consumer (readers can guess it)."""
    return f"webhook-{webhook_id}"


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
