"""The state machine table: transitions and the pure fold must agree everywhere."""

from __future__ import annotations

import itertools

import pytest

from events import (
    BecameReady,
    DestroyRequested,
    Event,
    EventMeta,
    Provisioned,
    RouteChosen,
    SandboxRejected,
    SandboxRequested,
    StepCancelled,
    StepFailed,
    TeardownFailed,
    TornDown,
    envelope,
)
from sandboxer.app.lifecycle import (
    TERMINAL,
    InvalidTransition,
    LifecycleModel,
    SandboxMachine,
    State,
    next_state,
)

META = EventMeta(actor="test", correlation_id="c")


class Model(LifecycleModel):
    def __init__(self) -> None:
        self.sandbox_id = "sbx-test"
        self.failing = False
        self.entered: list[str] = []
        self.on_enter = self.entered.append


def samples() -> list[Event]:
    sid = "sbx-test"
    return [
        SandboxRequested(
            **envelope(sid, META), profile="p", extension="e", inputs={}, ttl_seconds=5
        ),
        RouteChosen(**envelope(sid, META), extension="e", reason="r"),
        RouteChosen(**envelope(sid, META), extension="e", reason="r", metered=True),
        SandboxRejected(**envelope(sid, META), reason="no"),
        Provisioned(**envelope(sid, META), handle={}),
        BecameReady(**envelope(sid, META)),
        StepFailed(**envelope(sid, META), step="provision", error="x"),
        StepCancelled(**envelope(sid, META), step="provision", reason="destroy"),
        DestroyRequested(**envelope(sid, META), reason="user"),
        TornDown(**envelope(sid, META)),
        TeardownFailed(**envelope(sid, META), error="x", attempt=1),
        TeardownFailed(**envelope(sid, META), error="x", attempt=3, final=True),
    ]


def model_in(machine: SandboxMachine, state: str, failing: bool) -> Model:
    model = Model()
    machine.attach(model)
    model.state = str(state)
    model.failing = failing
    return model


@pytest.mark.parametrize("failing", [False, True])
def test_machine_and_pure_fold_agree_on_every_pair(failing: bool) -> None:
    machine = SandboxMachine()
    for state, event in itertools.product([s.value for s in State], samples()):
        model = model_in(machine, state, failing)
        expected = next_state(state, failing, event)
        if expected is None:
            with pytest.raises(InvalidTransition):
                machine.fire(model, event)
            assert model.state == state
        else:
            machine.fire(model, event)
            assert model.state == expected, (state, type(event).__name__)
        machine.detach(model)


def test_happy_path_and_entered_hook() -> None:
    machine = SandboxMachine()
    model = model_in(machine, State.NEW, False)
    happy = [samples()[i] for i in (0, 1, 4, 5, 8, 9)]
    for event in happy:
        machine.fire(model, event)
    assert model.entered == [
        "requested",
        "provisioning",
        "starting",
        "ready",
        "tearing_down",
        "destroyed",
    ]


def test_failure_teardown_ends_failed() -> None:
    machine = SandboxMachine()
    model = model_in(machine, State.NEW, False)
    s = samples()
    for event in (s[0], s[1], s[6], s[10], s[9]):
        machine.fire(model, event)
    assert model.state == "failed"
    assert model.failing


def test_terminal_states_allow_nothing() -> None:
    for state in TERMINAL:
        for event in samples():
            assert next_state(state, False, event) is None


def test_refusal_names_state_and_event() -> None:
    machine = SandboxMachine()
    model = model_in(machine, State.READY, False)
    with pytest.raises(InvalidTransition, match="is ready: Provisioned is not allowed"):
        machine.fire(model, samples()[4])
