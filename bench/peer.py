"""4. Peer event store: the same append and replay with the `eventsourcing` library.

Its own aggregates (a sandbox with the seven lifecycle events, an account with the
three ledger events), its SQLite recorder as it ships (a file, WAL journal), on the
same machine in the same run.

- Append: the same number of events. Ours is the population of the replay benchmark's
  stream (`JetStreamEventStore.append`, one ack per event, 1,000 aggregates at once);
  theirs saves each lifecycle's two aggregates in one `Application.save` (ten events
  in one SQLite transaction). Both timed in five equal segments.
- Replay: ours is `ProjectionRunner.start()` over that stream; theirs reads the
  application's notification log in pages (`recorder.select_notifications`), turns
  each stored event into its domain event (`mapper.to_domain_event`) and folds it into
  a dict of sandbox states and account balances. Target: ours faster than theirs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from bench import replay
from bench.common import (
    Figure,
    Options,
    Section,
    Stopwatch,
    alternate,
    nats_server,
    rate,
    scratch,
)

PAGE = 1000


class SbxAggregate(Aggregate):
    @event("Requested")
    def __init__(self, profile: str, extension: str, inputs: dict[str, str], ttl: int) -> None:
        self.profile = profile
        self.extension = extension
        self.inputs = inputs
        self.ttl = ttl
        self.state = "requested"

    @event("RouteChosen")
    def route(self, extension: str, reason: str, metered: bool) -> None:
        self.state = "reserving"

    @event("CreditsHeld")
    def held(self, account: str, amount: int) -> None:
        self.state = "provisioning"

    @event("Provisioned")
    def provisioned(self, handle: dict[str, str]) -> None:
        self.state = "starting"

    @event("BecameReady")
    def ready(self, services: list[str]) -> None:
        self.state = "ready"

    @event("DestroyRequested")
    def destroy(self, reason: str) -> None:
        self.state = "tearing_down"

    @event("TornDown")
    def torn_down(self) -> None:
        self.state = "destroyed"


class AccountAggregate(Aggregate):
    @event("Opened")
    def __init__(self, name: str) -> None:
        self.name = name
        self.reserved = 0
        self.debited = 0

    @event("CreditsReserved")
    def reserve(self, sandbox_id: str, amount: int, basis: dict[str, Any]) -> None:
        self.reserved += amount

    @event("CreditsDebited")
    def debit(self, sandbox_id: str, amount: int, basis: dict[str, Any]) -> None:
        self.reserved -= amount
        self.debited += amount

    @event("CreditsReleased")
    def release(self, sandbox_id: str, amount: int, reason: str) -> None:
        self.reserved -= amount


def open_app(db: Path) -> Application[UUID]:
    return Application(env={"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(db)})


def append_theirs(app: Application[UUID], lifecycles: int, segments: int) -> list[float]:
    accounts = [AccountAggregate(name=f"acct{i}") for i in range(replay.WRITERS)]
    app.save(*accounts)
    per_segment = max(lifecycles // segments, 1)
    rates: list[float] = []
    done = 0
    while done < lifecycles:
        count = min(per_segment, lifecycles - done)
        watch = Stopwatch()
        for i in range(done, done + count):
            account = accounts[i % len(accounts)]
            sid = f"sbx-{i:012x}"
            sbx = SbxAggregate(
                profile="profile.saas-stub",
                extension="saas-stub",
                inputs={"size": "small"},
                ttl=600,
            )
            sbx.route(
                extension="saas-stub",
                reason="profile.saas-stub names extension saas-stub",
                metered=True,
            )
            account.reserve(
                sandbox_id=sid,
                amount=30,
                basis={"size": "small", "rate": 0.05, "seconds": 600, "basis": "ttl"},
            )
            sbx.held(account=account.name, amount=30)
            sbx.provisioned(handle={"instance": sid, "endpoint": f"saas-stub://{sid}"})
            sbx.ready(services=["instance"])
            sbx.destroy(reason="user")
            sbx.torn_down()
            account.debit(
                sandbox_id=sid,
                amount=1,
                basis={"size": "small", "rate": 0.05, "seconds": 1.2, "basis": "metered"},
            )
            account.release(sandbox_id=sid, amount=29, reason="remainder of the reservation")
            app.save(sbx, account)
        rates.append(rate(count * 10, watch.seconds()))
        done += count
    return rates


STATE_AFTER = {
    "Requested": "requested",
    "RouteChosen": "reserving",
    "CreditsHeld": "provisioning",
    "Provisioned": "starting",
    "BecameReady": "ready",
    "DestroyRequested": "tearing_down",
    "TornDown": "destroyed",
}


def replay_theirs(app: Application[UUID]) -> tuple[int, float]:
    """Read every stored event in order, as domain events, into a small projection."""
    states: dict[UUID, str] = {}
    balances: dict[UUID, int] = {}
    count = 0
    start = 1
    watch = Stopwatch()
    while True:
        page = app.recorder.select_notifications(start, PAGE)
        if not page:
            break
        for notification in page:
            domain_event = app.mapper.to_domain_event(notification)
            count += 1
            name = type(domain_event).__name__
            state = STATE_AFTER.get(name)
            if state is not None:
                states[domain_event.originator_id] = state
            elif name == "CreditsReserved":
                key = domain_event.originator_id
                balances[key] = balances.get(key, 0) + domain_event.amount  # type: ignore[attr-defined]
        start = page[-1].id + 1
    return count, watch.seconds()


async def run(options: Options) -> Section:
    total = replay.full_size(options)
    ours_data = await replay.populated(options, total)
    lifecycles = total // 10
    section = Section(
        "peer",
        "the same append and replay with the eventsourcing library (SQLite)",
        sizes=f"{lifecycles * 10:,} events ({lifecycles:,} lifecycles) in each store",
    )
    section.notes.append(
        "append: ours acknowledges every event on its own (optimistic concurrency per "
        "aggregate, server's default sync); eventsourcing commits a lifecycle's ten events "
        "in one SQLite transaction (WAL, as the library sets it up). Each is timed in "
        f"{replay.SEGMENTS} equal segments of one pass: the figure is their median."
    )
    section.notes.append(
        "replay: ours folds every event into all our projections; theirs decodes every "
        "event into its domain event and folds it into a dict of states and balances."
    )
    with scratch(options, "peer") as folder:
        app = open_app(folder / "eventsourcing.sqlite")
        print(f"  appending {lifecycles * 10:,} events with eventsourcing ...", flush=True)
        theirs_append = append_theirs(app, lifecycles, replay.SEGMENTS)
        section.add(
            Figure(
                "append",
                "events/s",
                ours_data.append_rates,
                theirs_append,
                "eventsourcing + SQLite",
                note=f"appended once, {len(theirs_append)} segments",
            )
        )
        expected = lifecycles * 10 + replay.WRITERS  # their accounts' creation events
        async with nats_server(ours_data.folder, "default") as (_server, _nc, store):

            async def theirs(_run: int) -> float:
                count, seconds = replay_theirs(app)
                assert count == expected, (count, expected)
                return rate(count, seconds)

            async def ours(_run: int) -> float:
                return await replay.replay_ours(store, total)

            ours_rates, theirs_rates = await alternate(options.runs, theirs, ours)
        section.add(
            Figure(
                "replay",
                "events/s",
                ours_rates,
                theirs_rates,
                "eventsourcing + SQLite",
                target_ratio=1.0,
            )
        )
        app.close()
    return section
