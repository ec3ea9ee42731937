"""The event catalog: immutable msgspec Structs, one tagged union, JSON on the wire.

Data only. Everything that records or folds these lives elsewhere.
"""

from events.base import Envelope, Event, EventMeta, envelope, new_event_id, utc_now
from events.codec import DecodeError, decode_event, encode_event, register_upcaster
from events.ledger import (
    LEDGER_EVENTS,
    CreditsDebited,
    CreditsGranted,
    CreditsRejected,
    CreditsReleased,
    CreditsReserved,
    phase_event_id,
)
from events.reconcile import (
    RECONCILE_EVENTS,
    OrphanFound,
    OrphanRemovalFailed,
    OrphanRemoved,
)
from events.sandbox import (
    SANDBOX_EVENTS,
    BecameReady,
    CheckpointCreated,
    CheckpointDeleted,
    CheckpointFailed,
    CheckpointPolicy,
    CheckpointRequested,
    CheckpointSource,
    CreditsHeld,
    DestroyRequested,
    Provisioned,
    Restored,
    RestoreFailed,
    RestoreRequested,
    RouteChosen,
    SandboxRejected,
    SandboxRequested,
    StepCancelled,
    StepFailed,
    TeardownFailed,
    TornDown,
)
from events.subjects import (
    LEDGER_PREFIX,
    SANDBOX_PREFIX,
    STREAM_SUBJECTS,
    Aggregate,
    ledger_subject,
    sandbox_subject,
    subject_for,
)
from events.validation import (
    VALIDATION_EVENTS,
    ValidationFailed,
    ValidationPassed,
    ValidationStarted,
)
from events.webhooks import (
    WEBHOOK_EVENTS,
    WebhookDeliveryAttempted,
    WebhookDisabled,
    WebhookRegistered,
    WebhookRemoved,
)

ALL_EVENTS: tuple[type[Event], ...] = (
    SANDBOX_EVENTS + LEDGER_EVENTS + VALIDATION_EVENTS + WEBHOOK_EVENTS + RECONCILE_EVENTS
)

__all__ = [
    "ALL_EVENTS",
    "LEDGER_EVENTS",
    "LEDGER_PREFIX",
    "RECONCILE_EVENTS",
    "SANDBOX_EVENTS",
    "SANDBOX_PREFIX",
    "STREAM_SUBJECTS",
    "VALIDATION_EVENTS",
    "WEBHOOK_EVENTS",
    "Aggregate",
    "BecameReady",
    "CheckpointCreated",
    "CheckpointDeleted",
    "CheckpointFailed",
    "CheckpointPolicy",
    "CheckpointRequested",
    "CheckpointSource",
    "CreditsDebited",
    "CreditsGranted",
    "CreditsHeld",
    "CreditsRejected",
    "CreditsReleased",
    "CreditsReserved",
    "DecodeError",
    "DestroyRequested",
    "Envelope",
    "Event",
    "EventMeta",
    "OrphanFound",
    "OrphanRemovalFailed",
    "OrphanRemoved",
    "Provisioned",
    "RestoreFailed",
    "RestoreRequested",
    "Restored",
    "RouteChosen",
    "SandboxRejected",
    "SandboxRequested",
    "StepCancelled",
    "StepFailed",
    "TeardownFailed",
    "TornDown",
    "ValidationFailed",
    "ValidationPassed",
    "ValidationStarted",
    "WebhookDeliveryAttempted",
    "WebhookDisabled",
    "WebhookRegistered",
    "WebhookRemoved",
    "decode_event",
    "encode_event",
    "envelope",
    "ledger_subject",
    "new_event_id",
    "phase_event_id",
    "register_upcaster",
    "sandbox_subject",
    "subject_for",
    "utc_now",
]
