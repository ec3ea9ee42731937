"""The sandbox lifecycle as data: the states and the one transition table.

`TABLE` is the lifecycle the README and docs/events.md describe (requested →
reserving/provisioning → starting → ready, checkpointing and restoring, pausing →
paused → resuming, tearing_down → destroyed, rejected, failed). It lives beside the
events so that projections fold with `next_state` (a pure function of the table) and
depend on `events/` alone; the
manager's `transitions` machine (sandboxer/app/lifecycle.py) is built from the same
table.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

from events.base import Event
from events.sandbox import RouteChosen, TeardownFailed


class State(StrEnum):
    NEW = "new"  # before the first event; never visible outside
    REQUESTED = "requested"
    RESERVING = "reserving"
    PROVISIONING = "provisioning"
    STARTING = "starting"
    READY = "ready"
    CHECKPOINTING = "checkpointing"
    RESTORING = "restoring"
    PAUSING = "pausing"
    PAUSED = "paused"
    RESUMING = "resuming"
    TEARING_DOWN = "tearing_down"
    DESTROYED = "destroyed"
    REJECTED = "rejected"
    FAILED = "failed"


TERMINAL: frozenset[str] = frozenset({State.DESTROYED, State.REJECTED, State.FAILED})
LIVE: tuple[str, ...] = (
    State.REQUESTED,
    State.RESERVING,
    State.PROVISIONING,
    State.STARTING,
    State.READY,
    State.CHECKPOINTING,
    State.RESTORING,
    State.PAUSING,
    State.PAUSED,
    State.RESUMING,
)

SAME = "="  # the destination of an event that does not change the state

# A guard sees whether the sandbox is being torn down because something failed,
# and the event itself.
Guard = Callable[[bool, Event], bool]


def _metered(_failing: bool, event: Event) -> bool:
    return isinstance(event, RouteChosen) and event.metered


def _not_metered(failing: bool, event: Event) -> bool:
    return not _metered(failing, event)


def _failing(failing: bool, _event: Event) -> bool:
    return failing


def _not_failing(failing: bool, _event: Event) -> bool:
    return not failing


def _final(_failing: bool, event: Event) -> bool:
    return isinstance(event, TeardownFailed) and event.final


def _not_final(failing: bool, event: Event) -> bool:
    return not _final(failing, event)


# (event type, sources, destination, guard). The first row whose guard holds wins.
TABLE: tuple[tuple[str, tuple[str, ...], str, Guard | None], ...] = (
    ("SandboxRequested", (State.NEW,), State.REQUESTED, None),
    ("RouteChosen", (State.REQUESTED,), State.RESERVING, _metered),
    ("RouteChosen", (State.REQUESTED,), State.PROVISIONING, _not_metered),
    ("SandboxRejected", (State.REQUESTED, State.RESERVING), State.REJECTED, None),
    ("CreditsHeld", (State.RESERVING,), State.PROVISIONING, None),
    ("Provisioned", (State.PROVISIONING,), State.STARTING, None),
    ("BecameReady", (State.STARTING,), State.READY, None),
    (
        "StepFailed",
        (State.REQUESTED, State.RESERVING, State.PROVISIONING, State.STARTING),
        State.TEARING_DOWN,
        None,
    ),
    ("StepCancelled", (State.TEARING_DOWN,), State.TEARING_DOWN, None),
    ("DestroyRequested", LIVE, State.TEARING_DOWN, None),
    ("TornDown", (State.TEARING_DOWN,), State.FAILED, _failing),
    ("TornDown", (State.TEARING_DOWN,), State.DESTROYED, _not_failing),
    ("TeardownFailed", (State.TEARING_DOWN,), State.FAILED, _final),
    ("TeardownFailed", (State.TEARING_DOWN,), State.TEARING_DOWN, _not_final),
    ("CheckpointRequested", (State.READY,), State.CHECKPOINTING, None),
    ("CheckpointCreated", (State.CHECKPOINTING,), State.READY, None),
    ("CheckpointFailed", (State.CHECKPOINTING,), State.READY, None),
    ("RestoreRequested", (State.READY,), State.RESTORING, None),
    ("Restored", (State.RESTORING,), State.READY, None),
    ("RestoreFailed", (State.RESTORING,), State.READY, None),
    ("PauseRequested", (State.READY,), State.PAUSING, None),
    ("Paused", (State.PAUSING,), State.PAUSED, None),
    ("PauseFailed", (State.PAUSING,), State.READY, None),
    ("ResumeRequested", (State.PAUSED,), State.RESUMING, None),
    ("Resumed", (State.RESUMING,), State.READY, None),
    ("ResumeFailed", (State.RESUMING,), State.PAUSED, None),
    # A TTL can change whenever the sandbox is not finished; a warm pool member is
    # claimed once it is ready; use is recorded while it can be used.
    ("TtlExtended", LIVE, SAME, None),
    ("SandboxClaimed", (State.READY,), SAME, None),
    ("ActivitySeen", (State.READY, State.CHECKPOINTING, State.RESTORING), SAME, None),
    # What a ready sandbox's services do, as the watcher sees it: the state stays.
    ("ServiceExited", (State.READY,), SAME, None),
    ("ServiceUnhealthy", (State.READY,), SAME, None),
    ("ServiceRecovered", (State.READY,), SAME, None),
    # What callers do in a ready sandbox (exec, files). A command that was running
    # when a checkpoint began or a destroy stopped it still records how it ended.
    ("CommandStarted", (State.READY,), SAME, None),
    (
        "CommandFinished",
        (
            State.READY,
            State.CHECKPOINTING,
            State.RESTORING,
            State.PAUSING,
            State.PAUSED,
            State.TEARING_DOWN,
        ),
        SAME,
        None,
    ),
    ("FileUploaded", (State.READY, State.CHECKPOINTING, State.RESTORING), SAME, None),
    ("FileDownloaded", (State.READY, State.CHECKPOINTING, State.RESTORING), SAME, None),
    # An artifact can be deleted whatever the sandbox is doing, also after its end.
    ("CheckpointDeleted", tuple(s for s in State if s != State.NEW), SAME, None),
)

# Destroy reasons that make the end `failed` (a watched service exited, with
# `on_service_exit: fail`).
FAILING_DESTROYS = frozenset({"failure", "service_exited"})

# Events that mark the teardown that follows as the clean-up of a failure.
FAILURE_EVENTS = frozenset({"StepFailed"})

_BY_TRIGGER: dict[tuple[str, str], list[tuple[str, Guard | None]]] = {}
for _trigger, _sources, _dest, _guard in TABLE:
    for _source in _sources:
        _BY_TRIGGER.setdefault((_trigger, _source), []).append((_dest, _guard))


def failing_after(failing: bool, event: Event) -> bool:
    """Whether the sandbox is being torn down because of a failure, after `event`."""
    if type(event).__name__ in FAILURE_EVENTS:
        return True
    if type(event).__name__ == "DestroyRequested":
        return failing or getattr(event, "reason", "") in FAILING_DESTROYS
    return failing


def next_state(state: str, failing: bool, event: Event) -> str | None:
    """The state after `event`, or None when the state does not allow it."""
    for dest, guard in _BY_TRIGGER.get((type(event).__name__, state), ()):
        if guard is None or guard(failing, event):
            return state if dest == SAME else dest
    return None
