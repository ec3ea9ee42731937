"""An event as the stream holds it: what every reader of the stream yields."""

from __future__ import annotations

import msgspec

from events import Event


class RecordedEvent(msgspec.Struct, frozen=True):
    """An event as the stream holds it: with its stream sequence and subject."""

    seq: int
    subject: str
    event: Event
