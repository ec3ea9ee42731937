"""Subjects are a public contract: validators filter on them."""

from __future__ import annotations

from events.base import Event

SANDBOX_PREFIX = "sandboxer.sandbox"
LEDGER_PREFIX = "sandboxer.ledger"
VALIDATION_PREFIX = "sandboxer.validation"
DEAD_LETTER_PREFIX = "sandboxer.deadletter"
STREAM_SUBJECTS = ["sandboxer.>"]


def sandbox_subject(sandbox_id: str, event_type: str) -> str:
    return f"{SANDBOX_PREFIX}.{sandbox_id}.{event_type}"


def sandbox_filter(sandbox_id: str) -> str:
    """Every event of one sandbox: the optimistic-concurrency scope of its aggregate."""
    return f"{SANDBOX_PREFIX}.{sandbox_id}.>"


def ledger_subject(account: str, event_type: str) -> str:
    return f"{LEDGER_PREFIX}.{account}.{event_type}"


def ledger_filter(account: str) -> str:
    return f"{LEDGER_PREFIX}.{account}.>"


WEBHOOK_PREFIX = "sandboxer.webhook"
RECONCILE_PREFIX = "sandboxer.reconcile"
_PREFIXES = {
    "reconcile": RECONCILE_PREFIX,
    "sandbox": SANDBOX_PREFIX,
    "ledger": LEDGER_PREFIX,
    "validation": VALIDATION_PREFIX,
    "webhook": WEBHOOK_PREFIX,
}


def subject_for(event: Event) -> str:
    return f"{_PREFIXES[event.KIND]}.{event.aggregate_id}.{event.type_name()}"


def filter_for(event: Event) -> str:
    """The optimistic-concurrency scope of the event's aggregate."""
    return f"{_PREFIXES[event.KIND]}.{event.aggregate_id}.>"
