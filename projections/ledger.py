"""The ledger read model: balances per account, charges per sandbox. A pure fold.

available = granted - reserved - debited, where `reserved` is the sum of the open
reservations. A reservation is closed by a debit plus a release of the rest, or by a
release of all of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from events import (
    CreditsDebited,
    CreditsGranted,
    CreditsRejected,
    CreditsReleased,
    CreditsReserved,
    Event,
)
from events.subjects import LEDGER_SUBJECTS


class AccountView(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    account: str
    granted: int = 0
    reserved: int = 0
    debited: int = 0
    released: int = 0
    rejected: int = 0
    entries: int = 0
    last_seq: int = 0
    open: dict[str, int] = {}  # sandbox id -> amount still reserved

    @property
    def available(self) -> int:
        return self.granted - self.reserved - self.debited


class Charge(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What one sandbox cost: its reservation, debit and release."""

    sandbox_id: str
    account: str
    reserved: int = 0
    debited: int | None = None
    released: int = 0
    rejected: bool = False
    debits: int = 0  # how many debits were recorded (an invariant says at most one)
    reserve_basis: dict[str, str | int | float | bool] = {}
    debit_basis: dict[str, str | int | float | bool] = {}
    settled: bool = False
    last_seq: int = 0  # the stream sequence of its last event

    @property
    def closed(self) -> bool:
        """Nothing more is expected for it: released, or its reservation refused."""
        return self.settled or self.rejected


def evolve_account(view: AccountView | None, seq: int, event: Event) -> AccountView:
    view = view or AccountView(account=event.aggregate_id)
    change = _ACCOUNT_CHANGES.get(type(event))
    if change is None:
        return msgspec.structs.replace(view, entries=view.entries + 1, last_seq=seq)
    return change(view, seq, event)


# What each kind of entry does to an account (a dispatch on the event's type, not an
# isinstance chain: a replay folds millions of them).
def _granted(view: AccountView, seq: int, e: CreditsGranted) -> AccountView:
    return msgspec.structs.replace(
        view, granted=view.granted + e.amount, entries=view.entries + 1, last_seq=seq
    )


def _reserved(view: AccountView, seq: int, e: CreditsReserved) -> AccountView:
    opened = {**view.open, e.sandbox_id: view.open.get(e.sandbox_id, 0) + e.amount}
    return msgspec.structs.replace(
        view,
        reserved=view.reserved + e.amount,
        open=opened,
        entries=view.entries + 1,
        last_seq=seq,
    )


def _debited(view: AccountView, seq: int, e: CreditsDebited) -> AccountView:
    return msgspec.structs.replace(
        view,
        reserved=view.reserved - e.amount,
        debited=view.debited + e.amount,
        open=_less(view.open, e.sandbox_id, e.amount),
        entries=view.entries + 1,
        last_seq=seq,
    )


def _released(view: AccountView, seq: int, e: CreditsReleased) -> AccountView:
    return msgspec.structs.replace(
        view,
        reserved=view.reserved - e.amount,
        released=view.released + e.amount,
        open=_less(view.open, e.sandbox_id, e.amount),
        entries=view.entries + 1,
        last_seq=seq,
    )


def _rejected(view: AccountView, seq: int, _e: CreditsRejected) -> AccountView:
    return msgspec.structs.replace(
        view, rejected=view.rejected + 1, entries=view.entries + 1, last_seq=seq
    )


_ACCOUNT_CHANGES: dict[type[Event], Callable[[AccountView, int, Any], AccountView]] = {
    CreditsGranted: _granted,
    CreditsReserved: _reserved,
    CreditsDebited: _debited,
    CreditsReleased: _released,
    CreditsRejected: _rejected,
}


def _less(open_: dict[str, int], sandbox_id: str, amount: int) -> dict[str, int]:
    left = open_.get(sandbox_id, 0) - amount
    rest = dict(open_)  # a C-level copy: an account may hold thousands of reservations
    rest.pop(sandbox_id, None)
    if left != 0:
        rest[sandbox_id] = left
    return rest


