"""1. Append throughput: events/s through our event store vs raw nats-py `publish`.

Ours is `JetStreamEventStore.append`: the event encoded, optimistic concurrency
(`Nats-Expected-Last-Subject-Sequence` on the aggregate) and de-duplication
(`Nats-Msg-Id`) headers on. Raw is `js.publish` of the same bytes to the same
subjects, no headers. Both sequentially on one aggregate, and with 1,000 aggregates
appending concurrently (each aggregate's events in order, as the manager does).

Multi-event steps: today a step of several events is one publish per event, each
paying its own sync. JetStream's atomic batch (`Nats-Batch-Id`, stream
`allow_atomic`) commits them together; measured here against today's append of the
same steps.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence

import nats.js.errors
from nats.js import JetStreamContext

from bench.common import (
    SYNC_MODES,
    Figure,
    Options,
    Section,
    Stopwatch,
    alternate,
    nats_server,
    publish_raw,
    rate,
    scratch,
)
from events import Event, EventMeta, Provisioned, envelope
from events.subjects import Aggregate, aggregate_filter, subject_for
from sandboxer.store.event_store import (
    WRONG_LAST_SEQUENCE,
    ConcurrencyConflict,
    JetStreamEventStore,
)

META = EventMeta(actor="bench", correlation_id="bench-append")
TARGET = 0.8


def make_events(aggregate: str, count: int) -> list[Event]:
    handle = {"instance": aggregate, "endpoint": f"saas-stub://{aggregate}", "region": "eu-1"}
    return [Provisioned(**envelope(aggregate, META), handle=handle) for _ in range(count)]


async def append_atomic(
    store: JetStreamEventStore, events: Sequence[Event], expected_version: int
) -> list[int]:
    """One aggregate's events as one JetStream atomic batch: one commit, one sync.

    The expected version rides on the first message (the only one that may carry it),
    every message keeps its `Nats-Msg-Id`; the server answers the commit only."""
    if len(events) == 1:
        return await store.append(events, expected_version)
    batch = uuid.uuid4().hex
    aggregate = Aggregate.of(events[0])
    scope = aggregate_filter(aggregate)
    last = len(events)
    reply = b""
    for index, event in enumerate(events, start=1):
        headers = {
            "Nats-Msg-Id": event.event_id,
            "Nats-Batch-Id": batch,
            "Nats-Batch-Sequence": str(index),
        }
        if index == 1:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(expected_version)
            headers["Nats-Expected-Last-Subject-Sequence-Subject"] = scope
        payload = store.codec.encode(event)
        if index < last:
            await store.nc.publish(subject_for(event), payload, headers=headers)
        else:
            headers["Nats-Batch-Commit"] = "1"
            msg = await store.nc.request(
                subject_for(event), payload, headers=headers, timeout=store.timeout
            )
            reply = msg.data
    answer = json.loads(reply)
    if "error" in answer:
        error = nats.js.errors.APIError.from_error(answer["error"])
        if error.err_code in WRONG_LAST_SEQUENCE:
            raise ConcurrencyConflict(aggregate, expected_version, str(error.description))
        raise error
    seq = int(answer["seq"])
    return list(range(seq - last + 1, seq + 1))


async def run(options: Options) -> Section:
    sequential = options.size(2000, 40)
    aggregates = options.size(1000, 20)
    per_aggregate = options.size(5, 2)
    steps = options.size(250, 10)
    section = Section(
        "append",
        "append throughput through the event store vs raw publish",
        sizes=(
            f"{sequential} events sequentially on one aggregate; {aggregates} aggregates "
            f"× {per_aggregate} events concurrently; atomic batches: {steps} steps of 2 "
            f"and of 10 events sequentially; {aggregates} aggregates × one two-event step "
            "concurrently (the server commits atomic batches one at a time, ~2 ms each)"
        ),
    )
    section.notes.append(
        "ours: `JetStreamEventStore.append` (encode, expected-version and Msg-Id headers, "
        "await the ack); raw: `js.publish` of the same bytes to the same subjects."
    )
    section.notes.append(
        "atomic batch: ours is a two-event step as one JetStream atomic batch "
        "(expected version on the first message, commit on the last: one ack, one sync); "
        "its baseline is today's append of the same step (one publish and ack per event)."
    )
    for sync in SYNC_MODES:
        with scratch(options, f"append-{sync}") as folder:
            async with nats_server(folder, sync, atomic=True) as (_server, nc, store):
                await _measure(options, section, sync, nc.jetstream(), store)
    return section


async def _measure(
    options: Options,
    section: Section,
    sync: str,
    js: JetStreamContext,
    store: JetStreamEventStore,
) -> None:
    sequential = options.size(2000, 40)
    aggregates = options.size(1000, 20)
    per_aggregate = options.size(5, 2)
    steps = options.size(250, 10)
    counter = iter(range(10**9))

    async def raw_sequential(_run: int) -> float:
        events = make_events(f"sbx-raw{next(counter):09x}", sequential)
        return await publish_raw(js, [[(subject_for(e), store.codec.encode(e)) for e in events]])

    async def our_sequential(_run: int) -> float:
        events = make_events(f"sbx-our{next(counter):09x}", sequential)
        watch = Stopwatch()
        version = 0
        for event in events:
            (version,) = await store.append([event], version)
        return rate(sequential, watch.seconds())

    ours, base = await alternate(options.runs, raw_sequential, our_sequential)
    section.add(
        Figure(
            "sequential, one aggregate",
            "events/s",
            ours,
            base,
            "raw publish",
            mode=sync,
            target_ratio=TARGET,
        )
    )

    async def raw_concurrent(_run: int) -> float:
        batches = [
            [
                (subject_for(e), store.codec.encode(e))
                for e in make_events(f"sbx-raw{next(counter):09x}", per_aggregate)
            ]
            for _ in range(aggregates)
        ]
        return await publish_raw(js, batches)

    async def our_concurrent(_run: int) -> float:
        batches = [
            make_events(f"sbx-our{next(counter):09x}", per_aggregate) for _ in range(aggregates)
        ]

        async def one(events: list[Event]) -> None:
            version = 0
            for event in events:
                (version,) = await store.append([event], version)

        watch = Stopwatch()
        await asyncio.gather(*(one(b) for b in batches))
        return rate(aggregates * per_aggregate, watch.seconds())

    ours, base = await alternate(options.runs, raw_concurrent, our_concurrent)
    section.add(
        Figure(
            f"{aggregates:,} aggregates concurrently",
            "events/s",
            ours,
            base,
            "raw publish",
            mode=sync,
            target_ratio=TARGET,
        )
    )

    def stepper(size: int, atomic: bool) -> Callable[[int], Awaitable[float]]:
        append = append_atomic if atomic else JetStreamEventStore.append

        async def one_run(_run: int) -> float:
            events = make_events(f"sbx-stp{next(counter):09x}", size * steps)
            watch = Stopwatch()
            version = 0
            for i in range(0, len(events), size):
                version = (await append(store, events[i : i + size], version))[-1]
            return rate(len(events), watch.seconds())

        return one_run

    for size in (2, 10):
        ours, base = await alternate(options.runs, stepper(size, False), stepper(size, True))
        section.add(
            Figure(
                f"{size}-event steps, sequential: atomic batch",
                "events/s",
                ours,
                base,
                "one publish per event",
                mode=sync,
            )
        )

    async def concurrent_steps(atomic: bool) -> float:
        batches = [make_events(f"sbx-cst{next(counter):09x}", 2) for _ in range(aggregates)]

        async def one(events: list[Event]) -> None:
            version = 0
            for i in range(0, len(events), 2):
                step = events[i : i + 2]
                if atomic:
                    version = (await append_atomic(store, step, version))[-1]
                else:
                    version = (await store.append(step, version))[-1]

        watch = Stopwatch()
        await asyncio.gather(*(one(b) for b in batches))
        return rate(2 * aggregates, watch.seconds())

    async def concurrent_today(_run: int) -> float:
        return await concurrent_steps(atomic=False)

    async def concurrent_atomic(_run: int) -> float:
        return await concurrent_steps(atomic=True)

    ours, base = await alternate(options.runs, concurrent_today, concurrent_atomic)
    section.add(
        Figure(
            f"two-event steps, {aggregates:,} aggregates: atomic batch",
            "events/s",
            ours,
            base,
            "one publish per event",
            mode=sync,
        )
    )
