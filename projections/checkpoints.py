"""Checkpoints per sandbox, folded from the sandbox events."""

from __future__ import annotations

import datetime as dt

import msgspec

from events import (
    CheckpointCreated,
    CheckpointDeleted,
    CheckpointFailed,
    CheckpointRequested,
    Event,
)
from events.subjects import SANDBOX_SUBJECTS


class CheckpointView(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    id: str
    sandbox_id: str
    status: str  # requested, created, failed, deleted
    requested_at: dt.datetime
    created_at: dt.datetime | None = None
    size: int | None = None
    digest: str | None = None
    store_key: str | None = None
    metadata: dict[str, str] = {}
    error: str | None = None
    deleted_reason: str | None = None
    last_seq: int = 0


def evolve(view: CheckpointView | None, seq: int, event: Event) -> CheckpointView | None:
    if isinstance(event, CheckpointRequested):
        return CheckpointView(
            id=event.checkpoint_id,
            sandbox_id=event.aggregate_id,
            status="requested",
            requested_at=event.occurred_at,
            last_seq=seq,
        )
    if view is None:
        return None
    if isinstance(event, CheckpointCreated):
        return msgspec.structs.replace(
            view,
            status="created",
            created_at=event.occurred_at,
            size=event.size,
            digest=event.digest,
            store_key=event.store_key,
            metadata=event.metadata,
            last_seq=seq,
        )
    if isinstance(event, CheckpointFailed):
        return msgspec.structs.replace(view, status="failed", error=event.error, last_seq=seq)
    if isinstance(event, CheckpointDeleted):
        return msgspec.structs.replace(
            view, status="deleted", deleted_reason=event.reason, last_seq=seq
        )
    return view


class CheckpointsProjection:
    def __init__(self) -> None:
        self.checkpoints: dict[str, CheckpointView] = {}
        self.by_sandbox: dict[str, list[str]] = {}

    def apply(self, seq: int, subject: str, event: Event) -> None:
        checkpoint_id = getattr(event, "checkpoint_id", None)
        if checkpoint_id is None or not subject.startswith(SANDBOX_SUBJECTS):
            return
        current = self.checkpoints.get(checkpoint_id)
        if current is not None and seq <= current.last_seq:
            return  # folded already (an event can reach a worker twice)
        view = evolve(current, seq, event)
        if view is None:
            return
        if checkpoint_id not in self.checkpoints:
            self.by_sandbox.setdefault(view.sandbox_id, []).append(checkpoint_id)
        self.checkpoints[checkpoint_id] = view

    def load(self, views: list[CheckpointView]) -> None:
        """Replace every row with `views` (a snapshot's)."""
        self.checkpoints = {}
        self.by_sandbox = {}
        for view in sorted(views, key=lambda v: v.last_seq):
            self.by_sandbox.setdefault(view.sandbox_id, []).append(view.id)
            self.checkpoints[view.id] = view

    def get(self, checkpoint_id: str) -> CheckpointView | None:
        return self.checkpoints.get(checkpoint_id)

    def for_sandbox(self, sandbox_id: str) -> list[CheckpointView]:
        return [self.checkpoints[c] for c in self.by_sandbox.get(sandbox_id, [])]
