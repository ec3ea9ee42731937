"""The per-sandbox state machine: one table, read by `transitions` and by projections.

`TABLE` is the lifecycle the README and docs/events.md describe (requested →
reserving/provisioning → starting → ready, checkpointing and restoring, tearing_down →
destroyed, rejected, failed). `SandboxMachine` (transitions) drives live
sandboxes: applying an event fires the trigger of the same name, and entering a
state calls the aggregate's `on_enter` hook, which the manager sets only in live
mode, so replay applies history without side effects. `next_state` is the same
table as a pure function, for projections that fold millions of events.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any

from transitions import Machine, MachineError

from events import Event, RouteChosen, TeardownFailed
from sandboxer.errors import Conflict, SandboxerError


class State(StrEnum):
    NEW = "new"  # before the first event; never visible outside
    REQUESTED = "requested"
    RESERVING = "reserving"
    PROVISIONING = "provisioning"
    STARTING = "starting"
    READY = "ready"
    CHECKPOINTING = "checkpointing"
    RESTORING = "restoring"
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
    # An artifact can be deleted whatever the sandbox is doing, also after its end.
    ("CheckpointDeleted", tuple(s for s in State if s != State.NEW), SAME, None),
)

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
        return failing or getattr(event, "reason", "") == "failure"
    return failing


def next_state(state: str, failing: bool, event: Event) -> str | None:
    """The state after `event`, or None when the state does not allow it."""
    for dest, guard in _BY_TRIGGER.get((type(event).__name__, state), ()):
        if guard is None or guard(failing, event):
            return state if dest == SAME else dest
    return None


class InvalidTransition(Conflict):
    """The current state does not allow this step (HTTP 409)."""

    field = "state"
    wire = "invalid_transition"

    def __init__(self, sandbox_id: str, state: str, event_type: str) -> None:
        super().__init__(f"sandbox {sandbox_id} is {state}: {event_type} is not allowed")
        self.sandbox_id = sandbox_id
        self.state = state
        self.event_type = event_type

    def wire_args(self) -> dict[str, Any]:
        return {"sandbox_id": self.sandbox_id, "state": self.state, "event": self.event_type}

    @classmethod
    def from_wire(cls, answer: dict[str, Any]) -> SandboxerError:
        return cls(str(answer["sandbox_id"]), str(answer["state"]), str(answer["event"]))


class LifecycleModel:
    """What the transitions machine needs of a model; the aggregate extends it."""

    sandbox_id: str
    state: str
    failing: bool
    on_enter: Callable[[str], None] | None

    def _guard(self, guard: Guard, event_data: Any) -> bool:
        return guard(self.failing, event_data.kwargs["event"])

    def _entered(self, event_data: Any) -> None:
        self.failing = failing_after(self.failing, event_data.kwargs["event"])
        if self.on_enter is not None:
            self.on_enter(self.state)


def _machine_transitions() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for trigger, sources, dest, guard in TABLE:
        row: dict[str, Any] = {
            "trigger": trigger,
            "source": [str(s) for s in sources],
            "dest": str(dest),
        }
        if guard is not None:
            row["conditions"] = [_bound_guard(guard)]
        rows.append(row)
    return rows


def _bound_guard(guard: Guard) -> Callable[[Any], bool]:
    def check(event_data: Any) -> bool:
        model: LifecycleModel = event_data.model
        return model._guard(guard, event_data)

    return check


class SandboxMachine:
    """One transitions Machine shared by every live aggregate (models come and go)."""

    def __init__(self) -> None:
        self.machine = Machine(
            model=[],
            states=[s.value for s in State],
            transitions=_machine_transitions(),
            initial=State.NEW.value,
            auto_transitions=False,
            send_event=True,
            after_state_change="_entered",
            ignore_invalid_triggers=False,
        )

    def attach(self, model: LifecycleModel) -> None:
        self.machine.add_model(model, initial=State.NEW.value)

    def detach(self, model: LifecycleModel) -> None:
        self.machine.remove_model(model)

    def allows(self, model: LifecycleModel, event: Event) -> bool:
        """From the table the machine was built from: the machine's own `may_trigger`
        walks every trigger and ran three times per event (~9 % of a lifecycle)."""
        return next_state(model.state, model.failing, event) is not None

    def fire(self, model: LifecycleModel, event: Event) -> None:
        name = type(event).__name__
        try:
            fired = getattr(model, name)(event=event)
        except MachineError:  # no transition from this state: same refusal as a guard's
            fired = False
        if not fired:
            raise InvalidTransition(model.sandbox_id, model.state, name)