def evolve_charge(current: Charge | None, event: Event, seq: int) -> Charge | None:
    """The charge after one of its account's entries (`seq`: the entry's sequence),
    or `current` itself for an entry that changes no charge. A sandbox has one charge
    at a time: a warm pool member's is the pool's until a claim closes it and opens
    the claimer's."""
    sandbox_id = getattr(event, "sandbox_id", None)
    if sandbox_id is None:
        return current
    kind = type(event)
    if current is not None and current.account != event.aggregate_id:
        if not (current.closed and kind in (CreditsReserved, CreditsRejected)):
            return current  # another account's entry does not move this charge
        # A warm pool member claimed (docs/pools.md): the pool's charge closed, the
        # claimer's starts. The pool's stays in its account's totals and its events.
        current = None
    charge = current or Charge(sandbox_id=sandbox_id, account=event.aggregate_id)
    if kind is CreditsReserved:
        assert isinstance(event, CreditsReserved)
        return msgspec.structs.replace(
            charge,
            reserved=charge.reserved + event.amount,
            reserve_basis=event.basis,
            last_seq=seq,
        )
    if kind is CreditsRejected:
        return msgspec.structs.replace(charge, rejected=True, last_seq=seq)
    if kind is CreditsDebited:
        assert isinstance(event, CreditsDebited)
        return msgspec.structs.replace(
            charge,
            debited=(charge.debited or 0) + event.amount,
            debits=charge.debits + 1,
            debit_basis=event.basis,
            last_seq=seq,
        )
    if kind is CreditsReleased:
        assert isinstance(event, CreditsReleased)
        return msgspec.structs.replace(
            charge, released=charge.released + event.amount, settled=True, last_seq=seq
        )
    return current or msgspec.structs.replace(charge, last_seq=seq)


class LedgerProjection:
    """Balances of every account, and the charges: the open ones in memory, the closed
    ones since the last flush (`take_closed`), the older ones in the archive."""

    def __init__(self, archive: ChargeArchive | None = None) -> None:
        self.accounts: dict[str, AccountView] = {}
        self.charges: dict[str, Charge] = {}  # open
        self.closed: dict[str, Charge] = {}  # closed since the last flush
        self.archive = archive
        self.last_seq = 0

    def apply(self, seq: int, subject: str, event: Event) -> None:
        self.last_seq = seq
        if not subject.startswith(LEDGER_SUBJECTS):
            return
        key = event.aggregate_id
        account = self.accounts.get(key)
        if account is not None and seq <= account.last_seq:
            return  # folded already (a tail that overlaps what was loaded)
        self.accounts[key] = evolve_account(account, seq, event)
        sandbox_id = getattr(event, "sandbox_id", None)
        if sandbox_id is None:
            return
        # A reservation opens a charge or adds to an open one (in memory): only the
        # other entries can concern a charge that closed and went to the archive.
        if isinstance(event, CreditsReserved):
            current = self.charges.get(sandbox_id) or self.closed.get(sandbox_id)
        else:
            current = self.charge(sandbox_id)
        if current is not None and seq <= current.last_seq:
            return
        charge = evolve_charge(current, event, seq)
        if charge is None or charge is current:
            return
        if charge.closed:
            self.charges.pop(sandbox_id, None)
            self.closed[sandbox_id] = charge
        else:
            self.closed.pop(sandbox_id, None)
            self.charges[sandbox_id] = charge

    def charge(self, sandbox_id: str) -> Charge | None:
        found = self.charges.get(sandbox_id) or self.closed.get(sandbox_id)
        if found is None and self.archive is not None:
            found = self.archive.charge(sandbox_id)
        return found

    def take_closed(self) -> list[Charge]:
        rows = list(self.closed.values())
        self.closed.clear()
        return rows

    def snapshot(self) -> LedgerProjection:
        """A copy that stays put while this one follows the stream (rows are immutable)."""
        copy = LedgerProjection(self.archive)
        copy.accounts = dict(self.accounts)
        copy.charges = dict(self.charges)
        copy.closed = dict(self.closed)
        copy.last_seq = self.last_seq
        return copy

    def account(self, name: str) -> AccountView:
        return self.accounts.get(name) or AccountView(account=name)


class ChargeArchive(Protocol):
    def charge(self, sandbox_id: str) -> Charge | None: ...
