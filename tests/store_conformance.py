"""What every EventRecorder backend must do; subclass with a `recorder` fixture."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from events import (
    BecameReady,
    Event,
    EventMeta,
    Provisioned,
    RouteChosen,
    SandboxRequested,
    envelope,
    sandbox_filter,
)
from sandboxer.event_store import ConcurrencyConflict, EventRecorder, append_decided

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
        history = await recorder.read_aggregate(sandbox_filter("sbx-a1"))
        assert [r.event for r in history] == [first, route, ready]
        assert [r.subject for r in history] == [
            "sandboxer.sandbox.sbx-a1.SandboxRequested",
            "sandboxer.sandbox.sbx-a1.RouteChosen",
            "sandboxer.sandbox.sbx-a1.Provisioned",
        ]
        assert await recorder.read_aggregate(sandbox_filter("sbx-none")) == []

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
        history = await recorder.read_aggregate(sandbox_filter("sbx-c1"))
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
        history = await recorder.read_aggregate(sandbox_filter("sbx-d1"))
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
        assert len(await recorder.read_aggregate(sandbox_filter("sbx-w1"))) == 2

    async def test_version_is_the_last_sequence_of_the_aggregate(
        self, recorder: EventRecorder
    ) -> None:
        assert await recorder.version(sandbox_filter("sbx-v1")) == 0
        (first,) = await recorder.append([requested("sbx-v1")], 0)
        await recorder.append([requested("sbx-v2")], 0)
        assert await recorder.version(sandbox_filter("sbx-v1")) == first
        (ready,) = await recorder.append([BecameReady(**envelope("sbx-v1", META))], first)
        assert await recorder.version(sandbox_filter("sbx-v1")) == ready

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
            await append_decided(recorder, sandbox_filter("sbx-x1"), decide)
        finally:
            del recorder.append  # type: ignore[attr-defined]
        history = await recorder.read_aggregate(sandbox_filter("sbx-x1"))
        assert [r.event.type_name() for r in history] == [
            "SandboxRequested",
            "BecameReady",
            "RouteChosen",
        ]
        assert len(seen) == 2 and history[-1].event.reason == "try 2"  # type: ignore[attr-defined]
        assert await append_decided(recorder, sandbox_filter("sbx-x1"), list) == []

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
