"""Resuming after a restart, or after adopting a sandbox whose worker has gone.

- requested, starting, tearing_down: resumed where they stopped (routing is pure,
  wait_ready only looks, teardown is idempotent);
- provisioning: we cannot know what a half-finished provision made, so recovery
  records `StepFailed` and tears down: the sandbox ends `failed`, nothing is left;
- checkpointing, restoring: the step is recorded as failed; the sandbox stays ready.
"""

from __future__ import annotations

from events import CheckpointFailed, CheckpointPolicy, EventMeta, RestoreFailed, StepFailed
from events.subjects import Aggregate
from sandboxer.app.checkpointing import Checkpoints
from sandboxer.app.driver import Driver
from sandboxer.app.expiry import Expiry
from sandboxer.app.ledger import LedgerBook
from sandboxer.app.lifecycle import TERMINAL, State
from sandboxer.app.read_model import ProjectionRunner
from sandboxer.app.sandbox import ACTOR_MANAGER, ACTOR_RECOVERY, Sandbox, SandboxHost
from sandboxer.app.settlement import Settlement
from sandboxer.store.leases import Leases


class Recovery:
    def __init__(
        self,
        host: SandboxHost,
        runner: ProjectionRunner,
        leases: Leases,
        checkpoints: Checkpoints,
        ledger: LedgerBook,
        settlement: Settlement,
        expiry: Expiry,
        driver: Driver,
        starter_credits: int = 0,
    ) -> None:
        self.host = host
        self.runner = runner
        self.leases = leases
        self.checkpoints = checkpoints
        self.ledger = ledger
        self.settlement = settlement
        self.expiry = expiry
        self.driver = driver
        self.starter_credits = starter_credits

    async def resume(self) -> None:
        """Take every unfinished sandbox no live worker drives and continue it. The
        runner's projection (caught up) names them; only their aggregates are read."""
        alive: dict[str, str | None] = {}
        for key in list(self.runner.projection.unfinished):
            if not await self.leases.take_over(key, alive):
                continue  # another live worker drives it
            sbx = self.host.attach(key, live=False)
            for recorded in await self.host.store.read_aggregate(Aggregate("sandbox", key)):
                if recorded.seq > sbx.version:
                    self.host.apply(sbx, recorded.seq, recorded.event)
            if sbx.view is None or sbx.state in TERMINAL:
                self.host.finish(sbx)  # finished meanwhile by the worker whose lease lapsed
        # Finished sandboxes that still keep artifacts: their retention runs out.
        checkpoints = self.runner.checkpoints.checkpoints.values()
        keeping = {c.sandbox_id for c in checkpoints if c.status == "created"}
        for key in sorted(keeping):
            view = self.runner.projection.get(key)
            if view is not None and view.state in TERMINAL:
                request = await self.settlement.requested(key)  # its retention policy
                policy = request.checkpoint_policy if request is not None else None
                self.checkpoints.schedule_expiry(
                    key, view.ended_at or view.updated_at, policy or CheckpointPolicy()
                )
        await self.ledger.ensure_starter_grant(
            self.starter_credits, EventMeta(actor=ACTOR_MANAGER, correlation_id="starter-grant")
        )
        for sbx in list(self.host.sandboxes.values()):
            await self.recover(sbx)
        # Finished sandboxes whose reservation is still open: a crash came between the
        # end and the debit. Settle them now, exactly once (deterministic event ids).
        for sandbox_id, charge in list(self.runner.ledger.charges.items()):
            if charge.settled or charge.rejected:
                continue
            view = self.runner.projection.get(sandbox_id)
            if view is None or view.state not in TERMINAL:
                continue
            await self.settlement.settle_finished(sandbox_id)

    async def recover(self, sbx: Sandbox) -> None:
        """Go live with an aggregate read from its history: its TTL runs again and its
        state's step resumes (or is recorded as interrupted)."""
        host = self.host
        sbx.on_enter = lambda state: host.entered(sbx, state)
        self.expiry.schedule(sbx)
        if sbx.state in (State.CHECKPOINTING, State.RESTORING) and sbx.pending_checkpoint:
            failed = CheckpointFailed if sbx.state == State.CHECKPOINTING else RestoreFailed
            checkpoint_id = sbx.pending_checkpoint
            await host.record(
                sbx,
                lambda e: failed(
                    **e,
                    checkpoint_id=checkpoint_id,
                    error="interrupted: the service stopped during the step",
                ),
                sbx.meta(ACTOR_RECOVERY),
            )
        elif sbx.state == State.PROVISIONING:
            await host.record(
                sbx,
                lambda e: StepFailed(
                    **e, step="provision", error="interrupted: the service stopped during provision"
                ),
                sbx.meta(ACTOR_RECOVERY),
            )
        else:
            host.entered(sbx, sbx.state)  # its step resumes, or (ready) its watch
