"""The runtime aggregate of a sandbox this worker drives, and what the modules that
drive it share: the `SandboxHost` protocol they reach the manager through, step
labels, the errors of sandbox commands and the builders of step events."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from events import (
    Event,
    EventMeta,
    SandboxRequested,
    StepCancelled,
    StepFailed,
    TeardownFailed,
)
from events.base import Envelope
from projections.sandboxes import SandboxView
from sandboxer.app.lifecycle import TERMINAL, LifecycleModel, State
from sandboxer.errors import (
    Conflict,
    InvalidInput,
    NotFoundError,
    SandboxerError,
    Unavailable,
    Unprocessable,
)
from sandboxer.store.event_store import EventRecorder

log = logging.getLogger(__name__)

ACTOR_MANAGER = "system:manager"
ACTOR_RECOVERY = "system:recovery"
ACTOR_TTL = "system:ttl-reaper"
ACTOR_CHECKPOINT_POLICY = "system:checkpoint-policy"
ACTOR_IDLE = "system:idle-watch"

STEP_LABELS: dict[str, str] = {
    State.CHECKPOINTING: "checkpoint",
    State.RESTORING: "restore",
    State.REQUESTED: "route",
    State.RESERVING: "reserve",
    State.PROVISIONING: "provision",
    State.STARTING: "wait_ready",
    State.TEARING_DOWN: "teardown",
    State.PAUSING: "pause",
    State.RESUMING: "resume",
}


def step_label(state: str) -> str:
    return STEP_LABELS.get(state, state)


class NotFound(NotFoundError, LookupError):
    """No such sandbox driven here (its id is the message)."""

    field = "id"
    wire = "not_found"

    @classmethod
    def from_wire(cls, answer: dict[str, Any]) -> SandboxerError:
        return cls(str(answer.get("message") or answer.get("sandbox_id", "")))


class NotCapable(Conflict):
    """The sandbox's extension cannot do this (HTTP 409 with the reason)."""

    code = "not_capable"
    field = "extension"
    wire = "not_capable"


class TtlRefused(InvalidInput):
    """A TTL extension beyond the profile's max_ttl_seconds (HTTP 400)."""

    field = "ttl_seconds"
    wire = "ttl_refused"


class CreditsShort(SandboxerError):
    """The account does not cover what the request would reserve (HTTP 402)."""

    status = 402
    code = "insufficient_credits"
    field = "ttl_seconds"
    wire = "credits_short"


class EstimateFailed(Unavailable):
    """The metered extension could not estimate a cost just now (HTTP 503)."""

    code = "estimate_failed"
    wire = "estimate_failed"


class AlreadyCreated(Conflict):
    """A create with the same idempotency key got there first (the API answers with it)."""

    field = "Idempotency-Key"

    def __init__(self, sandbox_id: str) -> None:
        super().__init__(f"sandbox {sandbox_id} exists already")
        self.sandbox_id = sandbox_id


class CreateInProgress(Unavailable):
    """A create with the same Idempotency-Key is under way and not recorded yet."""

    code = "create_in_progress"
    field = "Idempotency-Key"

    def __init__(self, sandbox_id: str) -> None:
        super().__init__("a create with this Idempotency-Key is in progress; retry")
        self.sandbox_id = sandbox_id


class IdempotencyMismatch(Unprocessable):
    """A create reused an Idempotency-Key with another request than the recorded one."""

    code = "idempotency_mismatch"

    def __init__(self, sandbox_id: str, field: str, recorded: object, given: object) -> None:
        super().__init__(
            f"this Idempotency-Key created {sandbox_id} with {field}={_short(recorded)}; "
            f"this request has {field}={_short(given)}: use a new key for another sandbox"
        )
        self.sandbox_id = sandbox_id
        self.field = field


@dataclass(frozen=True)
class StepProgress:
    """The step running for a sandbox here: in which state, since when, its last
    progress message (runtime only, never recorded)."""

    state: str
    step: str
    since: dt.datetime
    message: str | None = None


