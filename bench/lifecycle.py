"""2. Lifecycle throughput: saas-stub sandboxes at zero latency, create → ready → destroy.

The whole service runs in this process as `serve` assembles it (embedded nats-server,
event store, projections, manager with its KV leases, webhooks, reconciler), driven
through the manager's commands; a sandbox's lifecycle ends when its reservation is
settled (ledger `CreditsReleased`). All sandboxes of a run go at once.

Baseline: the raw publish rate of the same number of events (the same ten events per
lifecycle, one task per sandbox publishing its events in order) to another stream on
the same server, so that no follower of the service's stream sees them.
"""

from __future__ import annotations

import asyncio
import os

import nats

from bench.common import (
    SYNC_MODES,
    Figure,
    Options,
    Section,
    Stopwatch,
    alternate,
    lifecycle_events,
    publish_raw,
    rate,
    raw_stream,
    scratch,
)
from events import CreditsReleased, EventMeta
from sandboxer.app.manager import CreateRequest
from sandboxer.bootstrap import Service
from sandboxer.config import Settings
from sandboxer.store.event_store import RecordedEvent
from tests.infra import free_port

META = EventMeta(actor="bench", correlation_id="bench-lifecycle")
EVENTS_PER_LIFECYCLE = 10  # 7 sandbox events + reserve, debit, release on the ledger
ESTIMATE = 30  # saas-stub small: 0.05 credits/s for the profile's 600 s TTL


def service_settings(data_dir: str, sync: str, **env: str) -> Settings:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXER_") or k in env}
    environ.update(
        SANDBOXER_DATA_DIR=data_dir,
        SANDBOXER_NATS_SYNC=sync,
        SANDBOXER_STARTER_CREDITS="0",
        SANDBOXER_SAAS_STUB_LATENCY_MS="0",
        SANDBOXER_NATS_PORT=str(free_port()),
        **env,
    )
    return Settings.from_env(environ)


class Lifecycles:
    """Drives N sandboxes through their whole life at once, through the manager."""

    def __init__(self, service: Service) -> None:
        assert service.manager is not None and service.runner is not None
        self.manager = service.manager
        self.ready: dict[str, asyncio.Future[None]] = {}
        self.settled: dict[str, asyncio.Future[None]] = {}
        service.runner.listeners.append(self._observe)
        self.count = 0

    def _observe(self, recorded: RecordedEvent) -> None:
        event = recorded.event
        if type(event).__name__ == "BecameReady":
            future = self.ready.get(event.aggregate_id)
        elif isinstance(event, CreditsReleased):
            future = self.settled.get(event.sandbox_id)
        else:
            return
        if future is not None and not future.done():
            future.set_result(None)

    async def one(self, sandbox_id: str) -> None:
        loop = asyncio.get_running_loop()
        self.ready[sandbox_id] = loop.create_future()
        self.settled[sandbox_id] = loop.create_future()
        await self.manager.create(
            CreateRequest(profile="profile.saas-stub", inputs={}, sandbox_id=sandbox_id), META
        )
        await self.ready[sandbox_id]
        await self.manager.destroy(sandbox_id, META)
        await self.settled[sandbox_id]
        del self.settled[sandbox_id], self.ready[sandbox_id]

    async def run(self, n: int) -> None:
        first = self.count
        self.count += n
        async with asyncio.timeout(600):
            await asyncio.gather(*(self.one(f"sbx-{i:012x}") for i in range(first, first + n)))


async def run(options: Options) -> Section:
    n = options.size(1000, 10)
    section = Section(
        "lifecycle",
        "saas-stub lifecycles at once, create → ready → destroy → settled",
        sizes=f"{n} sandboxes at once per run ({n * EVENTS_PER_LIFECYCLE} events)",
    )
    section.notes.append(
        "ours: the in-process service (as `serve` assembles it, KV leases on) driven "
        "through `SandboxManager.create`/`destroy`; a lifecycle ends when its reservation "
        "is settled. events/s counts every event appended to the stream in the run."
    )
    section.notes.append(
        f"raw: {n} tasks publishing the same {EVENTS_PER_LIFECYCLE} events each, in order, "
        "with `js.publish` to another stream on the same server."
    )
    for sync in SYNC_MODES:
        with scratch(options, f"lifecycle-{sync}") as folder:
            service = Service(service_settings(str(folder), sync, SANDBOXER_RECONCILE="off"))
            await service.start()
            try:
                assert service.manager is not None and service.store is not None
                assert service.embedded is not None
                await service.manager.ledger.grant(
                    "default", n * ESTIMATE * (options.runs + 1), META
                )
                await _measure(options, section, sync, service, n)
            finally:
                await service.stop()
    return section


async def _measure(options: Options, section: Section, sync: str, service: Service, n: int) -> None:
    assert service.store is not None and service.embedded is not None
    driver = Lifecycles(service)
    await driver.run(min(n, 50))  # warm up: imports, first connections
    raw_nc = await nats.connect(**service.embedded.connect_options())
    prefix = await raw_stream(raw_nc)
    raw_js = raw_nc.jetstream()
    counter = iter(range(10**9))
    lifecycles_per_s: list[float] = []
    store = service.store

    async def raw(_run: int) -> float:
        payloads = [
            [
                (f"{prefix}.{i}.{type(e).__name__}", store.codec.encode(e))
                for e in lifecycle_events(next(counter), META)
            ]
            for i in range(n)
        ]
        return await publish_raw(raw_js, payloads)

    async def ours(_run: int) -> float:
        before = await store.last_seq()
        watch = Stopwatch()
        await driver.run(n)
        seconds = watch.seconds()
        appended = await store.last_seq() - before
        lifecycles_per_s.append(rate(n, seconds))
        return rate(appended, seconds)

    try:
        our_events, raw_events = await alternate(options.runs, raw, ours)
    finally:
        await raw_nc.close()
    section.add(
        Figure(
            "lifecycles/s",
            "lifecycles/s",
            lifecycles_per_s,
            [r / EVENTS_PER_LIFECYCLE for r in raw_events],
            "raw publish of their events",
            mode=sync,
            target_ratio=0.5,
            target_value=300,
        )
    )
    section.add(
        Figure(
            "events/s in lifecycles",
            "events/s",
            our_events,
            raw_events,
            "raw publish",
            mode=sync,
            target_ratio=0.5,
        )
    )
