"""Sandbox lifecycle events, published on `sandboxer.sandbox.<sandbox_id>.<EventType>`.

Inputs recorded here never contain secrets: the manager strips inputs the profile
marks `secret` before the event is built.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

import msgspec

from events.base import Event


class RouteCandidate(msgspec.Struct, frozen=True, kw_only=True):
    """One candidate of a routed profile, in order: extension, its config, admission."""

    extension: str
    config: dict[str, Any] = {}
    when: str = "always"


class SandboxRequested(Event, frozen=True, kw_only=True):
    """Version 2 (same meaning as 1): `route`, `checkpoint_policy` and
    `from_checkpoint` were added to version 1 with defaults, so early version-1
    records lack them; from version 2 on every field is written. The upcaster from 1
    fills in the defaults, which is what such a record meant. Version 3 adds the
    caller's `labels`; a version-2 sandbox had none. Version 4 adds `pool`: the profile
    whose warm pool the sandbox was made for (account `pool`, waiting for a claim);
    None, as for every earlier record, is an ordinary create."""

    VERSION: ClassVar[int] = 4
    schema_version: int = 4

    profile: str
    extension: str  # the profile's extension, or its first route candidate
    inputs: dict[str, str]
    secret_inputs: list[str] = []
    account: str = "default"
    ttl_seconds: int
    config: dict[str, Any] = {}
    route: list[RouteCandidate] = []  # empty: `extension` with `config`, no choice
    checkpoint_policy: CheckpointPolicy | None = None
    from_checkpoint: CheckpointSource | None = None
    labels: dict[str, str] = {}
    pool: str | None = None
    use_policy: UsePolicy | None = None


class UsePolicy(msgspec.Struct, frozen=True, kw_only=True):
    """From the profile: after `idle_timeout_seconds` without use (None: never) the
    sandbox is destroyed, or paused with `on_idle: pause`; `pause_mode` pause freezes
    its processes (the engine's pause), stop stops its containers."""

    idle_timeout_seconds: int | None = None
    on_idle: str = "destroy"
    pause_mode: str = "pause"


class CheckpointPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """From the profile: checkpoint on ready, and how long artifacts are kept."""

    on_ready: bool = False
    keep_last: int = 5
    keep_days_after_destroy: float = 7.0


class CheckpointSource(msgspec.Struct, frozen=True, kw_only=True):
    """A clone: this sandbox is provisioned from another sandbox's checkpoint."""

    checkpoint_id: str
    sandbox_id: str
    store_key: str
    size: int
    digest: str
    metadata: dict[str, str] = {}


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


class ServiceState(msgspec.Struct, frozen=True, kw_only=True):
    """One service as the backend saw it: `state` the engine's (running, exited, ...),
    `health` healthy, unhealthy, starting or none (no healthcheck), `exit_code` once
    its container has exited."""

    service: str
    state: str
    health: str = "none"
    exit_code: int | None = None


class PublishedPort(msgspec.Struct, frozen=True, kw_only=True):
    """Where a client reaches `container_port` of `service`: `host`:`host_port` (the
    compose host's address for an SSH host)."""

    service: str
    container_port: int
    protocol: str = "tcp"
    host: str
    host_port: int


class BecameReady(Event, frozen=True, kw_only=True):
    """Version 2 adds what the backend reported at ready: each service's state and
    health, and the published ports. A version-1 record did not say (empty lists)."""

    VERSION: ClassVar[int] = 2
    schema_version: int = 2

    services: list[str] = []
    service_states: list[ServiceState] = []
    endpoints: list[PublishedPort] = []


class ServiceExited(Event, frozen=True, kw_only=True):
    """A service of a ready sandbox stopped running (its container exited)."""

    service: str
    exit_code: int | None = None


class ServiceUnhealthy(Event, frozen=True, kw_only=True):
    """A service of a ready sandbox failed its healthcheck (`output`: the check's last
    output, its tail)."""

    service: str
    output: str = ""


class ServiceRecovered(Event, frozen=True, kw_only=True):
    """A service that had exited or turned unhealthy runs (and is healthy) again."""

    service: str
    state: str
    health: str = "none"


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


class CheckpointRequested(Event, frozen=True, kw_only=True):
    checkpoint_id: str


class CheckpointCreated(Event, frozen=True, kw_only=True):
    checkpoint_id: str
    store_key: str
    size: int
    digest: str  # "sha256:<hex>"
    metadata: dict[str, str] = {}


class CheckpointFailed(Event, frozen=True, kw_only=True):
    checkpoint_id: str
    error: str


class RestoreRequested(Event, frozen=True, kw_only=True):
    checkpoint_id: str


class Restored(Event, frozen=True, kw_only=True):
    """Version 2 adds the services and published ports after the restore (a restore
    brings up new containers, whose random host ports differ); version 1 did not say."""

    VERSION: ClassVar[int] = 2
    schema_version: int = 2

    checkpoint_id: str
    service_states: list[ServiceState] = []
    endpoints: list[PublishedPort] = []


class RestoreFailed(Event, frozen=True, kw_only=True):
    checkpoint_id: str
    error: str


class CheckpointDeleted(Event, frozen=True, kw_only=True):
    """The artifact is gone from the store (retention, or an explicit delete)."""

    checkpoint_id: str
    reason: str


class CommandStarted(Event, frozen=True, kw_only=True):
    """A caller runs a command in a ready sandbox (exec): `argv` as given, or `shell`,
    a script for `sh -c`; a value of one of the sandbox's secret inputs appears as
    `***`. `env_names` are the variables it sets (their values are not recorded).
    `service` None: the sandbox's workspace. Its output is never an event."""

    command_id: str
    argv: list[str] = []
    shell: str | None = None
    service: str | None = None
    workdir: str | None = None
    env_names: list[str] = []
    timeout_seconds: float


class CommandFinished(Event, frozen=True, kw_only=True):
    """How a command ended. `outcome`: exited (`exit_code` set), timeout, disconnected
    (the caller went away), destroyed (the sandbox was), error (`error` says why it
    could not run). Each stream's byte count and sha256 let a caller check the output
    it kept; the service keeps none of it."""

    command_id: str
    outcome: str
    exit_code: int | None = None
    duration_seconds: float
    stdout_bytes: int
    stdout_sha256: str
    stderr_bytes: int
    stderr_sha256: str
    error: str | None = None


class FileUploaded(Event, frozen=True, kw_only=True):
    """A file was written into the sandbox (`service` None: its workspace)."""

    path: str
    service: str | None = None
    size: int
    sha256: str


class FileDownloaded(Event, frozen=True, kw_only=True):
    """A file was read out of the sandbox, all of it (a transfer the caller broke off
    is not recorded)."""

    path: str
    service: str | None = None
    size: int
    sha256: str


class TtlExtended(Event, frozen=True, kw_only=True):
    """The sandbox's TTL changed (`PATCH /v1/sandboxes/{id}`): it now ends at
    `expires_at`, `ttl_seconds` after it was created (at most the profile's
    `max_ttl_seconds`). On a metered backend `credits_added` is what its reservation
    was topped up by (ledger `ReservationExtended`)."""

    ttl_seconds: int
    expires_at: dt.datetime
    credits_added: int = 0


class ActivitySeen(Event, frozen=True, kw_only=True):
    """The sandbox was used since the last one: `kinds` what was seen (exec, files,
    logs, keepalive, backend: its containers' CPU or network counters moved), the
    latest at `last_at`. Recorded at most every quarter of the profile's
    `idle_timeout_seconds`, never once per call."""

    kinds: list[str]
    last_at: dt.datetime


class PauseRequested(Event, frozen=True, kw_only=True):
    reason: str  # user, idle


class Paused(Event, frozen=True, kw_only=True):
    """The backend holds the sandbox still (`mode`: pause freezes its processes, stop
    stops its containers); metering excludes the time until `ResumeRequested`."""

    mode: str = "pause"


class PauseFailed(Event, frozen=True, kw_only=True):
    """The pause did not happen; the sandbox stays ready."""

    error: str


class ResumeRequested(Event, frozen=True, kw_only=True):
    reason: str = "user"


class Resumed(Event, frozen=True, kw_only=True):
    """The sandbox runs again: its services and published ports after the resume (a
    stopped container comes back on new random host ports)."""

    service_states: list[ServiceState] = []
    endpoints: list[PublishedPort] = []


class ResumeFailed(Event, frozen=True, kw_only=True):
    """The resume did not happen; the sandbox stays paused (resume again, or destroy)."""

    error: str


class SandboxClaimed(Event, frozen=True, kw_only=True):
    """A create took this warm pool member: from now on it is the claimer's (`account`,
    `labels`, its TTL counted from the claim: ends at `expires_at`). The actor is the
    claimer's; the create's correlation id is this event's. On a metered backend
    `credits_held` is the claimer's reservation (ledger `<sandbox>.claim-reserve`),
    metered from this event on; the pool paid for the wait before. A create with an
    Idempotency-Key names, in `idempotency_id`, the id its key derives: a retry with
    that key answers with this member."""

    account: str
    ttl_seconds: int
    expires_at: dt.datetime
    labels: dict[str, str] = {}
    claim_id: str
    credits_held: int = 0
    idempotency_id: str | None = None


SANDBOX_EVENTS: tuple[type[Event], ...] = (
    SandboxRequested,
    RouteChosen,
    SandboxRejected,
    CreditsHeld,
    Provisioned,
    BecameReady,
    ServiceExited,
    ServiceUnhealthy,
    ServiceRecovered,
    StepFailed,
    StepCancelled,
    DestroyRequested,
    TornDown,
    TeardownFailed,
    CheckpointRequested,
    CheckpointCreated,
    CheckpointFailed,
    RestoreRequested,
    Restored,
    RestoreFailed,
    CheckpointDeleted,
    CommandStarted,
    CommandFinished,
    FileUploaded,
    FileDownloaded,
    TtlExtended,
    ActivitySeen,
    PauseRequested,
    Paused,
    PauseFailed,
    ResumeRequested,
    Resumed,
    ResumeFailed,
    SandboxClaimed,
)
