"""The event store: JetStream behind a narrow recorder interface.

One stream holds every subject under `sandboxer.>`. Callers speak in aggregates
(`Aggregate(kind, id)`) and kinds, never in subjects: the JetStream store turns them
into subject filters through events/subjects.py, the in-memory store matches the
same filters. An aggregate's version is the stream sequence of its last event;
appends state the version they expect (`Nats-Expected-Last-Subject-Sequence` scoped
to the aggregate's subjects), so a stale writer gets `ConcurrencyConflict` instead
of a fork in history, and carry the event id as `Nats-Msg-Id`, so a retried append
is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal, Protocol

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from events import Event
from events.codec import EventCodec, default_codec
from events.subjects import (
    ALL_SUBJECTS,
    STREAM_SUBJECTS,
    Aggregate,
    aggregate_filter,
    read_filters,
    subject_for,
)
from sandboxer.store.catchup import BATCH, CatchUpReader

# Re-exported: readers of the stream have always imported it from here.
from sandboxer.store.recorded import RecordedEvent as RecordedEvent

STREAM_NAME = "SANDBOXER"
TRANSIENT_RETRY_SECONDS = 20.0
STALL_CHECK_SECONDS = 5.0
# The ordered consumer gives the loop control back at least this often while messages
# are queued (a replay must not hold off lease renewals and the HTTP API).
YIELD_EVERY_MESSAGES = 1000
YIELD_EVERY_SECONDS = 0.02

log = logging.getLogger(__name__)


# How long the server remembers an append's `Nats-Msg-Id` (a retried append within
# it is stored once). A restarted server re-reads the messages of this window to
# rebuild that memory: a start right after a burst of writes pays for the burst.
DUPLICATE_WINDOW_SECONDS = 120.0


class FollowStalled(Exception):
    pass


class MutableStream(RuntimeError):
    """An operator's event stream that still allows deleting or purging events."""


def is_transient(exc: BaseException) -> bool:
    """Errors that a healthy cluster stops giving within seconds (failover, reconnect)."""
    if isinstance(exc, nats.js.errors.APIError):
        return exc.code == 503  # JetStream temporarily unavailable: no leader yet
    return isinstance(
        exc,
        (
            TimeoutError,
            nats.errors.TimeoutError,
            nats.errors.NoRespondersError,
            nats.errors.ConnectionReconnectingError,
            nats.js.errors.NoStreamResponseError,
        ),
    )


APPEND_ATTEMPTS = 5
# What ensure_stream does with a stream that allows deleting or purging messages:
# set the deny flags (ours), refuse to run (an operator's), or allow it (operator's flag).
MutablePolicy = Literal["lock", "refuse", "allow"]
WRONG_LAST_SEQUENCE = (10071, 10164)  # with and without the sequence in the message


def stream_position(reply: str) -> tuple[int, int]:
    """(stream sequence, messages pending) from a JetStream delivery's reply subject.

    `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>` (v1) or
    `$JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.
    <pending>[.<token>]` (v2). nats-py's `msg.metadata` builds a dataclass and a
    datetime for each message; replaying the stream needs these two numbers only.
    """
    tokens = reply.split(".")
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[5]), int(tokens[8])
    if len(tokens) >= 11 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[7]), int(tokens[10])
    raise ValueError(f"not a JetStream delivery: reply subject {reply!r}")


class ConcurrencyConflict(Exception):
    """The aggregate moved on since the writer read it."""

    def __init__(self, aggregate: Aggregate, expected: int, detail: str) -> None:
        super().__init__(f"{aggregate}: expected version {expected}: {detail}")
        self.aggregate = aggregate
        self.expected = expected


