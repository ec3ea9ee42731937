"""Every event type the service writes, in one tuple (the codec's union, the schema)."""

from __future__ import annotations

from events.base import Event
from events.ledger import LEDGER_EVENTS
from events.reconcile import RECONCILE_EVENTS
from events.sandbox import SANDBOX_EVENTS
from events.validation import VALIDATION_EVENTS
from events.webhooks import WEBHOOK_EVENTS

ALL_EVENTS: tuple[type[Event], ...] = (
    SANDBOX_EVENTS + LEDGER_EVENTS + VALIDATION_EVENTS + WEBHOOK_EVENTS + RECONCILE_EVENTS
)
