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
    account: str
    url: str
    event_types: list[str]


class WebhookRemoved(WebhookEvent, frozen=True, kw_only=True):
    reason: str = ""


class WebhookDeliveryAttempted(WebhookEvent, frozen=True, kw_only=True):
    """One attempt to deliver one event; `ok` false attempts are retried with back-off."""

    delivered_event_id: str
    delivered_seq: int
    attempt: int
    ok: bool
    status: int | None = None
    error: str = ""
    final: bool = False


WEBHOOK_EVENTS: tuple[type[Event], ...] = (
    WebhookRegistered,
    WebhookRemoved,
    WebhookDeliveryAttempted,
)