class EventRecorder(Protocol):
    """What the core needs from a store backend; the conformance tests pin it down."""

    async def append(self, events: Sequence[Event], expected_version: int) -> list[int]:
        """Append events of one aggregate at the version the writer read (0: a new
        aggregate); returns their stream sequences. ConcurrencyConflict when the
        aggregate has moved on: no append goes without that check."""
        ...

    async def read_aggregate(self, aggregate: Aggregate) -> list[RecordedEvent]:
        """Every event of one aggregate, in order."""
        ...

    async def version(self, aggregate: Aggregate) -> int:
        """The aggregate's version: the stream sequence of its last event, 0 if none."""
        ...

    def read(
        self,
        from_seq: int = 1,
        *,
        kinds: Sequence[str] | None = None,
        aggregate: Aggregate | None = None,
    ) -> AsyncIterator[RecordedEvent]:
        """Everything from `from_seq` up to what was stored when the read began: of
        every kind (`kinds=None`), of the kinds named, or of one aggregate."""
        ...

    def follow(
        self,
        from_seq: int = 1,
        *,
        kinds: Sequence[str] | None = None,
        aggregate: Aggregate | None = None,
    ) -> AsyncIterator[RecordedEvent]:
        """What `read` reads, then every new such event as it is stored; never ends."""
        ...

    def read_batches(
        self, from_seq: int = 1, *, upto: int | None = None
    ) -> AsyncIterator[list[RecordedEvent]]:
        """Every event of the stream (all subjects) with `from_seq <= seq <= upto`
        (`upto=None`: what was stored when the read began), in order, as non-empty
        lists: the replay's way to read, a few milliseconds of folding per list."""
        ...

    async def last_seq(self) -> int: ...

    async def identity(self) -> str:
        """Names this stream apart from any other, including one of the same name
        created anew: what a read model folded from it is tied to."""
        ...


async def append_decided(
    store: EventRecorder,
    aggregate: Aggregate,
    decide: Callable[[], Sequence[Event]],
    attempts: int = APPEND_ATTEMPTS,
) -> list[int]:
    """Append what `decide` returns at the aggregate's current version, so the append
    carries its expectation like every other; when another writer got there first,
    read the version and decide again. Deterministic event ids make a retry of an
    append that landed a no-op (see `append`). An empty decision appends nothing;
    events of another aggregate than `aggregate` are a ValueError."""
    for attempt in range(1, attempts + 1):
        version = await store.version(aggregate)
        events = decide()
        if not events:
            return []
        if Aggregate.of(events[0]) != aggregate:
            raise ValueError(f"decided events of {Aggregate.of(events[0])}, not of {aggregate}")
        try:
            return await store.append(events, version)
        except ConcurrencyConflict:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


