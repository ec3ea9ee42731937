"""The ledger audit's rule for paused intervals, on hand-made histories: a debit of a
paused sandbox must leave the paused time out and say so in its basis."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

from events import (
    BecameReady,
    CreditsDebited,
    CreditsGranted,
    CreditsHeld,
    CreditsReleased,
    CreditsReserved,
    DestroyRequested,
    Event,
    Paused,
    PauseRequested,
    Provisioned,
    Resumed,
    ResumeRequested,
    RouteChosen,
    SandboxRequested,
    TornDown,
)
from events.subjects import subject_for
from projections.ledger import LedgerProjection
from sandboxer.app.audit import audit
from sandboxer.store.recorded import RecordedEvent

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
SID = "sbx-0123456789ab"


def at(seconds: float, event_id: str = "") -> dict[str, object]:
    return {
        "event_id": event_id or f"{int(seconds * 1000):032x}",
        "occurred_at": T0 + dt.timedelta(seconds=seconds),
        "actor": "system:manager",
        "correlation_id": "c1",
    }


def history(basis: dict[str, str | int | float | bool]) -> list[Event]:
    """Provisioned at 1 s, paused from 10 s to 40 s (ResumeRequested), paused again at
    50 s and torn down at 60 s: 40 s paused, 19 s metered."""
    s = {"aggregate_id": SID}
    a = {"aggregate_id": "acme"}
    return [
        CreditsGranted(**a, **at(0, "a" * 32), amount=100),  # type: ignore[arg-type]
        SandboxRequested(
            **s,  # type: ignore[arg-type]
            **at(0.1),
            profile="profile.saas-stub",
            extension="saas-stub",
            inputs={},
            account="acme",
            ttl_seconds=600,
        ),
        RouteChosen(**s, **at(0.2), extension="saas-stub", reason="r", metered=True),  # type: ignore[arg-type]
        CreditsReserved(**a, **at(0.3, f"{SID}.reserve"), sandbox_id=SID, amount=30),  # type: ignore[arg-type]
        CreditsHeld(**s, **at(0.4), account="acme", amount=30),  # type: ignore[arg-type]
        Provisioned(**s, **at(1), handle={}),  # type: ignore[arg-type]
        BecameReady(**s, **at(2)),  # type: ignore[arg-type]
        PauseRequested(**s, **at(9), reason="user"),  # type: ignore[arg-type]
        Paused(**s, **at(10), mode="pause"),  # type: ignore[arg-type]
        ResumeRequested(**s, **at(40)),  # type: ignore[arg-type]
        Resumed(**s, **at(41)),  # type: ignore[arg-type]
        PauseRequested(**s, **at(49), reason="user"),  # type: ignore[arg-type]
        Paused(**s, **at(50), mode="pause"),  # type: ignore[arg-type]
        DestroyRequested(**s, **at(55), reason="user"),  # type: ignore[arg-type]
        TornDown(**s, **at(60)),  # type: ignore[arg-type]
        CreditsDebited(**a, **at(61, f"{SID}.debit"), sandbox_id=SID, amount=1, basis=basis),  # type: ignore[arg-type]
        CreditsReleased(**a, **at(61, f"{SID}.release"), sandbox_id=SID, amount=29),  # type: ignore[arg-type]
    ]


async def stream(events: list[Event]) -> AsyncIterator[RecordedEvent]:
    for seq, event in enumerate(events, 1):
        yield RecordedEvent(seq, subject_for(event), event)


async def check(basis: dict[str, str | int | float | bool]) -> list[str]:
    events = history(basis)
    live = LedgerProjection()
    for seq, event in enumerate(events, 1):
        live.apply(seq, subject_for(event), event)
    report = await audit(stream(events), live, now=T0 + dt.timedelta(seconds=70))
    return report.violations


async def test_a_debit_that_leaves_the_pauses_out_holds() -> None:
    assert (
        await check({"seconds": 19.0, "paused_seconds": 40.0, "capped_at_reservation": False}) == []
    )


async def test_a_debit_that_bills_the_paused_time_is_a_violation() -> None:
    violations = await check({"seconds": 59.0, "capped_at_reservation": False})
    assert len(violations) == 1 and "was paused 40.000s" in violations[0]


async def test_a_debit_that_says_the_pauses_but_bills_them_is_a_violation() -> None:
    violations = await check(
        {"seconds": 59.0, "paused_seconds": 40.0, "capped_at_reservation": False}
    )
    assert len(violations) == 1 and "ran 19.000s outside its pauses" in violations[0]
