"""The validator-facing subscription helper against a real JetStream."""

from __future__ import annotations

import asyncio
from collections import Counter

from nats.aio.client import Client as NatsClient

from events import BecameReady, EventMeta, SandboxRequested, envelope
from sandboxer.app.subscriptions import Delivery, dead_letter_subject, subscribe
from sandboxer.store.event_store import JetStreamEventStore

META = EventMeta(actor="test", correlation_id="c")
READY = "sandboxer.sandbox.*.BecameReady"


async def seed(store: JetStreamEventStore, n: int, start: int = 0) -> list[str]:
    ids = []
    for i in range(start, start + n):
        sid = f"sbx-sub{i:03d}"
        (seq,) = await store.append(
            [
                SandboxRequested(
                    **envelope(sid, META), profile="p", extension="e", inputs={}, ttl_seconds=5
                )
            ],
            0,
        )
        await store.append([BecameReady(**envelope(sid, META))], seq)
        ids.append(sid)
    return ids


async def run_until(condition: asyncio.Event, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    stop = asyncio.Event()
    task = asyncio.create_task(subscribe(*args, stop=stop, **kwargs))
    try:
        async with asyncio.timeout(30):
            await condition.wait()
    finally:
        stop.set()
        await task


async def test_each_event_once_and_position_kept(
    store: JetStreamEventStore, nc: NatsClient
) -> None:
    ids = await seed(store, 5)
    seen: list[str] = []
    done = asyncio.Event()

    async def handler(d: Delivery) -> None:
        seen.append(d.event.aggregate_id)
        if len(seen) == 5:
            done.set()

    await run_until(done, nc.jetstream(), "validator", [READY], handler)
    assert seen == ids, "only the ready events, in order"
    more = await seed(store, 2, start=5)
    again: list[str] = []
    done2 = asyncio.Event()

    async def handler2(d: Delivery) -> None:
        again.append(d.event.aggregate_id)
        if len(again) == 2:
            done2.set()

    await run_until(done2, nc.jetstream(), "validator", [READY], handler2)
    assert again == more, "a restarted durable consumer resumes after what it acked"


async def test_failures_are_redelivered_with_the_same_key(
    store: JetStreamEventStore, nc: NatsClient
) -> None:
    await seed(store, 1)
    attempts: list[tuple[str, int]] = []
    done = asyncio.Event()

    async def flaky(d: Delivery) -> None:
        attempts.append((d.key, d.attempt))
        if d.attempt < 3:
            raise RuntimeError("not yet")
        done.set()

    await run_until(done, nc.jetstream(), "flaky", [READY], flaky, backoff=[0.05])
    assert [a for _, a in attempts] == [1, 2, 3]
    assert len({k for k, _ in attempts}) == 1


async def test_always_failing_handler_ends_in_the_dead_letter_subject(
    store: JetStreamEventStore, nc: NatsClient
) -> None:
    ids = await seed(store, 2)
    calls: Counter[str] = Counter()
    js = nc.jetstream()
    dead = await js.subscribe(dead_letter_subject("broken"), ordered_consumer=True)

    async def broken(d: Delivery) -> None:
        calls[d.event.aggregate_id] += 1
        raise ValueError("health check exploded")

    stop = asyncio.Event()
    task = asyncio.create_task(
        subscribe(js, "broken", [READY], broken, max_attempts=3, backoff=[0.05], stop=stop)
    )
    letters = [await dead.next_msg(timeout=20) for _ in ids]
    stop.set()
    await task
    assert calls == {sid: 3 for sid in ids}
    for msg in letters:
        assert msg.headers is not None
        assert msg.headers["Sandboxer-Attempts"] == "3"
        assert "health check exploded" in msg.headers["Sandboxer-Error"]
        assert msg.headers["Sandboxer-Subject"].endswith(".BecameReady")
    info = await js.consumer_info("SANDBOXER", "broken")
    assert info.num_ack_pending == 0 and info.num_pending == 0