class Sandbox(LifecycleModel):
    """The aggregate: machine state plus the projection row folded from the same events."""

    def __init__(self, sandbox_id: str) -> None:
        self.sandbox_id = sandbox_id
        self.failing = False
        self.on_enter: Callable[[str], None] | None = None
        self.view: SandboxView | None = None
        self.request: SandboxRequested | None = None
        self.version = 0
        self.last_event_id: str | None = None
        self.last_correlation_id: str | None = None
        # Runtime only, never recorded:
        self.secrets: dict[str, str] = {}
        self.lock = asyncio.Lock()
        self.driver: asyncio.Task[None] | None = None
        self.step: asyncio.Task[None] | None = None
        self.step_name: str | None = None
        self.step_started: dt.datetime | None = None
        self.progress: str | None = None
        self.ttl_timer: asyncio.TimerHandle | None = None
        self.watcher: asyncio.Task[None] | None = None  # while ready (sandboxer/app/watch.py)
        self.idle_watch: asyncio.Task[None] | None = None  # (sandboxer/app/idle.py)
        self.last_used = 0.0  # loop time of the latest use seen here
        self.unrecorded_use: set[str] = set()  # kinds seen since the last ActivitySeen
        self.use_recorded = 0.0  # loop time of the last ActivitySeen
        self.pending_checkpoint: str | None = None  # of the running checkpoint or restore

    def meta(self, actor: str = ACTOR_MANAGER) -> EventMeta:
        """The meta of a system step: it follows from the aggregate's last event, so it
        carries that event's id as causation and its correlation id (the request it
        answers: a DELETE's X-Request-Id for the teardown, not the create's)."""
        correlation = self.last_correlation_id or (self.view.correlation_id if self.view else "")
        return EventMeta(actor=actor, correlation_id=correlation, causation_id=self.last_event_id)

    def stop_background(self) -> None:
        """Stop what runs beside the steps: the TTL timer, the service and idle watches."""
        if self.ttl_timer:
            self.ttl_timer.cancel()
        for task in (self.watcher, self.idle_watch):
            if task is not None and not task.done() and task is not asyncio.current_task():
                task.cancel()


Build = Callable[[Envelope], Event]


class SandboxHost(Protocol):
    """What the driver, expiry, recovery, settlement and cluster modules need of the
    manager: the aggregates it holds and the one save path. (A protocol, so that
    none of them imports the manager.)"""

    store: EventRecorder

    @property
    def sandboxes(self) -> dict[str, Sandbox]: ...

    @property
    def closing(self) -> bool: ...

    async def record(
        self,
        sbx: Sandbox,
        build: Build,
        meta: EventMeta | None = None,
        *,
        event_id: str | None = None,
    ) -> int: ...

    def attach(self, sandbox_id: str, live: bool) -> Sandbox: ...

    def apply(self, sbx: Sandbox, seq: int, event: Event) -> None: ...

    def entered(self, sbx: Sandbox, state: str) -> None: ...

    def finish(self, sbx: Sandbox) -> None: ...

    def detach(self, sbx: Sandbox) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None: ...

    def track(self, task: asyncio.Task[Any]) -> None: ...

    def exclusive(self, sandbox_id: str) -> AbstractAsyncContextManager[None]: ...

    async def caught_up(self, seq: int) -> None: ...


def still_driven(host: SandboxHost, sbx: Sandbox) -> bool:
    """Whether a loop beside the steps (a watch) should go on with the sandbox: this
    worker still drives this aggregate, and it is neither finished nor ending."""
    return (
        not host.closing
        and host.sandboxes.get(sbx.sandbox_id) is sbx
        and sbx.state not in TERMINAL
        and sbx.state != State.TEARING_DOWN
    )


# Builders for events recorded from inside loops and except blocks: each binds its
# values when called, not when the event is built under the aggregate's lock.
def step_failed(step: str, error: str, attempt: int = 1) -> Build:
    return lambda e: StepFailed(**e, step=step, error=error, attempt=attempt)


def step_cancelled(step: str, reason: str) -> Build:
    return lambda e: StepCancelled(**e, step=step, reason=reason)


def teardown_failed(error: str, attempt: int, final: bool) -> Build:
    return lambda e: TeardownFailed(**e, error=error, attempt=attempt, final=final)


def redact(text: str, secrets: Mapping[str, str]) -> str:
    for value in secrets.values():
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "%s failed; recovery retries it on the next start: %s",
            task.get_name(),
            task.exception(),
        )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
