"""The upcasters of the shipped catalog: each takes the raw JSON object of an event at
version N and returns it at version N+1, with the same meaning.

Never edit one that shipped: recorded events are read through it for as long as the
stream exists (audits replay from sequence 1). A new version adds a new entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# A payload of one version in, the next version's payload out.
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


def sandbox_requested_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """Early version-1 records predate routing and checkpoints: no route (the
    profile's extension, no choice), no checkpoint policy, not a clone."""
    raw.setdefault("route", [])
    raw.setdefault("checkpoint_policy", None)
    raw.setdefault("from_checkpoint", None)
    return raw


def webhook_registered_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """A version-1 registration without `start_seq` delivered the whole history."""
    raw.setdefault("start_seq", 0)
    return raw


def credits_debited_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 1 recorded `capped_at_reservation` only when it was true."""
    basis = raw.get("basis")
    basis = dict(basis) if isinstance(basis, dict) else {}
    basis.setdefault("capped_at_reservation", False)
    raw["basis"] = basis
    return raw


def no_service_report_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """BecameReady and Restored at version 1 did not report the services' states or
    published ports: none reported."""
    raw.setdefault("service_states", [])
    raw.setdefault("endpoints", [])
    return raw


def sandbox_requested_v2(raw: dict[str, Any]) -> dict[str, Any]:
    """A version-2 sandbox had no labels."""
    raw.setdefault("labels", {})
    return raw


def sandbox_requested_v3(raw: dict[str, Any]) -> dict[str, Any]:
    """A version-3 sandbox was an ordinary create, never a warm pool member, and had
    no idle timeout."""
    raw.setdefault("pool", None)
    raw.setdefault("use_policy", None)
    return raw


UPCASTERS: dict[tuple[str, int], Upcaster] = {
    ("SandboxRequested", 1): sandbox_requested_v1,
    ("SandboxRequested", 2): sandbox_requested_v2,
    ("SandboxRequested", 3): sandbox_requested_v3,
    ("WebhookRegistered", 1): webhook_registered_v1,
    ("CreditsDebited", 1): credits_debited_v1,
    ("BecameReady", 1): no_service_report_v1,
    ("Restored", 1): no_service_report_v1,
}
