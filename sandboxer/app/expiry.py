"""The TTL reaper: a timer per live sandbox that destroys it when its TTL ends, and
tries again shortly when that destroy fails (an expired sandbox never keeps running)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from events import EventMeta
from events.base import utc_now
from sandboxer.app.lifecycle import TERMINAL, InvalidTransition, State
from sandboxer.app.sandbox import ACTOR_TTL, NotFound, Sandbox, SandboxHost

log = logging.getLogger(__name__)

TTL_RETRY_SECONDS = 5.0

Destroy = Callable[[str, EventMeta, str], Awaitable[int]]


class Expiry:
    def __init__(self, host: SandboxHost, destroy: Destroy) -> None:
        self.host = host
        self.destroy = destroy

    def schedule(self, sbx: Sandbox) -> None:
        """(Re)arm the sandbox's timer for its view's `expires_at` (a TTL extension or
        a pool claim moves it)."""
        if sbx.ttl_timer is not None:
            sbx.ttl_timer.cancel()
            sbx.ttl_timer = None
        if sbx.view is None or sbx.state in TERMINAL:
            return
        delay = (sbx.view.expires_at - utc_now()).total_seconds()
        loop = asyncio.get_running_loop()
        sbx.ttl_timer = loop.call_later(max(delay, 0.0), self._expire, sbx.sandbox_id)

    def _expire(self, sandbox_id: str) -> None:
        sbx = self.host.sandboxes.get(sandbox_id)
        if sbx is None or sbx.state in TERMINAL or sbx.state == State.TEARING_DOWN:
            return
        self.host.track(asyncio.create_task(self._expire_now(sbx)))

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
            await self.destroy(sbx.sandbox_id, meta, "ttl")
        except (InvalidTransition, NotFound):
            pass  # destroyed meanwhile, or driven by another worker now
        except Exception as exc:
            # Never leave an expired sandbox running: try again shortly.
            log.warning("%s: TTL destroy failed (%s); retrying", sbx.sandbox_id, exc)
            if not self.host.closing:
                loop = asyncio.get_running_loop()
                sbx.ttl_timer = loop.call_later(TTL_RETRY_SECONDS, self._expire, sbx.sandbox_id)
