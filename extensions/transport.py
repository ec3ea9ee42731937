"""How a compose adapter reaches the machine its projects run on.

`Transport` is everything the shared compose core (`extensions/compose.py`) needs from
a host: run an argv (never a shell string: every argument is quoted for SSH, passed
as a list locally), run one with its output streamed, stream a command's stdout into
a local file or a local file into its stdin (checkpoints), and copy the repo into a
workspace with rsync. `SSHTransport` goes through the pooled SSH connection of one
host (one connection per host, reused, keepalive, timeouts on everything);
`LocalTransport` runs asyncio subprocesses on this machine and a local rsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from extensions.sdk import CommandRefused, OutputBuffer
from extensions.ssh import (
    CHUNK,
    CommandFailed,
    CommandResult,
    SSHPool,
    SSHTarget,
    command_line,
    rsync_argv,
    run_rsync,
)

__all__ = [
    "CommandFailed",
    "CommandResult",
    "LocalCommandFailed",
    "LocalTransport",
    "SSHTransport",
    "Transport",
]


class Reader(Protocol):
    """A started command whose stdout the caller reads (a file being fetched)."""

    command: str

    async def read(self, size: int) -> bytes:
        """Up to `size` bytes of stdout; b"" at its end."""
        ...

    async def finish(self) -> tuple[int, str]:
        """Wait for its end: the exit code and the tail of its error output."""
        ...

    async def close(self) -> None:
        """Stop it (killed if still running); idempotent."""
        ...


class Transport(Protocol):
    """One host's commands and files, as the compose core uses them."""

    @property
    def label(self) -> str:
        """Names the host in messages (`host0`, `this machine`)."""
        ...

    async def run(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        stdin: str | None = None,
        timeout: float = 60.0,
        check: bool = True,
    ) -> CommandResult:
        """Run argv to its end; with `check`, a non-zero exit raises `CommandFailed`
        (its `stderr` holds the error output)."""
        ...

    async def run_streaming(
        self,
        argv: Sequence[str],
        output: OutputBuffer,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float,
    ) -> int:
        """Run argv with no input, its output to `output` as it arrives; the exit code
        (128 + N for signal N). Past `timeout`: stopped, `TimeoutError`."""
        ...

    async def stream_to_file(
        self,
        argv: Sequence[str],
        path: Path,
        *,
        timeout: float,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """argv's stdout into a local file, chunk by chunk; the byte count."""
        ...

    async def stream_from_file(
        self,
        argv: Sequence[str],
        path: Path,
        *,
        timeout: float,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """A local file as argv's stdin, chunk by chunk."""
        ...

    async def open_reader(self, argv: Sequence[str]) -> Reader:
        """Start argv with no input; the caller reads its stdout (`Reader`)."""
        ...

    async def run_with_input(
        self, argv: Sequence[str], chunks: AsyncIterator[bytes], *, timeout: float
    ) -> None:
        """argv with `chunks` as its stdin (each written once the last drained); a
        non-zero exit raises `CommandFailed`."""
        ...

    async def copy_repo(
        self,
        source: Path,
        directory: str,
        *,
        includes: Sequence[str] = (),
        excludes: Sequence[str] = (),
        filters: Sequence[str] = (),
        timeout: float = 600.0,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        """Mirror the local `source/` into the host's `directory/` (rsync, the same
        rules everywhere: `--safe-links`, includes before filters and excludes)."""
        ...


class SSHTransport:
    """A host of a pool, over the pool's one reused connection to it."""

    def __init__(self, pool: SSHPool, target: SSHTarget, label: str) -> None:
        self.pool = pool
        self.target = target
        self._label = label

    @property
    def label(self) -> str:
        return self._label

    async def run(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        stdin: str | None = None,
        timeout: float = 60.0,
        check: bool = True,
    ) -> CommandResult:
        return await self.pool.run(
            self.target, argv, cwd=cwd, stdin=stdin, timeout=timeout, check=check
        )

    async def run_streaming(
        self,
        argv: Sequence[str],
        output: OutputBuffer,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float,
    ) -> int:
        command = command_line(argv, cwd=cwd, env=env)
        return await self.pool.run_streaming(self.target, command, output, timeout=timeout)

    async def stream_to_file(
        self,
        argv: Sequence[str],
        path: Path,
        *,
        timeout: float,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        return await self.pool.stream_to_file(
            self.target, argv, path, timeout=timeout, progress=progress
        )

    async def stream_from_file(
        self,
        argv: Sequence[str],
        path: Path,
        *,
        timeout: float,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        await self.pool.stream_from_file(
            self.target, argv, path, timeout=timeout, progress=progress
        )

    async def open_reader(self, argv: Sequence[str]) -> Reader:
        return await self.pool.open_reader(self.target, argv)

    async def run_with_input(
        self, argv: Sequence[str], chunks: AsyncIterator[bytes], *, timeout: float
    ) -> None:
        await self.pool.run_with_input(self.target, argv, chunks, timeout=timeout)

    async def copy_repo(
        self,
        source: Path,
        directory: str,
        *,
        includes: Sequence[str] = (),
        excludes: Sequence[str] = (),
        filters: Sequence[str] = (),
        timeout: float = 600.0,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        argv = rsync_argv(
            source,
            directory,
            target=self.target,
            includes=includes,
            excludes=excludes,
            filters=filters,
        )
        await run_rsync(argv, f"{self.target.host}:{directory}", timeout=timeout, progress=progress)


class LocalCommandFailed(CommandFailed):
    where = "local command"


class LocalTransport:
    """This machine: asyncio subprocesses from argv lists (no shell), local rsync."""

    label = "this machine"

    @staticmethod
    async def _start(
        argv: Sequence[str], cwd: str | None, env: Mapping[str, str] | None, **kwargs: object
    ) -> asyncio.subprocess.Process:
        if cwd is not None and not await asyncio.to_thread(os.path.isdir, cwd):
            raise CommandRefused(f"no such directory: {cwd}")
        return await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group: a timeout stops all of it
            **kwargs,  # type: ignore[arg-type]
        )

    @staticmethod
    async def _stop(proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    @classmethod
    async def _terminate(cls, proc: asyncio.subprocess.Process, grace: float = 2.0) -> None:
        """TERM to the process group, KILL what is left after `grace` seconds."""
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(proc.wait()), grace)
        await cls._stop(proc)

    async def run(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        stdin: str | None = None,
        timeout: float = 60.0,
        check: bool = True,
    ) -> CommandResult:
        try:
            proc = await self._start(
                argv,
                cwd,
                None,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError as exc:
            if check:
                raise LocalCommandFailed(shlex.join(argv), 127, str(exc)) from None
            return CommandResult(127, "", str(exc))
        try:
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
        except BaseException:
            await self._stop(proc)
            raise
        code = proc.returncode if proc.returncode is not None else -1
        result = CommandResult(
            code if code >= 0 else 128 - code,
            out.decode(errors="replace"),
            err.decode(errors="replace"),
        )
        if check and result.exit_status != 0:
            raise LocalCommandFailed(shlex.join(argv), result.exit_status, result.stderr)
        return result

    async def run_streaming(
        self,
        argv: Sequence[str],
        output: OutputBuffer,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float,
    ) -> int:
        async with asyncio.timeout(timeout):
            try:
                proc = await self._start(
                    argv,
                    cwd,
                    env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
            except (FileNotFoundError, PermissionError) as exc:
                output.add_text("stderr", f"{argv[0]}: {exc.strerror}\n")
                return 127 if isinstance(exc, FileNotFoundError) else 126
            try:
                await asyncio.gather(
                    _pump(proc.stdout, "stdout", output), _pump(proc.stderr, "stderr", output)
                )
                code = await proc.wait()
            finally:
                await self._terminate(proc)  # timed out or cancelled: the whole group
        return code if code >= 0 else 128 - code

    async def stream_to_file(
        self,
        argv: Sequence[str],
        path: Path,
        *,
        timeout: float,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        proc = await self._start(
            argv,
            None,
            None,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        written = 0
        try:
            async with asyncio.timeout(timeout):
                errors = asyncio.ensure_future(proc.stderr.read())
                with path.open("wb") as out:
                    while chunk := await proc.stdout.read(CHUNK):
                        out.write(chunk)
                        written += len(chunk)
                        if progress is not None:
                            progress(written)
                stderr = await errors
                code = await proc.wait()
        except BaseException:
            await self._stop(proc)
            raise
        if code != 0:
            raise LocalCommandFailed(shlex.join(argv), code, stderr.decode(errors="replace"))
        return written

    async def stream_from_file(
        self,
        argv: Sequence[str],
        path: Path,
        *,
        timeout: float,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        proc = await self._start(
            argv,
            None,
            None,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stderr is not None
        sent = 0
        try:
            async with asyncio.timeout(timeout):
                errors = asyncio.ensure_future(proc.stderr.read())
                with path.open("rb") as source:
                    while chunk := source.read(CHUNK):
                        proc.stdin.write(chunk)
                        await proc.stdin.drain()
                        sent += len(chunk)
                        if progress is not None:
                            progress(sent)
                proc.stdin.close()
                stderr = await errors
                code = await proc.wait()
        except BaseException:
            await self._stop(proc)
            raise
        if code != 0:
            raise LocalCommandFailed(shlex.join(argv), code, stderr.decode(errors="replace"))

    async def open_reader(self, argv: Sequence[str]) -> Reader:
        proc = await self._start(
            argv,
            None,
            None,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return LocalReader(proc, shlex.join(argv))

    async def run_with_input(
        self, argv: Sequence[str], chunks: AsyncIterator[bytes], *, timeout: float
    ) -> None:
        proc = await self._start(
            argv,
            None,
            None,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stderr is not None
        errors = asyncio.ensure_future(_tail(proc.stderr))
        try:
            async with asyncio.timeout(timeout):
                async for chunk in chunks:
                    proc.stdin.write(chunk)
                    await proc.stdin.drain()
                proc.stdin.close()
                code = await proc.wait()
                stderr = await errors
        except BaseException:
            errors.cancel()
            await self._stop(proc)
            raise
        if code != 0:
            raise LocalCommandFailed(shlex.join(argv), code, stderr)

    async def copy_repo(
        self,
        source: Path,
        directory: str,
        *,
        includes: Sequence[str] = (),
        excludes: Sequence[str] = (),
        filters: Sequence[str] = (),
        timeout: float = 600.0,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        argv = rsync_argv(source, directory, includes=includes, excludes=excludes, filters=filters)
        await run_rsync(argv, directory, timeout=timeout, progress=progress)


async def _pump(reader: asyncio.StreamReader | None, stream: str, output: OutputBuffer) -> None:
    """One stream into `output`; the next read waits until the consumer took the
    last chunk (the pipe then fills and holds the writer)."""
    if reader is None:
        return
    while chunk := await reader.read(CHUNK):
        await output.add(stream, chunk)


class LocalReader:
    """A local process's stdout, read by the caller; its stderr's tail collected."""

    def __init__(self, proc: asyncio.subprocess.Process, command: str) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self.proc = proc
        self.stdout = proc.stdout
        self.command = command
        self.errors = asyncio.ensure_future(_tail(proc.stderr))

    async def read(self, size: int) -> bytes:
        return await self.stdout.read(size)

    async def finish(self) -> tuple[int, str]:
        code = await self.proc.wait()
        return (code if code >= 0 else 128 - code), await self.errors

    async def close(self) -> None:
        self.errors.cancel()
        await LocalTransport._stop(self.proc)


async def _tail(reader: asyncio.StreamReader, keep: int = 64 * 1024) -> str:
    kept = b""
    while chunk := await reader.read(CHUNK):
        kept = (kept + chunk)[-keep:]
    return kept.decode(errors="replace")
