"""Assembles the service: NATS (embedded or configured), store, projection, manager, API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Coroutine
from typing import Any

import nats
from aiohttp import web
from nats.aio.client import Client as NatsClient

from extensions import ExtensionRegistry, RuntimeInfo
from sandboxer.app.bus import MessageBus
from sandboxer.app.manager import SandboxManager
from sandboxer.app.pools import PoolKeeper
from sandboxer.app.read_model import SNAPSHOT_EVERY, ProjectionRunner
from sandboxer.app.reconcile import Reconciler
from sandboxer.app.use import SandboxUse
from sandboxer.app.webhooks import Webhooks
from sandboxer.config import Settings
from sandboxer.http.api import Api
from sandboxer.http.auth import TokenBook, is_loopback
from sandboxer.http.server import ApiRunner
from sandboxer.metrics import Metrics
from sandboxer.profiles import ProfileCatalog
from sandboxer.store.archive import SqliteArchive
from sandboxer.store.event_store import JetStreamEventStore
from sandboxer.store.leases import WorkerLeases
from sandboxer.store.metered import MeteredEventStore
from sandboxer.store.nats_auth import external_connect_options, mutable_policy, redact
from sandboxer.store.nats_server import EmbeddedNats
from sandboxer.store.pool_kv import PoolKV
from sandboxer.store.read_snapshots import ObjectStoreReadModels
from sandboxer.store.snapshots import FileSnapshotStore, ObjectStoreSnapshots, SnapshotStore
from sandboxer.store.worker_names import default_worker_name

log = logging.getLogger(__name__)

SHUTDOWN_SECONDS = 60.0
STOP_PART_SECONDS = 12.0


class Service:
    def __init__(self, settings: Settings, embedded: EmbeddedNats | None = None) -> None:
        """`embedded`: the embedded server, possibly spawned already by the caller
        (`serve` spawns it before importing this module); made here when None and no
        NATS URL is set. Either way `start` waits until it answers."""
        self.settings = settings
        self.embedded = embedded
        self.nc: NatsClient | None = None
        self.store: JetStreamEventStore | None = None
        self.runner: ProjectionRunner | None = None
        self.manager: SandboxManager | None = None
        self.api: Api | None = None
        self.webhooks: Webhooks | None = None
        self.leases: WorkerLeases | None = None
        self.reconciler: Reconciler | None = None
        self.bus: MessageBus | None = None
        self.pools: PoolKeeper | None = None
        # This service's series, on a registry of its own (several services may share
        # a process: tests, in-process workers).
        self.metrics = Metrics()

    async def start(self) -> None:
        settings = self.settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        # Read every manifest and profile first: a bad file fails start-up, not a request.
        extensions = ExtensionRegistry.from_env(
            RuntimeInfo(settings.data_dir, settings.repo_roots), settings.environ
        )
        profiles = ProfileCatalog.from_env(settings.environ)
        if settings.nats_url is None:
            self.embedded = self.embedded or settings.embedded_server()
            assert self.embedded is not None
            # Started from this (the main) thread on purpose: the child's parent-death
            # signal is tied to the thread that spawned it, and this one lives as long
            # as the process. The ~0.1 s it blocks the loop is start-up time.
            self.embedded.start()
            log.info(
                "embedded NATS at %s (data under %s; reader credentials in %s)",
                self.embedded.url,
                settings.data_dir,
                self.embedded.reader_file,
            )
            options = self.embedded.connect_options()
        else:
            log.info("NATS at %s", redact(settings.nats_url))
            options = external_connect_options(settings)
        self.nc = await nats.connect(
            **options,
            connect_timeout=5,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            name="sandboxer",
        )
        self.store = MeteredEventStore(self.nc, self.metrics, replicas=settings.stream_replicas)
        await self.store.ensure_stream(mutable=mutable_policy(settings))
        # The lease first: it renews while the read models catch up.
        self.leases = WorkerLeases(
            self.nc,
            settings.worker_name or default_worker_name(settings.data_dir),
            ttl=settings.lease_ttl,
            replicas=settings.stream_replicas,
            metrics=self.metrics,
        )
        await self.leases.start()
        self.runner = ProjectionRunner(
            self.store,
            archive=SqliteArchive(settings.data_dir / "cache" / "archive.sqlite3"),
            snapshots=(
                ObjectStoreReadModels(
                    self.nc.jetstream(timeout=30),
                    self.leases.name,
                    replicas=settings.stream_replicas,
                )
                if settings.snapshot_every
                else None
            ),
            snapshot_every=settings.snapshot_every or SNAPSHOT_EVERY,
            snapshot_seconds=settings.snapshot_seconds,
            # `sandboxer replay` folds from sequence 1 into a scratch archive on disk
            fresh_archive=lambda: SqliteArchive.scratch(settings.data_dir / "cache"),
        )
        self.metrics.watch_read_model(self.runner)  # the lag shows while it catches up
        await self.runner.start()
        snapshots: SnapshotStore
        if settings.checkpoint_store == "fs":
            snapshots = FileSnapshotStore(settings.data_dir / "checkpoints")
        else:
            snapshots = ObjectStoreSnapshots(
                self.nc.jetstream(timeout=30),
                settings.checkpoint_bucket,
                replicas=settings.stream_replicas,
            )
        self.manager = SandboxManager(
            self.store,
            extensions,
            profiles,
            snapshots=snapshots,
            spool_dir=settings.data_dir / "spool",
            leases=self.leases,
            runner=self.runner,
            starter_credits=settings.starter_credits,
            metrics=self.metrics,
        )
        self.leases.on_lost = self.manager.abandon
        await self.manager.start()
        # One bus for every command: the API's, and those other workers forward here.
        self.bus = MessageBus(self.manager)
        await self.leases.serve_control(self.bus.on_control)
        await self._start_pools()
        self.webhooks = Webhooks(
            self.nc,
            self.store,
            self.runner,
            settings.data_dir,
            settings.environ,
            metrics=self.metrics,
        )
        await self.webhooks.start()
        self.reconciler = Reconciler(
            self.store,
            self.runner,
            extensions,
            mode=settings.reconcile,
            interval=settings.reconcile_interval,
            metrics=self.metrics,
        )
        self.reconciler.start()
        self.api = Api(
            self.manager,
            self.runner,
            self.store,
            profiles,
            self.webhooks,
            TokenBook.from_env(settings.environ),
            self.reconciler,
            self.bus,
            SandboxUse.build(
                self.manager,
                self.bus.handle,
                settings.data_dir / "spool" / "transfers",
                settings.max_file_bytes,
            ),
            metrics=self.metrics,
        )

    async def _start_pools(self) -> None:
        """Warm pools (sandboxer/app/pools.py): every worker keeps them, under KV locks."""
        assert self.nc is not None and self.manager is not None and self.bus is not None
        assert self.leases is not None
        kv = PoolKV(self.nc.jetstream(timeout=5), replicas=self.settings.stream_replicas)
        await kv.start()
        leases = self.leases
        self.pools = PoolKeeper(
            self.manager, kv, self.bus.handle, lambda: leases.holder, metrics=self.metrics
        )
        self.bus.pools = self.pools
        self.metrics.watch_pools(self.pools)
        self.pools.start()

    async def stop(self) -> None:
        """Each part gets a bounded time: a part that hangs is named in the log and
        the rest still stops (what is unfinished resumes on the next start)."""
        if self.reconciler is not None:
            await _bounded("reconciler", self.reconciler.stop())
        if self.webhooks is not None:
            await _bounded("webhooks", self.webhooks.stop())
        if self.pools is not None:
            await _bounded("pools", self.pools.stop())
        if self.manager is not None:
            await _bounded("manager", self.manager.close())
            await _bounded("extensions", self.manager.extensions.close())
        if self.leases is not None:
            await _bounded("leases", self.leases.stop())
        if self.runner is not None:
            await _bounded("projections", self.runner.stop())  # writes a snapshot
            self.runner.archive.close()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await _bounded("nats drain", self.nc.drain())
        if self.embedded is not None:
            self.embedded.stop()

    def app(self) -> web.Application:
        assert self.api is not None
        return self.api.app()


async def _bounded(part: str, stopping: Coroutine[Any, Any, object]) -> None:
    try:
        async with asyncio.timeout(STOP_PART_SECONDS):
            await stopping
    except TimeoutError:
        log.error("stopping %s took longer than %ss; going on", part, STOP_PART_SECONDS)


async def serve(
    settings: Settings,
    ready: asyncio.Event | None = None,
    *,
    http: bool = True,
    embedded: EmbeddedNats | None = None,
) -> None:
    """Run until SIGINT or SIGTERM; always stop the embedded NATS server on the way out.

    With `http=False` (`serve --worker`) the process only drives sandboxes: it shares
    the work of the cluster with the API nodes and takes over from workers that die."""
    tokens = TokenBook.from_env(settings.environ)  # a bad tokens file fails here, early
    if not is_loopback(settings.host) and not tokens.enabled:
        raise SystemExit(
            f"sandboxer serve: refusing to listen on {settings.host} without tokens: "
            "set SANDBOXER_TOKENS_FILE (or SANDBOXER_TOKENS), or listen on 127.0.0.1"
        )
    service = Service(settings, embedded)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner: web.AppRunner | None = None
    try:
        await service.start()
        assert service.leases is not None
        if http:
            runner = ApiRunner(service.app(), access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, settings.host, settings.port)
            await site.start()
            url = f"http://{settings.host}:{settings.port}"
            print(f"sandboxer listening on {url} (dashboard: {url}/)", flush=True)
        else:
            print(f"sandboxer worker {service.leases.holder} running", flush=True)
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        try:
            async with asyncio.timeout(SHUTDOWN_SECONDS):
                if runner is not None:
                    await runner.cleanup()
                await service.stop()
        except TimeoutError:
            # A stop must end: what is unfinished resumes on the next start anyway.
            log.error("shutdown took longer than %ss; exiting now", SHUTDOWN_SECONDS)
            if service.embedded is not None:
                service.embedded.stop()
            logging.shutdown()
            os._exit(1)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
