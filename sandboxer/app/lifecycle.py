"""The per-sandbox state machine, built by `transitions` from the lifecycle table.

`SandboxMachine` drives live sandboxes: applying an event fires the trigger of the
same name, and entering a state calls the aggregate's `on_enter` hook, which the
manager sets only in live mode, so replay applies history without side effects. The
table itself, and `next_state` (the same table as a pure function, for projections
that fold millions of events), are in events/lifecycle.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transitions import Machine, MachineError

from events import Event
from events.lifecycle import (
    FAILURE_EVENTS,
    LIVE,
    SAME,
    TABLE,
    TERMINAL,
    Guard,
    State,
    failing_after,
    next_state,
)
from sandboxer.errors import Conflict, SandboxerError

__all__ = [
    "FAILURE_EVENTS",
    "LIVE",
    "SAME",
    "TABLE",
    "TERMINAL",
    "InvalidTransition",
    "LifecycleModel",
    "SandboxMachine",
    "State",
    "failing_after",
    "next_state",
]


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
