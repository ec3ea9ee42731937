"""The command side of payments: grants, reservations and settlements on accounts.

Every decision is taken on the account's row in the projection runner's ledger (the
one ledger read model of the process) and appended with optimistic concurrency on
`sandboxer.ledger.<account>.>` at the version that row shows: if another process
moved the account on, the append is refused, the runner is let catch up with the
stream and the decision taken again. After an append the book waits until the runner
has applied it, so its next decision sees its own write. So concurrent reservations,
also from several processes, can never overdraw an account. Sandbox phases carry
deterministic event ids (`<sandbox>.reserve`, `.debit`, `.release`): a phase recorded
twice is one event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from events import (
    CreditsDebited,
    CreditsGranted,
    CreditsRejected,
    CreditsReleased,
    CreditsReserved,
    Event,
    EventMeta,
    envelope,
    phase_event_id,
)
from extensions.sdk import Cost
from projections.ledger import AccountView, Charge
from sandboxer.store.event_store import ConcurrencyConflict, EventRecorder

if TYPE_CHECKING:
    from sandboxer.app.read_model import ProjectionRunner

CONFLICT_RETRIES = 20
CATCH_UP_SECONDS = 30.0
STARTER_GRANT_ID = "default.starter-grant"
POOL_ACCOUNT = "pool"  # the operator account warm pool members wait on (docs/pools.md)


class LedgerError(ValueError):
    pass


class LedgerBook:
    def __init__(self, store: EventRecorder, runner: ProjectionRunner) -> None:
        self.store = store
        self.runner = runner
        self._locks: dict[str, asyncio.Lock] = {}

    def account(self, name: str) -> AccountView:
        return self.runner.ledger.account(name)

    def version(self, account: str) -> int:
        """The stream sequence of the account's last event (0: none yet)."""
        return self.account(account).last_seq

    def charge(self, sandbox_id: str) -> Charge | None:
        return self.runner.ledger.charge(sandbox_id)

    async def _caught_up(self, seq: int) -> None:
        if not await self.runner.wait_for(seq, CATCH_UP_SECONDS):
            raise LedgerError(f"the ledger projection did not reach sequence {seq}")

    async def refresh(self, account: str) -> None:
        """See what other processes appended (to the account) until now: let the
        runner catch up with the end of the stream."""
        await self._caught_up(await self.store.last_seq())

    async def _append(
        self, account: str, decide: Callable[[AccountView], Sequence[Event]]
    ) -> list[Event]:
        """Decide on the account's current state and append; on a conflict, re-read and
        decide again. Returns what was appended."""
        lock = self._locks.setdefault(account, asyncio.Lock())
        async with lock:
            for _ in range(CONFLICT_RETRIES):
                events = list(decide(self.account(account)))
                if not events:
                    return []
                try:
                    seqs = await self.store.append(events, self.version(account))
                except ConcurrencyConflict:
                    await self.refresh(account)
                    continue
                # Read your writes: the next decision (under this lock) and the caller
                # see the appended events in the runner's ledger.
                await self._caught_up(max(seqs))
                return events
        raise LedgerError(f"account {account}: gave up after {CONFLICT_RETRIES} conflicts")

    async def grant(
        self,
        account: str,
        amount: int,
        meta: EventMeta,
        reason: str = "",
        event_id: str | None = None,
    ) -> AccountView:
        if amount <= 0:
            raise LedgerError("amount must be a positive whole number of credits")
        await self._append(
            account,
            lambda _view: [
                CreditsGranted(**envelope(account, meta, event_id), amount=amount, reason=reason)
            ],
        )
        return self.account(account)

    async def ensure_starter_grant(self, amount: int, meta: EventMeta) -> None:
        """A fresh data directory's default account gets `amount` credits, once."""
        if amount <= 0 or self.account("default").entries > 0:
            return
        await self.refresh("default")
        if self.account("default").entries > 0:
            return
        await self._append(
            "default",
            lambda view: (
                []
                if view.entries
                else [
                    CreditsGranted(
                        **envelope("default", meta, STARTER_GRANT_ID),
                        amount=amount,
                        reason="starter grant",
                    )
                ]
            ),
        )

    async def reserve(
        self,
        sandbox_id: str,
        account: str,
        cost: Cost,
        meta: EventMeta,
        phase: str = "reserve",
    ) -> Charge:
        """Reserve `cost` for the sandbox, or record that the account cannot cover it.
        `phase` `claim-reserve`: a claimer's reservation of a warm pool member."""

        def decide(view: AccountView) -> list[Event]:
            existing = self.charge(sandbox_id)
            if existing is not None and existing.account == account:
                return []  # decided before (a retry, or recovery after a crash)
            event_id = phase_event_id(sandbox_id, phase)
            if view.available >= cost.amount:
                return [
                    CreditsReserved(
                        **envelope(account, meta, event_id),
                        sandbox_id=sandbox_id,
                        amount=cost.amount,
                        basis=cost.basis,
                    )
                ]
            return [
                CreditsRejected(
                    **envelope(account, meta, event_id),
                    sandbox_id=sandbox_id,
                    requested=cost.amount,
                    available=view.available,
                )
            ]

        await self._append(account, decide)
        charge = self.charge(sandbox_id)
        assert charge is not None
        return charge

    async def top_up(
        self, sandbox_id: str, account: str, cost: Cost, phase: str, meta: EventMeta
    ) -> bool:
        """Add `cost` to the sandbox's open reservation (a TTL extension) if the account
        covers it; whether it did. `phase` names the top-up (`extend-<ttl>`): recorded
        twice, it is one event."""
        charge = self.charge(sandbox_id)
        if charge is None or charge.closed:
            raise LedgerError(f"sandbox {sandbox_id} has no open reservation")

        def decide(view: AccountView) -> list[Event]:
            if view.available < cost.amount:
                return []
            return [
                CreditsReserved(
                    **envelope(account, meta, phase_event_id(sandbox_id, phase)),
                    sandbox_id=sandbox_id,
                    amount=cost.amount,
                    basis=cost.basis,
                )
            ]

        return bool(await self._append(account, decide))

    async def settle(
        self,
        sandbox_id: str,
        debit: Cost | None,
        meta: EventMeta,
        *,
        phases: tuple[str, str] = ("debit", "release"),
        reason: str | None = None,
    ) -> Charge:
        """Close the sandbox's reservation: debit (at most the reservation) and release
        the rest; with no debit, release all. Idempotent. `phases`: the debit's and the
        release's (`pool-debit`, `pool-release`: a claim closing the pool's charge);
        `reason`: the release's, when not the usual one."""
        charge = self.charge(sandbox_id)
        if charge is None or charge.rejected:
            raise LedgerError(f"sandbox {sandbox_id} has no reservation")

        def decide(view: AccountView) -> list[Event]:
            current = self.charge(sandbox_id)
            assert current is not None
            open_amount = view.open.get(sandbox_id, 0)
            if current.settled:
                return []
            events: list[Event] = []
            if debit is not None and current.debits == 0:
                amount = min(debit.amount, open_amount)
                # The extension's basis, and whether the reservation capped its actual
                # (always recorded, true or false: docs/payments.md).
                basis = {**debit.basis, "capped_at_reservation": amount < debit.amount}
                events.append(
                    CreditsDebited(
                        **envelope(view.account, meta, phase_event_id(sandbox_id, phases[0])),
                        sandbox_id=sandbox_id,
                        amount=amount,
                        basis=basis,
                    )
                )
                open_amount -= amount
            events.append(
                CreditsReleased(
                    **envelope(view.account, meta, phase_event_id(sandbox_id, phases[1])),
                    sandbox_id=sandbox_id,
                    amount=open_amount,
                    reason=reason or ("remainder of the reservation" if debit else "create failed"),
                )
            )
            return events

        await self._append(charge.account, decide)
        settled = self.charge(sandbox_id)
        assert settled is not None
        return settled
