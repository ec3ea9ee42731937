"""Settling a metered sandbox's reservation once it has ended: debit the metered
actual and release the rest, or release it all when it never became ready.
Deterministic from the recorded events, and never twice (the ledger's event ids)."""

from __future__ import annotations

import asyncio
from typing import cast

from events import EventMeta, SandboxRequested
from events.subjects import Aggregate
from extensions import Cost, ExtensionRegistry, Metered
from projections.sandboxes import SandboxView, metered_from, paused_seconds
from sandboxer.app.failpoints import failpoint
from sandboxer.app.ledger import POOL_ACCOUNT, LedgerBook
from sandboxer.app.lifecycle import TERMINAL
from sandboxer.app.read_model import ProjectionRunner
from sandboxer.app.sandbox import ACTOR_MANAGER, SandboxHost
from sandboxer.app.steps import Steps


class Settlement:
    def __init__(
        self,
        host: SandboxHost,
        runner: ProjectionRunner,
        extensions: ExtensionRegistry,
        ledger: LedgerBook,
        steps: Steps,
    ) -> None:
        self.host = host
        self.runner = runner
        self.extensions = extensions
        self.ledger = ledger
        self.steps = steps

    async def settle(self, request: SandboxRequested, view: SandboxView, meta: EventMeta) -> None:
        """`meta` is that of the event that ended the sandbox (causation and correlation)."""
        failpoint("before-settle")
        charge = self.ledger.charge(view.id)
        if charge is None or charge.rejected or charge.settled:
            return
        meta = EventMeta(
            actor=ACTOR_MANAGER, correlation_id=meta.correlation_id, causation_id=meta.causation_id
        )
        if view.pool is not None and view.claimed_at is None and charge.account != POOL_ACCOUNT:
            # A claim that stopped halfway reserved for a claimer who never got the
            # sandbox: released whole (the pool paid for the wait when it handed over).
            await self.ledger.settle(view.id, None, meta, reason="claim failed")
            return
        debit: Cost | None = None
        start = metered_from(view)
        if view.ready_at is not None and start is not None:
            ended = view.ended_at or view.updated_at
            # Paused intervals are not metered (docs/payments.md): the actual's basis
            # is the time provisioned (or claimed) to torn down, less them.
            paused = paused_seconds(view, ended)
            seconds = max((ended - start).total_seconds() - paused, 0.0)
            loaded = self.extensions.get(view.extension)
            ctx = self.steps.context_for(request, view, {}, view.extension)
            policy = loaded.manifest.hook("meter_actual")
            async with asyncio.timeout(policy.timeout * (policy.retries + 1) + 5):
                debit = await cast(Metered, loaded.adapter).meter_actual(ctx, seconds)
            if paused:
                debit = Cost(debit.amount, {**debit.basis, "paused_seconds": round(paused, 3)})
        await self.ledger.settle(view.id, debit, meta)

    async def settle_finished(self, sandbox_id: str, seen: int = 0) -> None:
        """Settle a finished sandbox from the runner's view of it (after a crash, or one
        another worker finished); `settle` itself does nothing twice. `seen`: a
        sequence of the sandbox the view must include first (read from its aggregate)."""
        if seen:
            await self.host.caught_up(seen)
        view = self.runner.projection.get(sandbox_id)
        if view is None or view.state not in TERMINAL or view.ended_by is None:
            return
        request = await self.requested(sandbox_id)
        if request is None:
            return
        await self.ledger.refresh(request.account)
        # The settlement follows from the event that ended the sandbox.
        meta = EventMeta(
            actor=ACTOR_MANAGER,
            correlation_id=view.ended_correlation_id or view.correlation_id,
            causation_id=view.ended_by,
        )
        self.host.spawn(self.settle(request, view, meta), f"settle-{sandbox_id}")

    async def requested(self, sandbox_id: str) -> SandboxRequested | None:
        """The sandbox's recorded request (its configuration is not in the read model)."""
        records = await self.host.store.read_aggregate(Aggregate("sandbox", sandbox_id))
        for recorded in records:
            if isinstance(recorded.event, SandboxRequested):
                return recorded.event
        return None
