"""Ledger events, published on `sandboxer.ledger.<account>.<EventType>`.

Amounts are whole credits. A reservation is a pending transfer: it is either
debited (the metered actual, at most the reservation) and the rest released, or
released whole (a failed create). Event ids of the phases of one sandbox are
derived from the sandbox id, so a phase appended twice (a retry, or recovery after
a crash) is one event.
"""

from __future__ import annotations

from typing import ClassVar

from events.base import Event

Basis = dict[str, str | int | float | bool]


class LedgerEvent(Event, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "ledger"


class CreditsGranted(LedgerEvent, frozen=True, kw_only=True):
    amount: int
    reason: str = ""


class CreditsReserved(LedgerEvent, frozen=True, kw_only=True):
    sandbox_id: str
    amount: int
    basis: Basis = {}


class CreditsRejected(LedgerEvent, frozen=True, kw_only=True):
    sandbox_id: str
    requested: int
    available: int


class CreditsDebited(LedgerEvent, frozen=True, kw_only=True):
    """`basis`: the extension's account of the actual (its own keys) plus the ledger's
    `capped_at_reservation`: true when the actual was more than the reservation and
    `amount` is the reservation. Version 2 always records that key; version 1 records
    only had it when true, and the upcaster from 1 fills in false."""

    VERSION: ClassVar[int] = 2
    schema_version: int = 2

    sandbox_id: str
    amount: int
    basis: Basis = {}


class CreditsReleased(LedgerEvent, frozen=True, kw_only=True):
    sandbox_id: str
    amount: int
    reason: str = ""


LEDGER_EVENTS: tuple[type[Event], ...] = (
    CreditsGranted,
    CreditsReserved,
    CreditsRejected,
    CreditsDebited,
    CreditsReleased,
)


def phase_event_id(sandbox_id: str, phase: str) -> str:
    """The deterministic id of one ledger phase of one sandbox (reserve, debit, release)."""
    return f"{sandbox_id}.{phase}"
