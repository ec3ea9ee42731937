"""A catch-up reader: the whole stream in batches, fast enough for full replays.

nats-py hands every delivered message through a generic header parser, a `Msg`, a
queue and a callback; for a replay of a million events that per-message path is the
ceiling (about 43k messages/s on two cores, before any decoding). This reader pulls
the stored messages in batches from an ephemeral pull consumer (no acks, in memory,
removed when the read ends or after a minute without use) onto a private inbox
whose messages bypass that path (see `route_raw`): of each message it keeps the
subject, the reply subject (`$JS.ACK...`, which carries the stream sequence and the
number of messages still pending) and the body, and never looks at the stored headers.
Bodies are decoded per batch (`EventCodec.decode_many`).

Measured against the batch direct get (`$JS.API.DIRECT.GET` with `batch`, server
2.11), which needs no consumer: on two shared cores the server delivered the pull
consumer's batches about twice as fast, so the reader pulls.

A consumer that stops delivering (its server restarted, the connection reconnected)
is replaced by a new one from the next sequence still missing; when that keeps
failing, or the consumer cannot be made, the rest is read with the event store's
ordered push consumer (`fallback`), in the same batches.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import NamedTuple

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.protocol.parser import AWAITING_CONTROL_LINE, MAX_CONTROL_LINE_SIZE

from events.codec import EventCodec
from sandboxer.store.recorded import RecordedEvent

log = logging.getLogger(__name__)

# Events per pull request and per batch handed out: big enough that a request's round
# trip is noise, small enough that a batch is a few milliseconds of folding.
BATCH = 1000
# Requests in flight at once: the next batch arrives while this one is decoded.
DEPTH = 4
# A consumer that delivers nothing for this long while events are due is replaced.
STALL_SECONDS = 5.0
RETRY_SECONDS = 20.0
# The consumer goes away on its own this long after its reader did (a crash).
INACTIVE_SECONDS = 60.0
PULL_EXPIRES_NS = int(30e9)

RawHandler = Callable[[bytes, bytes, bytes | None, bytes], None]
_ROUTES = "_sandboxer_raw_routes"


def route_raw(nc: NatsClient, sub: Subscription, handler: RawHandler) -> Callable[[], None]:
    """Deliver the messages of `sub` as `handler(subject, reply, raw_headers, body)`,
    bypassing nats-py's header parsing, `Msg`, pending queue and callback; returns the
    function that undoes it (call it before unsubscribing).

    The one reach into nats-py internals (2.x), installed once per client:
    - its protocol parser (`nc._ps`, one per client, reset but kept on reconnect)
      gets a fast path in front of `parse`: while the buffer starts with a complete
      `HMSG` of a routed subscription id, it is cut out and handed over here; any
      other bytes (other subscriptions, `MSG`, `PING`, `INFO`, a message split across
      reads that nats-py already began) go to nats-py's own parser as before;
    - `nc._process_msg(sid, subject, reply, data, headers)`, which that parser awaits
      for each message it parses, hands routed ones over too (headers raw, or None).
    The subscription itself is an ordinary `nc.subscribe`: credentials, TLS and the
    inbox prefix are untouched, and nats-py re-sends it with the same id after a
    reconnect. `handler` runs inside nats-py's read loop: it must be quick and must
    not raise. Message statistics (`nc.stats`) do not count routed messages."""
    routes: dict[int, RawHandler] | None = nc.__dict__.get(_ROUTES)
    if routes is None:
        routes = _install_routes(nc)
    sid: int = sub._id
    routes[sid] = handler
    table = routes

    def unroute() -> None:
        table.pop(sid, None)

    return unroute


def _install_routes(nc: NatsClient) -> dict[int, RawHandler]:
    table: dict[int, RawHandler] = {}
    original_msg = nc._process_msg

    async def process_msg(
        sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        raw = table.get(sid)
        if raw is None:
            await original_msg(sid, subject, reply, data, headers)  # type: ignore[arg-type]
        else:
            raw(subject, reply, headers, data)

    parser = nc._ps
    original_parse = parser.parse

    async def parse(data: bytes = b"") -> None:
        if parser.state != AWAITING_CONTROL_LINE or not table:
            await original_parse(data)
            return
        buf = parser.buf  # replaced by reset() on reconnect: look it up each time
        buf.extend(data)
        if not buf.startswith(b"HMSG "):
            await original_parse(b"")
            return
        # Scan a copy by position and cut what was handed over once at the end: a
        # cut per message moved the rest of the buffer every time.
        view = bytes(buf)
        size = len(view)
        pos = 0
        wait = False  # the buffer ends in the first part of a message: more comes
        while view.startswith(b"HMSG ", pos):
            end = view.find(b"\r\n", pos, pos + MAX_CONTROL_LINE_SIZE)
            if end < 0:
                wait = size - pos < MAX_CONTROL_LINE_SIZE  # else too long: nats-py reports it
                break
            args = view[pos + 5 : end].split()
            if len(args) == 5:
                subject, sid, reply, header_size, total_size = args
            elif len(args) == 4:
                subject, sid, header_size, total_size = args
                reply = b""
            else:
                break  # malformed: nats-py's parser reports it
            try:
                raw = table.get(int(sid))
                start = end + 2
                stop = start + int(total_size)
                middle = start + int(header_size)
            except ValueError:
                break  # malformed: nats-py's parser reports it
            if raw is None:
                break  # another subscription's: nats-py's parser delivers it
            if size < stop + 2:
                wait = True
                break
            pos = stop + 2
            raw(subject, reply, view[start:middle], view[middle:stop])
        if pos:
            del buf[:pos]
        if buf and not wait:
            await original_parse(b"")

    nc._process_msg = process_msg  # type: ignore[method-assign]
    parser.parse = parse  # type: ignore[method-assign]
    setattr(nc, _ROUTES, table)
    return table


class BatchUnavailable(Exception):
    """The pull consumer cannot serve this read; read the rest another way."""


class _Stalled(Exception):
    """The consumer stopped delivering: make a new one from where the read is."""


def ack_position(reply: bytes) -> tuple[int, int]:
    """(stream sequence, messages pending) from a delivery's `$JS.ACK...` reply subject
    (the two token layouts of `event_store.stream_position`), without decoding it."""
    tokens = reply.split(b".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[8])
    if len(tokens) >= 11:
        return int(tokens[7]), int(tokens[10])
    raise ValueError(f"not a JetStream delivery: reply subject {reply!r}")


# The end of a `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`
# reply subject, each followed by a newline: one regex over the batch's joined replies.
_ACK_TAIL = re.compile(rb"(\d+)\.\d+\.\d+\.\d+\n")


def ack_sequences(replies: list[bytes]) -> list[int]:
    """The stream sequence of each reply (`ack_position`). A consumer delivers in
    stream order, so a batch whose first and last sequences are `len - 1` apart
    holds consecutive sequences (no message deleted between): only those two are
    read. Otherwise one pass over the batch for the common layout (the other one may
    end in a token of its own: one reply at a time)."""
    if not replies:
        return []
    first, last = ack_position(replies[0])[0], ack_position(replies[-1])[0]
    if last - first == len(replies) - 1:
        return list(range(first, last + 1))
    if replies[0].count(b".") == 8:
        found: list[bytes] = _ACK_TAIL.findall(b"\n".join(replies) + b"\n")
        if len(found) == len(replies):
            return list(map(int, found))
    return [ack_position(reply)[0] for reply in replies]


class _Inbox:
    """What arrived on the reader's inbox: stored messages as three parallel lists,
    and the last status the server sent (408 a request expired, 409 the consumer is
    gone, ...). `wake` resolves when `want` messages or a status are there."""

    __slots__ = ("bodies", "replies", "status", "subjects", "wake", "want")

    def __init__(self) -> None:
        self.subjects: list[bytes] = []
        self.replies: list[bytes] = []
        self.bodies: list[bytes] = []
        self.status = 0
        self.want = 0
        self.wake: asyncio.Future[None] | None = None

    def on_raw(self, subject: bytes, reply: bytes, headers: bytes | None, body: bytes) -> None:
        # Runs for every message in nats-py's read loop: keep it to the appends.
        if reply:  # a stored message (statuses come without a reply subject)
            self.subjects.append(subject)
            self.replies.append(reply)
            self.bodies.append(body)
            # Wake early for the stream's last message (pending 0: `...<ts>.0`).
            if len(self.bodies) < self.want and not reply.endswith(b".0"):
                return
        else:
            self.status = int(headers[9:12]) if headers and headers[8:9] == b" " else 0
        wake = self.wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def take(self, most: int) -> tuple[list[bytes], list[bytes], list[bytes]]:
        taken = self.subjects[:most], self.replies[:most], self.bodies[:most]
        del self.subjects[:most], self.replies[:most], self.bodies[:most]
        return taken


class RawBatch(NamedTuple):
    """Stored messages as they came: stream sequences, subjects, event bodies."""

    seqs: list[int]
    subjects: list[bytes]
    bodies: list[bytes]


OrderedRead = Callable[[int, int], AsyncIterator[list[RecordedEvent]]]


class CatchUpReader:
    """Reads stream sequences `from_seq..upto` of every subject as lists of
    RecordedEvent, in order, from an ephemeral pull consumer; `fallback(from_seq,
    upto)` reads what it cannot (see the module docstring)."""

    def __init__(
        self,
        nc: NatsClient,
        js: JetStreamContext,
        stream: str,
        codec: EventCodec,
        fallback: OrderedRead,
        *,
        api_prefix: str = api.DEFAULT_PREFIX,
        batch: int = BATCH,
        depth: int = DEPTH,
        stall_seconds: float = STALL_SECONDS,
    ) -> None:
        self.nc = nc
        self.js = js
        self.stream = stream
        self.codec = codec
        self.fallback = fallback
        self.api_prefix = api_prefix
        self.batch = batch
        self.depth = depth
        self.stall_seconds = stall_seconds
        self._recorded = RecordedEvent

    async def read(self, from_seq: int, upto: int) -> AsyncIterator[list[RecordedEvent]]:
        """Every event with `from_seq <= seq <= upto`; the loop gets control back
        between batches (one batch is at most `batch` events)."""
        next_seq = max(from_seq, 1)
        deadline = time.monotonic() + RETRY_SECONDS
        while next_seq <= upto:
            try:
                async for raw in self._pull(next_seq, upto):
                    events = self._decode(raw)
                    next_seq = events[-1].seq + 1
                    deadline = time.monotonic() + RETRY_SECONDS
                    yield events
                    await asyncio.sleep(0)
                return
            except (_Stalled, nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                refused = isinstance(exc, nats.js.errors.APIError) and exc.code != 503
                if refused or time.monotonic() > deadline:
                    log.warning("catch-up from %d by the ordered consumer: %s", next_seq, exc)
                    break
                log.warning("catch-up from %d: %s; a new consumer", next_seq, exc)
                await asyncio.sleep(0.1)
        if next_seq <= upto:
            async for events in self.fallback(next_seq, upto):
                yield events
                await asyncio.sleep(0)

    def read_raw(self, from_seq: int, upto: int) -> AsyncIterator[RawBatch]:
        """The undecoded batches of `read` (no retries, no fallback): what the
        benchmark measures as the cost of reading alone."""
        return self._pull(max(from_seq, 1), upto)

    async def _pull(self, from_seq: int, upto: int) -> AsyncIterator[RawBatch]:
        """One consumer from `from_seq`: raw batches until `upto` (or the end of the
        stream) is delivered; _Stalled when it stops delivering."""
        inbox = _Inbox()
        sub = await self.nc.subscribe(self.nc.new_inbox())
        unroute = route_raw(self.nc, sub, inbox.on_raw)
        info: api.ConsumerInfo | None = None
        try:
            info = await self.js.add_consumer(
                self.stream,
                api.ConsumerConfig(
                    deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=from_seq,
                    ack_policy=api.AckPolicy.NONE,
                    inactive_threshold=INACTIVE_SECONDS,
                    mem_storage=True,
                    num_replicas=1,
                ),
            )
            if info.num_pending == 0:
                return  # nothing stored from `from_seq` on
            next_subject = f"{self.api_prefix}.CONSUMER.MSG.NEXT.{self.stream}.{info.name}"
            need = upto - from_seq + 1  # at most; fewer where messages were deleted
            asked = received = 0
            next_seq = from_seq
            while True:
                # Ask for what `upto` needs (deleted messages make it less: the last
                # one then says pending 0), and, as a safety net, for more when
                # nothing is due but neither `upto` nor the end has come.
                while (asked < need or asked == received) and (
                    asked - received < self.batch * self.depth
                ):
                    count = min(self.batch, max(need - asked, 1))
                    request = json.dumps({"batch": count, "expires": PULL_EXPIRES_NS})
                    await self.nc.publish(next_subject, request.encode(), reply=sub.subject)
                    asked += count
                if len(inbox.bodies) < min(self.batch, asked - received):
                    await self._wait(inbox, min(self.batch, asked - received))
                status, inbox.status = inbox.status, 0
                subjects, replies, bodies = inbox.take(self.batch)
                received += len(bodies)
                raw, last, pending = _positions(subjects, replies, bodies, next_seq, upto)
                if raw.seqs:
                    next_seq = raw.seqs[-1] + 1
                    yield raw
                if last >= upto or pending == 0:
                    return
                if status == 408:  # a request expired short (deleted messages): ask again
                    asked = received + len(inbox.bodies)
                elif status not in (0, 404):
                    raise _Stalled(f"the consumer answered status {status}")
        finally:
            unroute()
            try:
                await sub.unsubscribe()
                if info is not None:
                    await self.js.delete_consumer(self.stream, info.name)
            except Exception as exc:  # reconnecting or gone: the server forgets it anyway
                log.debug("catch-up consumer cleanup: %s", exc)

    async def _wait(self, inbox: _Inbox, want: int) -> None:
        """Until `want` messages, the stream's last one or a status arrived, or some
        messages and then a pause; _Stalled when nothing came for `stall_seconds`."""
        inbox.want = want
        inbox.wake = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(inbox.wake, self.stall_seconds)
        except TimeoutError:
            if not inbox.bodies and not inbox.status:
                raise _Stalled(f"nothing delivered for {self.stall_seconds:g} s") from None
        finally:
            inbox.wake = None
            inbox.want = 0

    def _decode(self, raw: RawBatch) -> list[RecordedEvent]:
        events = self.codec.decode_many(raw.bodies)
        recorded = self._recorded
        return [
            recorded(seq, subject.decode(), event)
            for seq, subject, event in zip(raw.seqs, raw.subjects, events, strict=True)
        ]


def _positions(
    subjects: list[bytes], replies: list[bytes], bodies: list[bytes], next_seq: int, upto: int
) -> tuple[RawBatch, int, int]:
    """The batch's messages with `next_seq <= seq <= upto`, the sequence of its last
    message and the messages pending after it (-1, -1 for an empty batch)."""
    if not bodies:
        return RawBatch([], [], []), -1, -1
    seqs = ack_sequences(replies)
    last, pending = ack_position(replies[-1])
    if seqs[0] < next_seq or last > upto:
        kept = [i for i, seq in enumerate(seqs) if next_seq <= seq <= upto]
        seqs = [seqs[i] for i in kept]
        subjects = [subjects[i] for i in kept]
        bodies = [bodies[i] for i in kept]
    return RawBatch(seqs, subjects, bodies), last, pending
