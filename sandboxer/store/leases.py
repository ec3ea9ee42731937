"""Which worker drives which sandbox: leases in JetStream KV, bound to a worker session.

Two buckets, replicated like the event stream:

- `sandboxer_workers`: one key per worker name, value = the current incarnation.
  The worker renews it every ttl/3 with compare-and-set; the bucket's max age (the
  lease TTL) removes the key of a worker that stopped renewing.
- `sandboxer_leases`: one key per unfinished sandbox, value = `<worker>/<incarnation>`.

A lease is valid while its worker's key holds the same incarnation, so one renewal
per worker keeps all its sandboxes (Consul's sessions work the same way). Taking a
sandbox is a compare-and-set on its lease key: of two workers that race, one wins.

A worker that cannot renew in time (paused, cut off from NATS) stops driving before
its key can expire (`valid()` turns false at 2/3 of the TTL) and, once it renews
again, comes back under a new incarnation: its old leases are then free for anyone,
itself included. The event stream's optimistic concurrency stays the last guard:
two writers can never fork a sandbox's history.

Commands for a sandbox another worker drives (destroy, checkpoint, restore) go to
that worker as a NATS request on `sbxctl.<worker>`, outside the event stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from events.subjects import control_subject
from sandboxer.errors import Unavailable
from sandboxer.metrics import Metrics
from sandboxer.store.worker_names import check_worker_name

log = logging.getLogger(__name__)

WORKERS_BUCKET = "sandboxer_workers"
LEASES_BUCKET = "sandboxer_leases"
DEFAULT_TTL = 10.0

ControlHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def _session(incarnation: str) -> bytes:
    """A worker's session value: `incarnation` is what its leases must name."""
    return json.dumps({"incarnation": incarnation, "host": socket.gethostname()}).encode()


class OwnerUnavailable(Unavailable):
    """The sandbox's worker does not answer; its lease expires within the TTL."""

    code = "owner_unavailable"
    field = "id"


