"""Subscriptions for downstream consumers (validators): durable, at least once.

`subscribe` runs a handler for every event on the filter subjects, through a durable
JetStream pull consumer: the event is acked only after the handler returns; a failure
is redelivered after a back-off; after `max_attempts` the event goes to the dead-letter
subject `sandboxer.deadletter.<durable>` (with the error) and is terminated. Delivery
is at least once: `Delivery.key` (the event id) lets a handler be exactly once in
effect (use it as an idempotency key).

The filters here are NATS subjects on purpose: durable consumers are the public NATS
contract outside validators program against (docs/events.md). The recorder
(sandboxer/store/event_store.py) is the one that speaks in aggregates and kinds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from events import Event
from events.codec import EventCodec, default_codec
from events.subjects import DEAD_LETTER_PREFIX
from sandboxer.store.event_store import STREAM_NAME, WRONG_LAST_SEQUENCE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    event: Event
    subject: str
    seq: int
    attempt: int

    @property
    def key(self) -> str:
        """Idempotency key: the same for every redelivery of this event."""
        return self.event.event_id


Handler = Callable[[Delivery], Awaitable[None]]


DEAD_LETTER_ATTEMPTS = 5


def dead_letter_subject(durable: str) -> str:
    return f"{DEAD_LETTER_PREFIX}.{durable}"


async def subscribe(
    js: JetStreamContext,
    durable: str,
    filter_subjects: Sequence[str],
    handler: Handler,
    *,
    max_attempts: int = 5,
    backoff: Sequence[float] = (1.0, 2.0, 5.0, 10.0),
    ack_wait: float = 60.0,
    batch: int = 10,
    stop: asyncio.Event | None = None,
    codec: EventCodec | None = None,
    stream: str = STREAM_NAME,
    start_seq: int = 0,
    max_ack_pending: int | None = None,
) -> None:
    """Consume until `stop` is set (or the task is cancelled).

    A new consumer starts at stream sequence `start_seq` (0: the whole history);
    `max_ack_pending` bounds the events in flight (1: one at a time, in order, so a
    failing handler holds back the rest instead of failing them all). Both apply
    when the durable is created; an existing one keeps its position and settings.
    """
    codec = codec or default_codec()
    config = api.ConsumerConfig(
        durable_name=durable,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=-1,  # we count attempts and dead-letter ourselves
        filter_subjects=list(filter_subjects),
        deliver_policy=(
            api.DeliverPolicy.BY_START_SEQUENCE if start_seq > 0 else api.DeliverPolicy.ALL
        ),
        opt_start_seq=start_seq if start_seq > 0 else None,
        max_ack_pending=max_ack_pending,
    )
    try:
        await js.add_consumer(stream, config)
    except nats.js.errors.BadRequestError:
        pass  # exists already: keep its position
    psub = await js.pull_subscribe_bind(durable, stream=stream)
    stop = stop or asyncio.Event()
    try:
        while not stop.is_set():
            try:
                msgs = await psub.fetch(batch, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for msg in msgs:
                if stop.is_set():
                    break  # the rest are redelivered to whoever consumes next
                await _handle(js, durable, msg, handler, codec, max_attempts, backoff, ack_wait)
    finally:
        with contextlib.suppress(Exception):
            await psub.unsubscribe()


async def _dead_letter(
    js: JetStreamContext, stream: str, subject: str, data: bytes, headers: dict[str, str]
) -> None:
    """Append to the durable's dead-letter subject at its last sequence, like every
    append: consumers of one durable on several nodes may dead-letter at once."""
    for attempt in range(1, DEAD_LETTER_ATTEMPTS + 1):
        try:
            last = int((await js.get_last_msg(stream, subject)).seq or 0)
        except nats.js.errors.NotFoundError:
            last = 0
        expected = {"Nats-Expected-Last-Subject-Sequence": str(last)}
        try:
            await js.publish(subject, data, stream=stream, headers={**headers, **expected})
            return
        except nats.js.errors.APIError as exc:
            if exc.err_code not in WRONG_LAST_SEQUENCE or attempt == DEAD_LETTER_ATTEMPTS:
                raise


async def _handle(
    js: JetStreamContext,
    durable: str,
    msg: Msg,
    handler: Handler,
    codec: EventCodec,
    max_attempts: int,
    backoff: Sequence[float],
    ack_wait: float,
) -> None:
    meta = msg.metadata
    attempt = meta.num_delivered

    async def still_working() -> None:
        # A long handler (a test suite) must not be redelivered while it runs.
        while True:
            await asyncio.sleep(max(ack_wait / 3, 0.2))
            with contextlib.suppress(Exception):
                await msg.in_progress()

    heartbeat = asyncio.create_task(still_working())
    try:
        event = codec.decode(msg.data)
        await handler(Delivery(event, msg.subject, meta.sequence.stream, attempt))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        if attempt >= max_attempts:
            log.warning(
                "%s: seq %d failed %d times, dead-lettered: %s",
                durable,
                meta.sequence.stream,
                attempt,
                error,
            )
            await _dead_letter(
                js,
                meta.stream,
                dead_letter_subject(durable),
                msg.data,
                {
                    "Sandboxer-Subject": msg.subject,
                    "Sandboxer-Seq": str(meta.sequence.stream),
                    "Sandboxer-Attempts": str(attempt),
                    "Sandboxer-Error": error[:500],
                    "Nats-Msg-Id": f"dead.{durable}.{meta.sequence.stream}",
                },
            )
            await msg.term()
            return
        delay = backoff[min(attempt - 1, len(backoff) - 1)] if backoff else 0.0
        log.info(
            "%s: seq %d attempt %d failed (%s); again in %.1fs",
            durable,
            meta.sequence.stream,
            attempt,
            error,
            delay,
        )
        await msg.nak(delay=delay)
        return
    finally:
        heartbeat.cancel()
    await msg.ack_sync()
