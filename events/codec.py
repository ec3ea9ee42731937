"""JSON encoding of events, with upcasters so that every recorded event keeps decoding.

An upcaster takes the raw JSON object of an event at version N and returns it at
version N+1. Decoding runs the chain up to the class's current VERSION, then
converts to the Struct. Current-version events take the typed fast path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

import msgspec

from events.base import Event
from events.upcasters import Upcaster


class DecodeError(ValueError):
    """A stored payload that no known event type or upcaster chain can read."""


def _check_version_default(event_type: type[Event]) -> None:
    """Events are built as `Type(**envelope(...), ...)`, so `schema_version` comes from
    the field's default: it must be the type's VERSION, or new events would be
    written as (and upcast like) an older version."""
    (field,) = [f for f in msgspec.structs.fields(event_type) if f.name == "schema_version"]
    if field.default != event_type.VERSION:
        raise TypeError(
            f"{event_type.__name__}: VERSION is {event_type.VERSION} but schema_version "
            f"defaults to {field.default}; declare `schema_version: int = {event_type.VERSION}`"
        )


class EventCodec:
    """Encodes and decodes one catalog of event types."""

    def __init__(
        self,
        types: Iterable[type[Event]],
        upcasters: dict[tuple[str, int], Upcaster] | None = None,
    ) -> None:
        self.types: dict[str, type[Event]] = {t.type_name(): t for t in types}
        for event_type in self.types.values():
            _check_version_default(event_type)
        self.upcasters: dict[tuple[str, int], Upcaster] = dict(upcasters or {})
        union = tuple(self.types.values())
        self._decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(
            union[0] if len(union) == 1 else Union[union]  # noqa: UP007
        )
        self._encoder = msgspec.json.Encoder()

    def register_upcaster(self, type_name: str, from_version: int, upcaster: Upcaster) -> None:
        self.upcasters[(type_name, from_version)] = upcaster

    def encode(self, event: Event) -> bytes:
        return self._encoder.encode(event)

    def decode(self, data: bytes) -> Event:
        try:
            event: Event = self._decoder.decode(data)
        except msgspec.ValidationError:
            return self._decode_slow(data)
        if event.schema_version < type(event).VERSION:
            return self._decode_slow(data)
        return event

    def decode_many(self, payloads: Sequence[bytes]) -> list[Event]:
        """`decode` of each payload, in order: what a replay calls per batch. The
        typed fast path without per-call lookups; upcasting and errors as `decode`
        (one JSON array of the whole batch measured slower than this loop)."""
        decode = self._decoder.decode
        slow = self._decode_slow
        events: list[Event] = []
        append = events.append
        for data in payloads:
            try:
                event: Event = decode(data)
            except msgspec.ValidationError:
                append(slow(data))
                continue
            if event.schema_version < event.VERSION:
                event = slow(data)
            append(event)
        return events

    def _decode_slow(self, data: bytes) -> Event:
        try:
            raw = msgspec.json.decode(data)
        except msgspec.DecodeError as exc:
            raise DecodeError(f"event payload is not JSON: {exc}") from exc
        if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
            raise DecodeError("event payload has no string field `type`")
        type_name: str = raw["type"]
        cls = self.types.get(type_name)
        if cls is None:
            raise DecodeError(f"unknown event type {type_name!r}")
        version = raw.get("schema_version", 1)
        if not isinstance(version, int) or version < 1:
            raise DecodeError(f"{type_name}: bad schema_version {version!r}")
        while version < cls.VERSION:
            upcaster = self.upcasters.get((type_name, version))
            if upcaster is None:
                raise DecodeError(f"{type_name}: no upcaster from version {version}")
            raw = upcaster(dict(raw))
            version += 1
            raw["schema_version"] = version
        try:
            return msgspec.convert(raw, cls)
        except msgspec.ValidationError as exc:
            raise DecodeError(f"{type_name} v{version}: {exc}") from exc


_default: EventCodec | None = None


def default_codec() -> EventCodec:
    """The codec for the shipped catalog (built lazily: the catalog imports this module)."""
    global _default
    if _default is None:
        from events.catalog import ALL_EVENTS
        from events.upcasters import UPCASTERS

        _default = EventCodec(ALL_EVENTS, UPCASTERS)
    return _default


def register_upcaster(type_name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Decorator: register an upcaster for the shipped catalog."""

    def wrap(fn: Upcaster) -> Upcaster:
        default_codec().register_upcaster(type_name, from_version, fn)
        return fn

    return wrap


def encode_event(event: Event) -> bytes:
    return default_codec().encode(event)


def decode_event(data: bytes) -> Event:
    return default_codec().decode(data)
