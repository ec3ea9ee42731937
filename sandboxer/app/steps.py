"""The steps of a sandbox's lifecycle: route, reserve, provision, wait_ready and
teardown, each calling its extension hook under the manifest's policy (timeout,
retries, backoff) and recording the outcome through the one save path."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar, cast

import msgspec

from events import (
    BecameReady,
    CreditsHeld,
    Paused,
    PauseFailed,
    Provisioned,
    PublishedPort,
    Resumed,
    ResumeFailed,
    RouteChosen,
    SandboxRejected,
    SandboxRequested,
    ServiceState,
    TornDown,
)
from events.ledger import phase_event_id
from events.sandbox import RouteCandidate
from extensions import (
    Cost,
    ExtensionRegistry,
    LoadedExtension,
    Metered,
    Pausing,
    Placing,
    StepContext,
)
from extensions.manifest import HookPolicy
from projections.sandboxes import SandboxView
from sandboxer.app.checkpointing import Checkpoints
from sandboxer.app.ledger import LedgerBook
from sandboxer.app.lifecycle import State
from sandboxer.app.sandbox import (
    Sandbox,
    SandboxHost,
    redact,
    step_failed,
    teardown_failed,
)
from sandboxer.app.watch import report
from sandboxer.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")
Step = Callable[[Sandbox], Coroutine[Any, Any, None]]


class HookFailed(Exception):
    def __init__(self, hook: str, error: str, attempt: int) -> None:
        super().__init__(f"{hook} failed after {attempt} attempt(s): {error}")
        self.hook = hook
        self.error = error
        self.attempt = attempt


class Steps:
    def __init__(
        self,
        host: SandboxHost,
        extensions: ExtensionRegistry,
        checkpoints: Checkpoints,
        ledger: LedgerBook,
        load: Callable[[str], dict[str, int]],
        metrics: Metrics | None = None,
    ) -> None:
        self.host = host
        self.metrics = metrics or Metrics()  # each hook call's duration and outcome
        self.extensions = extensions
        self.checkpoints = checkpoints
        self.ledger = ledger
        self._load = load  # sandboxes per host of an extension, across workers
        # Awaited with the sandbox id before its teardown (exec, files, logs in flight
        # here are stopped and record their end while the sandbox can still take it).
        self.before_teardown: list[Callable[[str], Awaitable[None]]] = []
        self._placement_locks: dict[str, asyncio.Lock] = {}
        # Warm pools (sandboxer/app/pools.py): the places unclaimed members hold per
        # host of an extension, which an ordinary create may take when nothing else is
        # free; `evict` then destroys one member on that host. Set by the pool keeper.
        self.pool_load: Callable[[str], dict[str, int]] | None = None
        self.evict: Callable[[str, str], Coroutine[Any, Any, None]] | None = None
        self._evictions: set[asyncio.Task[None]] = set()
        self.by_state: dict[str, Step] = {
            State.REQUESTED: self.route,
            State.RESERVING: self.reserve,
            State.PROVISIONING: self.provision,
            State.STARTING: self.wait_ready,
            State.TEARING_DOWN: self.teardown,
            State.CHECKPOINTING: checkpoints.run_checkpoint,
            State.RESTORING: checkpoints.run_restore,
            State.PAUSING: self.pause,
            State.RESUMING: self.resume,
        }

    # ---- contexts and hooks ----------------------------------------------------------

    def context(self, sbx: Sandbox, extension: str | None = None) -> StepContext:
        assert sbx.request is not None and sbx.view is not None

        def progress(message: str) -> None:
            sbx.progress = message

        return self.context_for(
            sbx.request, sbx.view, sbx.secrets, extension or sbx.view.extension, progress
        )

    def context_for(
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

    async def call_hook(
        self,
        sbx: Sandbox,
        hook: str,
        call: Callable[[StepContext], Awaitable[T]],
        policy: HookPolicy,
        ctx: StepContext | None = None,
    ) -> T:
        ctx = ctx or self.context(sbx)
        attempts = policy.retries + 1
        started = time.perf_counter()
        for attempt in range(1, attempts + 1):
            try:
                async with asyncio.timeout(policy.timeout):
                    result = await call(ctx)
                self.metrics.step(hook, True, time.perf_counter() - started)
                return result
            except TimeoutError:
                error = f"timed out after {policy.timeout:g}s"
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            error = redact(error, sbx.secrets)
            if attempt == attempts:
                self.metrics.step(hook, False, time.perf_counter() - started)
                raise HookFailed(hook, error, attempt)
            log.warning("%s: %s attempt %d failed: %s", sbx.sandbox_id, hook, attempt, error)
            await asyncio.sleep(policy.backoff * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    async def estimate(self, sbx: Sandbox, loaded: LoadedExtension, ctx: StepContext) -> Cost:
        assert sbx.request is not None
        return await self.estimate_for(sbx, loaded, sbx.request.ttl_seconds, ctx)

    async def estimate_for(
        self,
        sbx: Sandbox,
        loaded: LoadedExtension,
        ttl: int,
        ctx: StepContext | None = None,
    ) -> Cost:
        """The extension's estimate for a TTL of `ttl` seconds."""
        metered = cast(Metered, loaded.adapter)
        return await self.call_hook(
            sbx,
            "estimate_cost",
            lambda c: metered.estimate_cost(c, ttl),
            loaded.manifest.hook("estimate_cost"),
            ctx,
        )

    # ---- the steps -------------------------------------------------------------------

    async def route(self, sbx: Sandbox) -> None:
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
            ctx = self.context(sbx, extension)
            why = (
                f"{request.profile} routes to {extension}"
                if request.route
                else f"{request.profile} names extension {extension}"
            )
            if loaded.manifest.metered:
                try:
                    cost = await self.estimate(sbx, loaded, ctx)
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
                    evicting = False
                    try:
                        placement = cast(Placing, loaded.adapter).place(ctx, self._load(extension))
                    except Exception as exc:
                        lent = self._lent_load(sbx, extension)
                        try:
                            if lent is None:
                                raise
                            placement = cast(Placing, loaded.adapter).place(ctx, lent)
                            evicting = True
                        except Exception:
                            passed.append(redact(f"{extension}: {exc}", sbx.secrets))
                            continue
                    await self._record_route(
                        sbx,
                        extension,
                        placement.host,
                        [*passed, why, placement.reason],
                        loaded.manifest.metered,
                    )
                    if evicting:
                        self._evict(extension, placement.host)
                    return
            await self._record_route(sbx, extension, host, [*passed, why], loaded.manifest.metered)
            return
        code = "no_capacity" if len(candidates) == 1 else "no_route"
        reason = passed[0] if len(candidates) == 1 else "no route: " + "; ".join(passed)
        await self.host.record(sbx, lambda e: SandboxRejected(**e, reason=reason, code=code))

    def _lent_load(self, sbx: Sandbox, extension: str) -> dict[str, int] | None:
        """The load without the places unclaimed pool members hold, for an ordinary
        create (None: there are none, or this is a member: members never evict)."""
        assert sbx.request is not None
        if self.pool_load is None or sbx.request.pool is not None or self.evict is None:
            return None
        held = self.pool_load(extension)
        if not held:
            return None
        load = self._load(extension)
        return {host: n - held.get(host, 0) for host, n in load.items()}

    def _evict(self, extension: str, host: str) -> None:
        assert self.evict is not None
        task = asyncio.create_task(self.evict(extension, host), name=f"pool-evict-{host}")
        self._evictions.add(task)
        task.add_done_callback(self._evictions.discard)

    async def _record_route(
        self, sbx: Sandbox, extension: str, host: str | None, reasons: list[str], metered: bool
    ) -> None:
        await self.host.record(
            sbx,
            lambda e: RouteChosen(
                **e, extension=extension, host=host, reason="; ".join(reasons), metered=metered
            ),
        )

    async def reserve(self, sbx: Sandbox) -> None:
        """Reserve the estimate on the account (two-phase: the ledger first, then the
        sandbox's CreditsHeld; recovery finishes a crash between the two)."""
        assert sbx.request is not None and sbx.view is not None
        request = sbx.request
        loaded = self.extensions.get(sbx.view.extension)
        try:
            cost = await self.estimate(sbx, loaded, self.context(sbx))
        except HookFailed as exc:
            await self.host.record(sbx, step_failed("reserve", exc.error, exc.attempt))
            return
        charge = await self.ledger.reserve(sbx.sandbox_id, request.account, cost, sbx.meta())
        # What the sandbox records next follows from the ledger's decision.
        decided = msgspec.structs.replace(
            sbx.meta(), causation_id=phase_event_id(sbx.sandbox_id, "reserve")
        )
        if charge.rejected:
            available = self.ledger.account(request.account).available
            await self.host.record(
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
        await self.host.record(
            sbx,
            lambda e: CreditsHeld(**e, account=request.account, amount=charge.reserved),
            decided,
        )

    async def provision(self, sbx: Sandbox) -> None:
        loaded = self.extensions.get(sbx.view.extension if sbx.view else "")
        source = sbx.request.from_checkpoint if sbx.request else None
        try:
            if source is not None:
                handle = await self.call_hook(
                    sbx,
                    "provision",
                    lambda _ctx: self.checkpoints.provision_clone(sbx, source),
                    loaded.manifest.hook("restore"),
                )
            else:
                handle = await self.call_hook(
                    sbx, "provision", loaded.adapter.provision, loaded.manifest.hook("provision")
                )
        except HookFailed as exc:
            await self.host.record(sbx, step_failed("provision", exc.error, exc.attempt))
            return
        await self.host.record(sbx, lambda e: Provisioned(**e, handle=dict(handle)))

    async def wait_ready(self, sbx: Sandbox) -> None:
        loaded = self.extensions.get(sbx.view.extension if sbx.view else "")
        handle = dict(sbx.view.handle) if sbx.view else {}

        async def call(
            ctx: StepContext,
        ) -> tuple[list[str], list[ServiceState], list[PublishedPort]]:
            services = await loaded.adapter.wait_ready(ctx, handle)
            # Ready includes knowing where its ports are: a validator reacting to
            # BecameReady finds them in the event.
            return (list(services), *await report(loaded, ctx, handle))

        try:
            services, states, endpoints = await self.call_hook(
                sbx, "wait_ready", call, loaded.manifest.hook("wait_ready")
            )
        except HookFailed as exc:
            await self.host.record(sbx, step_failed("wait_ready", exc.error, exc.attempt))
            return
        await self.host.record(
            sbx,
            lambda e: BecameReady(
                **e, services=services, service_states=states, endpoints=endpoints
            ),
        )

    async def teardown(self, sbx: Sandbox) -> None:
        for drain in self.before_teardown:  # commands running in it end first
            await drain(sbx.sandbox_id)
        loaded = self.extensions.get(sbx.view.extension if sbx.view else "")
        policy = loaded.manifest.hook("teardown")
        handle = dict(sbx.view.handle) if sbx.view and sbx.view.handle else None
        attempts = policy.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                await self.call_hook(
                    sbx,
                    "teardown",
                    lambda ctx: loaded.adapter.teardown(ctx, handle),
                    HookPolicy(timeout=policy.timeout, retries=0),
                )
            except HookFailed as exc:
                final = attempt == attempts
                await self.host.record(sbx, teardown_failed(exc.error, attempt, final))
                if final:
                    return
                await asyncio.sleep(policy.backoff * 2 ** (attempt - 1))
                continue
            await self.host.record(sbx, lambda e: TornDown(**e))
            return

    def pause_mode(self, sbx: Sandbox) -> str:
        """How the sandbox is held still: the mode of the pause on record (a resume
        undoes that one), else the profile's at create."""
        if sbx.view is not None and sbx.view.pause_mode is not None and sbx.state != State.PAUSING:
            return sbx.view.pause_mode
        policy = sbx.request.use_policy if sbx.request is not None else None
        return policy.pause_mode if policy is not None else "pause"

    async def pause(self, sbx: Sandbox) -> None:
        """Hold the sandbox still (its files and volumes stay); metering stops at Paused."""
        loaded = self.extensions.get(sbx.view.extension if sbx.view else "")
        handle = dict(sbx.view.handle) if sbx.view else {}
        mode = self.pause_mode(sbx)
        adapter = cast(Pausing, loaded.adapter)
        try:
            await self.call_hook(
                sbx,
                "pause",
                lambda ctx: adapter.pause(ctx, handle, mode),
                loaded.manifest.hook("pause"),
            )
        except HookFailed as exc:
            error = exc.error
            await self.host.record(sbx, lambda e: PauseFailed(**e, error=error))
            return
        await self.host.record(sbx, lambda e: Paused(**e, mode=mode))

    async def resume(self, sbx: Sandbox) -> None:
        """Let it run again; its services and published ports as they are after it."""
        loaded = self.extensions.get(sbx.view.extension if sbx.view else "")
        handle = dict(sbx.view.handle) if sbx.view else {}
        mode = self.pause_mode(sbx)
        adapter = cast(Pausing, loaded.adapter)

        async def call(ctx: StepContext) -> tuple[list[ServiceState], list[PublishedPort]]:
            await adapter.resume(ctx, handle, mode)
            return await report(loaded, ctx, handle)

        try:
            states, endpoints = await self.call_hook(
                sbx, "resume", call, loaded.manifest.hook("resume")
            )
        except HookFailed as exc:
            error = exc.error
            await self.host.record(sbx, lambda e: ResumeFailed(**e, error=error))
            return
        await self.host.record(
            sbx, lambda e: Resumed(**e, service_states=states, endpoints=endpoints)
        )
