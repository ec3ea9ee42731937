"""Every append states the version it expects: no writer adds to an aggregate blind.

A run that makes every kind of writer append (the lifecycle, a checkpoint deleted
after its sandbox finished, a webhook's attempts, disabling and removal, a
reconciliation sweep, a validation result, a dead letter), then every message on
the stream is read raw: each carries `Nats-Expected-Last-Subject-Sequence`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from aiohttp import web
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from events import EventMeta, ValidationPassed, envelope
from events.subjects import Aggregate
from sandboxer.app.subscriptions import Delivery, subscribe
from sandboxer.store.event_store import JetStreamEventStore, append_decided
from tests.conftest import StartService
from tests.helpers import create, destroy, wait_state
from tests.infra import free_port

EXPECTED = "Nats-Expected-Last-Subject-Sequence"


async def stored(nc: NatsClient) -> list[Msg]:
    """Every message of the stream with its stored headers."""
    js = nc.jetstream()
    last = (await js.stream_info("SANDBOXER")).state.last_seq
    sub = await js.subscribe("sandboxer.>", ordered_consumer=True)
    msgs: list[Msg] = []
    try:
        async with asyncio.timeout(30):
            while not msgs or msgs[-1].metadata.sequence.stream < last:
                msgs.append(await sub.next_msg(timeout=10))
    finally:
        await sub.unsubscribe()
    return msgs


async def failing_receiver() -> tuple[web.AppRunner, str]:
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=500)

    app = web.Application()
    app.router.add_post("/hook", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/hook"


async def test_every_message_on_the_stream_was_appended_at_a_version(
    start_service: StartService, nc: NatsClient, store: JetStreamEventStore, tmp_path: Path
) -> None:
    vendor = tmp_path / "vendor"
    svc = await start_service(
        SANDBOXER_SAAS_STUB_STATE_DIR=str(vendor),
        SANDBOXER_WEBHOOK_ALLOW_NETS="127.0.0.0/8",
        SANDBOXER_WEBHOOK_MAX_ATTEMPTS="1",
        SANDBOXER_WEBHOOK_DISABLE_AFTER="1",
        SANDBOXER_WEBHOOK_BACKOFF="0.05",
    )
    receiver, url = await failing_receiver()
    try:
        async with svc.http.post(
            f"{svc.url}/v1/accounts/default/webhooks",
            json={"url": url, "event_types": ["BecameReady"]},
        ) as resp:
            hook: dict[str, Any] = await resp.json()
            assert resp.status == 201, hook

        made = await create(svc.http, svc.url)
        sandbox_id = made["id"]
        await wait_state(svc.http, svc.url, sandbox_id, {"ready"})
        async with svc.http.post(f"{svc.url}/v1/sandboxes/{sandbox_id}/checkpoints") as resp:
            checkpoint = await resp.json()
            assert resp.status == 202, checkpoint
        async with svc.http.get(
            f"{svc.url}/v1/checkpoints/{checkpoint['id']}",
            params={"wait": "20", "after_seq": str(checkpoint["last_seq"])},
        ) as resp:
            assert (await resp.json())["status"] == "created"
        await wait_state(svc.http, svc.url, sandbox_id, {"ready"})
        await destroy(svc.http, svc.url, sandbox_id)
        await wait_state(svc.http, svc.url, sandbox_id, {"destroyed"})
        # The sandbox is finished: this CheckpointDeleted is appended outside the
        # lifecycle, at the version the stream shows.
        async with svc.http.delete(f"{svc.url}/v1/checkpoints/{checkpoint['id']}") as resp:
            assert resp.status == 200, await resp.json()

        # The webhook's one delivery failed finally, so it is disabled; then removed.
        async with asyncio.timeout(30):
            while True:
                async with svc.http.get(f"{svc.url}/v1/accounts/default/webhooks") as resp:
                    (listed,) = (await resp.json())["webhooks"]
                if listed["disabled"]:
                    break
                await asyncio.sleep(0.1)  # polling a condition under a deadline
        async with svc.http.delete(f"{svc.url}/v1/webhooks/{hook['id']}") as resp:
            assert resp.status == 204

        # A reconciliation sweep finds and removes an orphan at the vendor.
        vendor.mkdir(exist_ok=True)
        (vendor / "sbx-orphan0001.json").write_text(json.dumps({"id": "sbx-orphan0001"}))
        async with svc.http.post(f"{svc.url}/v1/reconcile", params={"remove": "true"}) as resp:
            report = await resp.json()
            assert [o["removed"] for o in report["orphans"]] == [True], report

        # A validator's result, and a dead letter from a consumer that gives up.
        meta = EventMeta(actor="validator:test", correlation_id="c-1")
        result = ValidationPassed(
            **envelope(sandbox_id, meta), ready_event_id="r", exit_code=0, duration_seconds=0.1
        )
        await append_decided(store, Aggregate.of(result), lambda: [result])
        failed = asyncio.Event()

        async def give_up(delivery: Delivery) -> None:
            failed.set()
            raise RuntimeError("no")

        stop = asyncio.Event()
        consumer = asyncio.create_task(
            subscribe(
                nc.jetstream(),
                "gives-up",
                ["sandboxer.sandbox.*.BecameReady"],
                give_up,
                max_attempts=1,
                stop=stop,
            )
        )
        dead = await nc.jetstream().subscribe("sandboxer.deadletter.>", ordered_consumer=True)
        await dead.next_msg(timeout=20)
        stop.set()
        await consumer
    finally:
        await receiver.cleanup()

    msgs = await stored(nc)
    kinds = {m.subject.split(".")[1] for m in msgs}
    assert kinds >= {"sandbox", "ledger", "webhook", "reconcile", "validation", "deadletter"}
    types = {m.subject.rsplit(".", 1)[-1] for m in msgs}
    assert {"CheckpointDeleted", "WebhookDeliveryAttempted", "WebhookDisabled"} <= types
    assert {"WebhookRemoved", "OrphanFound", "OrphanRemoved", "ValidationPassed"} <= types
    blind = [m.subject for m in msgs if EXPECTED not in (m.headers or {})]
    assert blind == []
