"""exec: one command in a ready sandbox, its output streamed to the caller as it comes,
its start and end recorded (`CommandStarted`, `CommandFinished`: byte counts and
digests, never the output).

The output is handed on chunk by chunk and awaited, so a slow caller slows the
command instead of filling memory. A caller that goes away, a timeout, or a destroy
of the sandbox stops the remote process (the adapter's duty) and is the outcome.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from events import EventMeta
from extensions.sdk import ENV_NAME_RE, CommandResult, ExtensionError
from sandboxer.app.access import BadUse, SandboxAccess, Stopped, Target
from sandboxer.app.commands import AnyCommand, FinishCommand, Outcome, StartCommand
from sandboxer.errors import SandboxerError
from sandboxer.ids import new_command_id
from sandboxer.wire import ExecBody, ExecExit, ExecFrame, ExecStarted, ExecStderr, ExecStdout

log = logging.getLogger(__name__)

SendFrame = Callable[[ExecFrame], Awaitable[None]]
Handle = Callable[[AnyCommand], Awaitable[Outcome]]
Alive = Callable[[], bool]
FRAME_BYTES = 32 * 1024  # the most output one frame carries (a JSON line stays < 200 KiB)
STOPPED = {
    "destroyed": "the sandbox was destroyed",
    "paused": "the sandbox was paused",
    "disconnected": "the caller went away",
}


class StreamDigest:
    """Counts and hashes every byte of one stream, and cuts it into frames whose text
    is whole UTF-8 (a character split across chunks waits for its rest; bytes that
    are no UTF-8 go as base64)."""

    def __init__(self) -> None:
        self.size = 0
        self.sha = hashlib.sha256()
        self.pending = b""

    def add(self, data: bytes) -> tuple[str, str | None]:
        """(text, None), or ("", base64) for bytes that are not UTF-8."""
        self.size += len(data)
        self.sha.update(data)
        data = self.pending + data
        self.pending = b""
        try:
            return data.decode("utf-8"), None
        except UnicodeDecodeError as exc:
            if exc.reason == "unexpected end of data" and len(data) - exc.start < 4:
                self.pending = data[exc.start :]
                return data[: exc.start].decode("utf-8"), None
            return "", base64.b64encode(data).decode("ascii")

    def rest(self) -> bytes:
        rest, self.pending = self.pending, b""
        return rest


@dataclass(frozen=True)
class PreparedCommand:
    target: Target
    command_id: str
    argv: list[str]  # as recorded: empty for a shell script
    shell: str | None
    env: dict[str, str]
    workdir: str | None
    timeout: float

    @property
    def run_argv(self) -> list[str]:
        """What the adapter runs: the argv, or the script under `sh -c`."""
        return self.argv or ["sh", "-c", str(self.shell)]


class CommandRunner:
    def __init__(self, access: SandboxAccess, handle: Handle) -> None:
        self.access = access
        self.handle = handle

    async def prepare(self, sandbox_id: str, body: ExecBody) -> PreparedCommand:
        """Every check that can fail before anything runs or is recorded."""
        if (body.argv is None) == (body.shell is None):
            raise BadUse("give exactly one of argv (a list) and shell (a script)", "argv")
        if any("\x00" in a for a in body.argv or [str(body.shell)]):
            raise BadUse("argv contains a NUL byte", "shell" if body.shell else "argv")
        for name, value in body.env.items():
            if not ENV_NAME_RE.fullmatch(name):
                raise BadUse(f"env name {name[:64]!r} must match {ENV_NAME_RE.pattern}", "env")
            if "\x00" in value:
                raise BadUse(f"env {name} contains a NUL byte", f"env.{name}")
        if body.workdir is not None and "\x00" in body.workdir:
            raise BadUse("workdir contains a NUL byte", "workdir")
        target = await self.access.target(sandbox_id, "exec", body.service)
        return PreparedCommand(
            target=target,
            command_id=new_command_id(),
            argv=body.argv or [],
            shell=body.shell,
            env=dict(body.env),
            workdir=body.workdir,
            timeout=min(body.timeout_seconds, target.policy.timeout),
        )

    async def start(self, command: PreparedCommand, meta: EventMeta) -> int:
        """Record `CommandStarted` (on the sandbox's worker); its stream sequence."""
        target = command.target
        started = await self.handle(
            StartCommand(
                sandbox_id=target.view.id,
                command_id=command.command_id,
                argv=command.argv,
                shell=command.shell,
                service=target.service,
                workdir=command.workdir,
                env_names=sorted(command.env),
                timeout_seconds=command.timeout,
                meta=meta,
            )
        )
        return started.seq

    async def run(
        self,
        command: PreparedCommand,
        started_seq: int,
        meta: EventMeta,
        send: SendFrame,
        alive: Alive,
    ) -> ExecExit:
        """Run the started command and stream it, record the end; the exit frame is
        sent last (and returned). A caller that is gone gets nothing more, but the end
        is still recorded."""
        async with self.access.inflight.busy(command.target.view.id):
            return await self._run(command, started_seq, meta, send, alive)

    async def _run(
        self,
        command: PreparedCommand,
        started_seq: int,
        meta: EventMeta,
        send: SendFrame,
        alive: Alive,
    ) -> ExecExit:
        target = command.target
        sandbox_id = target.view.id
        digests = {"stdout": StreamDigest(), "stderr": StreamDigest()}

        async def work(stop: Callable[[str], None]) -> CommandResult:
            gone = False

            async def deliver(frame: ExecFrame) -> None:
                nonlocal gone
                if gone:
                    return
                try:
                    await send(frame)
                except (ConnectionError, RuntimeError):  # the caller went away mid-write
                    gone = True
                    stop("disconnected")

            async def on_output(stream: str, data: bytes) -> None:
                kind = ExecStdout if stream == "stdout" else ExecStderr
                for at in range(0, len(data), FRAME_BYTES):  # lines stay short
                    text, b64 = digests[stream].add(data[at : at + FRAME_BYTES])
                    if text or b64 is not None:
                        await deliver(kind(data=text, b64=b64))

            await deliver(ExecStarted(command_id=command.command_id, seq=started_seq))
            result: CommandResult = await target.adapter.exec(
                target.ctx,
                target.handle,
                command.run_argv,
                service=target.service,
                workdir=command.workdir,
                env=command.env,
                timeout=command.timeout,
                on_output=on_output,
            )
            for stream, digest in digests.items():
                rest = digest.rest()
                if rest:
                    kind = ExecStdout if stream == "stdout" else ExecStderr
                    await deliver(kind(b64=base64.b64encode(rest).decode("ascii")))
            return result

        outcome, exit_code, message = "exited", None, None
        clock = time.monotonic()
        try:
            exit_code = (await self.access.inflight.run(sandbox_id, work, alive)).exit_code
        except Stopped as stopped:
            outcome = stopped.outcome
            message = STOPPED.get(outcome, outcome)
        except TimeoutError:
            outcome, message = "timeout", f"stopped after {command.timeout:g}s"
        except asyncio.CancelledError:  # serve is stopping: record the end, then go
            await self._finish(command, meta, "disconnected", None, clock, digests, "serve stopped")
            raise
        except (ExtensionError, SandboxerError) as exc:
            outcome, message = "error", str(exc) or type(exc).__name__
        except Exception as exc:  # the adapter's failure is the command's outcome
            log.warning("exec in %s failed: %r", sandbox_id, exc)
            outcome, message = "error", str(exc) or type(exc).__name__
        end = await self._finish(command, meta, outcome, exit_code, clock, digests, message)
        if alive():
            with contextlib.suppress(ConnectionError, RuntimeError):
                await send(end)
        return end

    async def _finish(
        self,
        command: PreparedCommand,
        meta: EventMeta,
        outcome: str,
        exit_code: int | None,
        clock: float,
        digests: dict[str, StreamDigest],
        message: str | None,
    ) -> ExecExit:
        duration = round(time.monotonic() - clock, 3)
        out, err = digests["stdout"], digests["stderr"]
        finish = FinishCommand(
            sandbox_id=command.target.view.id,
            command_id=command.command_id,
            outcome=outcome,
            exit_code=exit_code,
            duration_seconds=duration,
            stdout_bytes=out.size,
            stdout_sha256=out.sha.hexdigest(),
            stderr_bytes=err.size,
            stderr_sha256=err.sha.hexdigest(),
            error=message if outcome == "error" else None,
            meta=meta,
        )
        seq = 0
        try:
            seq = (await asyncio.shield(self.handle(finish))).seq
        except Exception as exc:  # the sandbox ended meanwhile: its teardown is recorded
            log.warning("could not record the end of %s: %s", command.command_id, exc)
        return ExecExit(
            command_id=command.command_id,
            outcome=outcome,  # type: ignore[arg-type]
            exit_code=exit_code,
            duration_seconds=duration,
            stdout_bytes=out.size,
            stdout_sha256=out.sha.hexdigest(),
            stderr_bytes=err.size,
            stderr_sha256=err.sha.hexdigest(),
            message=message,
            seq=seq,
        )
