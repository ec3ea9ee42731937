"""What exec, files and logs share: the ready sandbox a caller may use, its adapter
and step context, and the calls in flight that a destroy of the sandbox stops.

These calls run on the worker the caller reached, whichever worker drives the
sandbox: the adapter is reached with the recorded handle, and what is recorded goes
through the bus to the driving worker (`StartCommand`, `FinishCommand`,
`RecordFileTransfer`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from events import DestroyRequested, PauseRequested, SandboxRequested, UsePolicy
from events.lifecycle import State
from events.subjects import Aggregate
from extensions import ExtensionRegistry, Handle, StepContext
from extensions.manifest import HookPolicy
from projections.sandboxes import SandboxView
from sandboxer.app.read_model import ProjectionRunner
from sandboxer.app.sandbox import NotCapable
from sandboxer.app.steps import Steps
from sandboxer.errors import Conflict, InvalidInput, NotFoundError
from sandboxer.store.event_store import EventRecorder, RecordedEvent

# The states in which a sandbox's containers answer commands and copies.
USABLE = (State.READY,)
REQUESTS_CACHED = 256  # SandboxRequested of sandboxes other workers drive, by id
DRAIN_SECONDS = 10.0  # the longest a teardown waits for the calls it stops
CALLER_POLL = 0.25  # seconds between looks at whether a streaming caller is still there
T = TypeVar("T")


class NotReady(Conflict):
    """The sandbox is not ready (HTTP 409 naming its state)."""

    code = "not_ready"
    field = "state"


class SandboxMissing(NotFoundError):
    field = "id"


class BadUse(InvalidInput):
    """A request that does not fit the sandbox (HTTP 400 naming the field)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class Stopped(Exception):
    """Why a call in flight was stopped from outside (the sandbox was destroyed, the
    caller went away): the reason is the outcome recorded."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


@dataclass(frozen=True)
class Target:
    """A ready sandbox and how to reach it for one capability."""

    view: SandboxView
    adapter: Any
    ctx: StepContext
    handle: Handle
    policy: HookPolicy
    service: str | None


class InFlight:
    """The calls running against each sandbox, each in a task of its own, so that a
    destroy (seen in the stream, whichever worker recorded it) or the caller going
    away stops them. `run` raises `Stopped` with the reason."""

    def __init__(self) -> None:
        self._calls: dict[str, set[_Call]] = {}
        self._busy: dict[str, int] = {}
        self._idle: dict[str, asyncio.Event] = {}

    async def run(
        self,
        sandbox_id: str,
        work: Callable[[Callable[[str], None]], Coroutine[Any, Any, T]],
        alive: Callable[[], bool] | None = None,
    ) -> T:
        """`await work(stop)` in its own task; `stop(reason)` (also handed to `work`,
        e.g. for a write that failed) cancels it. The caller's own cancellation
        cancels it too and waits for it."""
        call = _Call()
        job = asyncio.ensure_future(work(call.stop))
        call.job = job
        calls = self._calls.setdefault(sandbox_id, set())
        calls.add(call)
        watcher = None if alive is None else asyncio.create_task(_watch(alive, call))
        try:
            try:
                return await asyncio.shield(job)
            except asyncio.CancelledError:
                if job.cancelled() and call.reason is not None:
                    raise Stopped(call.reason) from None
                if not job.done():  # the caller itself was cancelled
                    call.stop("disconnected")
                    await asyncio.wait([job])
                raise
        finally:
            if watcher is not None:
                watcher.cancel()
            calls.discard(call)
            if not calls:
                self._calls.pop(sandbox_id, None)

    def stop(self, sandbox_id: str, outcome: str) -> int:
        calls = list(self._calls.get(sandbox_id, ()))
        for call in calls:
            call.stop(outcome)
        return len(calls)

    @contextlib.asynccontextmanager
    async def busy(self, sandbox_id: str) -> AsyncIterator[None]:
        """Around a whole call, its record of how it ended included: what `drain`
        waits for."""
        self._busy[sandbox_id] = self._busy.get(sandbox_id, 0) + 1
        try:
            yield
        finally:
            self._busy[sandbox_id] -= 1
            if not self._busy[sandbox_id]:
                del self._busy[sandbox_id]
                idle = self._idle.pop(sandbox_id, None)
                if idle is not None:
                    idle.set()

    async def drain(self, sandbox_id: str, timeout: float = DRAIN_SECONDS) -> None:
        """Stop the sandbox's calls and wait (a bounded time) until they are over."""
        self.stop(sandbox_id, "destroyed")
        if sandbox_id in self._busy:
            idle = self._idle.setdefault(sandbox_id, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(idle.wait(), timeout)

    def on_event(self, recorded: RecordedEvent) -> None:
        """A runner listener: a destroy or a pause stops every call to the sandbox (a
        paused container answers nothing until it resumes)."""
        if isinstance(recorded.event, DestroyRequested):
            self.stop(recorded.event.aggregate_id, "destroyed")
        elif isinstance(recorded.event, PauseRequested):
            self.stop(recorded.event.aggregate_id, "paused")


class _Call:
    def __init__(self) -> None:
        self.reason: str | None = None
        self.job: asyncio.Future[Any] | None = None

    def stop(self, outcome: str) -> None:
        if self.reason is None and self.job is not None and not self.job.done():
            self.reason = outcome
            self.job.cancel()


async def _watch(alive: Callable[[], bool], call: _Call) -> None:
    """Polls whether the caller is still connected (a command that prints nothing
    would otherwise never notice it left)."""
    # aiohttp tells a handler of a lost connection only by a failed write.
    while alive():  # noqa: ASYNC110
        await asyncio.sleep(CALLER_POLL)
    call.stop("disconnected")


class SandboxAccess:
    def __init__(
        self,
        runner: ProjectionRunner,
        store: EventRecorder,
        extensions: ExtensionRegistry,
        steps: Steps,
        live: Any,  # the manager: its driven aggregates hold the request and secrets
    ) -> None:
        self.runner = runner
        self.store = store
        self.extensions = extensions
        self.steps = steps
        self.live = live
        self.inflight = InFlight()
        runner.listeners.append(self.inflight.on_event)
        self._requests: OrderedDict[str, SandboxRequested] = OrderedDict()

    def view(self, sandbox_id: str) -> SandboxView:
        view = self.runner.projection.get(sandbox_id)
        if view is None:
            raise SandboxMissing(f"no sandbox {sandbox_id!r}")
        return view

    def check(self, sandbox_id: str, capability: str) -> tuple[SandboxView, Any]:
        """The view and the loaded extension, if the sandbox is ready and its extension
        has `capability`."""
        view = self.view(sandbox_id)
        if view.state not in USABLE:
            raise NotReady(f"sandbox {sandbox_id} is {view.state}; {capability} needs it ready")
        loaded = self.extensions.get(view.extension)
        if not loaded.manifest.has(capability):
            raise NotCapable(f"extension {view.extension} has no {capability} capability")
        return view, loaded

    @staticmethod
    def service(view: SandboxView, asked: str | None, watched: bool = True) -> str | None:
        """The service a call runs in: the one asked for (one of the sandbox's), else
        its only service; None for a sandbox without services (its workspace).
        `watched`: the extension reports services (the `services` capability); what
        another one's wait_ready names is no service, and `asked` goes to it as is."""
        if not watched:
            return asked
        if asked is not None:
            if view.services and asked not in view.services:
                raise BadUse(
                    f"no service {asked!r} in sandbox {view.id}; "
                    f"its services: {', '.join(view.services)}",
                    "service",
                )
            return asked
        if len(view.services) == 1:
            return view.services[0]
        if view.services:
            raise BadUse(
                f"sandbox {view.id} has several services; name one: {', '.join(view.services)}",
                "service",
            )
        return None

    async def target(
        self, sandbox_id: str, capability: str, service: str | None, *, every: bool = False
    ) -> Target:
        """`every`: service None stands for all of the sandbox's services (logs)."""
        view, loaded = self.check(sandbox_id, capability)
        watched = loaded.manifest.has("services")
        chosen = None if every and service is None else self.service(view, service, watched)
        request, secrets = await self._request(sandbox_id)
        ctx = self.steps.context_for(request, view, secrets, view.extension)
        return Target(
            view=view,
            adapter=loaded.adapter,
            ctx=ctx,
            handle=dict(view.handle),
            policy=loaded.manifest.hook(capability),
            service=chosen,
        )

    async def use_policy(self, sandbox_id: str) -> UsePolicy | None:
        """The sandbox's idle timeout and pause mode, as recorded at create."""
        request, _secrets = await self._request(sandbox_id)
        return request.use_policy

    async def _request(self, sandbox_id: str) -> tuple[SandboxRequested, dict[str, str]]:
        sbx = self.live.get(sandbox_id)
        if sbx is not None and sbx.request is not None:
            return sbx.request, dict(sbx.secrets)
        cached = self._requests.get(sandbox_id)
        if cached is not None:
            self._requests.move_to_end(sandbox_id)
            return cached, {}
        for recorded in await self.store.read_aggregate(Aggregate("sandbox", sandbox_id)):
            if isinstance(recorded.event, SandboxRequested):
                self._requests[sandbox_id] = recorded.event
                while len(self._requests) > REQUESTS_CACHED:
                    self._requests.popitem(last=False)
                return recorded.event, {}
        raise SandboxMissing(f"no sandbox {sandbox_id!r}")
