"""Several workers on one stream: each drives only the sandboxes it holds a lease on
(sandboxer/store/leases.py) and follows the stream for the rest; it adopts a sandbox
whose worker has gone (the same recovery as a restart) and settles what a gone
worker finished but did not settle. Commands for a sandbox another worker drives are
forwarded by the bus (sandboxer/app/bus.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping

import nats.errors

from events import Event
from events.subjects import SANDBOX_SUBJECTS, Aggregate
from projections.sandboxes import SandboxView
from sandboxer.app.ledger import LedgerBook
from sandboxer.app.lifecycle import TERMINAL
from sandboxer.app.read_model import ProjectionRunner
from sandboxer.app.recovery import Recovery
from sandboxer.app.sandbox import NotFound, Sandbox, SandboxHost
from sandboxer.app.settlement import Settlement
from sandboxer.store.event_store import RecordedEvent
from sandboxer.store.leases import Leases

log = logging.getLogger(__name__)


class Foreign(Mapping[str, SandboxView]):
    """The unfinished sandboxes other workers drive: the runner's unfinished rows that
    are not driven here. A view over the runner's projection, not a fold of its own."""

    def __init__(self, runner: ProjectionRunner, here: Mapping[str, object]) -> None:
        self._runner = runner
        self._here = here

    def __getitem__(self, key: str) -> SandboxView:
        if key in self._here:
            raise KeyError(key)
        return self._runner.projection.unfinished[key]

    def __iter__(self) -> Iterator[str]:
        here = self._here
        return iter([key for key in self._runner.projection.unfinished if key not in here])

    def __len__(self) -> int:
        return sum(1 for _ in self)


class Cluster:
    def __init__(
        self,
        host: SandboxHost,
        runner: ProjectionRunner,
        leases: Leases,
        ledger: LedgerBook,
        settlement: Settlement,
        recovery: Recovery,
    ) -> None:
        self.host = host
        self.runner = runner
        self.leases = leases
        self.ledger = ledger
        self.settlement = settlement
        self.recovery = recovery
        self.foreign = Foreign(runner, host.sandboxes)
        # Metered sandboxes another worker finished, until their reservation is settled:
        self._ended_elsewhere: dict[str, float] = {}
        self._early: list[RecordedEvent] | None = None  # seen while the manager starts

    # ---- following the stream ------------------------------------------------------

    def listen(self) -> None:
        """Listen before looking: what the runner applies from now on is either in the
        projection as the start sees it (skipped by sequence) or observed after it."""
        self._early = []
        self.runner.listeners.append(self._on_recorded)

    def started(self, last: int) -> None:
        """The start has read everything up to `last`: observe what came meanwhile."""
        early, self._early = self._early or [], None
        for recorded in early:
            if recorded.seq > last:
                self.observe(recorded.seq, recorded.subject, recorded.event)

    def stop(self) -> None:
        if self._on_recorded in self.runner.listeners:
            self.runner.listeners.remove(self._on_recorded)

    def _on_recorded(self, recorded: RecordedEvent) -> None:
        """Called by the runner after it applied an event: notice what other workers
        finish (their sandboxes, accounts and checkpoints are in the runner's views)."""
        if self._early is not None:
            self._early.append(recorded)
            return
        try:
            self.observe(recorded.seq, recorded.subject, recorded.event)
        except Exception:  # called inside the runner's follow, which must go on
            log.exception("observing event %d failed", recorded.seq)

    def observe(self, seq: int, subject: str, event: Event) -> None:
        """A metered sandbox that another worker ended: settled by the sweep if that
        worker does not settle it (the runner's view is the one after `event`)."""
        if not subject.startswith(SANDBOX_SUBJECTS):
            return
        key = event.aggregate_id
        if key in self.host.sandboxes:
            return  # ours: settled when it ends here
        view = self.runner.projection.get(key)
        if view is not None and view.metered and view.ended_by == event.event_id:
            self._ended_elsewhere[key] = asyncio.get_running_loop().time()

    # ---- adoption --------------------------------------------------------------------

    async def driven_here(self, sandbox_id: str) -> Sandbox | None:
        """The sandbox if this worker drives it (adopting it first if its worker has
        gone); None if another live worker does. NotFound if nobody drives it."""
        sbx = self.host.sandboxes.get(sandbox_id)
        if sbx is not None:
            return sbx
        async with self.host.exclusive(sandbox_id):
            sbx = self.host.sandboxes.get(sandbox_id)
            if sbx is not None:
                return sbx  # a concurrent request adopted it while we waited
            if await self.leases.owner(sandbox_id) is not None:
                return None
            if not await self.leases.take_over(sandbox_id):
                return None  # another worker adopted it just now
            await self.adopt(sandbox_id)
        sbx = self.host.sandboxes.get(sandbox_id)
        if sbx is None:
            raise NotFound(sandbox_id)  # finished, or never existed
        return sbx

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.leases.ttl / 2)
            try:
                await self.sweep()
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning("lease sweep: %s", exc)

    async def sweep(self) -> list[str]:
        """Adopt the sandboxes whose worker has gone; settle what a gone worker finished
        but did not settle. Returns the adopted ids."""
        adopted: list[str] = []
        alive: dict[str, str | None] = {}
        for key in list(self.foreign):
            if self.host.closing:
                break
            async with self.host.exclusive(key):
                if key in self.foreign and await self.leases.take_over(key, alive):
                    await self.adopt(key)
                    adopted.append(key)
        now = asyncio.get_running_loop().time()
        for key, ended in list(self._ended_elsewhere.items()):
            charge = self.ledger.charge(key)
            if charge is not None and (charge.settled or charge.rejected):
                del self._ended_elsewhere[key]
            elif now - ended > self.leases.ttl:
                del self._ended_elsewhere[key]
                await self.settlement.settle_finished(key)
        return adopted

    async def adopt(self, sandbox_id: str) -> None:
        """Continue a sandbox from its last event, as a restart would. Callers hold
        `exclusive(sandbox_id)`; the aggregate is attached only once its history is
        read, so no request ever acts on a half-loaded sandbox."""
        if sandbox_id in self.host.sandboxes:
            return
        records = await self.host.store.read_aggregate(Aggregate("sandbox", sandbox_id))
        sbx = self.host.attach(sandbox_id, live=False)
        for recorded in records:
            if recorded.seq > sbx.version:
                self.host.apply(sbx, recorded.seq, recorded.event)
        if sbx.request is not None:
            await self.ledger.refresh(sbx.request.account)
        if sbx.view is None or sbx.state in TERMINAL:
            self.host.finish(sbx)
            if sbx.view is not None and sbx.view.metered:
                await self.settlement.settle_finished(sandbox_id, seen=sbx.version)
            return
        await self.recovery.recover(sbx)

    def abandon(self) -> None:
        """Stop driving everything (our session lapsed); the sweep takes back what no
        other worker took meanwhile."""
        for sbx in list(self.host.sandboxes.values()):
            sbx.stop_background()
            if sbx.driver is not None and not sbx.driver.done():
                sbx.driver.cancel()
            del self.host.sandboxes[sbx.sandbox_id]  # in `foreign` from now on
            self.host.detach(sbx)
