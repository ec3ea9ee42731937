"""ExecResult: what one command did, gathered from its exec frames."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Literal

from sandboxer.client.errors import CommandFailed, CommandTimedOut, InvalidResponse
from sandboxer.wire import AnyExecFrame, ExecExit, ExecStarted, ExecStderr, ExecStdout


def chunk_bytes(frame: ExecStdout | ExecStderr) -> bytes:
    """A stdout/stderr frame's bytes: `data` as UTF-8, or its `b64` when it was not."""
    if frame.b64 is not None:
        return base64.b64decode(frame.b64)
    return frame.data.encode()


@dataclass(frozen=True)
class ExecResult:
    """One finished command. `stdout`/`stderr` are the output decoded as UTF-8 (invalid
    bytes replaced); `stdout_raw`/`stderr_raw` are the exact bytes. `stdout_bytes`,
    `stdout_sha256` (and stderr's) are the server's count and digest of what the command
    wrote. `exit_code` is set when `outcome` is `exited`; `message` says why otherwise."""

    command_id: str
    outcome: Literal["exited", "timeout", "disconnected", "destroyed", "error"]
    exit_code: int | None
    duration_seconds: float
    stdout_raw: bytes
    stderr_raw: bytes
    stdout_bytes: int
    stdout_sha256: str
    stderr_bytes: int
    stderr_sha256: str
    message: str | None = None
    seq: int = 0
    started_seq: int = 0

    @property
    def stdout(self) -> str:
        return self.stdout_raw.decode(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_raw.decode(errors="replace")

    @property
    def ok(self) -> bool:
        """Exited with code 0."""
        return self.outcome == "exited" and self.exit_code == 0

    def check(self) -> ExecResult:
        """This result when `ok`; else CommandTimedOut (outcome `timeout`) or CommandFailed."""
        if self.ok:
            return self
        if self.outcome == "timeout":
            raise CommandTimedOut(self)
        raise CommandFailed(self)


@dataclass
class ExecCollector:
    """Feeds on the frames as they come; `result()` once the exit frame was seen."""

    started: ExecStarted | None = None
    exit: ExecExit | None = None
    out: list[bytes] = field(default_factory=list)
    err: list[bytes] = field(default_factory=list)

    def feed(self, frame: AnyExecFrame) -> bytes | None:
        """Records the frame; a stdout/stderr chunk's bytes are returned."""
        if isinstance(frame, ExecStarted):
            self.started = frame
        elif isinstance(frame, ExecStdout):
            data = chunk_bytes(frame)
            self.out.append(data)
            return data
        elif isinstance(frame, ExecStderr):
            data = chunk_bytes(frame)
            self.err.append(data)
            return data
        elif isinstance(frame, ExecExit):
            self.exit = frame
        return None

    def result(self) -> ExecResult:
        end = self.exit
        if end is None:
            raise InvalidResponse("the exec stream ended without an exit frame")
        return ExecResult(
            command_id=end.command_id,
            outcome=end.outcome,
            exit_code=end.exit_code,
            duration_seconds=end.duration_seconds,
            stdout_raw=b"".join(self.out),
            stderr_raw=b"".join(self.err),
            stdout_bytes=end.stdout_bytes,
            stdout_sha256=end.stdout_sha256,
            stderr_bytes=end.stderr_bytes,
            stderr_sha256=end.stderr_sha256,
            message=end.message,
            seq=end.seq,
            started_seq=self.started.seq if self.started else 0,
        )
