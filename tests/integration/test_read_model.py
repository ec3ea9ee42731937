"""The projection runner against a real nats-server: catching up, waiting, replaying."""

from __future__ import annotations

import asyncio

import pytest

from events import CheckpointDeleted, EventMeta, SandboxRejected, SandboxRequested, envelope
from events.subjects import subject_for
from projections.archive import MemoryArchive
from projections.sandboxes import SandboxesProjection
from sandboxer.app.read_model import ProjectionRunner
from sandboxer.store.event_store import JetStreamEventStore, stream_position

META = EventMeta(actor="test", correlation_id="c")


def requested(sandbox_id: str) -> SandboxRequested:
    return SandboxRequested(
        **envelope(sandbox_id, META), profile="p", extension="saas-stub", inputs={}, ttl_seconds=60
    )


def test_the_projection_indexes_unfinished_rows_and_names_the_ending_event() -> None:
    projection = SandboxesProjection(MemoryArchive())
    ended = SandboxRejected(
        **envelope("sbx-e0001", EventMeta(actor="t", correlation_id="d")), reason="no"
    )
    later = CheckpointDeleted(**envelope("sbx-e0001", META), checkpoint_id="ckpt-1", reason="r")
    for seq, event in enumerate([requested("sbx-e0001"), requested("sbx-e0002")], start=1):
        projection.apply(seq, subject_for(event), event)
    assert set(projection.unfinished) == {"sbx-e0001", "sbx-e0002"}
    for seq, event in enumerate([ended, later], start=3):
        projection.apply(seq, subject_for(event), event)
    assert set(projection.unfinished) == {"sbx-e0002"}
    view = projection.get("sbx-e0001")
    assert view is not None and set(projection.finished) == {"sbx-e0001"}
    assert view.state == "rejected" and view.last_seq == 4
    assert view.ended_by == ended.event_id and view.ended_correlation_id == "d"


def test_stream_position_reads_both_reply_formats() -> None:
    assert stream_position("$JS.ACK.SANDBOXER.c1.1.42.7.1700000000000000000.3") == (42, 3)
    v2 = "$JS.ACK.dom.ACCHASH.SANDBOXER.c1.1.42.7.1700000000000000000.0.tok"
    assert stream_position(v2) == (42, 0)
    with pytest.raises(ValueError, match="not a JetStream delivery"):
        stream_position("_INBOX.abc")


async def test_start_catches_up_and_wait_for_wakes_at_its_sequence(
    store: JetStreamEventStore,
) -> None:
    for i in range(20):
        await store.append([requested(f"sbx-r{i:04d}")], 0)
    runner = ProjectionRunner(store)
    await runner.start(timeout=30)
    try:
        assert runner.last_seq == 20 and len(runner.projection.unfinished) == 20
        assert await runner.wait_for(5, 0.01) is True  # reached already

        waiter = asyncio.create_task(runner.wait_for(22, 30))
        await store.append([requested("sbx-r0100")], 0)
        await store.append([requested("sbx-r0101")], 0)
        assert await waiter is True
        assert runner.last_seq >= 22
        assert runner._targets == []
    finally:
        await runner.stop()


async def test_a_wait_that_times_out_leaves_nothing_behind(store: JetStreamEventStore) -> None:
    await store.append([requested("sbx-t0001")], 0)
    runner = ProjectionRunner(store)
    await runner.start(timeout=30)
    try:
        results = await asyncio.gather(*(runner.wait_for(10**9, 0.05) for _ in range(5)))
        assert results == [False] * 5
        assert runner._targets == []
        # a long-poll on a sandbox still wakes on its change
        poll = asyncio.create_task(runner.wait_sandbox("sbx-t0002", 0, 30))
        await store.append([requested("sbx-t0002")], 0)
        await asyncio.wait_for(poll, 30)
        assert runner.projection.get("sbx-t0002") is not None
    finally:
        await runner.stop()


def test_ledger_fold_keeps_the_open_reservations_exact() -> None:
    from events import CreditsDebited, CreditsGranted, CreditsReleased, CreditsReserved
    from projections.ledger import LedgerProjection

    ledger = LedgerProjection()
    events = [CreditsGranted(**envelope("acme", META), amount=1000)]
    events += [
        CreditsReserved(**envelope("acme", META), sandbox_id=f"sbx-{i}", amount=30)
        for i in range(3)
    ]
    events += [
        CreditsDebited(**envelope("acme", META), sandbox_id="sbx-1", amount=10),
        CreditsReleased(**envelope("acme", META), sandbox_id="sbx-1", amount=20),
        CreditsDebited(**envelope("acme", META), sandbox_id="sbx-0", amount=5),
    ]
    for seq, event in enumerate(events, start=1):
        ledger.apply(seq, f"sandboxer.ledger.acme.{event.type_name()}", event)
    account = ledger.account("acme")
    assert account.open == {"sbx-2": 30, "sbx-0": 25}
    assert list(account.open) == ["sbx-2", "sbx-0"]  # a changed reservation moves last
    assert (account.reserved, account.debited, account.available) == (55, 15, 930)


async def test_catch_up_pauses_the_collector_and_gives_it_back(
    store: JetStreamEventStore,
) -> None:
    import gc

    await store.append([requested("sbx-g0001")], 0)
    assert gc.isenabled()
    runner = ProjectionRunner(store)
    await runner.start(timeout=30)
    await runner.stop()
    assert gc.isenabled()
    # Rows cannot form reference cycles: the collector never has to walk them.
    view = runner.projection.get("sbx-g0001")
    assert view is not None and not gc.is_tracked(view)
    gc.disable()
    try:
        again = ProjectionRunner(store)
        await again.start(timeout=30)
        await again.stop()
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()
