"""Webhook registrations, the disabled ones and their failure streaks, folded from
the webhook events: the state the delivery loops start from (a snapshot keeps it)."""

from __future__ import annotations

import msgspec

from events import (
    Event,
    WebhookDeliveryAttempted,
    WebhookDisabled,
    WebhookRegistered,
    WebhookRemoved,
)
from events.subjects import WEBHOOK_SUBJECTS


class WebhookState(msgspec.Struct, kw_only=True):
    registrations: dict[str, WebhookRegistered] = {}
    disabled: dict[str, WebhookDisabled] = {}
    failures: dict[str, int] = {}  # deliveries in a row that finally failed


class WebhooksProjection:
    def __init__(self) -> None:
        self.state = WebhookState()

    def apply(self, subject: str, event: Event) -> None:
        if subject.startswith(WEBHOOK_SUBJECTS):
            fold(self.state, event)


def fold(state: WebhookState, event: object) -> None:
    key = getattr(event, "aggregate_id", "")
    if isinstance(event, WebhookRegistered):
        state.registrations[key] = event
    elif isinstance(event, WebhookRemoved):
        state.registrations.pop(key, None)
        state.disabled.pop(key, None)
        state.failures.pop(key, None)
    elif isinstance(event, WebhookDisabled):
        state.disabled[key] = event
    elif isinstance(event, WebhookDeliveryAttempted):
        if event.ok:
            state.failures[key] = 0
        elif event.final:
            state.failures[key] = state.failures.get(key, 0) + 1
