"""Ledger events, published on `sandboxer.ledger.<account>.<EventType>`.

The payments issue fills this catalog; the subject space and the union are ready.
"""

from __future__ import annotations

from events.base import Event

LEDGER_EVENTS: tuple[type[Event], ...] = ()
