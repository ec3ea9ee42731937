"""Webhooks: a real aiohttp receiver that verifies signatures and is down at first."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

from aiohttp import web
from nats.aio.client import Client as NatsClient
from nats.js import api

from sandboxer.app.webhooks import SIGNATURE_HEADER, sign, verify
from tests.conftest import StartService
from tests.helpers import create, wait_state
from tests.infra import free_port


class Receiver:
    """Answers 503 to the first `down_for` requests; dedupes on Sandboxer-Event-Id."""

    def __init__(self, secret_box: dict[str, str], down_for: int) -> None:
        self.secret_box = secret_box
        self.down_for = down_for
        self.requests = 0
        self.bad_signatures = 0
        self.effects: Counter[str] = Counter()  # event id -> times acted on
        self.events: dict[str, dict[str, Any]] = {}
        self.changed = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests += 1
        if not verify(self.secret_box["secret"], request.headers[SIGNATURE_HEADER], body):
            self.bad_signatures += 1
            return web.Response(status=401)
        if self.requests <= self.down_for:
            return web.Response(status=503)
        event_id = request.headers["Sandboxer-Event-Id"]
        if event_id not in self.events:  # exactly once in effect
            self.events[event_id] = json.loads(body)
            self.effects[event_id] += 1
        self.changed.set()
        return web.Response(status=204)


async def test_signed_retried_and_exactly_once_in_effect(
    start_service: StartService, nc: NatsClient
) -> None:
    svc = await start_service(
        SANDBOXER_WEBHOOK_BACKOFF="0.1,0.2", SANDBOXER_WEBHOOK_ALLOW_NETS="127.0.0.0/8"
    )
    box: dict[str, str] = {}
    receiver = Receiver(box, down_for=3)
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with svc.http.post(
            f"{svc.url}/v1/accounts/default/webhooks",
            json={
                "url": f"http://127.0.0.1:{port}/hook",
                "event_types": ["SandboxRequested", "BecameReady"],
            },
        ) as resp:
            registered = await resp.json()
            assert resp.status == 201, registered
        box["secret"] = registered["secret"]
        made = await create(svc.http, svc.url)
        # The receiver is down, yet the lifecycle goes on.
        await wait_state(svc.http, svc.url, made["id"], {"ready"})
        async with asyncio.timeout(30):
            while len(receiver.events) < 2:
                receiver.changed.clear()
                await receiver.changed.wait()
        assert receiver.bad_signatures == 0
        types = sorted(e["event"]["type"] for e in receiver.events.values())
        assert types == ["BecameReady", "SandboxRequested"]
        assert set(receiver.effects.values()) == {1}
        assert receiver.requests >= 5, "the first attempts failed and were retried"
        async with svc.http.get(f"{svc.url}/v1/accounts/default/webhooks") as resp:
            listed = (await resp.json())["webhooks"]
        assert [w["id"] for w in listed] == [registered["id"]]
        assert listed[0]["secret"] is None, "the secret is shown once only"
    finally:
        await runner.cleanup()
    # One record per delivery outcome (not per retry), right after its answer: wait
    # for the last one; together they count every attempt.
    subject = f"sandboxer.webhook.{registered['id']}.WebhookDeliveryAttempted"
    records: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while len(records) < 2:
            records = await recorded(nc, subject)
            if len(records) < 2:
                await asyncio.sleep(0.05)  # polling a condition, under a deadline
    assert len(records) == 2 and all(r["ok"] for r in records), records
    assert sum(r["attempt"] for r in records) == receiver.requests, "attempts counted"
    async with svc.http.delete(f"{svc.url}/v1/webhooks/{registered['id']}") as resp:
        assert resp.status == 204


async def recorded(nc: NatsClient, subject: str) -> list[dict[str, Any]]:
    """The events on `subject` so far, as JSON objects."""
    js = nc.jetstream()
    info = await js.stream_info("SANDBOXER", subjects_filter=subject)
    count = (info.state.subjects or {}).get(subject, 0)
    if not count:
        return []
    sub = await js.subscribe(subject, ordered_consumer=True)
    try:
        found = []
        for _ in range(count):
            msg = await sub.next_msg(timeout=5)
            found.append(json.loads(msg.data))
        return found
    finally:
        await sub.unsubscribe()


async def test_bad_registrations(start_service: StartService) -> None:
    svc = await start_service()
    for body, field in [
        ({"url": "ftp://x", "event_types": ["BecameReady"]}, "url"),
        ({"url": "http://127.0.0.1:1/", "event_types": ["Nope"]}, "event_types"),
        ({"url": "http://127.0.0.1:1/", "event_types": []}, "event_types"),
        ({"url": "http://127.0.0.1:1/"}, "event_types"),
    ]:
        async with svc.http.post(f"{svc.url}/v1/accounts/default/webhooks", json=body) as r:
            assert r.status == 400
            assert (await r.json())["error"]["field"] == field


def test_signature_rules() -> None:
    body = b'{"a": 1}'
    header = sign("s3cret", body, timestamp=1_700_000_000)
    assert verify("s3cret", header, body, now=1_700_000_100)
    assert not verify("s3cret", header, body + b" ", now=1_700_000_100)
    assert not verify("other", header, body, now=1_700_000_100)
    assert not verify("s3cret", header, body, now=1_700_000_000 + 3600), "replayed too late"
    assert not verify("s3cret", "garbage", body)


async def test_a_consumer_named_by_an_earlier_release_is_carried_on(
    start_service: StartService, nc: NatsClient
) -> None:
    """Earlier releases named a webhook's consumer `webhook-<id>`, which a reader can
    guess from the stream. A start finds such a consumer, goes on from where it
    stood under the unguessable name, and deletes it."""
    env = {"SANDBOXER_WEBHOOK_BACKOFF": "0.1", "SANDBOXER_WEBHOOK_ALLOW_NETS": "127.0.0.0/8"}
    box: dict[str, str] = {}
    receiver = Receiver(box, down_for=0)
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    js = nc.jetstream()
    try:
        svc = await start_service(**env)
        async with svc.http.post(
            f"{svc.url}/v1/accounts/default/webhooks",
            json={"url": f"http://127.0.0.1:{port}/hook", "event_types": ["SandboxRequested"]},
        ) as resp:
            registered = await resp.json()
            assert resp.status == 201, registered
        box["secret"] = registered["secret"]
        first = await create(svc.http, svc.url)
        async with asyncio.timeout(30):
            while not receiver.events:
                receiver.changed.clear()
                await receiver.changed.wait()
        assert svc.service.webhooks is not None
        durable = svc.service.webhooks.durable(registered["id"])
        assert registered["id"] not in durable
        await svc.stop()

        # As an earlier release left it: the old name, everything so far delivered.
        last = (await js.stream_info("SANDBOXER")).state.last_seq
        old = await js.consumer_info("SANDBOXER", durable)
        await js.delete_consumer("SANDBOXER", durable)
        legacy = f"webhook-{registered['id']}"
        await js.add_consumer(
            "SANDBOXER",
            api.ConsumerConfig(
                durable_name=legacy,
                ack_policy=api.AckPolicy.EXPLICIT,
                filter_subjects=old.config.filter_subjects,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=last + 1,
            ),
        )

        svc = await start_service(**env)
        second = await create(svc.http, svc.url)
        async with asyncio.timeout(30):
            while len(receiver.events) < 2:
                receiver.changed.clear()
                await receiver.changed.wait()
        delivered = [e["event"]["aggregate_id"] for e in receiver.events.values()]
        assert delivered == [first["id"], second["id"]]
        assert receiver.requests == 2, "nothing was delivered again"
        names = [i.name for i in await js.consumers_info("SANDBOXER")]
        assert durable in names and legacy not in names
    finally:
        await runner.cleanup()
