"""The JetStream event store against a real nats-server."""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

import msgspec
import pytest
from nats.aio.client import Client as NatsClient

from events import Aggregate, Event, envelope
from events.codec import DecodeError, EventCodec
from sandboxer.store.event_store import JetStreamEventStore
from tests.store_conformance import RecorderConformance


class TestJetStreamRecorder(RecorderConformance):
    @pytest.fixture
    def recorder(self, store: JetStreamEventStore) -> JetStreamEventStore:
        return store


async def test_stream_is_file_backed_with_the_public_subjects(
    store: JetStreamEventStore, nc: NatsClient
) -> None:
    await store.ensure_stream()  # idempotent
    info = await nc.jetstream().stream_info("SANDBOXER")
    assert info.config.subjects == ["sandboxer.>"]
    assert info.config.storage == "file"
    assert info.config.num_replicas == 1


class Renamed(Event, frozen=True, kw_only=True):
    """Test-only event at version 2: v1 called the field `image`, v2 calls it `template`."""

    VERSION: ClassVar[int] = 2
    schema_version: int = 2
    template: str
    region: str


def _v1_to_v2(raw: dict[str, Any]) -> dict[str, Any]:
    raw["template"] = raw.pop("image")
    raw.setdefault("region", "eu-1")
    return raw


async def test_old_event_decodes_through_its_upcaster(nc: NatsClient) -> None:
    codec = EventCodec([Renamed], {("Renamed", 1): _v1_to_v2})
    store = JetStreamEventStore(nc, codec=codec)
    await store.ensure_stream()
    v1 = {
        "type": "Renamed",
        "event_id": "e1",
        "aggregate_id": "sbx-u1",
        "occurred_at": "2026-01-01T00:00:00Z",
        "actor": "old",
        "correlation_id": "c",
        "causation_id": None,
        "schema_version": 1,
        "image": "busybox",
    }
    # Written the way an old release wrote it: straight onto the stream.
    await nc.jetstream().publish("sandboxer.sandbox.sbx-u1.Renamed", msgspec.json.encode(v1))
    current = Renamed(**envelope("sbx-u1", _meta()), template="alpine", region="us-2")
    await store.append([current], await store.version(Aggregate("sandbox", "sbx-u1")))
    history = await store.read_aggregate(Aggregate("sandbox", "sbx-u1"))
    old, new = (r.event for r in history)
    assert isinstance(old, Renamed) and isinstance(new, Renamed)
    assert (old.template, old.region, old.schema_version) == ("busybox", "eu-1", 2)
    assert old.occurred_at == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert new == current
    # The batch reader decodes the same way (its batch decode upcasts too).
    batched = [r.event async for batch in store.read_batches(1) for r in batch]
    assert batched == [old, new]


def test_missing_upcaster_is_a_clear_error() -> None:
    codec = EventCodec([Renamed])
    raw = msgspec.json.encode(
        {
            "type": "Renamed",
            "event_id": "e",
            "aggregate_id": "a",
            "occurred_at": "2026-01-01T00:00:00Z",
            "actor": "x",
            "correlation_id": "c",
            "schema_version": 1,
            "image": "busybox",
        }
    )
    with pytest.raises(DecodeError, match="no upcaster from version 1"):
        codec.decode(raw)
    with pytest.raises(DecodeError, match="no upcaster from version 1"):
        codec.decode_many([raw])
    with pytest.raises(DecodeError, match="unknown event type"):
        codec.decode(b'{"type": "Nope"}')


def _meta() -> Any:
    from events import EventMeta

    return EventMeta(actor="test", correlation_id="c")
