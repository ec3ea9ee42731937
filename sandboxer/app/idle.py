"""Use and idleness of the sandboxes this worker drives (a profile's
`idle_timeout_seconds`).

Use is seen on the driving worker: a command's start and end and a file transfer
are recorded here anyway; a log follower's heartbeat and a keepalive arrive as
`NoteActivity` through the bus; the backend's own counters (the `activity`
capability: compose containers' CPU time and network bytes) are sampled by the
idle watch. Use is noted in memory at once and recorded sparingly: an
`ActivitySeen` at most every quarter of the idle timeout, never one per call.

A sandbox that sees no use for its idle timeout (and runs no command) is destroyed
with reason `idle`, or paused with `on_idle: pause`. The idle clock starts when the
sandbox becomes ready on this worker (at ready, after a resume, after a claim, after
this worker started or took it over): a restart never ends a sandbox early. An
unclaimed warm pool member is never idle: it waits to be claimed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import cast

from events import ActivitySeen, EventMeta, UsePolicy
from events.base import utc_now
from extensions import ActivityCounting, ExtensionRegistry, StepContext
from sandboxer.app.lifecycle import InvalidTransition, State
from sandboxer.app.sandbox import ACTOR_IDLE, Sandbox, SandboxHost, still_driven
from sandboxer.store.event_store import ConcurrencyConflict

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 30.0  # the longest between two looks at the backend's counters
MIN_TICK = 0.25

Act = Callable[[str, EventMeta, str], Awaitable[int]]


def use_policy(sbx: Sandbox) -> UsePolicy:
    request = sbx.request
    if request is None or request.use_policy is None:
        return UsePolicy()
    return request.use_policy


def idle_timeout(sbx: Sandbox) -> float | None:
    """Seconds without use after which the sandbox is idle (None: never)."""
    view = sbx.view
    if view is not None and view.pool is not None and view.claimed_at is None:
        return None  # a warm pool member waits to be claimed
    seconds = use_policy(sbx).idle_timeout_seconds
    return float(seconds) if seconds else None


def record_period(sbx: Sandbox) -> float:
    """The least time between two ActivitySeen of the sandbox."""
    timeout = idle_timeout(sbx)
    return timeout / 4 if timeout else 0.0


class UseWatch:
    def __init__(
        self,
        host: SandboxHost,
        extensions: ExtensionRegistry,
        context: Callable[[Sandbox], StepContext],
        destroy: Act,
        pause: Act,
    ) -> None:
        self.host = host
        self.extensions = extensions
        self.context = context
        self.destroy = destroy
        self.pause = pause

    # ---- use -------------------------------------------------------------------------

    def note(self, sbx: Sandbox, kind: str) -> None:
        """Someone used the sandbox just now (`kind`: exec, files, logs, keepalive,
        backend). Recorded later, or now if the last record is a quarter timeout old."""
        if idle_timeout(sbx) is None:
            return
        now = asyncio.get_running_loop().time()
        sbx.last_used = now
        sbx.unrecorded_use.add(kind)
        if now - sbx.use_recorded >= record_period(sbx):
            sbx.use_recorded = now
            self.host.spawn(self._record(sbx), f"activity-{sbx.sandbox_id}")

    async def _record(self, sbx: Sandbox) -> None:
        kinds = sorted(sbx.unrecorded_use)
        if not kinds or sbx.state not in (State.READY, State.CHECKPOINTING, State.RESTORING):
            return
        sbx.unrecorded_use.clear()
        last_at = utc_now()
        try:
            await self.host.record(
                sbx,
                lambda e: ActivitySeen(**e, kinds=kinds, last_at=last_at),
                sbx.meta(ACTOR_IDLE),
            )
        except (InvalidTransition, ConcurrencyConflict):
            pass  # the sandbox moved on meanwhile (a pause, a destroy)

    # ---- the watch -------------------------------------------------------------------

    def ensure(self, sbx: Sandbox) -> None:
        """The sandbox is ready (again) here: its idle clock starts now; watch it
        (once) if it has an idle timeout."""
        if self.host.closing or sbx.view is None or idle_timeout(sbx) is None:
            return
        sbx.last_used = asyncio.get_running_loop().time()
        if sbx.idle_watch is None or sbx.idle_watch.done():
            sbx.idle_watch = asyncio.create_task(self._watch(sbx), name=f"idle-{sbx.sandbox_id}")

    def _watching(self, sbx: Sandbox) -> bool:
        return still_driven(self.host, sbx)

    async def _watch(self, sbx: Sandbox) -> None:
        assert sbx.view is not None
        loaded = self.extensions.get(sbx.view.extension)
        counting = loaded.manifest.has("activity")
        policy = loaded.manifest.hook("activity") if counting else None
        ctx = self.context(sbx)
        noise = int(ctx.config.get("activity_noise", 0))  # a move this small is not use
        loop = asyncio.get_running_loop()
        counters: dict[str, int] | None = None
        while self._watching(sbx):
            timeout = idle_timeout(sbx)
            if timeout is None:
                return
            tick = min(timeout / 4, SAMPLE_SECONDS)
            left = sbx.last_used + timeout - loop.time()
            await asyncio.sleep(max(min(tick, left), MIN_TICK))  # the next look, or the deadline
            if not self._watching(sbx) or sbx.view is None:
                return
            if sbx.state != State.READY:
                counters = None  # paused, checkpointing: the clock restarts at ready
                continue
            if any(c.finished_at is None for c in sbx.view.commands):
                self.note(sbx, "exec")  # a command still running is use
            if counting and policy is not None:
                try:
                    async with asyncio.timeout(policy.timeout):
                        sample = await cast(ActivityCounting, loaded.adapter).activity(
                            ctx, dict(sbx.view.handle)
                        )
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("%s: activity: %s: %s", sbx.sandbox_id, type(exc).__name__, exc)
                else:
                    if counters is not None and moved(counters, sample, noise):
                        self.note(sbx, "backend")
                    counters = sample
            now = loop.time()
            if sbx.unrecorded_use and now - sbx.use_recorded >= record_period(sbx):
                sbx.use_recorded = now
                await self._record(sbx)
            if now - sbx.last_used >= timeout and sbx.state == State.READY:
                await self._idle(sbx, timeout)
                return

    async def _idle(self, sbx: Sandbox, timeout: float) -> None:
        action = self.pause if use_policy(sbx).on_idle == "pause" else self.destroy
        log.info("%s: idle for %gs: %s", sbx.sandbox_id, timeout, use_policy(sbx).on_idle)
        try:
            await action(sbx.sandbox_id, sbx.meta(ACTOR_IDLE), "idle")
        except (InvalidTransition, ConcurrencyConflict):
            pass  # used, destroyed or paused meanwhile


def moved(before: dict[str, int], now: dict[str, int], noise: int = 0) -> bool:
    """Whether a counter present in both samples moved by more than `noise` (the
    extension's `activity_noise`: what an idle backend's counters drift by); one that
    appeared or disappeared, a container started or removed, is not use by itself."""
    return any(name in before and abs(value - before[name]) > noise for name, value in now.items())
