"""One asyncio task per live sandbox: runs the step of its state until the state has
none, records a step cancelled by a destroy, and retries a step that crashed on an
outage (never a half-finished provision: that one fails and tears down)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from events.base import utc_now
from sandboxer.app.lifecycle import InvalidTransition, State
from sandboxer.app.sandbox import (
    ACTOR_RECOVERY,
    Sandbox,
    SandboxHost,
    step_cancelled,
    step_failed,
    step_label,
)
from sandboxer.app.steps import Step
from sandboxer.store.event_store import ConcurrencyConflict
from sandboxer.store.leases import Leases

log = logging.getLogger(__name__)

STEP_CRASH_RETRIES = 5


class Driver:
    def __init__(
        self,
        host: SandboxHost,
        steps: Mapping[str, Step],
        leases: Leases,
        on_fenced: Callable[[], None],
    ) -> None:
        self.host = host
        self.steps = steps
        self.leases = leases
        self.on_fenced = on_fenced  # our session may have lapsed: stop driving everything

    def runs_step(self, state: str) -> bool:
        return state in self.steps

    def ensure(self, sbx: Sandbox) -> None:
        """Drive the sandbox unless a task does already (or the manager is closing)."""
        if self.host.closing:
            return
        if sbx.driver is None or sbx.driver.done():
            sbx.driver = asyncio.create_task(self._drive(sbx), name=f"drive-{sbx.sandbox_id}")

    async def _drive(self, sbx: Sandbox) -> None:
        crashes = 0
        while sbx.state in self.steps and not self.host.closing:
            if not self.leases.valid():
                # Fenced: our session may have expired; another worker may drive it now.
                self.on_fenced()
                self.leases.reset()
                return
            name = sbx.state
            sbx.step_name = step_label(name)
            sbx.step_started = utc_now()
            sbx.step = asyncio.create_task(self.steps[name](sbx))
            try:
                await sbx.step
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    sbx.step.cancel()
                    raise
                # Cancelled by destroy: say so, then go on to teardown.
                if sbx.state == State.TEARING_DOWN:
                    await self.host.record(
                        sbx,
                        step_cancelled(step_label(name), "destroy requested"),
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
                    await self.host.record(
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

    def cancel_all(self) -> list[asyncio.Task[None]]:
        """Cancel every running driver (and the watches beside them); the tasks to
        wait for."""
        tasks: list[asyncio.Task[None]] = []
        for sbx in self.host.sandboxes.values():
            for watch in (sbx.watcher, sbx.idle_watch):
                if watch is not None and not watch.done():
                    tasks.append(watch)
            sbx.stop_background()
            if sbx.driver and not sbx.driver.done():
                sbx.driver.cancel()
                tasks.append(sbx.driver)
        return tasks
