"""The catch-up reader of the JetStream store against a real nats-server: batches in
order, the loop's turn between them, the switch from catching up to following live,
the ordered-consumer fallback, and the one adapter into nats-py it relies on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from events import Aggregate, CreditsGranted, Event, envelope
from sandboxer.store.catchup import ack_position, ack_sequences, route_raw
from sandboxer.store.event_store import JetStreamEventStore, RecordedEvent
from sandboxer.store.nats_server import EmbeddedNats
from tests.store_conformance import META, requested


async def _fill(store: JetStreamEventStore, count: int, prefix: str = "sbx-c") -> list[int]:
    """`count` events of `count` aggregates (every third a ledger event)."""
    seqs: list[int] = []
    for i in range(count):
        event: Event = requested(f"{prefix}{i}")
        if i % 3 == 2:
            event = CreditsGranted(**envelope(f"acct-{prefix}{i}", META), amount=i)
        seqs.extend(await store.append([event], 0))
    return seqs


async def test_small_batches_in_order_with_the_loops_turn_between_them(
    store: JetStreamEventStore,
) -> None:
    store.catch_up.batch, store.catch_up.depth = 4, 2
    seqs = await _fill(store, 30)
    loop = asyncio.get_running_loop()
    turns: list[int] = []
    batches: list[list[RecordedEvent]] = []
    async for batch in store.read_batches(1):
        # A callback scheduled at the last batch has run before this one came.
        assert len(turns) == len(batches)
        batches.append(batch)
        loop.call_soon(turns.append, len(batches))
    assert all(0 < len(b) <= 4 for b in batches) and len(batches) >= 8
    assert [r.seq for b in batches for r in b] == seqs
    expected = [r async for r in store.read(1)]
    assert [r for b in batches for r in b] == expected
    middle = [r.seq async for b in store.read_batches(seqs[7], upto=seqs[21]) for r in b]
    assert middle == seqs[7:22]


async def test_the_ordered_fallback_reads_the_same_batches(store: JetStreamEventStore) -> None:
    seqs = await _fill(store, 12)
    fast = [r async for b in store.read_batches(1) for r in b]
    ordered = [r async for b in store._ordered_batches(seqs[0], seqs[-1]) for r in b]
    assert ordered == fast and [r.seq for r in fast] == seqs
    part = [r.seq async for b in store._ordered_batches(seqs[3], seqs[5]) for r in b]
    assert part == seqs[3:6]
    assert [b async for b in store._ordered_batches(seqs[-1] + 1, seqs[-1] + 5)] == []


async def test_follow_catches_up_in_batches_then_follows_live(
    store: JetStreamEventStore,
) -> None:
    """Appends land while the follower is still catching up (after the end the catch-up
    read began at) and after it switched to the live consumer: every event arrives
    once, in order."""
    store.catch_up.batch, store.catch_up.depth = 5, 2
    seqs = await _fill(store, 40)
    caught_up: list[int] = []
    real_read = store.catch_up.read

    async def observed(from_seq: int, upto: int) -> AsyncIterator[list[RecordedEvent]]:
        async for batch in real_read(from_seq, upto):
            caught_up.extend(r.seq for r in batch)
            yield batch

    store.catch_up.read = observed  # type: ignore[method-assign]
    seen: list[int] = []
    late = 0
    async with asyncio.timeout(30):
        async for recorded in store.follow(1):
            seen.append(recorded.seq)
            if len(seen) in (3, 12, 25):  # during the catch-up
                seqs.extend(await store.append([requested(f"sbx-late{late}")], 0))
                late += 1
            if len(seen) == 43:  # after the switch: live
                seqs.extend(await store.append([requested("sbx-live")], 0))
            if len(seen) == 44:
                break
    assert seen == seqs
    assert caught_up == seqs[:40]  # the batches read what was there when follow began


async def test_follow_by_kind_still_reads_only_that_kind(store: JetStreamEventStore) -> None:
    seqs = await _fill(store, 9)
    ledger = [s for i, s in enumerate(seqs) if i % 3 == 2]
    seen: list[int] = []
    async with asyncio.timeout(10):
        async for recorded in store.follow(1, kinds=["ledger"]):
            seen.append(recorded.seq)
            if len(seen) == len(ledger):
                break
    assert seen == ledger


async def test_the_ordered_consumer_gives_the_loop_its_turn(store: JetStreamEventStore) -> None:
    """A replay through the ordered consumer takes queued messages without awaiting:
    it must still yield to the loop at least every 1,000 messages."""
    await _fill(store, 1300)
    loop = asyncio.get_running_loop()
    turns: list[int] = []
    count = 0
    received = store.nc.stats["in_msgs"]
    async for _recorded in store.read(1):
        count += 1
        if count == 1:  # let every message reach the queue first (a replay's case)
            async with asyncio.timeout(10):
                while store.nc.stats["in_msgs"] < received + 1300:
                    await asyncio.sleep(0.01)
        if count == 100:
            loop.call_soon(turns.append, count)
        if count == 1150:
            assert turns == [100]
    assert count == 1300


async def test_route_raw_hands_over_the_raw_message_and_leaves_others_alone(
    nc: NatsClient,
) -> None:
    routed_inbox, plain_inbox = nc.new_inbox(), nc.new_inbox()
    raw: list[tuple[bytes, bytes, bytes | None, bytes]] = []
    routed = await nc.subscribe(routed_inbox)
    plain = await nc.subscribe(plain_inbox)
    unroute = route_raw(nc, routed, lambda *message: raw.append(message))
    again = route_raw(nc, plain, lambda *message: None)
    again()  # a second route on the same client, undone: `plain` is nats-py's again
    for subject in (routed_inbox, plain_inbox):
        await nc.publish(subject, b"body", reply="r.1", headers={"X-Ours": "1"})
    await nc.publish(routed_inbox, b"bare")
    plain_msg: Msg = await plain.next_msg(timeout=5)
    assert plain_msg.headers == {"X-Ours": "1"} and plain_msg.data == b"body"
    await nc.flush()
    async with asyncio.timeout(5):
        while len(raw) < 2:
            await asyncio.sleep(0.01)  # raw messages have no future to await
    (subject, reply, headers, body), bare = raw
    assert (subject, reply, body) == (routed_inbox.encode(), b"r.1", b"body")
    assert headers is not None and headers.startswith(b"NATS/1.0\r\n")
    assert b"X-Ours: 1\r\n" in headers
    assert bare == (routed_inbox.encode(), b"", None, b"bare")
    unroute()
    await nc.publish(routed_inbox, b"after")
    after: Msg = await routed.next_msg(timeout=5)
    assert after.data == b"after"


def test_ack_sequences_read_both_reply_layouts() -> None:
    v1 = [b"$JS.ACK.S.c1.1.%d.%d.1700000000.%d" % (seq, seq, 9 - seq) for seq in (4, 5, 6)]
    assert ack_sequences(v1) == [4, 5, 6]
    assert [ack_position(reply) for reply in v1] == [(4, 5), (5, 4), (6, 3)]
    v2 = b"$JS.ACK.dom.acc.S.c1.1.17.3.1700000000.2.tok123"
    assert ack_sequences([v2, v2]) == [17, 17] and ack_position(v2) == (17, 2)
    assert ack_sequences([]) == []
    # Deleted messages leave gaps: each reply is read then.
    gaps = [b"$JS.ACK.S.c1.1.%d.%d.1700000000.0" % (seq, seq) for seq in (4, 5, 9)]
    assert ack_sequences(gaps) == [4, 5, 9]
    assert ack_sequences([v2.replace(b".17.", b".%d." % seq) for seq in (3, 8)]) == [3, 8]


async def test_read_aggregate_is_unchanged_by_the_batch_reader(
    store: JetStreamEventStore,
) -> None:
    await _fill(store, 4)
    history = await store.read_aggregate(Aggregate("sandbox", "sbx-c1"))
    assert [r.subject for r in history] == ["sandboxer.sandbox.sbx-c1.SandboxRequested"]


async def test_a_server_restart_during_the_read_costs_no_event(
    nats_server: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    """The consumer dies with the server; after the client reconnects the reader
    notices the silence and goes on with a new one from the next missing sequence."""
    nc = await nats.connect(**nats_server.connect_options(), reconnect_time_wait=0.2)
    try:
        store = JetStreamEventStore(nc)
        await store.ensure_stream()
        seqs = await _fill(store, 60)
        store.catch_up.batch, store.catch_up.depth = 10, 1
        store.catch_up.stall_seconds = 1.0
        seen: list[int] = []
        async with asyncio.timeout(60):
            async for batch in store.read_batches(1):
                seen.extend(r.seq for r in batch)
                if len(seen) == 10:
                    nats_server.stop()
                    nats_server.start()
        assert seen == seqs
        assert "catch-up from 11" in caplog.text  # a new consumer went on from there
        assert "by the ordered consumer" not in caplog.text  # not the fallback
    finally:
        await nc.close()


async def test_routed_messages_split_across_reads_arrive_whole_and_in_order(
    nc: NatsClient,
) -> None:
    """Messages bigger than a socket read, between others' messages: the fast path
    waits for the rest of a message, and hands what is not routed to nats-py."""
    routed_inbox, plain_inbox = nc.new_inbox(), nc.new_inbox()
    raw: list[bytes] = []
    routed = await nc.subscribe(routed_inbox)
    plain = await nc.subscribe(plain_inbox)
    unroute = route_raw(nc, routed, lambda _s, _r, _h, body: raw.append(body))
    bodies = [bytes([65 + i % 26]) * (1000 + 997 * i) for i in range(120)]
    for i, body in enumerate(bodies):
        await nc.publish(routed_inbox, body, headers={"N": str(i)})
        if i % 10 == 0:
            await nc.publish(plain_inbox, b"plain %d" % i, headers={"N": str(i)})
    plain_msgs = [await plain.next_msg(timeout=10) for _ in range(12)]
    await nc.flush()
    async with asyncio.timeout(10):
        while len(raw) < len(bodies):
            await asyncio.sleep(0.01)  # raw messages have no future to await
    assert raw == bodies
    assert [m.data for m in plain_msgs] == [b"plain %d" % i for i in range(0, 120, 10)]
    assert [m.headers for m in plain_msgs] == [{"N": str(i)} for i in range(0, 120, 10)]
    unroute()


async def test_where_no_pull_consumer_can_be_made_the_ordered_consumer_reads(
    store: JetStreamEventStore, caplog: pytest.LogCaptureFixture
) -> None:
    seqs = await _fill(store, 7)
    store.catch_up.stream = "NO_SUCH_STREAM"  # the consumer is refused (404)
    read = [r.seq async for b in store.read_batches(seqs[2]) for r in b]
    assert read == seqs[2:]
    assert f"catch-up from {seqs[2]} by the ordered consumer" in caplog.text
