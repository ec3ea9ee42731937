"""The manager: the commands on sandboxes and the one save path of their aggregates.

Each step appends its outcome as an event before the next side effect; entering a
state (the transitions `on_enter` hook, live mode only) starts the driver for it.
The manager keeps no read model of its own: it reads the projection runner's (which
has every event the manager appends before the aggregate applies it). What drives a
sandbox lives beside it: the steps (steps.py) run by one task per sandbox
(driver.py), the TTL reaper (expiry.py), recovery after a restart (recovery.py),
settlement of metered reservations (settlement.py) and the work shared with other
workers (cluster.py). The manager wires them and holds the aggregates.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
from collections.abc import AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats.errors

from events import (
    BecameReady,
    CheckpointRequested,
    DestroyRequested,
    Event,
    EventMeta,
    PauseRequested,
    RestoreRequested,
    ResumeRequested,
    SandboxClaimed,
    SandboxRequested,
    TtlExtended,
)
from events.base import envelope, utc_now
from events.ledger import phase_event_id
from events.sandbox import RouteCandidate
from events.subjects import Aggregate
from extensions import Cost, ExtensionRegistry, PathRefused, StepContext, confine_path
from extensions.manifest import ConfigError
from projections.sandboxes import evolve
from sandboxer.app.checkpointing import Checkpoints, UnknownCheckpoint
from sandboxer.app.cluster import Cluster
from sandboxer.app.driver import Driver
from sandboxer.app.expiry import Expiry
from sandboxer.app.idle import UseWatch
from sandboxer.app.ledger import LedgerBook
from sandboxer.app.lifecycle import TERMINAL, InvalidTransition, SandboxMachine, State
from sandboxer.app.read_model import ProjectionRunner
from sandboxer.app.recovery import Recovery
from sandboxer.app.sandbox import (
    ACTOR_CHECKPOINT_POLICY,
    STEP_LABELS,
    AlreadyCreated,
    Build,
    CreateInProgress,
    CreditsShort,
    EstimateFailed,
    IdempotencyMismatch,
    NotCapable,
    NotFound,
    Sandbox,
    StepProgress,
    TtlRefused,
    log_failure,
)
from sandboxer.app.settlement import Settlement
from sandboxer.app.steps import HookFailed, Steps
from sandboxer.app.watch import ServiceWatch, check_watch_config
from sandboxer.ids import check_account, check_labels, new_sandbox_id
from sandboxer.metrics import Metrics
from sandboxer.profiles import ProfileCatalog, ProfileError
from sandboxer.store.event_store import ConcurrencyConflict, EventRecorder
from sandboxer.store.leases import Leases, OwnerUnavailable
from sandboxer.store.snapshots import SnapshotStore

__all__ = [
    "AlreadyCreated",
    "CreateInProgress",
    "CreateRequest",
    "IdempotencyMismatch",
    "NotFound",
    "Sandbox",
    "SandboxManager",
    "StepProgress",
]

log = logging.getLogger(__name__)

APPEND_ATTEMPTS = 4
CATCH_UP_SECONDS = 30.0


@dataclass(frozen=True)
class CreateRequest:
    profile: str
    inputs: Mapping[str, str]
    ttl_seconds: int | None = None
    account: str = "default"
    from_checkpoint: str | None = None
    sandbox_id: str | None = None  # from an idempotency key; None: a fresh random id
    labels: Mapping[str, str] = field(default_factory=dict)
    pool: str | None = None  # a warm pool member of this profile (account `pool`)


class SandboxManager:
    def __init__(
        self,
        store: EventRecorder,
        extensions: ExtensionRegistry,
        profiles: ProfileCatalog,
        *,
        snapshots: SnapshotStore,
        spool_dir: Path,
        leases: Leases,
        runner: ProjectionRunner,
        starter_credits: int = 0,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        # The read models (sandboxes, checkpoints, ledger): the runner's, the one copy.
        # Its listeners tell the manager what other workers append.
        self.runner = runner
        self.leases = leases
        self.extensions = extensions
        self.profiles = profiles
        self.machine = SandboxMachine()
        self._sandboxes: dict[str, Sandbox] = {}
        self._background: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Task[Any]] = set()
        # Sandbox ids being created or adopted right now: one at a time per id, so two
        # racing requests never attach two aggregates for one sandbox.
        self._claims: dict[str, asyncio.Future[None]] = {}
        self._closing = False
        self.checkpoints = Checkpoints(self, snapshots, spool_dir)
        self.ledger = LedgerBook(store, runner)
        self.steps = Steps(
            self, extensions, self.checkpoints, self.ledger, self._load, metrics=metrics
        )
        self.driver = Driver(self, self.steps.by_state, leases, lambda: self.abandon())
        self.expiry = Expiry(self, self.destroy)
        self.watch = ServiceWatch(self, extensions, self.steps.context, self.destroy)
        self.use = UseWatch(self, extensions, self.steps.context, self.destroy, self.pause)
        self.settlement = Settlement(self, runner, extensions, self.ledger, self.steps)
        self.recovery = Recovery(
            self,
            runner,
            leases,
            self.checkpoints,
            self.ledger,
            self.settlement,
            self.expiry,
            self.driver,
            starter_credits,
        )
        self.cluster = Cluster(self, runner, leases, self.ledger, self.settlement, self.recovery)
        # Unfinished sandboxes that other workers drive (a view of the runner's rows):
        self.foreign = self.cluster.foreign

    @property
    def sandboxes(self) -> dict[str, Sandbox]:
        """The aggregates this worker drives."""
        return self._sandboxes

    @property
    def closing(self) -> bool:
        return self._closing

    # ---- start, stop -------------------------------------------------------------

    async def start(self) -> int:
        """Resume every sandbox that is not finished. Call after `runner.start()`."""
        self.cluster.listen()
        last = self.runner.last_seq
        await self.recovery.resume()
        self.cluster.started(last)
        self._background = [
            asyncio.create_task(self.cluster.sweep_forever(), name="manager-sweep"),
        ]
        return last

    async def caught_up(self, seq: int) -> None:
        """Wait until the runner has applied `seq` (read your writes). If it does not in
        time, say so and go on: the write model must not fall behind the stream."""
        try:
            reached = await self.runner.wait_for(seq, CATCH_UP_SECONDS)
        except RuntimeError:
            reached = False
        if not reached:
            log.warning("the projection did not reach sequence %d; reads may lag", seq)

    async def close(self) -> None:
        """Stop driving; what is unfinished resumes on the next start."""
        self._closing = True
        self.cluster.stop()
        self.checkpoints.close()
        for background in self._background:
            background.cancel()
        tasks: list[asyncio.Task[Any]] = [*self._background, *self.driver.cancel_all()]
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=10)

    # ---- commands ----------------------------------------------------------------

    async def create(self, request: CreateRequest, meta: EventMeta) -> tuple[Sandbox, int]:
        """Validate, record `SandboxRequested`, start driving. Returns the stream sequence."""
        profile = self.profiles.get(request.profile)
        try:
            check_account(request.account)
        except ValueError as exc:
            raise ProfileError(str(exc), "account") from exc
        inputs = profile.resolve_inputs(request.inputs)
        labels = check_labels(dict(request.labels))
        for name in profile.path_inputs():
            if name in inputs:
                self._confine(name, inputs[name])
        ttl = profile.resolve_ttl(request.ttl_seconds)
        candidates = profile.candidates()
        try:
            for candidate in candidates:
                config = self.extensions.resolve_config(candidate.extension, candidate.config)
                check_watch_config(config)
        except ConfigError as exc:
            raise ProfileError(f"{profile.name}: {exc}", "profile") from exc
        if profile.on_idle == "pause" and profile.idle_timeout_seconds:
            for candidate in candidates:
                if not self.extensions.get(candidate.extension).manifest.has("pause"):
                    raise ProfileError(
                        f"{profile.name} says on_idle: pause, but extension "
                        f"{candidate.extension} cannot pause",
                        "profile",
                    )
        source = None
        if request.from_checkpoint is not None:
            if profile.route:
                raise ProfileError(
                    f"{profile.name} routes between extensions; a clone needs "
                    "the extension of its checkpoint",
                    "profile",
                )
            try:
                source = self.checkpoints.source(request.from_checkpoint, profile.extension)
            except (UnknownCheckpoint, NotCapable) as exc:
                raise ProfileError(str(exc), "from_checkpoint") from exc
        secret_keys = profile.secret_inputs()
        sandbox_id = request.sandbox_id or new_sandbox_id()
        async with self.exclusive(sandbox_id):
            if sandbox_id in self.sandboxes or sandbox_id in self.foreign:
                raise AlreadyCreated(sandbox_id)
            if not await self.leases.claim_new(sandbox_id):
                # The key's lease exists: a create in flight elsewhere, or one whose worker
                # died (then the lease is ours to take, with what it recorded, if anything).
                if not await self.leases.take_over(sandbox_id):
                    raise AlreadyCreated(sandbox_id)
                if await self.store.read_aggregate(Aggregate("sandbox", sandbox_id)):
                    await self.cluster.adopt(sandbox_id)
                    raise AlreadyCreated(sandbox_id)
            sbx = self.attach(sandbox_id, live=True)
            sbx.secrets = {k: v for k, v in inputs.items() if k in secret_keys}
            recorded_inputs = {k: v for k, v in inputs.items() if k not in secret_keys}
            try:
                seq = await self.record(
                    sbx,
                    lambda e: SandboxRequested(
                        **e,
                        profile=profile.name,
                        extension=candidates[0].extension,
                        inputs=recorded_inputs,
                        secret_inputs=sorted(sbx.secrets),
                        account=request.account,
                        ttl_seconds=ttl,
                        config=dict(candidates[0].config),
                        route=[
                            RouteCandidate(
                                extension=c.extension, config=dict(c.config), when=c.when
                            )
                            for c in profile.route
                        ],
                        checkpoint_policy=profile.checkpoint,
                        from_checkpoint=source,
                        labels=labels,
                        pool=request.pool,
                        use_policy=profile.use_policy(),
                    ),
                    meta,
                    event_id=f"{sandbox_id}.requested" if request.sandbox_id else None,
                )
            except BaseException:
                self.finish(sbx)
                raise
            self.expiry.schedule(sbx)
            return sbx, seq

    def _confine(self, name: str, value: str) -> None:
        """A path input must name a directory under the operator's repo roots: refused
        here, before any extension reads it."""
        try:
            confine_path(value, self.extensions.runtime.repo_roots)
        except PathRefused as exc:
            raise ProfileError(f"input {name!r}: {value[:200]!r} {exc}", f"inputs.{name}") from None

    async def destroy(self, sandbox_id: str, meta: EventMeta, reason: str = "user") -> int:
        """Record `DestroyRequested` and cancel the step in flight; teardown follows.

        Destroying a sandbox that is already being torn down is a no-op: it returns
        the sequence of the sandbox's last event, so the caller can show that state.
        """
        sbx = await self.driven_here(sandbox_id)
        if sbx is None:  # the bus forwards to the driving worker; it took it just now
            raise OwnerUnavailable(f"sandbox {sandbox_id} is driven by another worker")
        if sbx.state == State.TEARING_DOWN:
            return sbx.version
        inflight = sbx.step  # captured first: recording starts the teardown step
        try:
            seq = await self.record(sbx, lambda e: DestroyRequested(**e, reason=reason), meta)
        except InvalidTransition:
            # A concurrent destroy recorded first while we waited for the aggregate:
            # the teardown this request asks for is under way (or done: NotFound).
            if sbx.state == State.TEARING_DOWN:
                return sbx.version
            if sbx.state in TERMINAL:
                raise NotFound(sandbox_id) from None
            raise
        if inflight is not None and not inflight.done():
            inflight.cancel()
        return seq

    async def pause(self, sandbox_id: str, meta: EventMeta, reason: str = "user") -> int:
        """Record `PauseRequested` for a ready sandbox; the pause step follows."""
        sbx = await self._driven(sandbox_id)
        self._capable(sbx, "pause")
        if sbx.view is not None and sbx.view.pool is not None and sbx.view.claimed_at is None:
            raise InvalidTransition(sandbox_id, "an unclaimed pool member", "PauseRequested")
        if sbx.state in (State.PAUSING, State.PAUSED):
            return sbx.version  # asked again: the pause is under way, or done
        return await self.record(sbx, lambda e: PauseRequested(**e, reason=reason), meta)

    async def resume(self, sandbox_id: str, meta: EventMeta, reason: str = "user") -> int:
        """Record `ResumeRequested` for a paused sandbox; the resume step follows."""
        sbx = await self._driven(sandbox_id)
        self._capable(sbx, "resume")
        if sbx.state in (State.RESUMING, State.READY):
            return sbx.version
        return await self.record(sbx, lambda e: ResumeRequested(**e, reason=reason), meta)

    async def extend(self, sandbox_id: str, ttl_seconds: int, meta: EventMeta) -> int:
        """The sandbox ends `ttl_seconds` from now: record `TtlExtended`, bounded by the
        profile's max_ttl_seconds (from creation, or from the claim of a pool member);
        a metered sandbox's reservation is topped up first, or the extension refused."""
        sbx = await self._driven(sandbox_id)
        view, request = sbx.view, sbx.request
        assert view is not None and request is not None
        if sbx.state in TERMINAL or sbx.state == State.TEARING_DOWN:
            raise InvalidTransition(sandbox_id, sbx.state, "TtlExtended")
        if ttl_seconds < 1:
            raise TtlRefused("ttl_seconds must be a whole number of seconds, at least 1")
        limit = self.profiles.get(view.profile).max_ttl_seconds
        start = view.claimed_at or view.created_at
        now = utc_now()
        lived = max(math.ceil((now - start).total_seconds()), 0)
        total = lived + ttl_seconds
        if total > limit:
            raise TtlRefused(
                f"ttl_seconds {ttl_seconds} would make sandbox {sandbox_id} live {total}s, "
                f"more than {view.profile}'s max_ttl_seconds ({limit}); it has lived "
                f"{lived}s, so at most {max(limit - lived, 0)} now"
            )
        added = await self._top_up(sbx, total, meta) if view.metered else 0
        if added:  # the extension follows from the ledger's top-up (as CreditsHeld does)
            meta = msgspec.structs.replace(
                meta, causation_id=phase_event_id(sandbox_id, f"extend-{total}")
            )
        expires_at = start + dt.timedelta(seconds=total)
        return await self.record(
            sbx,
            lambda e: TtlExtended(
                **e, ttl_seconds=total, expires_at=expires_at, credits_added=added
            ),
            meta,
        )

    async def _top_up(self, sbx: Sandbox, ttl_seconds: int, meta: EventMeta) -> int:
        """Reserve what a TTL of `ttl_seconds` costs beyond the reservation held."""
        assert sbx.view is not None
        loaded = self.extensions.get(sbx.view.extension)
        try:
            estimate = await self.steps.estimate_for(sbx, loaded, ttl_seconds)
        except HookFailed as exc:
            raise EstimateFailed(f"extension {sbx.view.extension}: {exc.error}") from None
        charge = self.ledger.charge(sbx.sandbox_id)
        held = charge.reserved if charge is not None else 0
        extra = estimate.amount - held
        if extra <= 0:
            return 0
        account = sbx.view.account
        phase = f"extend-{ttl_seconds}"
        # Decided on the sandbox as it is: the top-up follows from its last event.
        decided = msgspec.structs.replace(meta, causation_id=sbx.last_event_id)
        if not await self.ledger.top_up(
            sbx.sandbox_id, account, Cost(extra, estimate.basis), phase, decided
        ):
            available = self.ledger.account(account).available
            raise CreditsShort(
                f"a TTL of {ttl_seconds}s costs {estimate.amount} credits, {extra} more than "
                f"sandbox {sbx.sandbox_id} holds; account {account} has {available} available"
            )
        return extra

    def note_use(self, sandbox_id: str, kind: str) -> None:
        """Someone uses the sandbox (driven here): it is not idle."""
        sbx = self._sandboxes.get(sandbox_id)
        if sbx is not None:
            self.use.note(sbx, kind)

    async def _driven(self, sandbox_id: str) -> Sandbox:
        sbx = await self.driven_here(sandbox_id)
        if sbx is None:  # the bus forwards to the driving worker; it took it just now
            raise OwnerUnavailable(f"sandbox {sandbox_id} is driven by another worker")
        return sbx

    def _capable(self, sbx: Sandbox, capability: str) -> None:
        extension = sbx.view.extension if sbx.view is not None else ""
        if not self.extensions.get(extension).manifest.has(capability):
            raise NotCapable(f"extension {extension} has no {capability} capability")

    async def check_retry(self, sandbox_id: str, request: CreateRequest) -> None:
        """Raise IdempotencyMismatch if `request` is not the create recorded as
        `sandbox_id` (a client retrying must send the same request). Secret input
        values are never recorded, so only their names are compared."""
        live = self.sandboxes.get(sandbox_id)
        recorded = live.request if live is not None else None
        if recorded is None:
            for event in await self.store.read_aggregate(Aggregate("sandbox", sandbox_id)):
                if isinstance(event.event, SandboxRequested):
                    recorded = event.event
                    break
        if recorded is None:
            return  # not recorded yet: nothing to compare with
        profile = self.profiles.get(request.profile)
        secret_keys = set(profile.secret_inputs())
        inputs = profile.resolve_inputs(request.inputs)
        given: dict[str, object] = {
            "profile": profile.name,
            "account": request.account,
            "ttl_seconds": profile.resolve_ttl(request.ttl_seconds),
            "from_checkpoint": request.from_checkpoint,
            "labels": dict(request.labels),
        }
        was: dict[str, object] = {
            "profile": recorded.profile,
            "account": recorded.account,
            "ttl_seconds": recorded.ttl_seconds,
            "from_checkpoint": recorded.from_checkpoint.checkpoint_id
            if recorded.from_checkpoint
            else None,
            "labels": recorded.labels,
        }
        if recorded.pool is not None:
            # A warm pool member the key claimed: the create is what the claim recorded.
            claim = await self._claim_of(sandbox_id)
            given["Idempotency-Key"] = request.sandbox_id
            was["Idempotency-Key"] = claim.idempotency_id if claim is not None else None
            if claim is not None:
                was.update(account=claim.account, ttl_seconds=claim.ttl_seconds)
                was["labels"] = claim.labels
        for name in sorted(set(inputs) | set(recorded.inputs) | set(recorded.secret_inputs)):
            secret = name in secret_keys or name in recorded.secret_inputs
            given[f"inputs.{name}"] = (
                ("(secret)" if secret else inputs[name]) if name in inputs else None
            )
            if name in recorded.secret_inputs:
                was[f"inputs.{name}"] = "(secret)"
            else:
                was[f"inputs.{name}"] = recorded.inputs.get(name)
        for name, value in given.items():
            if was.get(name) != value:
                raise IdempotencyMismatch(sandbox_id, name, was.get(name), value)

    async def _claim_of(self, sandbox_id: str) -> SandboxClaimed | None:
        for event in await self.store.read_aggregate(Aggregate("sandbox", sandbox_id)):
            if isinstance(event.event, SandboxClaimed):
                return event.event
        return None

    def get(self, sandbox_id: str) -> Sandbox | None:
        return self._sandboxes.get(sandbox_id)

    @contextlib.asynccontextmanager
    async def exclusive(self, sandbox_id: str) -> AsyncIterator[None]:
        """Creating or adopting a sandbox, one request at a time per id: the others
        wait, then find the aggregate the first one attached."""
        while (pending := self._claims.get(sandbox_id)) is not None:
            await asyncio.shield(pending)
        claim = asyncio.get_running_loop().create_future()
        self._claims[sandbox_id] = claim
        try:
            yield
        finally:
            del self._claims[sandbox_id]
            claim.set_result(None)

    # ---- the aggregates and the one save path ------------------------------------

    def attach(self, sandbox_id: str, live: bool) -> Sandbox:
        sbx = Sandbox(sandbox_id)
        if live:
            sbx.on_enter = lambda state: self.entered(sbx, state)
        self.machine.attach(sbx)
        self._sandboxes[sandbox_id] = sbx
        return sbx

    def detach(self, sbx: Sandbox) -> None:
        self.machine.detach(sbx)

    def apply(self, sbx: Sandbox, seq: int, event: Event) -> None:
        """Fold the event into the aggregate, then fire the machine (whose on_enter hook
        may start the next step, which must see the new state)."""
        if not self.machine.allows(sbx, event):
            raise InvalidTransition(sbx.sandbox_id, sbx.state, type(event).__name__)
        if isinstance(event, SandboxRequested):
            sbx.request = event
        if isinstance(event, (CheckpointRequested, RestoreRequested)):
            sbx.pending_checkpoint = event.checkpoint_id
        before = sbx.view
        sbx.view = evolve(sbx.view, seq, event)
        sbx.version = seq
        sbx.last_event_id = event.event_id
        sbx.last_correlation_id = event.correlation_id
        self.machine.fire(sbx, event)
        if (
            sbx.on_enter is not None
            and before is not None
            and sbx.view is not None
            and before.expires_at != sbx.view.expires_at
        ):
            self.expiry.schedule(sbx)  # a TTL extension or a pool claim moved the end
        if isinstance(event, SandboxClaimed) and sbx.on_enter is not None:
            self.use.ensure(sbx)  # a claimed member's idle clock starts at the claim
        if (
            isinstance(event, BecameReady)
            and sbx.on_enter is not None
            and self.checkpoints.policy(sbx).on_ready
        ):
            meta = sbx.meta(ACTOR_CHECKPOINT_POLICY)
            self.spawn(
                self._checkpoint_quietly(sbx.sandbox_id, meta), f"checkpoint-{sbx.sandbox_id}"
            )

    async def record(
        self,
        sbx: Sandbox,
        build: Build,
        meta: EventMeta | None = None,
        *,
        event_id: str | None = None,
    ) -> int:
        """Append one event and apply it: `build` makes it from the envelope (taken
        under the aggregate's lock, so its causation is the event it follows), e.g.
        `lambda e: Provisioned(**e, handle=handle)`. Shielded: a cancelled caller must
        not leave an event in the stream that the in-memory aggregate has not seen."""
        task = asyncio.ensure_future(self._append_apply(sbx, build, meta, event_id))
        self.track(task)
        return await asyncio.shield(task)

    async def _append_apply(
        self,
        sbx: Sandbox,
        build: Build,
        meta: EventMeta | None,
        event_id: str | None,
    ) -> int:
        async with sbx.lock:
            event = build(envelope(sbx.sandbox_id, meta or sbx.meta(), event_id))
            event_type = type(event)
            if not self.machine.allows(sbx, event):
                raise InvalidTransition(sbx.sandbox_id, sbx.state, event_type.__name__)
            for attempt in range(1, APPEND_ATTEMPTS + 1):
                try:
                    (seq,) = await self.store.append([event], sbx.version)
                    break
                except ConcurrencyConflict:
                    raise
                except (TimeoutError, nats.errors.Error) as exc:
                    if attempt == APPEND_ATTEMPTS:
                        raise
                    log.warning(
                        "append %s for %s: %s; retrying", event_type.__name__, sbx.sandbox_id, exc
                    )
                    await asyncio.sleep(0.2 * attempt)
            # The runner's read models have the event before the aggregate applies it
            # (and the next step reads them): read your writes, one copy of each.
            await self.caught_up(seq)
            self.apply(sbx, seq, event)
            return seq

    async def record_step(
        self,
        sandbox_id: str,
        build: Build,
        meta: EventMeta | None = None,
        *,
        event_id: str | None = None,
    ) -> int:
        """Record the next event of a live sandbox through the one save path (for the
        steps other modules run: checkpoint and restore, a command's start and end)."""
        sbx = self._sandboxes.get(sandbox_id)
        if sbx is None:
            raise InvalidTransition(sandbox_id, "finished", "the step's event")
        return await self.record(sbx, build, meta, event_id=event_id)

    def step_context(self, sandbox_id: str) -> StepContext:
        """The context the sandbox's running step hands to its extension."""
        return self.steps.context(self._sandboxes[sandbox_id])

    def entered(self, sbx: Sandbox, state: str) -> None:
        if state in TERMINAL:
            if sbx.request is not None and sbx.view is not None and sbx.view.metered:
                # The settlement follows from the event that ended the sandbox.
                self.spawn(
                    self.settlement.settle(sbx.request, sbx.view, sbx.meta()),
                    f"settle-{sbx.sandbox_id}",
                )
            if sbx.view is not None:
                self.checkpoints.schedule_expiry(
                    sbx.sandbox_id, sbx.view.ended_at or utc_now(), self.checkpoints.policy(sbx)
                )
            self.finish(sbx)
        elif self.driver.runs_step(state):
            self.driver.ensure(sbx)
        elif state == State.READY:
            self.watch.ensure(sbx)
            self.use.ensure(sbx)

    def finish(self, sbx: Sandbox) -> None:
        sbx.stop_background()
        sbx.secrets.clear()
        if self._sandboxes.get(sbx.sandbox_id) is sbx:
            del self._sandboxes[sbx.sandbox_id]
            self.spawn(self.leases.release(sbx.sandbox_id), f"release-{sbx.sandbox_id}")
        self.machine.detach(sbx)

    async def _checkpoint_quietly(self, sandbox_id: str, meta: EventMeta) -> None:
        with contextlib.suppress(InvalidTransition):
            await self.checkpoints.request(sandbox_id, meta)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """A background task the manager waits for on close (settlements, retention)."""
        task = asyncio.create_task(coro, name=name)
        self.track(task)
        task.add_done_callback(log_failure)

    def track(self, task: asyncio.Task[Any]) -> None:
        """Wait for `task` on close."""
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    def _load(self, extension: str) -> dict[str, int]:
        """Sandboxes per host of one extension that still hold a place there."""
        load: dict[str, int] = {}
        views = [other.view for other in self._sandboxes.values()]
        for view in [*views, *self.foreign.values()]:  # other workers' sandboxes hold places too
            if view is not None and view.extension == extension and view.host is not None:
                if view.state not in TERMINAL:
                    load[view.host] = load.get(view.host, 0) + 1
        return load

    # ---- what the API reads --------------------------------------------------------

    def live(self) -> list[Sandbox]:
        return list(self._sandboxes.values())

    @staticmethod
    def runs_step(state: str) -> bool:
        """Whether a sandbox in `state` runs a step (which may show progress)."""
        return state in STEP_LABELS

    def progress(self, sandbox_id: str) -> StepProgress | None:
        """The step this worker runs for the sandbox now, if any (not the one a new
        state has just ended, whose driver has not moved on yet)."""
        sbx = self._sandboxes.get(sandbox_id)
        if sbx is None or sbx.step_name is None or sbx.step_started is None:
            return None
        if sbx.step_name != STEP_LABELS.get(sbx.state):
            return None
        return StepProgress(
            state=sbx.state, step=sbx.step_name, since=sbx.step_started, message=sbx.progress
        )

    # ---- several workers -----------------------------------------------------------

    async def driven_here(self, sandbox_id: str) -> Sandbox | None:
        """The sandbox if this worker drives it (adopting it first if its worker has
        gone); None if another live worker does. NotFound if nobody drives it."""
        return await self.cluster.driven_here(sandbox_id)

    async def sweep(self) -> list[str]:
        return await self.cluster.sweep()

    def abandon(self) -> None:
        self.cluster.abandon()
