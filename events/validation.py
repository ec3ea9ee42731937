"""Validation results, published by validators on
`sandboxer.validation.<sandbox_id>.<EventType>`.

The validator owns health checks and the profile's test_command; sand-boxer only
records what it reports. The final result of one validation run has an id derived
from the ready event it answers, so a redelivered ready event yields one result.
"""

from __future__ import annotations

from typing import ClassVar

from events.base import Event


class ValidationEvent(Event, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "validation"


class ValidationStarted(ValidationEvent, frozen=True, kw_only=True):
    ready_event_id: str
    checks: list[str] = []


class ValidationPassed(ValidationEvent, frozen=True, kw_only=True):
    ready_event_id: str
    exit_code: int = 0
    duration_seconds: float
    output_tail: str = ""


class ValidationFailed(ValidationEvent, frozen=True, kw_only=True):
    ready_event_id: str
    exit_code: int | None = None
    duration_seconds: float
    reason: str
    output_tail: str = ""


VALIDATION_EVENTS: tuple[type[Event], ...] = (
    ValidationStarted,
    ValidationPassed,
    ValidationFailed,
)
