"""Webhook registrations and delivery attempts, on `sandboxer.webhook.<id>.<EventType>`.

The signing secret is never recorded: it is derived from the service's key (kept
in the data directory) and the webhook id, and shown once at registration.
"""

from __future__ import annotations

from typing import ClassVar

from events.base import Event


class WebhookEvent(Event, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "webhook"


class WebhookRegistered(WebhookEvent, frozen=True, kw_only=True):
    """`start_seq`: the first stream sequence the webhook's consumer delivers; 0 (what
    registrations recorded before the field existed meant) is the whole history.

    Version 2 always writes `start_seq`; version 1 records may lack it (it was added
    to version 1 with a default), and the upcaster from 1 fills in 0."""

    VERSION: ClassVar[int] = 2
    schema_version: int = 2

    account: str
    url: str
    event_types: list[str]
    start_seq: int = 0


class WebhookRemoved(WebhookEvent, frozen=True, kw_only=True):
    reason: str = ""


class WebhookDeliveryAttempted(WebhookEvent, frozen=True, kw_only=True):
    """Attempt number `attempt` to deliver one event, and its answer.

    Recorded for the attempt that succeeded (`ok`) or the last one allowed (`final`):
    one event per delivery outcome, `attempt` being the attempts it took. (Older
    records also include retried attempts: `ok` and `final` both false.)
    """

    delivered_event_id: str
    delivered_seq: int
    attempt: int
    ok: bool
    status: int | None = None
    error: str = ""
    final: bool = False


class WebhookDisabled(WebhookEvent, frozen=True, kw_only=True):
    """The webhook stopped delivering after `failures` deliveries in a row finally
    failed; it stays registered (and listed, disabled) until removed."""

    reason: str
    failures: int


WEBHOOK_EVENTS: tuple[type[Event], ...] = (
    WebhookRegistered,
    WebhookRemoved,
    WebhookDeliveryAttempted,
    WebhookDisabled,
)
