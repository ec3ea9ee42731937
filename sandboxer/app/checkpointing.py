"""Checkpoint orchestration: the manager's steps for `checkpointing` and `restoring`,
clones from a checkpoint, and artifact retention.

The adapter streams an archive into a spool file; the SnapshotStore streams it to its
backend with a digest; the events record id, store key, size and digest. A failed
checkpoint or restore (a digest mismatch included) is recorded and leaves the sandbox
`ready`; a digest mismatch is found before the sandbox is touched.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, Protocol, cast

from events import (
    CheckpointCreated,
    CheckpointDeleted,
    CheckpointFailed,
    CheckpointPolicy,
    CheckpointRequested,
    CheckpointSource,
    Event,
    EventMeta,
    Restored,
    RestoreFailed,
    RestoreRequested,
    SandboxRequested,
    envelope,
)
from events.base import Envelope, utc_now
from events.subjects import Aggregate
from extensions import ExtensionRegistry, Handle, Snapshotting, StepContext
from projections.checkpoints import CheckpointsProjection, CheckpointView
from projections.sandboxes import SandboxView
from sandboxer.app.lifecycle import InvalidTransition
from sandboxer.app.read_model import ProjectionRunner
from sandboxer.app.sandbox import NotCapable
from sandboxer.app.watch import report
from sandboxer.errors import Conflict
from sandboxer.store.event_store import EventRecorder, append_decided
from sandboxer.store.snapshots import SnapshotStore


class LiveSandbox(Protocol):
    """What checkpointing reads of a sandbox the manager drives (its aggregate)."""

    sandbox_id: str
    view: SandboxView | None
    request: SandboxRequested | None
    pending_checkpoint: str | None  # of the running checkpoint or restore
    progress: str | None  # shown while the step runs

    def meta(self, actor: str = ...) -> EventMeta: ...


class StepDriver(Protocol):
    """What checkpointing needs of the manager that drives sandboxes: their
    aggregates, the one save path, a step's context, background tasks. (A protocol,
    so that the two modules do not import each other.)"""

    runner: ProjectionRunner
    extensions: ExtensionRegistry
    store: EventRecorder

    @property
    def sandboxes(self) -> Mapping[str, LiveSandbox]: ...

    async def record_step(
        self,
        sandbox_id: str,
        build: Callable[[Envelope], Event],
        meta: EventMeta | None = None,
    ) -> int: ...

    async def caught_up(self, seq: int) -> None: ...

    def step_context(self, sandbox_id: str) -> StepContext: ...

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None: ...


log = logging.getLogger(__name__)

ACTOR_POLICY = "system:checkpoint-policy"
ACTOR_RETENTION = "system:retention"


class UnknownCheckpoint(Conflict, LookupError):
    """The checkpoint is not one this sandbox can be restored to (HTTP 409)."""

    field = "checkpoint"
    wire = "unknown_checkpoint"


def new_checkpoint_id() -> str:
    return f"ckpt-{secrets.token_hex(6)}"


class Checkpoints:
    def __init__(self, manager: StepDriver, store: SnapshotStore, spool: Path) -> None:
        self.manager = manager
        self.store = store
        self.spool = spool
        self._timers: dict[str, asyncio.TimerHandle] = {}

    @property
    def projection(self) -> CheckpointsProjection:
        """The projection runner's checkpoints (the one checkpoint read model); what the
        manager appends is in it before the aggregate applies it (`_append_apply`)."""
        return self.manager.runner.checkpoints

    # ---- commands -----------------------------------------------------------------

    def _capable(self, extension: str) -> Snapshotting:
        loaded = self.manager.extensions.get(extension)
        if not (loaded.manifest.has("snapshot") and loaded.manifest.has("restore")):
            raise NotCapable(
                f"extension {extension} cannot checkpoint (no snapshot/restore capability)"
            )
        return cast(Snapshotting, loaded.adapter)

    def _live(self, sandbox_id: str) -> LiveSandbox:
        sbx = self.manager.sandboxes.get(sandbox_id)
        if sbx is None or sbx.view is None:
            raise InvalidTransition(sandbox_id, "finished", "CheckpointRequested")
        return sbx

    async def request(self, sandbox_id: str, meta: EventMeta) -> tuple[str, int]:
        sbx = self._live(sandbox_id)
        assert sbx.view is not None
        self._capable(sbx.view.extension)
        checkpoint_id = new_checkpoint_id()
        seq = await self.manager.record_step(
            sbx.sandbox_id, lambda e: CheckpointRequested(**e, checkpoint_id=checkpoint_id), meta
        )
        return checkpoint_id, seq

    async def request_restore(self, sandbox_id: str, checkpoint_id: str, meta: EventMeta) -> int:
        sbx = self._live(sandbox_id)
        assert sbx.view is not None
        self._capable(sbx.view.extension)
        checkpoint = self.created(checkpoint_id)
        if checkpoint.sandbox_id != sandbox_id:
            raise UnknownCheckpoint(
                f"checkpoint {checkpoint_id} belongs to sandbox {checkpoint.sandbox_id}; "
                "clone it with create --from-checkpoint"
            )
        return await self.manager.record_step(
            sbx.sandbox_id, lambda e: RestoreRequested(**e, checkpoint_id=checkpoint_id), meta
        )

    def created(self, checkpoint_id: str) -> CheckpointView:
        view = self.projection.get(checkpoint_id)
        if view is None:
            raise UnknownCheckpoint(f"no checkpoint {checkpoint_id!r}")
        if view.status != "created" or view.store_key is None or view.digest is None:
            raise UnknownCheckpoint(f"checkpoint {checkpoint_id} is {view.status}")
        return view

    def source(self, checkpoint_id: str, extension: str) -> CheckpointSource:
        """What a clone records about the checkpoint it starts from."""
        self._capable(extension)
        view = self.created(checkpoint_id)
        assert view.store_key is not None and view.digest is not None and view.size is not None
        return CheckpointSource(
            checkpoint_id=view.id,
            sandbox_id=view.sandbox_id,
            store_key=view.store_key,
            size=view.size,
            digest=view.digest,
            metadata=dict(view.metadata),
        )

    async def delete(self, checkpoint_id: str, meta: EventMeta, reason: str) -> None:
        view = self.projection.get(checkpoint_id)
        if view is None:
            raise UnknownCheckpoint(f"no checkpoint {checkpoint_id!r}")
        if view.status == "deleted":
            return
        if view.store_key:
            await self.store.delete(view.store_key)
        sbx = self.manager.sandboxes.get(view.sandbox_id)
        if sbx is not None:
            await self.manager.record_step(
                sbx.sandbox_id,
                lambda e: CheckpointDeleted(**e, checkpoint_id=checkpoint_id, reason=reason),
                meta,
            )
        else:  # a finished sandbox: appended at the version its stream shows
            event = CheckpointDeleted(
                **envelope(view.sandbox_id, meta, f"{checkpoint_id}.deleted"),
                checkpoint_id=checkpoint_id,
                reason=reason,
            )

            def decide() -> list[Event]:
                # Another node (its expiry) may have deleted it meanwhile.
                now = self.projection.get(checkpoint_id)
                return [] if now is not None and now.status == "deleted" else [event]

            seqs = await append_decided(self.manager.store, Aggregate.of(event), decide)
            if seqs:
                await self.manager.caught_up(seqs[0])

    # ---- steps (driven by the state machine) -----------------------------------------

    def _spool_file(self, checkpoint_id: str) -> Path:
        self.spool.mkdir(parents=True, exist_ok=True)
        return self.spool / f"{checkpoint_id}.tar"

    def _ctx(self, sbx: LiveSandbox, checkpoint_id: str) -> StepContext:
        ctx = self.manager.step_context(sbx.sandbox_id)
        return StepContext(
            sandbox_id=ctx.sandbox_id,
            profile=ctx.profile,
            inputs=ctx.inputs,
            config=ctx.config,
            host=ctx.host,
            progress=ctx.progress,
            checkpoint_id=checkpoint_id,
        )

    async def run_checkpoint(self, sbx: LiveSandbox) -> None:
        assert sbx.view is not None and sbx.pending_checkpoint is not None
        checkpoint_id = sbx.pending_checkpoint
        loaded = self.manager.extensions.get(sbx.view.extension)
        adapter = self._capable(sbx.view.extension)
        spool = self._spool_file(checkpoint_id)
        handle: Handle = dict(sbx.view.handle)
        policy = loaded.manifest.hook("snapshot")
        try:
            async with asyncio.timeout(policy.timeout):
                metadata = await adapter.snapshot(self._ctx(sbx, checkpoint_id), handle, spool)
                sbx.progress = "storing the artifact"
                artifact = await self.store.put_file(checkpoint_id, spool)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            await self.manager.record_step(
                sbx.sandbox_id,
                lambda e: CheckpointFailed(**e, checkpoint_id=checkpoint_id, error=error[:2000]),
            )
            return
        finally:
            spool.unlink(missing_ok=True)
        await self.manager.record_step(
            sbx.sandbox_id,
            lambda e: CheckpointCreated(
                **e,
                checkpoint_id=checkpoint_id,
                store_key=artifact.key,
                size=artifact.size,
                digest=artifact.digest,
                metadata=metadata,
            ),
        )
        await self._keep_last(sbx)

    async def run_restore(self, sbx: LiveSandbox) -> None:
        assert sbx.view is not None and sbx.pending_checkpoint is not None
        checkpoint_id = sbx.pending_checkpoint
        adapter = self._capable(sbx.view.extension)
        spool = self._spool_file(f"restore-{checkpoint_id}-{sbx.sandbox_id}")
        loaded = self.manager.extensions.get(sbx.view.extension)
        try:
            view = self.created(checkpoint_id)
            assert view.store_key is not None and view.digest is not None
            async with asyncio.timeout(loaded.manifest.hook("restore").timeout):
                sbx.progress = "fetching the artifact"
                await self.store.get_file(view.store_key, spool, view.digest)
                ctx = self._ctx(sbx, checkpoint_id)
                handle = await adapter.restore(
                    ctx, dict(sbx.view.handle), spool, dict(view.metadata)
                )
            async with asyncio.timeout(loaded.manifest.hook("wait_ready").timeout):
                sbx.progress = "waiting until ready"
                await loaded.adapter.wait_ready(ctx, handle)
                # New containers: new states and (random) host ports.
                states, endpoints = await report(loaded, ctx, handle)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            await self.manager.record_step(
                sbx.sandbox_id,
                lambda e: RestoreFailed(**e, checkpoint_id=checkpoint_id, error=error[:2000]),
            )
            return
        finally:
            spool.unlink(missing_ok=True)
        await self.manager.record_step(
            sbx.sandbox_id,
            lambda e: Restored(
                **e, checkpoint_id=checkpoint_id, service_states=states, endpoints=endpoints
            ),
        )

    async def provision_clone(self, sbx: LiveSandbox, source: CheckpointSource) -> Handle:
        """The provision step of a sandbox created from a checkpoint."""
        assert sbx.view is not None
        adapter = self._capable(sbx.view.extension)
        spool = self._spool_file(f"clone-{sbx.sandbox_id}")
        try:
            await self.store.get_file(source.store_key, spool, source.digest)
            ctx = self._ctx(sbx, source.checkpoint_id)
            return await adapter.restore(ctx, None, spool, dict(source.metadata))
        finally:
            spool.unlink(missing_ok=True)

    # ---- retention ------------------------------------------------------------------

    def policy(self, sbx: LiveSandbox) -> CheckpointPolicy:
        request = sbx.request
        return (
            request.checkpoint_policy
            if request and request.checkpoint_policy
            else CheckpointPolicy()
        )

    async def _keep_last(self, sbx: LiveSandbox) -> None:
        keep = max(self.policy(sbx).keep_last, 1)
        created = [c for c in self.projection.for_sandbox(sbx.sandbox_id) if c.status == "created"]
        for old in created[:-keep]:
            await self.delete(
                old.id,
                sbx.meta(ACTOR_RETENTION),  # follows from the CheckpointCreated
                reason=f"retention: keep the last {keep}",
            )

    def schedule_expiry(
        self, sandbox_id: str, ended_at: dt.datetime, policy: CheckpointPolicy
    ) -> None:
        """All of a finished sandbox's artifacts go `keep_days_after_destroy` after its end."""
        if not any(c.status == "created" for c in self.projection.for_sandbox(sandbox_id)):
            return
        due = ended_at + dt.timedelta(days=policy.keep_days_after_destroy)
        delay = max((due - utc_now()).total_seconds(), 0.0)
        loop = asyncio.get_running_loop()
        self._timers[sandbox_id] = loop.call_later(
            min(delay, 2**31),
            lambda: self.manager.spawn(self.expire(sandbox_id), f"retention-{sandbox_id}"),
        )

    async def expire(self, sandbox_id: str) -> None:
        self._timers.pop(sandbox_id, None)
        meta = EventMeta(actor=ACTOR_RETENTION, correlation_id=f"retention-{sandbox_id}")
        for view in self.projection.for_sandbox(sandbox_id):
            if view.status == "created":
                await self.delete(view.id, meta, reason="retention: the sandbox ended")

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