class WorkerLeases:
    def __init__(
        self,
        nc: NatsClient,
        name: str,
        *,
        ttl: float = DEFAULT_TTL,
        replicas: int = 1,
        on_lost: Callable[[], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.nc = nc
        self.metrics = metrics or Metrics()  # renewals and their failures
        self.js = nc.jetstream(timeout=5)
        self.name = check_worker_name(name)
        self.ttl = ttl
        self.replicas = replicas
        self.on_lost = on_lost
        self.incarnation = ""
        self._revision = 0
        self._renewed_at = 0.0
        self._workers: KeyValue | None = None
        self._leases: KeyValue | None = None
        # lease revisions this process wrote, so a release is one conditional delete
        self._held: dict[str, int] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._control: Any = None

    @property
    def holder(self) -> str:
        return f"{self.name}/{self.incarnation}"

    # ---- session -----------------------------------------------------------------

    async def start(self) -> None:
        self._workers = await self._bucket(WORKERS_BUCKET, ttl=self.ttl)
        self._leases = await self._bucket(LEASES_BUCKET, ttl=0)
        await self._register()
        self._heartbeat = asyncio.create_task(self._renew_forever(), name="lease-heartbeat")

    async def stop(self) -> None:
        """Leave the cluster: our leases become free at once (no TTL wait)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if self._control is not None:
            with contextlib.suppress(Exception):
                await self._control.unsubscribe()
        if self._workers is not None and self._revision:
            with contextlib.suppress(Exception):
                await self._workers.delete(self.name, last=self._revision)
        self._revision = 0

    def reset(self) -> None:
        """Give up the current session: the heartbeat registers a new incarnation, so
        every lease of the old one is free (for us too, through the sweep)."""
        self._revision = 0
        self._held.clear()

    def valid(self) -> bool:
        """Whether we may still act on our leases: renewed within 2/3 of the TTL."""
        return bool(self._revision) and time.monotonic() - self._renewed_at < self.ttl * 2 / 3

    async def _bucket(self, name: str, ttl: float) -> KeyValue:
        return await open_bucket(self.js, name, ttl, self.replicas)

    async def _register(self) -> None:
        assert self._workers is not None
        incarnation = secrets.token_hex(4)
        started = time.monotonic()
        self._revision = 0  # until the new session is written, we hold nothing
        self._revision = await self._workers.put(self.name, _session(incarnation))
        self.incarnation = incarnation
        self._renewed_at = started
        log.info("worker %s registered (lease TTL %gs)", self.holder, self.ttl)

    async def _renew_forever(self) -> None:
        assert self._workers is not None
        while True:
            await asyncio.sleep(self.ttl / 3)
            if not self._revision:
                with contextlib.suppress(TimeoutError, nats.errors.Error):
                    await self._register()
                continue
            started = time.monotonic()
            try:
                async with asyncio.timeout(self.ttl / 3):
                    self._revision = await self._workers.update(
                        self.name, _session(self.incarnation), last=self._revision
                    )
                self._renewed_at = started
                self.metrics.lease_renewals.inc()
                continue
            except nats.js.errors.KeyWrongLastSequenceError:
                self.metrics.lease_renewal_failures.labels("expired").inc()
                log.error("worker %s: session expired; giving up every lease", self.holder)
            except (TimeoutError, nats.errors.Error) as exc:
                self.metrics.lease_renewal_failures.labels("error").inc()
                if self.valid():
                    log.warning("worker %s: renewal failed (%s); retrying", self.holder, exc)
                    continue
                log.error("worker %s: could not renew in time (%s)", self.holder, exc)
            self.metrics.leases_lost.inc()
            if self.on_lost is not None:
                self.on_lost()
            with contextlib.suppress(TimeoutError, nats.errors.Error):
                await self._register()

    # ---- leases ------------------------------------------------------------------

    async def _holder_alive(self, holder: str, cache: dict[str, str | None]) -> bool:
        assert self._workers is not None
        name, _, incarnation = holder.partition("/")
        if name not in cache:
            try:
                entry = await self._workers.get(name)
                cache[name] = json.loads(entry.value or b"{}").get("incarnation")
            except nats.js.errors.KeyNotFoundError:
                cache[name] = None
        if name == self.name:
            return incarnation == self.incarnation
        return cache[name] == incarnation

    async def claim_new(self, sandbox_id: str) -> bool:
        """Take the lease of a sandbox we are about to create; False if it is taken."""
        assert self._leases is not None
        try:
            self._held[sandbox_id] = await self._leases.create(sandbox_id, self.holder.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    async def take_over(self, sandbox_id: str, alive: dict[str, str | None] | None = None) -> bool:
        """Claim a sandbox whose lease is free or held by a worker that is gone."""
        assert self._leases is not None
        if not self.valid():
            return False
        cache = {} if alive is None else alive
        try:
            entry = await self._leases.get(sandbox_id)
        except nats.js.errors.KeyNotFoundError:
            entry = None
        try:
            if entry is None:
                self._held[sandbox_id] = await self._leases.create(sandbox_id, self.holder.encode())
                return True
            holder = (entry.value or b"").decode()
            if holder == self.holder:
                if entry.revision is not None:
                    self._held[sandbox_id] = entry.revision
                return True
            if await self._holder_alive(holder, cache):
                return False
            self._held[sandbox_id] = await self._leases.update(
                sandbox_id, self.holder.encode(), last=entry.revision
            )
            log.info("worker %s took over %s from %s", self.holder, sandbox_id, holder)
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            return False  # another worker won the race

    async def owner(self, sandbox_id: str) -> str | None:
        """The live worker name holding the sandbox, or None."""
        assert self._leases is not None
        try:
            entry = await self._leases.get(sandbox_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        holder = (entry.value or b"").decode()
        if await self._holder_alive(holder, {}):
            return holder.partition("/")[0]
        return None

    async def release(self, sandbox_id: str) -> None:
        """Delete our lease only: by the revision we wrote (one round trip), or, for
        a lease this process did not write, after reading whose it is."""
        assert self._leases is not None
        revision = self._held.pop(sandbox_id, None)
        if revision is not None:
            with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                await self._leases.delete(sandbox_id, last=revision)
            return
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            entry = await self._leases.get(sandbox_id)
            if (entry.value or b"").decode() == self.holder:
                await self._leases.delete(sandbox_id, last=entry.revision)

    # ---- commands for another worker's sandboxes -----------------------------------

    async def serve_control(self, handler: ControlHandler) -> None:
        async def on_request(msg: Msg) -> None:
            try:
                body = json.loads(msg.data)
                answer = await handler(body)
            except Exception as exc:  # answered, never dropped: the caller waits
                answer = {"error": "internal", "message": f"{type(exc).__name__}: {exc}"}
            await msg.respond(json.dumps(answer).encode())

        self._control = await self.nc.subscribe(control_subject(self.name), cb=on_request)

    async def forward(self, owner: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        try:
            msg = await self.nc.request(
                control_subject(owner), json.dumps(body).encode(), timeout=timeout
            )
        except (TimeoutError, nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
            raise OwnerUnavailable(
                f"worker {owner} does not answer; its sandboxes are taken over within {self.ttl:g}s"
            ) from exc
        answer: dict[str, Any] = json.loads(msg.data)
        return answer


async def open_bucket(js: Any, name: str, ttl: float, replicas: int) -> KeyValue:
    """Create (or open, as it is) a KV bucket of one-value keys, `ttl` seconds each
    (0: kept), retrying a slow or restarting server a few times."""
    config = KeyValueConfig(
        bucket=name,
        history=1,
        ttl=ttl or None,
        storage=StorageType.FILE,
        replicas=replicas,
    )
    for attempt in range(1, 6):
        try:
            kv: KeyValue = await js.create_key_value(config)
            return kv
        except (TimeoutError, nats.errors.Error) as exc:
            if attempt == 5:
                raise
            log.warning("KV bucket %s: %s; retrying", name, exc)
            await asyncio.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


class Leases(Protocol):
    """What the manager needs of a lease table (WorkerLeases on NATS KV; or one
    process's own, SingleWorkerLeases)."""

    ttl: float

    async def claim_new(self, sandbox_id: str) -> bool: ...

    async def take_over(
        self, sandbox_id: str, alive: dict[str, str | None] | None = None
    ) -> bool: ...

    async def owner(self, sandbox_id: str) -> str | None: ...

    async def release(self, sandbox_id: str) -> None: ...

    def valid(self) -> bool: ...

    def reset(self) -> None: ...

    async def forward(self, owner: str, body: dict[str, Any], timeout: float) -> dict[str, Any]: ...


class SingleWorkerLeases:
    """The lease table of a worker that is alone on its stream: every sandbox is its
    own and there is nobody to forward to. For unit tests of the manager and the
    bus on the in-memory recorder (sandboxer/store/memory_store.py)."""

    def __init__(self, ttl: float = DEFAULT_TTL) -> None:
        self.ttl = ttl
        self.held: set[str] = set()

    async def claim_new(self, sandbox_id: str) -> bool:
        if sandbox_id in self.held:
            return False
        self.held.add(sandbox_id)
        return True

    async def take_over(self, sandbox_id: str, alive: dict[str, str | None] | None = None) -> bool:
        self.held.add(sandbox_id)
        return True

    async def owner(self, sandbox_id: str) -> str | None:
        return None  # no other worker

    async def release(self, sandbox_id: str) -> None:
        self.held.discard(sandbox_id)

    def valid(self) -> bool:
        return True

    def reset(self) -> None:
        self.held.clear()

    async def forward(self, owner: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        raise OwnerUnavailable(f"no worker {owner!r}: this worker is alone")
