"""The envelope every event carries."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import ClassVar, TypedDict

import msgspec


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_event_id() -> str:
    return uuid.uuid4().hex


class EventMeta(msgspec.Struct, frozen=True, kw_only=True):
    """Who caused a step and in answer to what; copied onto each event of the step."""

    actor: str
    correlation_id: str
    causation_id: str | None = None


class Envelope(TypedDict):
    """The fields every event carries besides its own: `Type(**envelope(...), ...)`
    builds an event whose own fields the type checker sees."""

    event_id: str
    aggregate_id: str
    occurred_at: dt.datetime
    actor: str
    correlation_id: str
    causation_id: str | None


def envelope(aggregate_id: str, meta: EventMeta, event_id: str | None = None) -> Envelope:
    """A fresh id (unless a deterministic one is given) and the current time."""
    return Envelope(
        event_id=event_id or new_event_id(),
        aggregate_id=aggregate_id,
        occurred_at=utc_now(),
        actor=meta.actor,
        correlation_id=meta.correlation_id,
        causation_id=meta.causation_id,
    )


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=True):
    """Base of every event. The tag (`type`) is the class name; it ends the subject.

    `aggregate_id` is the sandbox id for sandbox events and the account for ledger
    events. `schema_version` is written explicitly so upcasters know what they read;
    its default is the type's VERSION (a type at version 2 declares `= 2`; a test
    holds every type to it).
    """

    KIND: ClassVar[str] = "sandbox"
    VERSION: ClassVar[int] = 1

    event_id: str
    aggregate_id: str
    occurred_at: dt.datetime
    actor: str
    correlation_id: str
    causation_id: str | None = None
    schema_version: int = 1

    @classmethod
    def type_name(cls) -> str:
        return cls.__name__
