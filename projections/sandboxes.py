"""The current-sandbox view: one row per sandbox, folded from its events."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import msgspec

from events import (
    ActivitySeen,
    BecameReady,
    CommandFinished,
    CommandStarted,
    CreditsHeld,
    DestroyRequested,
    Event,
    FileDownloaded,
    FileUploaded,
    Paused,
    Provisioned,
    PublishedPort,
    Restored,
    Resumed,
    ResumeRequested,
    RouteChosen,
    SandboxClaimed,
    SandboxRejected,
    SandboxRequested,
    ServiceExited,
    ServiceRecovered,
    ServiceState,
    ServiceUnhealthy,
    StepFailed,
    TeardownFailed,
    TtlExtended,
    ValidationFailed,
    ValidationPassed,
    ValidationStarted,
)
from events.lifecycle import TERMINAL, failing_after, next_state
from events.subjects import SANDBOX_SUBJECTS, VALIDATION_SUBJECTS
from projections.paging import MAX_PAGE, Cursor, Filter, after_cursor, order_key


class RowArchive(Protocol):
    """What the projection needs of the archive (projections/archive.py)."""

    def get(self, sandbox_id: str) -> SandboxView | None: ...

    def write(self, views: Iterable[SandboxView], charges: Iterable[Any], seq: int) -> None: ...

    def page(
        self, where: Filter, after: Cursor | None, limit: int, newest_first: bool = False
    ) -> list[SandboxView]: ...

    def counts(self) -> dict[tuple[str, str], int]: ...


RECENT_COMMANDS = 20  # commands a view keeps (the events keep them all)


class CommandSummary(msgspec.Struct, frozen=True, kw_only=True):
    """One command run in the sandbox, as its two events tell it (finished_at None:
    still running, or its end was never recorded)."""

    command_id: str
    argv: list[str]
    shell: str | None
    service: str | None
    actor: str
    started_at: dt.datetime
    finished_at: dt.datetime | None = None
    outcome: str | None = None
    exit_code: int | None = None
    duration_seconds: float | None = None


class SandboxView(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    id: str
    state: str
    profile: str
    extension: str
    account: str
    inputs: dict[str, str]
    ttl_seconds: int
    created_at: dt.datetime
    updated_at: dt.datetime
    expires_at: dt.datetime
    last_seq: int
    events: int = 1
    host: str | None = None
    handle: dict[str, str] = {}
    services: list[str] = []
    # Each service's state and health as last reported (at ready, after a restore, and
    # by the watcher while ready), and the published ports.
    service_states: list[ServiceState] = []
    endpoints: list[PublishedPort] = []
    route_reason: str | None = None
    reason: str | None = None  # why it was rejected, failed or destroyed
    failing: bool = False
    needs_reconciliation: bool = False
    correlation_id: str = ""
    metered: bool = False
    credits_held: int = 0
    provisioned_at: dt.datetime | None = None
    ready_at: dt.datetime | None = None
    ended_at: dt.datetime | None = None
    # The event that ended the sandbox: what settling its reservation follows from.
    ended_by: str | None = None
    ended_correlation_id: str | None = None
    validation: str | None = None  # running, passed, failed (reported by a validator)
    validation_exit_code: int | None = None
    validation_output: str | None = None
    validation_reason: str | None = None
    labels: dict[str, str] = {}
    # The last RECENT_COMMANDS commands, oldest first; how many ran; files moved.
    commands: list[CommandSummary] = []
    commands_run: int = 0
    files_uploaded: int = 0
    files_downloaded: int = 0
    # A warm pool member: the profile whose pool it was made for; claimed_at once a
    # create took it (then `account` and `labels` are the claimer's).
    pool: str | None = None
    claimed_at: dt.datetime | None = None
    claim_id: str | None = None  # the claim's own id (SandboxClaimed.claim_id)
    # Pauses: the current one's start (None: not paused), the seconds of the ones
    # that ended (from Paused to ResumeRequested), how many there were.
    paused_at: dt.datetime | None = None
    paused_seconds: float = 0.0
    pauses: int = 0
    pause_mode: str | None = None  # how the current (or last) pause holds it
    last_activity_at: dt.datetime | None = None  # the latest use ActivitySeen recorded


def metered_from(view: SandboxView) -> dt.datetime | None:
    """Where the sandbox's current charge meters from: its claim (a warm pool
    member: the pool paid for the wait), else its provision."""
    return view.claimed_at or view.provisioned_at


def paused_seconds(view: SandboxView, until: dt.datetime) -> float:
    """Seconds the sandbox spent paused up to `until` (a pause still on counts up to
    then): what metering leaves out (docs/payments.md)."""
    total = view.paused_seconds
    if view.paused_at is not None:
        total += max((until - view.paused_at).total_seconds(), 0.0)
    return total


def _commands(view: SandboxView, event: CommandStarted | CommandFinished) -> list[CommandSummary]:
    if isinstance(event, CommandStarted):
        started = CommandSummary(
            command_id=event.command_id,
            argv=event.argv,
            shell=event.shell,
            service=event.service,
            actor=event.actor,
            started_at=event.occurred_at,
        )
        return [*view.commands, started][-RECENT_COMMANDS:]
    return [
        msgspec.structs.replace(
            c,
            finished_at=event.occurred_at,
            outcome=event.outcome,
            exit_code=event.exit_code,
            duration_seconds=event.duration_seconds,
        )
        if c.command_id == event.command_id
        else c
        for c in view.commands
    ]


def _reason(view: SandboxView, event: Event) -> str | None:
    if isinstance(event, SandboxRejected):
        return event.reason
    if isinstance(event, StepFailed):
        return f"{event.step} failed: {event.error}"
    if isinstance(event, TeardownFailed) and event.final:
        return f"teardown failed: {event.error}"
    if isinstance(event, DestroyRequested) and view.reason is None:
        return f"destroy requested ({event.reason}) by {event.actor}"
    return view.reason


def _service_change(
    states: list[ServiceState], event: ServiceExited | ServiceUnhealthy | ServiceRecovered
) -> list[ServiceState]:
    if isinstance(event, ServiceExited):
        new = ServiceState(service=event.service, state="exited", exit_code=event.exit_code)
    elif isinstance(event, ServiceUnhealthy):
        new = ServiceState(service=event.service, state="running", health="unhealthy")
    else:
        new = ServiceState(service=event.service, state=event.state, health=event.health)
    kept = [s for s in states if s.service != event.service]
    return sorted([*kept, new], key=lambda s: s.service)


def evolve(view: SandboxView | None, seq: int, event: Event) -> SandboxView | None:
    """The view after one event. Unknown or out-of-place events leave it unchanged."""
    if view is None:
        if not isinstance(event, SandboxRequested):
            return None
        return SandboxView(
            id=event.aggregate_id,
            state="requested",
            profile=event.profile,
            extension=event.extension,
            account=event.account,
            inputs=event.inputs,
            ttl_seconds=event.ttl_seconds,
            created_at=event.occurred_at,
            updated_at=event.occurred_at,
            expires_at=event.occurred_at + dt.timedelta(seconds=event.ttl_seconds),
            last_seq=seq,
            correlation_id=event.correlation_id,
            labels=event.labels,
            pool=event.pool,
        )
    state = next_state(view.state, view.failing, event)
    if state is None:
        return msgspec.structs.replace(view, last_seq=seq, events=view.events + 1)
    kind = type(event)
    change = _CHANGES.get(kind)
    changed = change(view, event) if change is not None else view
    ended_at, ended_by, ended_correlation_id = (
        view.ended_at,
        view.ended_by,
        view.ended_correlation_id,
    )
    if state in TERMINAL:
        ended_at = event.occurred_at
        if view.state not in TERMINAL:
            ended_by, ended_correlation_id = event.event_id, event.correlation_id
    # Keywords spelled out, never `**`: a replace from a dict costs three times as much.
    return msgspec.structs.replace(
        changed,
        state=state,
        updated_at=event.occurred_at,
        last_seq=seq,
        events=view.events + 1,
        failing=failing_after(view.failing, event),
        reason=_reason(view, event) if kind in _REASONS else view.reason,
        ended_at=ended_at,
        ended_by=ended_by,
        ended_correlation_id=ended_correlation_id,
    )


# What each kind of event changes in a view besides its state (a dispatch on the
# event's type: a replay folds millions of events, an isinstance chain per event cost
# a tenth of its time).
_replace = msgspec.structs.replace


def _routed(v: SandboxView, e: RouteChosen) -> SandboxView:
    return _replace(v, extension=e.extension, host=e.host, route_reason=e.reason, metered=e.metered)


def _held(v: SandboxView, e: CreditsHeld) -> SandboxView:
    return _replace(v, credits_held=e.amount)


def _provisioned(v: SandboxView, e: Provisioned) -> SandboxView:
    return _replace(v, handle=e.handle, provisioned_at=e.occurred_at)


def _ready(v: SandboxView, e: BecameReady) -> SandboxView:
    return _replace(
        v,
        services=e.services,
        ready_at=e.occurred_at,
        service_states=e.service_states,
        endpoints=e.endpoints,
    )


def _restored(v: SandboxView, e: Restored) -> SandboxView:
    if not e.service_states:
        return v
    return _replace(v, service_states=e.service_states, endpoints=e.endpoints)


def _service(v: SandboxView, e: ServiceExited | ServiceUnhealthy | ServiceRecovered) -> SandboxView:
    return _replace(v, service_states=_service_change(v.service_states, e))


def _teardown_failed(v: SandboxView, e: TeardownFailed) -> SandboxView:
    return _replace(v, needs_reconciliation=True) if e.final else v


def _started(v: SandboxView, e: CommandStarted) -> SandboxView:
    return _replace(v, commands=_commands(v, e), commands_run=v.commands_run + 1)


def _finished(v: SandboxView, e: CommandFinished) -> SandboxView:
    return _replace(v, commands=_commands(v, e))


def _uploaded(v: SandboxView, _e: FileUploaded) -> SandboxView:
    return _replace(v, files_uploaded=v.files_uploaded + 1)


def _downloaded(v: SandboxView, _e: FileDownloaded) -> SandboxView:
    return _replace(v, files_downloaded=v.files_downloaded + 1)


def _extended(v: SandboxView, e: TtlExtended) -> SandboxView:
    return _replace(
        v,
        ttl_seconds=e.ttl_seconds,
        expires_at=e.expires_at,
        credits_held=v.credits_held + e.credits_added,
    )


def _claimed(v: SandboxView, e: SandboxClaimed) -> SandboxView:
    return _replace(
        v,
        account=e.account,
        labels=e.labels,
        ttl_seconds=e.ttl_seconds,
        expires_at=e.expires_at,
        claimed_at=e.occurred_at,
        claim_id=e.claim_id,
        correlation_id=e.correlation_id,
        credits_held=e.credits_held if v.metered else v.credits_held,
    )


def _active(v: SandboxView, e: ActivitySeen) -> SandboxView:
    return _replace(v, last_activity_at=e.last_at)


def _paused(v: SandboxView, e: Paused) -> SandboxView:
    return _replace(v, paused_at=e.occurred_at, pauses=v.pauses + 1, pause_mode=e.mode)


def _resuming(v: SandboxView, e: ResumeRequested) -> SandboxView:
    return _replace(v, paused_at=None, paused_seconds=paused_seconds(v, e.occurred_at))


def _resumed(v: SandboxView, e: Resumed) -> SandboxView:
    if not e.service_states:
        return v
    return _replace(v, service_states=e.service_states, endpoints=e.endpoints)


_CHANGES: dict[type[Event], Callable[[SandboxView, Any], SandboxView]] = {
    RouteChosen: _routed,
    CreditsHeld: _held,
    Provisioned: _provisioned,
    BecameReady: _ready,
    Restored: _restored,
    ServiceExited: _service,
    ServiceUnhealthy: _service,
    ServiceRecovered: _service,
    TeardownFailed: _teardown_failed,
    CommandStarted: _started,
    CommandFinished: _finished,
    FileUploaded: _uploaded,
    FileDownloaded: _downloaded,
    TtlExtended: _extended,
    SandboxClaimed: _claimed,
    ActivitySeen: _active,
    Paused: _paused,
    ResumeRequested: _resuming,
    Resumed: _resumed,
}
_REASONS = frozenset({SandboxRejected, StepFailed, TeardownFailed, DestroyRequested})


class SandboxesProjection:
    """The live sandboxes by id in memory, the ones that ended since the last flush,
    and the archive of all the others (a finished sandbox leaves memory there); and
    the stream sequence the fold has reached."""

    def __init__(self, archive: RowArchive) -> None:
        self.archive = archive
        self.unfinished: dict[str, SandboxView] = {}
        self.finished: dict[str, SandboxView] = {}  # ended; archived at the next flush
        self.last_seq = 0

    def _put(self, view: SandboxView) -> None:
        if view.state in TERMINAL:
            self.unfinished.pop(view.id, None)
            self.finished[view.id] = view
        else:
            self.unfinished[view.id] = view

    def apply(self, seq: int, subject: str, event: Event) -> SandboxView | None:
        self.last_seq = seq
        if subject.startswith(VALIDATION_SUBJECTS):
            return self._validation(seq, event)
        if not subject.startswith(SANDBOX_SUBJECTS):
            return None
        key = event.aggregate_id
        # A new aggregate has no row anywhere: skip the archive's lookup for it.
        current = None if isinstance(event, SandboxRequested) else self.get(key)
        if current is not None and seq <= current.last_seq:
            return current  # folded already (a tail that overlaps the archive)
        view = evolve(current, seq, event)
        if view is not None:
            self._put(view)
        return view

    def _validation(self, seq: int, event: Event) -> SandboxView | None:
        view = self.get(event.aggregate_id)
        if view is None or seq <= view.last_seq:
            return view
        if isinstance(event, ValidationStarted):
            view = msgspec.structs.replace(
                view,
                validation="running",
                validation_exit_code=None,
                validation_output=None,
                last_seq=seq,
            )
        elif isinstance(event, (ValidationPassed, ValidationFailed)):
            view = msgspec.structs.replace(
                view,
                validation="passed" if isinstance(event, ValidationPassed) else "failed",
                validation_exit_code=event.exit_code,
                validation_output=event.output_tail,
                validation_reason=getattr(event, "reason", None),
                last_seq=seq,
            )
        self._put(view)
        return view

    def get(self, sandbox_id: str) -> SandboxView | None:
        return (
            self.unfinished.get(sandbox_id)
            or self.finished.get(sandbox_id)
            or self.archive.get(sandbox_id)
        )

    def take_finished(self) -> list[SandboxView]:
        """The rows that ended since the last call: the caller archives them."""
        rows = list(self.finished.values())
        self.finished.clear()
        return rows

    def page(
        self,
        *,
        state: str | None = None,
        account: str | None = None,
        live_only: bool = False,
        labels: dict[str, str] | None = None,
        after: Cursor | None = None,
        limit: int = MAX_PAGE,
        newest_first: bool = False,
    ) -> list[SandboxView]:
        """Up to `limit` rows by (created_at, id) after `after` (or from the newest):
        the live ones from memory, the finished ones from the archive (flushed first)."""
        where = Filter(state=state, account=account, labels=labels or {})
        rows: list[SandboxView] = []
        if state is None or state not in TERMINAL:
            rows = [
                v
                for v in self.unfinished.values()
                if where.matches(v) and after_cursor(v, after, newest_first)
            ]
        if not live_only and (state is None or state in TERMINAL):
            self.archive.write(self.take_finished(), [], self.last_seq)
            rows += self.archive.page(where, after, limit, newest_first)
        rows.sort(key=order_key, reverse=newest_first)
        return rows[:limit]

    def state_counts(self) -> dict[tuple[str, str], int]:
        """How many sandboxes are in each (state, extension)."""
        counts = self.archive.counts()
        for view in (*self.unfinished.values(), *self.finished.values()):
            key = (view.state, view.extension)
            counts[key] = counts.get(key, 0) + 1
        return counts
