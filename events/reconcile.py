"""Reconciliation sweeps, on `sandboxer.reconcile.<extension>.<EventType>`.

A sweep compares what the events say is live with what an extension finds on its
hosts; what no live sandbox owns is an orphan: reported, and removed if configured.
"""

from __future__ import annotations

from typing import ClassVar

from events.base import Event


class ReconcileEvent(Event, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "reconcile"


class OrphanFound(ReconcileEvent, frozen=True, kw_only=True):
    """`why`: the owning sandbox is finished (`finished`) or unknown to the events
    (`unknown`); `action`: what the sweep does about it (`report` or `remove`)."""

    sweep_id: str
    host: str
    sandbox_id: str
    kind: str  # workspace, compose_project, checkpoint_image, instance, ...
    detail: str
    why: str
    action: str


class OrphanRemoved(ReconcileEvent, frozen=True, kw_only=True):
    sweep_id: str
    host: str
    sandbox_id: str
    kind: str
    detail: str


class OrphanRemovalFailed(ReconcileEvent, frozen=True, kw_only=True):
    sweep_id: str
    host: str
    sandbox_id: str
    kind: str
    detail: str
    error: str


RECONCILE_EVENTS: tuple[type[Event], ...] = (OrphanFound, OrphanRemoved, OrphanRemovalFailed)
