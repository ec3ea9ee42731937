"""An in-memory EventRecorder: the JetStream store's rules without a server.

For fast unit tests of what decides on events (command handlers, folds): the same
optimistic concurrency per aggregate, the same retry rule (an event id already
appended after the expected version is that append, not a second event), the same
reads by kind or aggregate, matched on the subject filters events/subjects.py
makes for the JetStream store (`*` one token, `>` the rest). tests/store_conformance.py holds it
and the JetStream store to one behaviour. Nothing survives the process.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import AsyncIterator, Sequence

from events import Event
from events.subjects import ALL_SUBJECTS, Aggregate, aggregate_filter, read_filters, subject_for
from sandboxer.store.event_store import ConcurrencyConflict, RecordedEvent


def subject_matches(subject: str, filter_subject: str) -> bool:
    """NATS subject matching: `*` is one token, a final `>` one or more."""
    tokens, wanted = subject.split("."), filter_subject.split(".")
    for index, want in enumerate(wanted):
        if want == ">":
            return len(tokens) > index
        if index >= len(tokens) or (want != "*" and want != tokens[index]):
            return False
    return len(tokens) == len(wanted)


def _matches(subject: str, filters: Sequence[str]) -> bool:
    if filters == [ALL_SUBJECTS]:
        return True  # every subject in the stream matches the stream's own filter
    return any(subject_matches(subject, f) for f in filters)


class InMemoryEventStore:
    """EventRecorder over a list; sequences start at 1 like a stream's."""

    def __init__(self) -> None:
        self._log: list[RecordedEvent] = []
        self._appended = asyncio.Condition()
        self._identity = f"memory@{secrets.token_hex(8)}"

    async def append(self, events: Sequence[Event], expected_version: int) -> list[int]:
        if not events:
            return []
        aggregate = Aggregate.of(events[0])
        if any(Aggregate.of(e) != aggregate for e in events):
            raise ValueError("one append holds events of one aggregate only")
        scope = aggregate_filter(aggregate)
        seqs: list[int] = []
        expected = expected_version
        async with self._appended:
            for event in events:
                current = self._version(scope)
                if current != expected:
                    landed = self._landed(scope, event.event_id, expected)
                    if landed is None:
                        raise ConcurrencyConflict(
                            aggregate, expected, f"wrong last sequence: {current}"
                        )
                    seqs.append(landed)
                    expected = landed
                    continue
                recorded = RecordedEvent(len(self._log) + 1, subject_for(event), event)
                self._log.append(recorded)
                seqs.append(recorded.seq)
                expected = recorded.seq
            self._appended.notify_all()
        return seqs

    def _version(self, filter_subject: str) -> int:
        for recorded in reversed(self._log):
            if subject_matches(recorded.subject, filter_subject):
                return recorded.seq
        return 0

    def _landed(self, scope: str, event_id: str, after: int) -> int | None:
        """The retry rule: the aggregate's next event after `after` is this one."""
        for recorded in self._log[after:]:
            if subject_matches(recorded.subject, scope):
                return recorded.seq if recorded.event.event_id == event_id else None
        return None

    async def read_aggregate(self, aggregate: Aggregate) -> list[RecordedEvent]:
        return [r async for r in self.read(1, aggregate=aggregate)]

    async def version(self, aggregate: Aggregate) -> int:
        return self._version(aggregate_filter(aggregate))

    async def read(
        self,
        from_seq: int = 1,
        *,
        kinds: Sequence[str] | None = None,
        aggregate: Aggregate | None = None,
    ) -> AsyncIterator[RecordedEvent]:
        filters = read_filters(kinds, aggregate)
        end = len(self._log)  # up to what was stored when the read began
        for recorded in self._log[max(from_seq, 1) - 1 : end]:
            if _matches(recorded.subject, filters):
                yield recorded

    async def read_batches(
        self, from_seq: int = 1, *, upto: int | None = None, batch: int = 1000
    ) -> AsyncIterator[list[RecordedEvent]]:
        end = len(self._log) if upto is None else min(upto, len(self._log))
        for start in range(max(from_seq, 1) - 1, end, batch):
            yield self._log[start : min(start + batch, end)]
            await asyncio.sleep(0)  # as the JetStream reader: the loop's turn per batch

    async def follow(
        self,
        from_seq: int = 1,
        *,
        kinds: Sequence[str] | None = None,
        aggregate: Aggregate | None = None,
    ) -> AsyncIterator[RecordedEvent]:
        filters = read_filters(kinds, aggregate)
        next_seq = max(from_seq, 1)
        while True:
            async with self._appended:
                await self._appended.wait_for(functools.partial(self._holds, next_seq))
                batch = self._log[next_seq - 1 :]
            for recorded in batch:
                next_seq = recorded.seq + 1
                if _matches(recorded.subject, filters):
                    yield recorded

    def _holds(self, seq: int) -> bool:
        return len(self._log) >= seq

    async def last_seq(self) -> int:
        return len(self._log)

    async def identity(self) -> str:
        return self._identity
