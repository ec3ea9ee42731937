"""The services' logs of a ready sandbox, as lines, followed if asked; nothing is
recorded (reading logs changes nothing)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from events import EventMeta
from extensions.sdk import CommandRefused
from sandboxer.app.access import BadUse, SandboxAccess, Stopped, Target
from sandboxer.app.commands import AnyCommand, NoteActivity, Outcome
from sandboxer.wire import LogLine

MAX_LINE = 64 * 1024  # a longer line is passed on in pieces of this many bytes
MAX_TAIL = 100_000
SendLine = Callable[[LogLine], Awaitable[None]]
Handle = Callable[[AnyCommand], Awaitable[Outcome]]
ACTOR_LOGS = "system:log-follower"
HEARTBEAT_MAX = 60.0  # seconds between a follower's "still reading" to the driving worker


class LineSplitter:
    """Cuts one service's stream into lines (a partial last line waits for its end,
    a line longer than MAX_LINE goes in pieces)."""

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        data = self.pending + data
        lines = data.split(b"\n")
        self.pending = lines.pop()
        while len(self.pending) > MAX_LINE:
            lines.append(self.pending[:MAX_LINE])
            self.pending = self.pending[MAX_LINE:]
        return lines

    def rest(self) -> list[bytes]:
        rest, self.pending = self.pending, b""
        return [rest] if rest else []


class LogReader:
    def __init__(self, access: SandboxAccess, handle: Handle | None = None) -> None:
        self.access = access
        self.handle = handle  # the bus's: a follower keeps its sandbox from going idle

    async def _heartbeat(self, target: Target) -> None:
        """While a follower reads, tell the driving worker (through the bus) every
        quarter of the idle timeout: following logs is use."""
        policy = await self.access.use_policy(target.view.id)
        if self.handle is None or policy is None or not policy.idle_timeout_seconds:
            return
        interval = min(policy.idle_timeout_seconds / 4, HEARTBEAT_MAX)
        meta = EventMeta(actor=ACTOR_LOGS, correlation_id=target.view.correlation_id)
        while True:
            with contextlib.suppress(Exception):
                await self.handle(NoteActivity(sandbox_id=target.view.id, kind="logs", meta=meta))
            await asyncio.sleep(interval)  # a heartbeat's period, not a wait on a condition

    async def prepare(self, sandbox_id: str, service: str | None) -> Target:
        """service None: every service of the sandbox."""
        return await self.access.target(sandbox_id, "logs", service, every=True)

    async def read(
        self,
        target: Target,
        send: SendLine,
        alive: Callable[[], bool],
        *,
        follow: bool,
        tail: int | None,
        since: float | None,
    ) -> str:
        """Pass every line on; the answer is how it ended: done, destroyed,
        disconnected."""
        splitters: dict[tuple[str, str], LineSplitter] = {}

        async def work(stop: Callable[[str], None]) -> None:
            async def on_output(service: str, stream: str, data: bytes) -> None:
                splitter = splitters.setdefault((service, stream), LineSplitter())
                for line in splitter.feed(data):
                    await emit(service, stream, line, stop)

            await target.adapter.logs(
                target.ctx,
                target.handle,
                service=target.service,
                follow=follow,
                tail=tail,
                since=since,
                on_output=on_output,
            )
            for (service, stream), splitter in splitters.items():
                for line in splitter.rest():
                    await emit(service, stream, line, stop)

        async def emit(service: str, stream: str, line: bytes, stop: Callable[[str], None]) -> None:
            try:
                await send(
                    LogLine(
                        service=service,
                        stream="stderr" if stream == "stderr" else "stdout",
                        line=line.decode("utf-8", errors="replace"),
                    )
                )
            except (ConnectionError, RuntimeError):
                stop("disconnected")

        heartbeat = asyncio.create_task(self._heartbeat(target)) if follow else None
        try:
            await self.access.inflight.run(target.view.id, work, alive)
        except Stopped as stopped:
            return stopped.outcome
        except CommandRefused as exc:
            raise BadUse(str(exc), "service") from None
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await heartbeat
        return "done"
