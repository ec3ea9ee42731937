"""The manager: drives every live sandbox through its lifecycle, one asyncio task each.

Each step appends its outcome as an event before the next side effect; entering a
state (the transitions `on_enter` hook, live mode only) starts the driver for it.
The manager keeps no read model of its own: it reads the projection runner's (which
has every event the manager appends before the aggregate applies it). On start, once
the runner has caught up, it reads the aggregates of the unfinished sandboxes and
resumes them:

- requested, starting, tearing_down: resumed where they stopped (routing is pure,
  wait_ready only looks, teardown is idempotent);
- provisioning: we cannot know what a half-finished provision made, so recovery
  records `StepFailed` and tears down: the sandbox ends `failed`, nothing is left.

Several workers share one stream: each drives only the sandboxes it holds a lease on
(sandboxer/store/leases.py), follows the stream for the rest, and adopts a sandbox whose
worker has gone (the same recovery as a restart). Commands for a sandbox another
worker drives are forwarded to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import msgspec
import nats.errors

from events import (
    BecameReady,
    CheckpointFailed,
    CheckpointPolicy,
    CheckpointRequested,
    CreditsHeld,
    DestroyRequested,
    Event,
    EventMeta,
    Provisioned,
    RestoreFailed,
    RestoreRequested,
    RouteChosen,
    SandboxRejected,
    SandboxRequested,
    StepCancelled,
    StepFailed,
    TeardownFailed,
    TornDown,
)
from events.base import Envelope, envelope, utc_now
from events.ledger import phase_event_id
from events.sandbox import RouteCandidate
from events.subjects import SANDBOX_SUBJECTS, Aggregate
from extensions import (
    Cost,
    ExtensionRegistry,
    LoadedExtension,
    Metered,
    PathRefused,
    Placing,
    StepContext,
    confine_path,
)
from extensions.manifest import ConfigError, HookPolicy
from projections.sandboxes import SandboxView, evolve
from sandboxer.app.checkpointing import Checkpoints, NotCapable, UnknownCheckpoint
from sandboxer.app.failpoints import failpoint
from sandboxer.app.ledger import LedgerBook
from sandboxer.app.lifecycle import (
    TERMINAL,
    InvalidTransition,
    LifecycleModel,
    SandboxMachine,
    State,
)
from sandboxer.app.read_model import ProjectionRunner
from sandboxer.errors import Conflict, NotFoundError, SandboxerError, Unprocessable
from sandboxer.ids import check_account, new_sandbox_id
from sandboxer.profiles import ProfileCatalog, ProfileError
from sandboxer.store.event_store import ConcurrencyConflict, EventRecorder, RecordedEvent
from sandboxer.store.leases import Leases, OwnerUnavailable
from sandboxer.store.snapshots import SnapshotStore

log = logging.getLogger(__name__)

ACTOR_MANAGER = "system:manager"
ACTOR_RECOVERY = "system:recovery"
ACTOR_TTL = "system:ttl-reaper"
ACTOR_CHECKPOINT_POLICY = "system:checkpoint-policy"
APPEND_ATTEMPTS = 4
STEP_CRASH_RETRIES = 5
TTL_RETRY_SECONDS = 5.0
CATCH_UP_SECONDS = 30.0

T = TypeVar("T")
E = TypeVar("E", bound=Event)


class NotFound(NotFoundError, LookupError):
    """No such sandbox driven here (its id is the message)."""

    field = "id"
    wire = "not_found"

    @classmethod
    def from_wire(cls, answer: dict[str, Any]) -> SandboxerError:
        return cls(str(answer.get("message") or answer.get("sandbox_id", "")))


class AlreadyCreated(Conflict):
    """A create with the same idempotency key got there first (the API answers with it)."""

    field = "Idempotency-Key"

    def __init__(self, sandbox_id: str) -> None:
        super().__init__(f"sandbox {sandbox_id} exists already")
        self.sandbox_id = sandbox_id


class IdempotencyMismatch(Unprocessable):
    """A create reused an Idempotency-Key with another request than the recorded one."""

    code = "idempotency_mismatch"

    def __init__(self, sandbox_id: str, field: str, recorded: object, given: object) -> None:
        super().__init__(
            f"this Idempotency-Key created {sandbox_id} with {field}={_short(recorded)}; "
            f"this request has {field}={_short(given)}: use a new key for another sandbox"
        )
        self.sandbox_id = sandbox_id
        self.field = field


class HookFailed(Exception):
    def __init__(self, hook: str, error: str, attempt: int) -> None:
        super().__init__(f"{hook} failed after {attempt} attempt(s): {error}")
        self.hook = hook
        self.error = error
        self.attempt = attempt


@dataclass(frozen=True)
class CreateRequest:
    profile: str
    inputs: Mapping[str, str]
    ttl_seconds: int | None = None
    account: str = "default"
    from_checkpoint: str | None = None
    sandbox_id: str | None = None  # from an idempotency key; None: a fresh random id


@dataclass(frozen=True)
class StepProgress:
    """The step running for a sandbox here: in which state, since when, its last
    progress message (runtime only, never recorded)."""

    state: str
    step: str
    since: dt.datetime
    message: str | None = None


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


class Sandbox(LifecycleModel):
    """The aggregate: machine state plus the projection row folded from the same events."""

    def __init__(self, sandbox_id: str) -> None:
        self.sandbox_id = sandbox_id
        self.failing = False
        self.on_enter: Callable[[str], None] | None = None
        self.view: SandboxView | None = None
        self.request: SandboxRequested | None = None
        self.version = 0
        self.last_event_id: str | None = None
        self.last_correlation_id: str | None = None
        # Runtime only, never recorded:
        self.secrets: dict[str, str] = {}
        self.lock = asyncio.Lock()
        self.driver: asyncio.Task[None] | None = None
        self.step: asyncio.Task[None] | None = None
        self.step_name: str | None = None
        self.step_started: dt.datetime | None = None
        self.progress: str | None = None
        self.ttl_timer: asyncio.TimerHandle | None = None
        self.pending_checkpoint: str | None = None  # of the running checkpoint or restore

    def meta(self, actor: str = ACTOR_MANAGER) -> EventMeta:
        """The meta of a system step: it follows from the aggregate's last event, so it
        carries that event's id as causation and its correlation id (the request it
        answers: a DELETE's X-Request-Id for the teardown, not the create's)."""
        correlation = self.last_correlation_id or (self.view.correlation_id if self.view else "")
        return EventMeta(actor=actor, correlation_id=correlation, causation_id=self.last_event_id)


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
    ) -> None:
        self.store = store
        # The read models (sandboxes, checkpoints, ledger): the runner's, the one copy.
        # Its listeners tell the manager what other workers append.
        self.runner = runner
        self._early: list[RecordedEvent] | None = None  # seen while start() loads
        self.leases = leases
        self.checkpoints = Checkpoints(self, snapshots, spool_dir)
        self.ledger = LedgerBook(store, runner)
        self.starter_credits = starter_credits
        self.extensions = extensions
        self.profiles = profiles
        self.machine = SandboxMachine()
        self.sandboxes: dict[str, Sandbox] = {}
        # Unfinished sandboxes that other workers drive (a view of the runner's rows):
        self.foreign = Foreign(runner, self.sandboxes)
        # Metered sandboxes another worker finished, until their reservation is settled:
        self._ended_elsewhere: dict[str, float] = {}
        self._background: list[asyncio.Task[None]] = []
        self._steps: dict[str, Callable[[Sandbox], Coroutine[Any, Any, None]]] = {
            State.REQUESTED: self._route,
            State.RESERVING: self._reserve,
            State.PROVISIONING: self._provision,
            State.STARTING: self._wait_ready,
            State.TEARING_DOWN: self._teardown,
            State.CHECKPOINTING: self.checkpoints.run_checkpoint,
            State.RESTORING: self.checkpoints.run_restore,
        }
        self._inflight: set[asyncio.Task[Any]] = set()
        self._placement_locks: dict[str, asyncio.Lock] = {}
        # Sandbox ids being created or adopted right now: one at a time per id, so two
        # racing requests never attach two aggregates for one sandbox.
        self._claims: dict[str, asyncio.Future[None]] = {}
        self._closing = False

    # ---- start, stop -------------------------------------------------------------

    async def start(self) -> int:
        """Resume every sandbox that is not finished. Call after `runner.start()`: the
        runner's projection (caught up) names the unfinished sandboxes; only their
        aggregates are read, to rebuild their state machines."""
        # Listen before looking: what the runner applies from now on is either in the
        # projection as seen here (skipped by sequence) or observed after it.
        self._early = []
        self.runner.listeners.append(self._on_recorded)
        last = self.runner.last_seq
        alive: dict[str, str | None] = {}
        for key in list(self.runner.projection.unfinished):
            if not await self.leases.take_over(key, alive):
                continue  # another live worker drives it: in `foreign`
            sbx = self._attach(key, live=False)
            for recorded in await self.store.read_aggregate(Aggregate("sandbox", key)):
                if recorded.seq > sbx.version:
                    self._apply(sbx, recorded.seq, recorded.event)
            if sbx.view is None or sbx.state in TERMINAL:
                self._finish(sbx)  # finished meanwhile by the worker whose lease lapsed
        # Finished sandboxes that still keep artifacts: their retention runs out.
        checkpoints = self.runner.checkpoints.checkpoints.values()
        keeping = {c.sandbox_id for c in checkpoints if c.status == "created"}
        for key in sorted(keeping):
            view = self.runner.projection.get(key)
            if view is not None and view.state in TERMINAL:
                request = await self._requested(key)  # its retention policy
                policy = request.checkpoint_policy if request is not None else None
                self.checkpoints.schedule_expiry(
                    key, view.ended_at or view.updated_at, policy or CheckpointPolicy()
                )
        await self.ledger.ensure_starter_grant(
            self.starter_credits, EventMeta(actor=ACTOR_MANAGER, correlation_id="starter-grant")
        )
        for sbx in list(self.sandboxes.values()):
            await self._recover(sbx)
        # Finished sandboxes whose reservation is still open: a crash came between the
        # end and the debit. Settle them now, exactly once (deterministic event ids).
        for sandbox_id, charge in list(self.runner.ledger.charges.items()):
            if charge.settled or charge.rejected:
                continue
            view = self.runner.projection.get(sandbox_id)
            if view is None or view.state not in TERMINAL:
                continue
            await self._settle_finished(sandbox_id)
        early, self._early = self._early, None
        for recorded in early:
            if recorded.seq > last:
                self.observe(recorded.seq, recorded.subject, recorded.event)
        self._background = [
            asyncio.create_task(self._sweep_forever(), name="manager-sweep"),
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
        with contextlib.suppress(ValueError):
            self.runner.listeners.remove(self._on_recorded)
        self.checkpoints.close()
        for background in self._background:
            background.cancel()
        tasks: list[asyncio.Task[Any]] = [*self._background]
        for sbx in self.sandboxes.values():
            if sbx.ttl_timer:
                sbx.ttl_timer.cancel()
            if sbx.driver and not sbx.driver.done():
                sbx.driver.cancel()
                tasks.append(sbx.driver)
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
        for name in profile.path_inputs():
            if name in inputs:
                self._confine(name, inputs[name])
        ttl = profile.resolve_ttl(request.ttl_seconds)
        candidates = profile.candidates()
        try:
            for candidate in candidates:
                self.extensions.resolve_config(candidate.extension, candidate.config)
        except ConfigError as exc:
            raise ProfileError(f"{profile.name}: {exc}", "profile") from exc
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
        async with self._exclusive(sandbox_id):
            if sandbox_id in self.sandboxes or sandbox_id in self.foreign:
                raise AlreadyCreated(sandbox_id)
            if not await self.leases.claim_new(sandbox_id):
                # The key's lease exists: a create in flight elsewhere, or one whose worker
                # died (then the lease is ours to take, with what it recorded, if anything).
                if not await self.leases.take_over(sandbox_id):
                    raise AlreadyCreated(sandbox_id)
                if await self.store.read_aggregate(Aggregate("sandbox", sandbox_id)):
                    await self._adopt(sandbox_id)
                    raise AlreadyCreated(sandbox_id)
            sbx = self._attach(sandbox_id, live=True)
            sbx.secrets = {k: v for k, v in inputs.items() if k in secret_keys}
            recorded_inputs = {k: v for k, v in inputs.items() if k not in secret_keys}
            try:
                seq = await self._record(
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
                    ),
                    meta,
                    event_id=f"{sandbox_id}.requested" if request.sandbox_id else None,
                )
            except BaseException:
                self._finish(sbx)
                raise
            self._schedule_ttl(sbx)
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
            seq = await self._record(sbx, lambda e: DestroyRequested(**e, reason=reason), meta)
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
        }
        was: dict[str, object] = {
            "profile": recorded.profile,
            "account": recorded.account,
            "ttl_seconds": recorded.ttl_seconds,
            "from_checkpoint": recorded.from_checkpoint.checkpoint_id
            if recorded.from_checkpoint
            else None,
        }
        for name in sorted(set(inputs) | set(recorded.inputs) | set(recorded.secret_inputs)):
            secret = name in secret_keys or name in recorded.secret_inputs
            given[f"inputs.{name}"] = (
                ("(secret)" if secret else inputs[name]) if name in inputs else None
            )
            if name in recorded.secret_inputs:
                was[f"inputs.{name}"] = "(secret)"
            else:
                was[f"inputs.{name}"] = recorded.inputs.get(name)
        for field, value in given.items():
            if was.get(field) != value:
                raise IdempotencyMismatch(sandbox_id, field, was.get(field), value)

    def get(self, sandbox_id: str) -> Sandbox | None:
        return self.sandboxes.get(sandbox_id)

    @contextlib.asynccontextmanager
    async def _exclusive(self, sandbox_id: str) -> AsyncIterator[None]:
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

    # ---- recording ---------------------------------------------------------------

    def _attach(self, sandbox_id: str, live: bool) -> Sandbox:
        sbx = Sandbox(sandbox_id)
        if live:
            sbx.on_enter = lambda state: self._entered(sbx, state)
        self.machine.attach(sbx)
        self.sandboxes[sandbox_id] = sbx
        return sbx

    def _apply(self, sbx: Sandbox, seq: int, event: Event) -> None:
        """Fold the event into the aggregate, then fire the machine (whose on_enter hook
        may start the next step, which must see the new state)."""
        if not self.machine.allows(sbx, event):
            raise InvalidTransition(sbx.sandbox_id, sbx.state, type(event).__name__)
        if isinstance(event, SandboxRequested):
            sbx.request = event
        if isinstance(event, (CheckpointRequested, RestoreRequested)):
            sbx.pending_checkpoint = event.checkpoint_id
        sbx.view = evolve(sbx.view, seq, event)
        sbx.version = seq
        sbx.last_event_id = event.event_id
        sbx.last_correlation_id = event.correlation_id
        self.machine.fire(sbx, event)
        if (
            isinstance(event, BecameReady)
            and sbx.on_enter is not None
            and self.checkpoints.policy(sbx).on_ready
        ):
            meta = sbx.meta(ACTOR_CHECKPOINT_POLICY)
            self.spawn(
                self._checkpoint_quietly(sbx.sandbox_id, meta), f"checkpoint-{sbx.sandbox_id}"
            )

    async def _record(
        self,
        sbx: Sandbox,
        build: Callable[[Envelope], Event],
        meta: EventMeta | None = None,
        *,
        event_id: str | None = None,
    ) -> int:
        """Append one event and apply it: `build` makes it from the envelope (taken
        under the aggregate's lock, so its causation is the event it follows), e.g.
        `lambda e: Provisioned(**e, handle=handle)`. Shielded: a cancelled caller must
        not leave an event in the stream that the in-memory aggregate has not seen."""
        task = asyncio.ensure_future(self._append_apply(sbx, build, meta, event_id))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return await asyncio.shield(task)

    async def _append_apply(
        self,
        sbx: Sandbox,
        build: Callable[[Envelope], Event],
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
            self._apply(sbx, seq, event)
            return seq

    # ---- driving -----------------------------------------------------------------

    async def _checkpoint_quietly(self, sandbox_id: str, meta: EventMeta) -> None:
        with contextlib.suppress(InvalidTransition):
            await self.checkpoints.request(sandbox_id, meta)

    def _entered(self, sbx: Sandbox, state: str) -> None:
        if state in TERMINAL:
            if sbx.request is not None and sbx.view is not None and sbx.view.metered:
                # The settlement follows from the event that ended the sandbox.
                self.spawn(
                    self._settle(sbx.request, sbx.view, sbx.meta()), f"settle-{sbx.sandbox_id}"
                )
            if sbx.view is not None:
                self.checkpoints.schedule_expiry(
                    sbx.sandbox_id, sbx.view.ended_at or utc_now(), self.checkpoints.policy(sbx)
                )
            self._finish(sbx)
        elif state in self._steps:
            self._ensure_driver(sbx)

    def _ensure_driver(self, sbx: Sandbox) -> None:
        if self._closing:
            return
        if sbx.driver is None or sbx.driver.done():
            sbx.driver = asyncio.create_task(self._drive(sbx), name=f"drive-{sbx.sandbox_id}")

    def _finish(self, sbx: Sandbox) -> None:
        if sbx.ttl_timer:
            sbx.ttl_timer.cancel()
        sbx.secrets.clear()
        if self.sandboxes.get(sbx.sandbox_id) is sbx:
            del self.sandboxes[sbx.sandbox_id]
            self.spawn(self.leases.release(sbx.sandbox_id), f"release-{sbx.sandbox_id}")
        self.machine.detach(sbx)

    async def _drive(self, sbx: Sandbox) -> None:
        crashes = 0
        while sbx.state in self._steps and not self._closing:
            if not self.leases.valid():
                # Fenced: our session may have expired; another worker may drive it now.
                self.abandon()
                self.leases.reset()
                return
            name = sbx.state
            sbx.step_name = _step_label(name)
            sbx.step_started = utc_now()
            sbx.step = asyncio.create_task(self._steps[name](sbx))
            try:
                await sbx.step
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    sbx.step.cancel()
                    raise
                # Cancelled by destroy: say so, then go on to teardown.
                if sbx.state == State.TEARING_DOWN:
                    await self._record(
                        sbx,
                        step_cancelled(_step_label(name), "destroy requested"),
                    )
            except (InvalidTransition, ConcurrencyConflict) as exc:
                log.warning("%s: step %s superseded: %s", sbx.sandbox_id, name, exc)
                if sbx.state == name:
                    return
            except Exception as exc:
                # An outage longer than the store's own retries (a NATS node lost, say).
                crashes += 1
                if crashes > STEP_CRASH_RETRIES:
                    log.exception("%s: step %s crashed; left for recovery", sbx.sandbox_id, name)
                    return
                log.warning("%s: step %s crashed (%s); retrying", sbx.sandbox_id, name, exc)
                await asyncio.sleep(min(2.0**crashes, 30.0))
                if sbx.state == State.PROVISIONING == name:
                    # What a half-finished provision made is unknown: fail it and tear
                    # down (as recovery after a restart does), never provision twice.
                    await self._record(
                        sbx,
                        step_failed("provision", f"interrupted: {type(exc).__name__}: {exc}"[:500]),
                        sbx.meta(ACTOR_RECOVERY),
                    )
            else:
                crashes = 0
            finally:
                sbx.step = None
                sbx.step_name = None
                sbx.progress = None

    async def record_step(
        self,
        sandbox_id: str,
        build: Callable[[Envelope], Event],
        meta: EventMeta | None = None,
    ) -> int:
        """Record the next event of a live sandbox through the one save path (for the
        steps other modules run: checkpoint and restore)."""
        sbx = self.sandboxes.get(sandbox_id)
        if sbx is None:
            raise InvalidTransition(sandbox_id, "finished", "the step's event")
        return await self._record(sbx, build, meta)

    def step_context(self, sandbox_id: str) -> StepContext:
        """The context the sandbox's running step hands to its extension."""
        return self._context(self.sandboxes[sandbox_id])

    def _context(self, sbx: Sandbox, extension: str | None = None) -> StepContext:
        assert sbx.request is not None and sbx.view is not None

        def progress(message: str) -> None:
            sbx.progress = message

        return self._context_for(
            sbx.request, sbx.view, sbx.secrets, extension or sbx.view.extension, progress
        )

    def _context_for(
        self,
        request: SandboxRequested,
        view: SandboxView,
        secrets: Mapping[str, str],
        extension: str,
        progress: Callable[[str], None] | None = None,
    ) -> StepContext:
        loaded = self.extensions.get(extension)
        overrides = request.config
        for candidate in request.route:
            if candidate.extension == extension:
                overrides = candidate.config
                break
        return StepContext(
            sandbox_id=request.aggregate_id,
            profile=request.profile,
            inputs={**request.inputs, **secrets},
            config=loaded.config_for(overrides),
            host=view.host,
            progress=progress or (lambda _message: None),
        )

    async def _call_hook(
        self,
        sbx: Sandbox,
        hook: str,
        call: Callable[[StepContext], Awaitable[T]],
        policy: HookPolicy,
        ctx: StepContext | None = None,
    ) -> T:
        ctx = ctx or self._context(sbx)
        attempts = policy.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                async with asyncio.timeout(policy.timeout):
                    return await call(ctx)
            except TimeoutError:
                error = f"timed out after {policy.timeout:g}s"
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            error = _redact(error, sbx.secrets)
            if attempt == attempts:
                raise HookFailed(hook, error, attempt)
            log.warning("%s: %s attempt %d failed: %s", sbx.sandbox_id, hook, attempt, error)
            await asyncio.sleep(policy.backoff * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    async def _route(self, sbx: Sandbox) -> None:
        """Try the profile's candidates in order; record the choice and every reason."""
        assert sbx.request is not None and sbx.view is not None
        request = sbx.request
        candidates = request.route or [
            RouteCandidate(extension=request.extension, config=request.config)
        ]
        passed: list[str] = []
        for candidate in candidates:
            extension = candidate.extension
            loaded = self.extensions.get(extension)
            ctx = self._context(sbx, extension)
            why = (
                f"{request.profile} routes to {extension}"
                if request.route
                else f"{request.profile} names extension {extension}"
            )
            if loaded.manifest.metered:
                try:
                    cost = await self._estimate(sbx, loaded, ctx)
                except HookFailed as exc:
                    passed.append(f"{extension} refused: {exc.error}")
                    continue
                available = self.ledger.account(request.account).available
                if candidate.when == "credits_cover_estimate":
                    if available < cost.amount:
                        passed.append(
                            f"{extension}: account {request.account} has "
                            f"{available} credits, estimate is {cost.amount}"
                        )
                        continue
                    why += f" (credits {available} cover the estimate {cost.amount})"
            host = None
            if loaded.manifest.has("place"):
                lock = self._placement_locks.setdefault(extension, asyncio.Lock())
                async with lock:
                    try:
                        placement = cast(Placing, loaded.adapter).place(ctx, self._load(extension))
                    except Exception as exc:
                        passed.append(_redact(f"{extension}: {exc}", sbx.secrets))
                        continue
                    await self._record_route(
                        sbx,
                        extension,
                        placement.host,
                        [*passed, why, placement.reason],
                        loaded.manifest.metered,
                    )
                    return
            await self._record_route(sbx, extension, host, [*passed, why], loaded.manifest.metered)
            return
        code = "no_capacity" if len(candidates) == 1 else "no_route"
        reason = passed[0] if len(candidates) == 1 else "no route: " + "; ".join(passed)
        await self._record(sbx, lambda e: SandboxRejected(**e, reason=reason, code=code))

    async def _estimate(self, sbx: Sandbox, loaded: LoadedExtension, ctx: StepContext) -> Cost:
        assert sbx.request is not None
        ttl = sbx.request.ttl_seconds
        metered = cast(Metered, loaded.adapter)
        return await self._call_hook(
            sbx,
            "estimate_cost",
            lambda c: metered.estimate_cost(c, ttl),
            loaded.manifest.hook("estimate_cost"),
            ctx,
        )

    async def _record_route(
        self, sbx: Sandbox, extension: str, host: str | None, reasons: list[str], metered: bool
    ) -> None:
        await self._record(
            sbx,
            lambda e: RouteChosen(
                **e, extension=extension, host=host, reason="; ".join(reasons), metered=metered
            ),
        )

    async def _reserve(self, sbx: Sandbox) -> None:
        """Reserve the estimate on the account (two-phase: the ledger first, then the
        sandbox's CreditsHeld; recovery finishes a crash between the two)."""
        assert sbx.request is not None and sbx.view is not None
        request = sbx.request
        loaded = self.extensions.get(sbx.view.extension)
        try:
            cost = await self._estimate(sbx, loaded, self._context(sbx))
        except HookFailed as exc:
            await self._record(sbx, step_failed("reserve", exc.error, exc.attempt))
            return
        charge = await self.ledger.reserve(sbx.sandbox_id, request.account, cost, sbx.meta())
        # What the sandbox records next follows from the ledger's decision.
        decided = msgspec.structs.replace(
            sbx.meta(), causation_id=phase_event_id(sbx.sandbox_id, "reserve")
        )
        if charge.rejected:
            available = self.ledger.account(request.account).available
            await self._record(
                sbx,
                lambda e: SandboxRejected(
                    **e,
                    code="insufficient_credits",
                    reason=(
                        f"insufficient credits in account {request.account}: required "
                        f"{cost.amount}, available {available}"
                    ),
                ),
                decided,
            )
            return
        await self._record(
            sbx,
            lambda e: CreditsHeld(**e, account=request.account, amount=charge.reserved),
            decided,
        )

    async def _settle(self, request: SandboxRequested, view: SandboxView, meta: EventMeta) -> None:
        """After the end: debit the metered actual and release the rest, or release all
        when the sandbox never became ready. Deterministic from the recorded events.
        `meta` is that of the event that ended the sandbox (causation and correlation)."""
        failpoint("before-settle")
        charge = self.ledger.charge(view.id)
        if charge is None or charge.rejected or charge.settled:
            return
        meta = EventMeta(
            actor=ACTOR_MANAGER, correlation_id=meta.correlation_id, causation_id=meta.causation_id
        )
        debit: Cost | None = None
        if view.ready_at is not None and view.provisioned_at is not None:
            ended = view.ended_at or view.updated_at
            seconds = max((ended - view.provisioned_at).total_seconds(), 0.0)
            loaded = self.extensions.get(view.extension)
            ctx = self._context_for(request, view, {}, view.extension)
            policy = loaded.manifest.hook("meter_actual")
            async with asyncio.timeout(policy.timeout * (policy.retries + 1) + 5):
                debit = await cast(Metered, loaded.adapter).meter_actual(ctx, seconds)
        await self.ledger.settle(view.id, debit, meta)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """A background task the manager waits for on close (settlements, retention)."""
        task = asyncio.create_task(coro, name=name)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        task.add_done_callback(_log_failure)

    def _load(self, extension: str) -> dict[str, int]:
        """Sandboxes per host of one extension that still hold a place there."""
        load: dict[str, int] = {}
        views = [other.view for other in self.sandboxes.values()]
        for view in [*views, *self.foreign.values()]:  # other workers' sandboxes hold places too
            if view is not None and view.extension == extension and view.host is not None:
                if view.state not in TERMINAL:
                    load[view.host] = load.get(view.host, 0) + 1
        return load

    async def _provision(self, sbx: Sandbox) -> None:
        loaded = self.extensions.get(sbx.view.extension if sbx.view else "")
        source = sbx.request.from_checkpoint if sbx.request else None
        try:
            if source is not None:
                handle = await self._call_hook(
                    sbx,
                    "provision",
                    lambda _ctx: self.checkpoints.provision_clone(sbx, source),
                    loaded.manifest.hook("restore"),
                )
            else:
                handle = await self._call_hook(
                    sbx, "provision", loaded.adapter.provision, loaded.manifest.hook("provision")
                )
        except HookFailed as exc:
            await self._record(sbx, step_failed("provision", exc.error, exc.attempt))
            return
        await self._record(sbx, lambda e: Provisioned(**e, handle=dict(handle)))

    async def _wait_ready(self, sbx: Sandbox) -> None:
        loaded = self.extensions.get(sbx.view.extension if sbx.view else "")
        handle = dict(sbx.view.handle) if sbx.view else {}

        async def call(ctx: StepContext) -> list[str]:
            return await loaded.adapter.wait_ready(ctx, handle)

        try:
            services = await self._call_hook(
                sbx, "wait_ready", call, loaded.manifest.hook("wait_ready")
            )
        except HookFailed as exc:
            await self._record(sbx, step_failed("wait_ready", exc.error, exc.attempt))
            return
        await self._record(sbx, lambda e: BecameReady(**e, services=list(services)))

    async def _teardown(self, sbx: Sandbox) -> None:
        loaded = self.extensions.get(sbx.view.extension if sbx.view else "")
        policy = loaded.manifest.hook("teardown")
        handle = dict(sbx.view.handle) if sbx.view and sbx.view.handle else None
        attempts = policy.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                await self._call_hook(
                    sbx,
                    "teardown",
                    lambda ctx: loaded.adapter.teardown(ctx, handle),
                    HookPolicy(timeout=policy.timeout, retries=0),
                )
            except HookFailed as exc:
                final = attempt == attempts
                await self._record(sbx, teardown_failed(exc.error, attempt, final))
                if final:
                    return
                await asyncio.sleep(policy.backoff * 2 ** (attempt - 1))
                continue
            await self._record(sbx, lambda e: TornDown(**e))
            return

    # ---- TTL and recovery --------------------------------------------------------

    def _schedule_ttl(self, sbx: Sandbox) -> None:
        if sbx.view is None or sbx.state in TERMINAL:
            return
        delay = (sbx.view.expires_at - utc_now()).total_seconds()
        loop = asyncio.get_running_loop()
        sbx.ttl_timer = loop.call_later(max(delay, 0.0), self._expire, sbx.sandbox_id)

    def _expire(self, sandbox_id: str) -> None:
        sbx = self.sandboxes.get(sandbox_id)
        if sbx is None or sbx.state in TERMINAL or sbx.state == State.TEARING_DOWN:
            return
        task = asyncio.create_task(self._expire_now(sbx))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _expire_now(self, sbx: Sandbox) -> None:
        # The expiry follows from the create that set the TTL (and is of its request).
        request = sbx.request
        meta = (
            EventMeta(
                actor=ACTOR_TTL,
                correlation_id=request.correlation_id,
                causation_id=request.event_id,
            )
            if request is not None
            else sbx.meta(ACTOR_TTL)
        )
        try:
            await self.destroy(sbx.sandbox_id, meta, reason="ttl")
        except (InvalidTransition, NotFound):
            pass  # destroyed meanwhile, or driven by another worker now
        except Exception as exc:
            # Never leave an expired sandbox running: try again shortly.
            log.warning("%s: TTL destroy failed (%s); retrying", sbx.sandbox_id, exc)
            if not self._closing:
                loop = asyncio.get_running_loop()
                sbx.ttl_timer = loop.call_later(TTL_RETRY_SECONDS, self._expire, sbx.sandbox_id)

    async def _recover(self, sbx: Sandbox) -> None:
        sbx.on_enter = lambda state: self._entered(sbx, state)
        self._schedule_ttl(sbx)
        if sbx.state in (State.CHECKPOINTING, State.RESTORING) and sbx.pending_checkpoint:
            failed = CheckpointFailed if sbx.state == State.CHECKPOINTING else RestoreFailed
            checkpoint_id = sbx.pending_checkpoint
            await self._record(
                sbx,
                lambda e: failed(
                    **e,
                    checkpoint_id=checkpoint_id,
                    error="interrupted: the service stopped during the step",
                ),
                sbx.meta(ACTOR_RECOVERY),
            )
        elif sbx.state == State.PROVISIONING:
            await self._record(
                sbx,
                lambda e: StepFailed(
                    **e, step="provision", error="interrupted: the service stopped during provision"
                ),
                sbx.meta(ACTOR_RECOVERY),
            )
        elif sbx.state in self._steps:
            self._ensure_driver(sbx)

    def live(self) -> list[Sandbox]:
        return list(self.sandboxes.values())

    @staticmethod
    def runs_step(state: str) -> bool:
        """Whether a sandbox in `state` runs a step (which may show progress)."""
        return state in STEP_LABELS

    def progress(self, sandbox_id: str) -> StepProgress | None:
        """The step this worker runs for the sandbox now, if any (not the one a new
        state has just ended, whose driver has not moved on yet)."""
        sbx = self.sandboxes.get(sandbox_id)
        if sbx is None or sbx.step_name is None or sbx.step_started is None:
            return None
        if sbx.step_name != STEP_LABELS.get(sbx.state):
            return None
        return StepProgress(
            state=sbx.state, step=sbx.step_name, since=sbx.step_started, message=sbx.progress
        )

    # ---- several workers ---------------------------------------------------------

    async def driven_here(self, sandbox_id: str) -> Sandbox | None:
        """The sandbox if this worker drives it (adopting it first if its worker has
        gone); None if another live worker does. NotFound if nobody drives it."""
        sbx = self.sandboxes.get(sandbox_id)
        if sbx is not None:
            return sbx
        async with self._exclusive(sandbox_id):
            sbx = self.sandboxes.get(sandbox_id)
            if sbx is not None:
                return sbx  # a concurrent request adopted it while we waited
            if await self.leases.owner(sandbox_id) is not None:
                return None
            if not await self.leases.take_over(sandbox_id):
                return None  # another worker adopted it just now
            await self._adopt(sandbox_id)
        sbx = self.sandboxes.get(sandbox_id)
        if sbx is None:
            raise NotFound(sandbox_id)  # finished, or never existed
        return sbx

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
        if key in self.sandboxes:
            return  # ours: settled when it ends here
        view = self.runner.projection.get(key)
        if view is not None and view.metered and view.ended_by == event.event_id:
            self._ended_elsewhere[key] = asyncio.get_running_loop().time()

    async def _sweep_forever(self) -> None:
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
            if self._closing:
                break
            async with self._exclusive(key):
                if key in self.foreign and await self.leases.take_over(key, alive):
                    await self._adopt(key)
                    adopted.append(key)
        now = asyncio.get_running_loop().time()
        for key, ended in list(self._ended_elsewhere.items()):
            charge = self.ledger.charge(key)
            if charge is not None and (charge.settled or charge.rejected):
                del self._ended_elsewhere[key]
            elif now - ended > self.leases.ttl:
                del self._ended_elsewhere[key]
                await self._settle_finished(key)
        return adopted

    async def _adopt(self, sandbox_id: str) -> None:
        """Continue a sandbox from its last event, as a restart would. Callers hold
        `_exclusive(sandbox_id)`; the aggregate is attached only once its history is
        read, so no request ever acts on a half-loaded sandbox."""
        if sandbox_id in self.sandboxes:
            return
        records = await self.store.read_aggregate(Aggregate("sandbox", sandbox_id))
        sbx = self._attach(sandbox_id, live=False)
        for recorded in records:
            if recorded.seq > sbx.version:
                self._apply(sbx, recorded.seq, recorded.event)
        if sbx.request is not None:
            await self.ledger.refresh(sbx.request.account)
        if sbx.view is None or sbx.state in TERMINAL:
            self._finish(sbx)
            if sbx.view is not None and sbx.view.metered:
                await self._settle_finished(sandbox_id, seen=sbx.version)
            return
        await self._recover(sbx)

    async def _settle_finished(self, sandbox_id: str, seen: int = 0) -> None:
        """Settle a finished sandbox from the runner's view of it (after a crash, or one
        another worker finished); `_settle` itself does nothing twice. `seen`: a
        sequence of the sandbox the view must include first (read from its aggregate)."""
        if seen:
            await self.caught_up(seen)
        view = self.runner.projection.get(sandbox_id)
        if view is None or view.state not in TERMINAL or view.ended_by is None:
            return
        request = await self._requested(sandbox_id)
        if request is None:
            return
        await self.ledger.refresh(request.account)
        # The settlement follows from the event that ended the sandbox.
        meta = EventMeta(
            actor=ACTOR_MANAGER,
            correlation_id=view.ended_correlation_id or view.correlation_id,
            causation_id=view.ended_by,
        )
        self.spawn(self._settle(request, view, meta), f"settle-{sandbox_id}")

    async def _requested(self, sandbox_id: str) -> SandboxRequested | None:
        """The sandbox's recorded request (its configuration is not in the read model)."""
        records = await self.store.read_aggregate(Aggregate("sandbox", sandbox_id))
        for recorded in records:
            if isinstance(recorded.event, SandboxRequested):
                return recorded.event
        return None

    def abandon(self) -> None:
        """Stop driving everything (our session lapsed); the sweep takes back what no
        other worker took meanwhile."""
        for sbx in list(self.sandboxes.values()):
            if sbx.ttl_timer:
                sbx.ttl_timer.cancel()
            if sbx.driver is not None and not sbx.driver.done():
                sbx.driver.cancel()
            del self.sandboxes[sbx.sandbox_id]  # in `foreign` from now on
            self.machine.detach(sbx)


STEP_LABELS: dict[str, str] = {
    State.CHECKPOINTING: "checkpoint",
    State.RESTORING: "restore",
    State.REQUESTED: "route",
    State.RESERVING: "reserve",
    State.PROVISIONING: "provision",
    State.STARTING: "wait_ready",
    State.TEARING_DOWN: "teardown",
}


# Builders for events recorded from inside loops and except blocks: each binds its
# values when called, not when the event is built under the aggregate's lock.
def step_failed(step: str, error: str, attempt: int = 1) -> Callable[[Envelope], Event]:
    return lambda e: StepFailed(**e, step=step, error=error, attempt=attempt)


def step_cancelled(step: str, reason: str) -> Callable[[Envelope], Event]:
    return lambda e: StepCancelled(**e, step=step, reason=reason)


def teardown_failed(error: str, attempt: int, final: bool) -> Callable[[Envelope], Event]:
    return lambda e: TeardownFailed(**e, error=error, attempt=attempt, final=final)


def _step_label(state: str) -> str:
    return STEP_LABELS.get(state, state)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "%s failed; recovery retries it on the next start: %s",
            task.get_name(),
            task.exception(),
        )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _redact(text: str, secrets: Mapping[str, str]) -> str:
    for value in secrets.values():
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text
