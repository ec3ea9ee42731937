"""The reconciliation sweep: what the events say is live, against what exists on hosts.

Every extension with `inventory` lists what it finds carrying a sandbox id (workspaces,
compose projects, SaaS instances). Whatever no live sandbox owns (its sandbox is
finished, or unknown to the events) is an orphan: recorded as `OrphanFound` and, when
the sweep removes, `OrphanRemoved` or `OrphanRemovalFailed`, on
`sandboxer.reconcile.<extension>.>`.

The inventory is taken before the projection is caught up to the stream's end: a
sandbox is recorded (`SandboxRequested`) before anything of it is made, so a thing
found on a host always has its owner's events in that catch-up. Nothing live is
ever judged an orphan because its events were late.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any, TypedDict, cast

import msgspec

from events import Event, EventMeta, OrphanFound, OrphanRemovalFailed, OrphanRemoved, envelope
from events.subjects import Aggregate
from extensions import ExtensionRegistry, Reconciling, Resource
from sandboxer.app.lifecycle import TERMINAL
from sandboxer.app.read_model import ProjectionRunner
from sandboxer.metrics import Metrics
from sandboxer.store.event_store import EventRecorder, append_decided

log = logging.getLogger(__name__)

ACTOR_RECONCILER = "system:reconciler"
MODES = ("off", "report", "remove")
INVENTORY_TIMEOUT = 120.0
REMOVE_TIMEOUT = 330.0


class OrphanOut(msgspec.Struct, frozen=True, kw_only=True):
    extension: str
    host: str
    sandbox_id: str
    kind: str
    detail: str
    why: str  # finished | unknown
    removed: bool = False
    error: str | None = None


class SweepReport(msgspec.Struct, frozen=True, kw_only=True):
    sweep_id: str
    removing: bool
    checked: dict[str, int]  # extension -> resources found
    orphans: list[OrphanOut]
    errors: dict[str, str]  # extension -> why its inventory failed


class Reconciler:
    def __init__(
        self,
        store: EventRecorder,
        runner: ProjectionRunner,
        extensions: ExtensionRegistry,
        *,
        mode: str = "report",
        interval: float = 300.0,
        metrics: Metrics | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"reconcile mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.store = store
        self.runner = runner
        self.extensions = extensions
        self.mode = mode
        self.interval = interval
        self.metrics = metrics or Metrics()  # sweeps and the orphans they find
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def start(self) -> None:
        if self.mode != "off" and self.interval > 0:
            self._task = asyncio.create_task(self._sweep_forever(), name="reconcile")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                report = await self.sweep()
            except Exception:
                log.exception("reconciliation sweep failed")
                continue
            if report.orphans or report.errors:
                log.warning(
                    "sweep %s: %d orphan(s), inventory errors: %s",
                    report.sweep_id,
                    len(report.orphans),
                    report.errors or "none",
                )

    async def sweep(self, remove: bool | None = None, actor: str = ACTOR_RECONCILER) -> SweepReport:
        """One sweep over every reconciling extension; `remove` overrides the mode."""
        removing = self.mode == "remove" if remove is None else remove
        async with self._lock:  # one sweep at a time per process
            return await self._sweep(removing, actor)

    async def _sweep(self, removing: bool, actor: str) -> SweepReport:
        sweep_id = f"sweep-{secrets.token_hex(6)}"
        meta = EventMeta(actor=actor, correlation_id=sweep_id)
        found: dict[str, tuple[Reconciling, dict[str, Any], list[Resource]]] = {}
        errors: dict[str, str] = {}
        for name in self.extensions.names():
            loaded = self.extensions.get(name)
            if not loaded.manifest.has("inventory"):
                continue
            adapter = cast(Reconciling, loaded.adapter)
            config = loaded.config_for({})
            try:
                async with asyncio.timeout(INVENTORY_TIMEOUT):
                    found[name] = (adapter, config, await adapter.inventory(config))
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"[:500]
        # Now the events: everything appended until now, so every owner is in view.
        await self.runner.wait_for(await self.store.last_seq(), 30.0)
        orphans: list[OrphanOut] = []
        for name, (adapter, config, resources) in found.items():
            for resource in resources:
                view = self.runner.projection.get(resource.sandbox_id)
                if view is not None and view.state not in TERMINAL:
                    continue
                orphan = OrphanOut(
                    extension=name,
                    host=resource.host,
                    sandbox_id=resource.sandbox_id,
                    kind=resource.kind,
                    detail=resource.detail,
                    why="unknown" if view is None else "finished",
                )
                found_event = await self._record(
                    OrphanFound(
                        **envelope(name, meta),
                        **_resource(orphan, meta),
                        why=orphan.why,
                        action="remove" if removing else "report",
                    )
                )
                if removing:  # the removal follows from the finding
                    then = msgspec.structs.replace(meta, causation_id=found_event.event_id)
                    orphan = await self._remove(adapter, config, resource, orphan, then)
                orphans.append(orphan)
        self.metrics.sweep(found, [(o.extension, o.why) for o in orphans], errors)
        return SweepReport(
            sweep_id=sweep_id,
            removing=removing,
            checked={name: len(resources) for name, (_, _, resources) in found.items()},
            orphans=orphans,
            errors=errors,
        )

    async def _remove(
        self,
        adapter: Reconciling,
        config: dict[str, Any],
        resource: Resource,
        orphan: OrphanOut,
        meta: EventMeta,
    ) -> OrphanOut:
        try:
            async with asyncio.timeout(REMOVE_TIMEOUT):
                await adapter.remove_orphan(config, resource)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
            await self._record(
                OrphanRemovalFailed(
                    **envelope(orphan.extension, meta), **_resource(orphan, meta), error=error
                )
            )
            return msgspec.structs.replace(orphan, error=error)
        await self._record(
            OrphanRemoved(**envelope(orphan.extension, meta), **_resource(orphan, meta))
        )
        return msgspec.structs.replace(orphan, removed=True)

    async def _record(self, event: Event) -> Event:
        # Sweeps on several nodes write to one aggregate: each append at its version.
        await append_decided(self.store, Aggregate.of(event), lambda: [event])
        return event


class _Resource(TypedDict):
    sweep_id: str
    host: str
    sandbox_id: str
    kind: str
    detail: str


def _resource(orphan: OrphanOut, meta: EventMeta) -> _Resource:
    """What every reconcile event says of the resource it is about."""
    return _Resource(
        sweep_id=meta.correlation_id,
        host=orphan.host,
        sandbox_id=orphan.sandbox_id,
        kind=orphan.kind,
        detail=orphan.detail,
    )