class JetStreamEventStore:
    """EventRecorder over one JetStream stream."""

    def __init__(
        self,
        nc: NatsClient,
        *,
        stream: str = STREAM_NAME,
        replicas: int = 1,
        codec: EventCodec | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=timeout)
        self.stream = stream
        self.replicas = replicas
        self.codec = codec or default_codec()
        self.timeout = timeout
        self.catch_up = CatchUpReader(
            nc,
            self.js,
            stream,
            self.codec,
            self._ordered_batches,
        )

    async def ensure_stream(self, *, mutable: MutablePolicy = "lock") -> None:
        """Create the stream append-only (deny_delete, deny_purge) if it is missing.

        An existing stream that still allows deleting or purging: `mutable="lock"` sets
        both flags (JetStream lets them be set, never unset), `"refuse"` raises
        MutableStream (an operator's stream: theirs to change), `"allow"` logs a warning
        and goes on."""
        config = api.StreamConfig(
            name=self.stream,
            subjects=STREAM_SUBJECTS,
            storage=api.StorageType.FILE,
            num_replicas=self.replicas,
            retention=api.RetentionPolicy.LIMITS,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
            allow_direct=True,
            deny_delete=True,
            deny_purge=True,
        )
        try:
            info = await self.js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            try:
                await self.js.add_stream(config)
                return
            except nats.js.errors.BadRequestError:
                info = await self.js.stream_info(self.stream)  # another process won the race
        allowed = [
            flag
            for flag, denied in (
                ("deny_delete", info.config.deny_delete),
                ("deny_purge", info.config.deny_purge),
            )
            if not denied
        ]
        if not allowed:
            return
        if mutable == "lock":
            info.config.deny_delete = True
            info.config.deny_purge = True
            await self.js.update_stream(info.config)
            log.info("stream %s is now append-only (deny_delete, deny_purge)", self.stream)
            return
        flags = " and ".join(f"{flag} is false" for flag in allowed)
        if mutable == "allow":
            log.warning(
                "stream %s allows deleting or purging events (%s); running anyway "
                "because SANDBOXER_ALLOW_MUTABLE_STREAM=1",
                self.stream,
                flags,
            )
            return
        raise MutableStream(
            f"the event stream {self.stream} is not append-only ({flags}): set "
            "deny_delete and deny_purge on it (they cannot be unset afterwards), or set "
            "SANDBOXER_ALLOW_MUTABLE_STREAM=1 to run on it anyway"
        )

    async def append(self, events: Sequence[Event], expected_version: int) -> list[int]:
        if not events:
            return []
        aggregate = Aggregate.of(events[0])
        if any(Aggregate.of(event) != aggregate for event in events):
            raise ValueError("one append holds events of one aggregate only")
        scope = aggregate_filter(aggregate)
        seqs: list[int] = []
        expected = expected_version
        for event in events:
            headers = {
                "Nats-Msg-Id": event.event_id,
                "Nats-Expected-Last-Subject-Sequence": str(expected),
                "Nats-Expected-Last-Subject-Sequence-Subject": scope,
            }
            try:
                seq = await self._publish(event, headers)
            except nats.js.errors.APIError as exc:
                if exc.err_code not in WRONG_LAST_SEQUENCE:
                    raise
                # The server checks the expected version before de-duplication, so a
                # retry of an append that did land arrives here: find it, don't fork.
                landed = await self._find_landed(aggregate, event.event_id, after=expected)
                if landed is None:
                    raise ConcurrencyConflict(aggregate, expected, str(exc.description)) from exc
                seq = landed
            seqs.append(seq)
            expected = seq
        return seqs

    async def _publish(self, event: Event, headers: dict[str, str]) -> int:
        """Publish, retrying what a cluster says while a node restarts or a leader is
        elected. Safe: the Msg-Id makes a retry of a landed publish a no-op."""
        deadline = time.monotonic() + TRANSIENT_RETRY_SECONDS
        delay = 0.1
        while True:
            try:
                ack = await self.js.publish(
                    subject_for(event),
                    self.codec.encode(event),
                    timeout=self.timeout,
                    stream=self.stream,
                    headers=headers,
                )
                return int(ack.seq)
            except Exception as exc:
                if not is_transient(exc) or time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _check_alive(self, sub: Any) -> None:
        """Quiet is fine; quiet while the consumer has events pending, or a consumer
        that is gone, is not."""
        try:
            info = await sub.consumer_info()
        except Exception as exc:
            raise FollowStalled(f"consumer lost ({type(exc).__name__}: {exc})") from exc
        if info.num_pending:
            raise FollowStalled(f"{info.num_pending} events pending but none delivered")

    async def _find_landed(self, aggregate: Aggregate, event_id: str, after: int) -> int | None:
        async for recorded in self.read(after + 1, aggregate=aggregate):
            if recorded.event.event_id == event_id:
                return recorded.seq
            return None  # the next event after `after` is someone else's
        return None

    async def read_aggregate(self, aggregate: Aggregate) -> list[RecordedEvent]:
        return [r async for r in self.read(1, aggregate=aggregate)]

    async def version(self, aggregate: Aggregate) -> int:
        # One request: the server finds the last message of a wildcard filter itself.
        try:
            msg = await self.js.get_last_msg(self.stream, aggregate_filter(aggregate))
        except nats.js.errors.NotFoundError:
            return 0
        return int(msg.seq or 0)

    async def last_seq(self) -> int:
        info = await self.js.stream_info(self.stream)
        return int(info.state.last_seq)

    async def identity(self) -> str:
        info = await self.js.stream_info(self.stream)
        return f"{self.stream}@{info.created}"

    def _record(self, msg: Msg) -> RecordedEvent:
        return RecordedEvent(
            seq=stream_position(msg.reply)[0],
            subject=msg.subject,
            event=self.codec.decode(msg.data),
        )

    async def read(
        self,
        from_seq: int = 1,
        *,
        kinds: Sequence[str] | None = None,
        aggregate: Aggregate | None = None,
    ) -> AsyncIterator[RecordedEvent]:
        filters = read_filters(kinds, aggregate)
        last = await self.last_seq()
        if from_seq > last:
            return
        async for msg in self._ordered(from_seq, filters, stop_at=last):
            yield self._record(msg)

    async def read_batches(
        self, from_seq: int = 1, *, upto: int | None = None
    ) -> AsyncIterator[list[RecordedEvent]]:
        if upto is None:
            upto = await self.last_seq()
        async for events in self.catch_up.read(from_seq, upto):
            yield events

    async def _ordered_batches(
        self, from_seq: int, upto: int
    ) -> AsyncIterator[list[RecordedEvent]]:
        """`read_batches` by the ordered consumer: where the pull batches cannot."""
        events: list[RecordedEvent] = []
        async for msg in self._ordered(from_seq, [ALL_SUBJECTS], stop_at=upto):
            recorded = self._record(msg)
            if recorded.seq > upto:
                break
            events.append(recorded)
            if len(events) >= BATCH:
                yield events
                events = []
        if events:
            yield events

    async def follow(
        self,
        from_seq: int = 1,
        *,
        kinds: Sequence[str] | None = None,
        aggregate: Aggregate | None = None,
    ) -> AsyncIterator[RecordedEvent]:
        """Every event from `from_seq` on, forever. Heals itself: when the consumer dies
        with its NATS node (or stops delivering while events wait), a new one resumes
        after the last event yielded. Following the whole stream catches up with
        `read_batches` first (to the end as it was then), then an ordered consumer
        goes on from the next sequence: nothing is lost or repeated at the switch."""
        filters = read_filters(kinds, aggregate)
        whole_stream = filters == [ALL_SUBJECTS]
        next_seq = max(from_seq, 1)
        delay = 0.1
        while True:
            try:
                if whole_stream:
                    async for events in self.read_batches(next_seq):
                        for recorded in events:
                            next_seq = recorded.seq + 1
                            yield recorded
                async for msg in self._ordered(next_seq, filters, stop_at=None):
                    recorded = self._record(msg)
                    if recorded.seq < next_seq:
                        continue  # redelivered by a consumer reset
                    next_seq = recorded.seq + 1
                    delay = 0.1
                    yield recorded
            except FollowStalled as exc:
                log.warning("follow %s: %s; resubscribing at %d", filters, exc, next_seq)
            except Exception as exc:
                if not is_transient(exc) and not isinstance(exc, nats.js.errors.NotFoundError):
                    raise
                log.warning("follow %s: %s; retrying at %d", filters, exc, next_seq)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _ordered(
        self, from_seq: int, filters: Sequence[str], stop_at: int | None
    ) -> AsyncIterator[Msg]:
        """An ordered push consumer: the fastest way to read a stream in order. More
        than one filter: one consumer with `filter_subjects` (NATS 2.10)."""
        queue: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_msg(msg: Msg) -> None:
            queue.put_nowait(msg)

        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(from_seq, 1),
            filter_subjects=list(filters) if len(filters) > 1 else None,
        )
        sub = await self.js.subscribe(
            filters[0],
            stream=self.stream,
            cb=on_msg,
            ordered_consumer=True,
            config=config,
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )
        try:
            if stop_at is not None:
                info = await sub.consumer_info()
                delivered = info.delivered.consumer_seq if info.delivered else 0
                if info.num_pending == 0 and delivered == 0:
                    return
            taken = 0
            since = time.monotonic()
            while True:
                if not queue.empty():
                    # Most messages are already waiting: take them without a timer (a
                    # timeout per message made a task and a timer handle per event),
                    # but give the loop its turn now and then: a full queue never
                    # suspends this loop on its own.
                    taken += 1
                    if taken >= YIELD_EVERY_MESSAGES or (
                        taken % 64 == 0 and time.monotonic() - since >= YIELD_EVERY_SECONDS
                    ):
                        await asyncio.sleep(0)
                        taken = 0
                        since = time.monotonic()
                    msg = queue.get_nowait()
                elif stop_at is not None:
                    msg = await queue.get()
                else:
                    try:
                        # asyncio.timeout, not wait_for: 3.11's wait_for runs the get
                        # in a task of its own, and a cancel that meets it can be lost
                        # (a stream then held the server's shutdown).
                        async with asyncio.timeout(STALL_CHECK_SECONDS):
                            msg = await queue.get()
                    except TimeoutError:
                        await self._check_alive(sub)
                        continue
                yield msg
                if stop_at is not None:
                    seq, pending = stream_position(msg.reply)
                    if pending == 0 or seq >= stop_at:
                        return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
