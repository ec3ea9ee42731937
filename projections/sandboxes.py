"""The current-sandbox view: one row per sandbox, folded from its events."""

from __future__ import annotations

import datetime as dt

import msgspec

from events import (
    BecameReady,
    CommandFinished,
    CommandStarted,
    CreditsHeld,
    DestroyRequested,
    Event,
    FileDownloaded,
    FileUploaded,
    Provisioned,
    PublishedPort,
    Restored,
    RouteChosen,
    SandboxRejected,
    SandboxRequested,
    ServiceExited,
    ServiceRecovered,
    ServiceState,
    ServiceUnhealthy,
    StepFailed,
    TeardownFailed,
    ValidationFailed,
    ValidationPassed,
    ValidationStarted,
)
from events.lifecycle import TERMINAL, failing_after, next_state
from events.subjects import SANDBOX_SUBJECTS, VALIDATION_SUBJECTS

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
        )
    state = next_state(view.state, view.failing, event)
    if state is None:
        return msgspec.structs.replace(view, last_seq=seq, events=view.events + 1)
    changes: dict[str, object] = {}
    if isinstance(event, RouteChosen):
        changes = {
            "extension": event.extension,
            "host": event.host,
            "route_reason": event.reason,
            "metered": event.metered,
        }
    elif isinstance(event, CreditsHeld):
        changes = {"credits_held": event.amount}
    elif isinstance(event, Provisioned):
        changes = {"handle": event.handle, "provisioned_at": event.occurred_at}
    elif isinstance(event, BecameReady):
        changes = {
            "services": event.services,
            "ready_at": event.occurred_at,
            "service_states": event.service_states,
            "endpoints": event.endpoints,
        }
    elif isinstance(event, Restored) and event.service_states:
        changes = {"service_states": event.service_states, "endpoints": event.endpoints}
    elif isinstance(event, (ServiceExited, ServiceUnhealthy, ServiceRecovered)):
        changes = {"service_states": _service_change(view.service_states, event)}
    elif isinstance(event, TeardownFailed) and event.final:
        changes = {"needs_reconciliation": True}
    elif isinstance(event, CommandStarted):
        changes = {"commands": _commands(view, event), "commands_run": view.commands_run + 1}
    elif isinstance(event, CommandFinished):
        changes = {"commands": _commands(view, event)}
    elif isinstance(event, FileUploaded):
        changes = {"files_uploaded": view.files_uploaded + 1}
    elif isinstance(event, FileDownloaded):
        changes = {"files_downloaded": view.files_downloaded + 1}
    if state in TERMINAL:
        changes["ended_at"] = event.occurred_at
    if state in TERMINAL and view.state not in TERMINAL:
        changes["ended_by"] = event.event_id
        changes["ended_correlation_id"] = event.correlation_id
    return msgspec.structs.replace(
        view,
        state=state,
        updated_at=event.occurred_at,
        last_seq=seq,
        events=view.events + 1,
        failing=failing_after(view.failing, event),
        reason=_reason(view, event),
        **changes,
    )


class SandboxesProjection:
    """All sandboxes by id, the unfinished ones among them (an index of the same rows),
    and the stream sequence the fold has reached."""

    def __init__(self) -> None:
        self.sandboxes: dict[str, SandboxView] = {}
        self.unfinished: dict[str, SandboxView] = {}
        self.last_seq = 0

    def _put(self, view: SandboxView) -> None:
        self.sandboxes[view.id] = view
        if view.state in TERMINAL:
            self.unfinished.pop(view.id, None)
        else:
            self.unfinished[view.id] = view

    def apply(self, seq: int, subject: str, event: Event) -> SandboxView | None:
        self.last_seq = seq
        if subject.startswith(VALIDATION_SUBJECTS):
            return self._validation(seq, event)
        if not subject.startswith(SANDBOX_SUBJECTS):
            return None
        key = event.aggregate_id
        view = evolve(self.sandboxes.get(key), seq, event)
        if view is not None:
            self._put(view)
        return view

    def _validation(self, seq: int, event: Event) -> SandboxView | None:
        view = self.sandboxes.get(event.aggregate_id)
        if view is None:
            return None
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
        return self.sandboxes.get(sandbox_id)

    def list(
        self,
        *,
        state: str | None = None,
        account: str | None = None,
        live_only: bool = False,
        labels: dict[str, str] | None = None,
    ) -> list[SandboxView]:
        wanted = list((labels or {}).items())
        rows = [
            v
            for v in self.sandboxes.values()
            if (state is None or v.state == state)
            and (account is None or v.account == account)
            and not (live_only and v.state in TERMINAL)
            and all(v.labels.get(k) == want for k, want in wanted)
        ]
        rows.sort(key=lambda v: v.created_at)
        return rows

    def state_counts(self) -> dict[tuple[str, str], int]:
        """How many sandboxes are in each (state, extension)."""
        counts: dict[tuple[str, str], int] = {}
        for view in self.sandboxes.values():
            key = (view.state, view.extension)
            counts[key] = counts.get(key, 0) + 1
        return counts

    def snapshot(self) -> dict[str, SandboxView]:
        return dict(self.sandboxes)
