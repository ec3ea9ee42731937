"""What every EventRecorder backend must do; subclass with a `recorder` fixture."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from events import (
    Aggregate,
    BecameReady,
    CreditsGranted,
    Event,
    EventMeta,
    Provisioned,
    RouteChosen,
    SandboxRequested,
    ValidationStarted,
    envelope,
)
from sandboxer.store.event_store import ConcurrencyConflict, EventRecorder, append_decided

META = EventMeta(actor="test", correlation_id="corr-1")


def requested(sandbox_id: str) -> SandboxRequested:
    return SandboxRequested(
        **envelope(sandbox_id, META),
        profile="profile.saas-stub",
        extension="saas-stub",
        inputs={"size": "small"},
        ttl_seconds=60,
    )


class RecorderConformance:
    async def test_append_then_read_aggregate(self, recorder: EventRecorder) -> None:
        first = requested("sbx-a1")
        (seq1,) = await recorder.append([first], 0)
        route = RouteChosen(**envelope("sbx-a1", META), extension="saas-stub", reason="test")
        ready = Provisioned(**envelope("sbx-a1", META), handle={"k": "v"})
        seqs = await recorder.append([route, ready], seq1)
        assert seqs[0] > seq1 and seqs[1] > seqs[0]
        history = await recorder.read_aggregate(Aggregate("sandbox", "sbx-a1"))
        assert [r.event for r in history] == [first, route, ready]
        assert [r.subject for r in history] == [
            "sandboxer.sandbox.sbx-a1.SandboxRequested",
            "sandboxer.sandbox.sbx-a1.RouteChosen",
            "sandboxer.sandbox.sbx-a1.Provisioned",
        ]
        assert await recorder.read_aggregate(Aggregate("sandbox", "sbx-none")) == []

    async def test_stale_writer_gets_conflict(self, recorder: EventRecorder) -> None:
        (seq1,) = await recorder.append([requested("sbx-c1")], 0)
        await recorder.append(
            [RouteChosen(**envelope("sbx-c1", META), extension="x", reason="a")], seq1
        )
        stale = RouteChosen(**envelope("sbx-c1", META), extension="x", reason="b")
        with pytest.raises(ConcurrencyConflict):
            await recorder.append([stale], seq1)
        with pytest.raises(ConcurrencyConflict):
            await recorder.append([requested("sbx-c1")], 0)  # "new" aggregate that is not
        history = await recorder.read_aggregate(Aggregate("sandbox", "sbx-c1"))
        assert [r.event.type_name() for r in history] == ["SandboxRequested", "RouteChosen"]

    async def test_other_aggregates_do_not_conflict(self, recorder: EventRecorder) -> None:
        (a,) = await recorder.append([requested("sbx-o1")], 0)
        await recorder.append([requested("sbx-o2")], 0)
        # sbx-o2's append moved the stream on, but sbx-o1's version is still `a`.
        await recorder.append([BecameReady(**envelope("sbx-o1", META))], a)

    async def test_retried_append_is_not_a_second_event(self, recorder: EventRecorder) -> None:
        event = requested("sbx-d1")
        (seq,) = await recorder.append([event], 0)
        assert await recorder.append([event], 0) == [seq]  # same expected version: retry
        history = await recorder.read_aggregate(Aggregate("sandbox", "sbx-d1"))
        assert len(history) == 1

    async def test_concurrent_writers_one_wins(self, recorder: EventRecorder) -> None:
        (seq,) = await recorder.append([requested("sbx-w1")], 0)
        attempts = [
            recorder.append(
                [RouteChosen(**envelope("sbx-w1", META), extension="x", reason=str(i))], seq
            )
            for i in range(10)
        ]
        results = await asyncio.gather(*attempts, return_exceptions=True)
        assert sum(1 for r in results if isinstance(r, list)) == 1
        assert all(isinstance(r, ConcurrencyConflict) for r in results if not isinstance(r, list))
        assert len(await recorder.read_aggregate(Aggregate("sandbox", "sbx-w1"))) == 2

    async def test_version_is_the_last_sequence_of_the_aggregate(
        self, recorder: EventRecorder
    ) -> None:
        assert await recorder.version(Aggregate("sandbox", "sbx-v1")) == 0
        (first,) = await recorder.append([requested("sbx-v1")], 0)
        await recorder.append([requested("sbx-v2")], 0)
        assert await recorder.version(Aggregate("sandbox", "sbx-v1")) == first
        (ready,) = await recorder.append([BecameReady(**envelope("sbx-v1", META))], first)
        assert await recorder.version(Aggregate("sandbox", "sbx-v1")) == ready

    async def test_append_decided_decides_again_after_a_conflict(
        self, recorder: EventRecorder
    ) -> None:
        (first,) = await recorder.append([requested("sbx-x1")], 0)
        seen: list[int] = []

        def decide() -> list[Event]:
            seen.append(len(seen))
            if len(seen) == 1:  # another writer appends while we decide
                racing.append(asyncio.ensure_future(recorder.append([other], first)))
            return [
                RouteChosen(**envelope("sbx-x1", META), extension="x", reason=f"try {len(seen)}")
            ]

        other = BecameReady(**envelope("sbx-x1", META))
        racing: list[asyncio.Future[list[int]]] = []
        real_append = recorder.append

        async def append_after_the_other(events: Sequence[Event], expected: int) -> list[int]:
            if racing:
                await racing.pop()
            return await real_append(events, expected)

        recorder.append = append_after_the_other  # type: ignore[method-assign]
        try:
            await append_decided(recorder, Aggregate("sandbox", "sbx-x1"), decide)
        finally:
            del recorder.append  # type: ignore[attr-defined]
        history = await recorder.read_aggregate(Aggregate("sandbox", "sbx-x1"))
        assert [r.event.type_name() for r in history] == [
            "SandboxRequested",
            "BecameReady",
            "RouteChosen",
        ]
        assert len(seen) == 2 and history[-1].event.reason == "try 2"  # type: ignore[attr-defined]
        assert await append_decided(recorder, Aggregate("sandbox", "sbx-x1"), list) == []

    async def test_read_and_follow_from_sequence(self, recorder: EventRecorder) -> None:
        seqs = [(await recorder.append([requested(f"sbx-r{i}")], 0))[0] for i in range(5)]
        assert [r.seq async for r in recorder.read(seqs[2])] == seqs[2:]
        assert [r.seq async for r in recorder.read(seqs[-1] + 1)] == []
        assert await recorder.last_seq() == seqs[-1]

        seen: list[int] = []

        async def follow() -> None:
            async for r in recorder.follow(seqs[3]):
                seen.append(r.seq)
                if len(seen) == 3:
                    return

        follower = asyncio.create_task(follow())
        (later,) = await recorder.append([requested("sbx-r9")], 0)
        async with asyncio.timeout(10):
            await follower
        assert seen == [seqs[3], seqs[4], later]

    async def test_reads_by_kind_and_by_aggregate(self, recorder: EventRecorder) -> None:
        (s1,) = await recorder.append([requested("sbx-k1")], 0)
        (g1,) = await recorder.append([CreditsGranted(**envelope("acct-k", META), amount=5)], 0)
        (v1,) = await recorder.append(
            [ValidationStarted(**envelope("sbx-k1", META), ready_event_id="e")], 0
        )
        (s2,) = await recorder.append([BecameReady(**envelope("sbx-k1", META))], s1)
        (g2,) = await recorder.append([CreditsGranted(**envelope("acct-k", META), amount=7)], g1)
        (o1,) = await recorder.append([requested("sbx-k2")], 0)
        everything = [s1, g1, v1, s2, g2, o1]

        async def seqs(
            from_seq: int = 1,
            kinds: list[str] | None = None,
            aggregate: Aggregate | None = None,
        ) -> list[int]:
            read = recorder.read(from_seq, kinds=kinds, aggregate=aggregate)
            return [r.seq async for r in read if r.seq >= s1]

        assert await seqs() == everything
        assert await seqs(kinds=["sandbox"]) == [s1, s2, o1]
        assert await seqs(kinds=["ledger"]) == [g1, g2]
        assert await seqs(kinds=["ledger", "validation"]) == [g1, v1, g2]
        assert await seqs(kinds=["ledger", "ledger"]) == [g1, g2]
        assert await seqs(kinds=["webhook"]) == []
        assert await seqs(aggregate=Aggregate("sandbox", "sbx-k1")) == [s1, s2]
        assert await seqs(g1 + 1, aggregate=Aggregate("ledger", "acct-k")) == [g2]
        assert await seqs(aggregate=Aggregate("validation", "sbx-k1")) == [v1]
        assert await seqs(aggregate=Aggregate("ledger", "acct-none")) == []
        # An aggregate is its whole id: `sbx-k` does not read `sbx-k1`.
        assert await seqs(aggregate=Aggregate("sandbox", "sbx-k")) == []
        assert await recorder.version(Aggregate("ledger", "acct-k")) == g2
        assert await recorder.version(Aggregate("validation", "sbx-k1")) == v1
        history = await recorder.read_aggregate(Aggregate("ledger", "acct-k"))
        assert [r.subject for r in history] == [
            "sandboxer.ledger.acct-k.CreditsGranted",
            "sandboxer.ledger.acct-k.CreditsGranted",
        ]

    async def test_follow_by_kind_and_by_aggregate(self, recorder: EventRecorder) -> None:
        (s1,) = await recorder.append([requested("sbx-f1")], 0)
        (g1,) = await recorder.append([CreditsGranted(**envelope("acct-f", META), amount=1)], 0)

        async def first(count: int, **scope: Any) -> list[int]:
            seen: list[int] = []
            async for r in recorder.follow(s1, **scope):
                seen.append(r.seq)
                if len(seen) == count:
                    break
            return seen

        by_kind = asyncio.create_task(first(2, kinds=["ledger"]))
        by_aggregate = asyncio.create_task(first(2, aggregate=Aggregate("sandbox", "sbx-f1")))
        await recorder.append([requested("sbx-f2")], 0)
        (g2,) = await recorder.append([CreditsGranted(**envelope("acct-f", META), amount=2)], g1)
        (s2,) = await recorder.append([BecameReady(**envelope("sbx-f1", META))], s1)
        async with asyncio.timeout(10):
            assert await by_kind == [g1, g2]
            assert await by_aggregate == [s1, s2]

    async def test_a_read_names_kinds_or_an_aggregate(self, recorder: EventRecorder) -> None:
        bad: list[dict[str, Any]] = [
            {"kinds": ["sandbox"], "aggregate": Aggregate("sandbox", "sbx-b1")},
            {"kinds": ["nothing"]},
            {"kinds": []},
            {"kinds": "sandbox"},  # one string, not a sequence of kinds
        ]
        for scope in bad:
            with pytest.raises((ValueError, TypeError)):
                [r async for r in recorder.read(1, **scope)]
            with pytest.raises((ValueError, TypeError)):
                await anext(aiter(recorder.follow(1, **scope)))

    async def test_append_decided_refuses_another_aggregates_events(
        self, recorder: EventRecorder
    ) -> None:
        with pytest.raises(ValueError):
            await append_decided(
                recorder, Aggregate("sandbox", "sbx-y1"), lambda: [requested("sbx-y2")]
            )
        assert await recorder.read_aggregate(Aggregate("sandbox", "sbx-y2")) == []

    async def test_read_batches_reads_the_whole_stream_in_order(
        self, recorder: EventRecorder
    ) -> None:
        assert [b async for b in recorder.read_batches(1)] == []  # empty stream
        appended: list[tuple[int, Event]] = []
        for i in range(12):
            event: Event = requested(f"sbx-b{i}")
            if i % 3 == 1:  # another kind in between: every subject is read
                event = CreditsGranted(**envelope(f"acct-b{i}", META), amount=i)
            (seq,) = await recorder.append([event], 0)
            appended.append((seq, event))
        batches = [b async for b in recorder.read_batches(1)]
        assert all(batches)  # no empty lists
        read = [r for b in batches for r in b]
        assert [(r.seq, r.event) for r in read] == appended
        assert read[1].subject == "sandboxer.ledger.acct-b1.CreditsGranted"
        assert read[0].subject == "sandboxer.sandbox.sbx-b0.SandboxRequested"
        seqs = [seq for seq, _ in appended]

        async def seqs_of(from_seq: int, upto: int | None = None) -> list[int]:
            return [r.seq async for b in recorder.read_batches(from_seq, upto=upto) for r in b]

        assert await seqs_of(seqs[4]) == seqs[4:]  # from the middle
        assert await seqs_of(seqs[4], upto=seqs[9]) == seqs[4:10]
        assert await seqs_of(seqs[4], upto=seqs[4]) == [seqs[4]]
        assert await seqs_of(seqs[4], upto=seqs[3]) == []
        assert await seqs_of(seqs[-1] + 1) == []  # past the end

    async def test_read_batches_reads_up_to_the_end_it_began_at(
        self, recorder: EventRecorder
    ) -> None:
        seqs = [(await recorder.append([requested(f"sbx-e{i}")], 0))[0] for i in range(5)]
        seen: list[int] = []
        async for batch in recorder.read_batches(seqs[0]):
            seen.extend(r.seq for r in batch)
            if len(seen) == len(batch):  # appended while the read goes on: not read
                await recorder.append([requested("sbx-e-late")], 0)
        assert seen == seqs
