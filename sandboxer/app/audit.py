"""`sandboxer ledger audit`: replay the ledger from sequence 1 and check its rules.

Pure: it folds the events it is given (as they come: the history is never held
at once), compares with the live projection (from a snapshot) and returns a
report. The rules (docs/payments.md): an account's available balance is never below
zero after any event; a sandbox is debited at most once; every destroyed metered
sandbox that became ready is debited; reserved equals the sum of open reservations;
no reservation stays open longer than `ttl_grace` after its sandbox's TTL ended (the
sandbox should have been destroyed and settled by then); a debit's metered seconds
leave out the sandbox's paused intervals (its `paused_seconds` are those the events
show); and the live projection equals the fresh replay.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterable

import msgspec

from events import CreditsDebited
from events.base import utc_now
from events.subjects import LEDGER_SUBJECTS
from projections.archive import MemoryArchive
from projections.ledger import AccountView, Charge, LedgerProjection
from projections.sandboxes import (
    SandboxesProjection,
    SandboxView,
    metered_from,
    paused_seconds,
)
from sandboxer.store.event_store import RecordedEvent


class DebitLine(msgspec.Struct, frozen=True):
    seq: int
    account: str
    sandbox_id: str
    amount: int
    basis: dict[str, str | int | float | bool]


class AuditReport(msgspec.Struct, frozen=True):
    ok: bool
    events: int
    accounts: dict[str, AccountView]
    debits: list[DebitLine]
    violations: list[str]


_NONE = Charge(sandbox_id="", account="")
DEFAULT_TTL_GRACE = 300.0  # seconds: a teardown retried with back-off may take minutes


async def audit(
    recorded: AsyncIterable[RecordedEvent],
    live: LedgerProjection,
    account: str | None = None,
    *,
    now: dt.datetime | None = None,
    ttl_grace: float = DEFAULT_TTL_GRACE,
) -> AuditReport:
    fresh = LedgerProjection()
    sandboxes = SandboxesProjection(MemoryArchive())
    violations: list[str] = []
    debits: list[DebitLine] = []
    count = 0
    # Folded as they are read: the history is never held in memory at once.
    async for item in recorded:
        seq, subject, event = item.seq, item.subject, item.event
        sandboxes.apply(seq, subject, event)
        if not subject.startswith(LEDGER_SUBJECTS):
            continue
        name = event.aggregate_id
        if account is not None and name != account:
            fresh.apply(seq, subject, event)
            continue
        count += 1
        fresh.apply(seq, subject, event)
        view = fresh.account(name)
        if view.available < 0:
            violations.append(f"seq {seq}: account {name} available {view.available} < 0")
        if view.reserved != sum(view.open.values()):
            violations.append(
                f"seq {seq}: account {name} reserved {view.reserved} != "
                f"open reservations {sum(view.open.values())}"
            )
        if isinstance(event, CreditsDebited):
            debits.append(DebitLine(seq, name, event.sandbox_id, event.amount, event.basis))
            if (fresh.charge(event.sandbox_id) or _NONE).debits > 1:
                violations.append(f"seq {seq}: sandbox {event.sandbox_id} debited twice")
    # Nothing is flushed here: every row the fold made is still in memory.
    for line in debits:
        found = sandboxes.get(line.sandbox_id)
        if found is not None:
            violations += _paused_violations(line, found)
    for sandbox in (*sandboxes.unfinished.values(), *sandboxes.finished.values()):
        if not sandbox.metered or sandbox.credits_held == 0:
            continue
        if account is not None and sandbox.account != account:
            continue
        charge = fresh.charge(sandbox.id)
        if (
            sandbox.state == "destroyed"
            and sandbox.ready_at is not None
            and (charge is None or charge.debits == 0)
        ):
            violations.append(f"sandbox {sandbox.id} was destroyed but never debited")
        elif sandbox.state in ("destroyed", "failed") and (charge is None or not charge.settled):
            violations.append(
                f"sandbox {sandbox.id} is {sandbox.state} but its reservation is open"
            )
        elif sandbox.id in fresh.account(sandbox.account).open:
            overdue = ((now or utc_now()) - sandbox.expires_at).total_seconds()
            if overdue > ttl_grace:
                violations.append(
                    f"sandbox {sandbox.id} is {sandbox.state} with its reservation open "
                    f"{overdue:.0f}s after its TTL ended (more than {ttl_grace:g}s)"
                )
    names = sorted(set(fresh.accounts) | set(live.accounts))
    for name in names:
        if account is not None and name != account:
            continue
        mine, theirs = live.accounts.get(name), fresh.accounts.get(name)
        if mine != theirs:
            violations.append(
                f"account {name}: the live projection differs from a fresh "
                f"replay ({_diff(mine, theirs)})"
            )
    accounts = {k: v for k, v in fresh.accounts.items() if account is None or k == account}
    return AuditReport(
        ok=not violations, events=count, accounts=accounts, debits=debits, violations=violations
    )


PAUSE_TOLERANCE = 0.01  # seconds: the basis rounds to milliseconds


def _paused_violations(line: DebitLine, sandbox: SandboxView) -> list[str]:
    """A debit of a sandbox that was paused must say so, and its seconds must be the
    time provisioned to ended less the paused time (as the events show them)."""
    start = metered_from(sandbox)
    if start is None or sandbox.ended_at is None or line.account != sandbox.account:
        return []  # (a claimed member's pool debit: its wait, never paused)
    paused = paused_seconds(sandbox, sandbox.ended_at)
    recorded = line.basis.get("paused_seconds", 0.0)
    if not isinstance(recorded, (int, float)) or abs(float(recorded) - paused) > PAUSE_TOLERANCE:
        return [
            f"seq {line.seq}: sandbox {line.sandbox_id} was paused {paused:.3f}s; its "
            f"debit's basis says paused_seconds {recorded!r}"
        ]
    seconds = line.basis.get("seconds")
    if paused and isinstance(seconds, (int, float)):
        active = (sandbox.ended_at - start).total_seconds() - paused
        if abs(float(seconds) - max(active, 0.0)) > PAUSE_TOLERANCE:
            return [
                f"seq {line.seq}: sandbox {line.sandbox_id} ran {active:.3f}s outside its "
                f"pauses; its debit's basis says seconds {seconds!r}"
            ]
    return []


def _diff(live: AccountView | None, fresh: AccountView | None) -> str:
    if live is None or fresh is None:
        return "missing in the " + ("live projection" if live is None else "replay")
    parts = []
    for field in ("granted", "reserved", "debited", "released", "rejected", "entries"):
        a, b = getattr(live, field), getattr(fresh, field)
        if a != b:
            parts.append(f"{field}: live {a}, replay {b}")
    return "; ".join(parts) or "open reservations differ"
