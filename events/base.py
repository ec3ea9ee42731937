"""The envelope every event carries."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import ClassVar, Self

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


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=True):
    """Base of every event. The tag (`type`) is the class name; it ends the subject.

    `aggregate_id` is the sandbox id for sandbox events and the account for ledger
    events. `schema_version` is written explicitly so upcasters know what they read.
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

    @classmethod
    def create(
        cls,
        aggregate_id: str,
        meta: EventMeta,
        *,
        event_id: str | None = None,
        **fields: object,
    ) -> Self:
        """Build an event with a fresh id and the current time, at the current version."""
        return cls(
            event_id=event_id or new_event_id(),
            aggregate_id=aggregate_id,
            occurred_at=utc_now(),
            actor=meta.actor,
            correlation_id=meta.correlation_id,
            causation_id=meta.causation_id,
            schema_version=cls.VERSION,
            **fields,
        )
