"""Sandbox lifecycle events, published on `sandboxer.sandbox.<sandbox_id>.<EventType>`.

Inputs recorded here never contain secrets: the manager strips inputs the profile
marks `secret` before the event is built.
"""

from __future__ import annotations

import msgspec

from events.base import Event


class RouteCandidate(msgspec.Struct, frozen=True, kw_only=True):
    """One candidate of a routed profile, in order: extension, its config, admission."""

    extension: str
    config: dict[str, object] = {}
    when: str = "always"


class SandboxRequested(Event, frozen=True, kw_only=True):
    profile: str
    extension: str  # the profile's extension, or its first route candidate
    inputs: dict[str, str]
    secret_inputs: list[str] = []
    account: str = "default"
    ttl_seconds: int
    config: dict[str, object] = {}
    route: list[RouteCandidate] = []  # empty: `extension` with `config`, no choice


class CreditsHeld(Event, frozen=True, kw_only=True):
    """The account's reservation for this sandbox is in place (ledger CreditsReserved)."""

    account: str
    amount: int


class RouteChosen(Event, frozen=True, kw_only=True):
    extension: str
    host: str | None = None
    reason: str
    metered: bool = False


class SandboxRejected(Event, frozen=True, kw_only=True):
    reason: str
    code: str = "rejected"


class Provisioned(Event, frozen=True, kw_only=True):
    handle: dict[str, str]


class BecameReady(Event, frozen=True, kw_only=True):
    services: list[str] = []


class StepFailed(Event, frozen=True, kw_only=True):
    step: str
    error: str
    attempt: int = 1


class StepCancelled(Event, frozen=True, kw_only=True):
    step: str
    reason: str


class DestroyRequested(Event, frozen=True, kw_only=True):
    reason: str  # user, ttl, failure, recovery


class TornDown(Event, frozen=True, kw_only=True):
    pass


class TeardownFailed(Event, frozen=True, kw_only=True):
    error: str
    attempt: int
    final: bool = False


SANDBOX_EVENTS: tuple[type[Event], ...] = (
    SandboxRequested,
    RouteChosen,
    SandboxRejected,
    CreditsHeld,
    Provisioned,
    BecameReady,
    StepFailed,
    StepCancelled,
    DestroyRequested,
    TornDown,
    TeardownFailed,
)
