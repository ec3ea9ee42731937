"""Files in and out of a ready sandbox, streamed both ways, recorded once whole
(`FileUploaded`, `FileDownloaded`: path, size, sha256).

An upload is spooled under the data dir first (bounded by the size limit, hashed on
the way), so the adapter gets a local file of known size and the caller's body is
never held in memory; a download is handed on chunk by chunk as the adapter reads.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from events import EventMeta
from extensions.sdk import FileRefused, FileStream, FileTooLarge, check_file_path
from sandboxer.app.access import BadUse, SandboxAccess, Stopped, Target
from sandboxer.app.commands import AnyCommand, Outcome, RecordFileTransfer
from sandboxer.errors import NotFoundError, SandboxerError
from sandboxer.wire import FileOut

log = logging.getLogger(__name__)

Handle = Callable[[AnyCommand], Awaitable[Outcome]]
DEFAULT_MAX_FILE_BYTES = 1024**3
FILE_CHUNK = 1024 * 1024  # what an upload is read in


class TooLarge(SandboxerError):
    status = 413
    code = "too_large"
    field = "body"


class FileMissing(NotFoundError):
    field = "path"


@dataclass(frozen=True)
class FileTarget:
    target: Target
    path: str


def refused(exc: FileRefused) -> SandboxerError:
    """The adapter's refusal as the caller's error: a path that is not there is a 404,
    any other refusal a 400 naming `path`."""
    message = str(exc)
    if "does not exist" in message or "no such file" in message.lower():
        return FileMissing(message)
    return BadUse(message, "path")


class FileTransfers:
    def __init__(
        self,
        access: SandboxAccess,
        handle: Handle,
        spool_dir: Path,
        max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ) -> None:
        self.access = access
        self.handle = handle
        self.spool_dir = spool_dir
        self.max_bytes = max_bytes

    async def prepare(
        self, sandbox_id: str, path: str, service: str | None, capability: str
    ) -> FileTarget:
        try:
            checked = check_file_path(path)
        except FileRefused as exc:
            raise BadUse(str(exc), "path") from None
        return FileTarget(await self.access.target(sandbox_id, capability, service), checked)

    async def upload(
        self,
        file: FileTarget,
        body: AsyncIterator[bytes],
        length: int | None,
        meta: EventMeta,
    ) -> FileOut:
        if length is not None and length > self.max_bytes:
            raise TooLarge(f"the file is {length} bytes; the limit is {self.max_bytes}")
        async with self.access.inflight.busy(file.target.view.id):
            return await self._upload(file, body, length, meta)

    async def _upload(
        self,
        file: FileTarget,
        body: AsyncIterator[bytes],
        length: int | None,
        meta: EventMeta,
    ) -> FileOut:
        target = file.target
        self.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        spool = self.spool_dir / f"upload-{secrets.token_hex(8)}"
        try:
            size, digest = await self._spool(body, spool)
            try:
                await self.access.inflight.run(
                    target.view.id,
                    lambda _stop: asyncio.wait_for(
                        target.adapter.put_file(
                            target.ctx, target.handle, file.path, spool, service=target.service
                        ),
                        target.policy.timeout,
                    ),
                )
            except FileRefused as exc:
                raise refused(exc) from None
        finally:
            spool.unlink(missing_ok=True)
        seq = await self._record(file, "upload", size, digest, meta)
        return FileOut(path=file.path, service=target.service, size=size, sha256=digest, seq=seq)

    async def _spool(self, body: AsyncIterator[bytes], spool: Path) -> tuple[int, str]:
        sha = hashlib.sha256()
        size = 0
        fd = os.open(spool, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            async for chunk in body:
                size += len(chunk)
                if size > self.max_bytes:
                    raise TooLarge(f"the file is larger than the limit of {self.max_bytes} bytes")
                sha.update(chunk)
                out.write(chunk)
        return size, sha.hexdigest()

    async def open(self, file: FileTarget) -> FileStream:
        """The file's stream; the caller iterates it, then calls `downloaded`."""
        target = file.target
        try:
            stream: FileStream = await asyncio.wait_for(
                target.adapter.get_file(
                    target.ctx,
                    target.handle,
                    file.path,
                    service=target.service,
                    max_bytes=self.max_bytes,
                ),
                target.policy.timeout,
            )
        except FileRefused as exc:
            raise refused(exc) from None
        except FileTooLarge as exc:
            raise TooLarge(str(exc)) from None
        return stream

    async def send(
        self,
        file: FileTarget,
        stream: FileStream,
        write: Callable[[bytes], Awaitable[None]],
        alive: Callable[[], bool],
        meta: EventMeta,
    ) -> int:
        """Hand the stream on; once the whole file went out, record `FileDownloaded`
        (its sequence; 0 when the caller left or the sandbox was destroyed first)."""
        async with self.access.inflight.busy(file.target.view.id):
            return await self._send(file, stream, write, alive, meta)

    async def _send(
        self,
        file: FileTarget,
        stream: FileStream,
        write: Callable[[bytes], Awaitable[None]],
        alive: Callable[[], bool],
        meta: EventMeta,
    ) -> int:
        sha = hashlib.sha256()

        async def work(stop: Callable[[str], None]) -> int:
            sent = 0
            try:
                async for chunk in stream.chunks:
                    sha.update(chunk)
                    sent += len(chunk)
                    await write(chunk)
            except (ConnectionError, RuntimeError):
                stop("disconnected")
            return sent

        try:
            sent = await self.access.inflight.run(file.target.view.id, work, alive)
        except Stopped:
            return 0
        finally:
            await stream.aclose()
        if sent != stream.size:
            log.warning("%s: sent %d of %d bytes", file.path, sent, stream.size)
            return 0
        return await self._record(file, "download", sent, sha.hexdigest(), meta)

    async def _record(
        self, file: FileTarget, direction: str, size: int, digest: str, meta: EventMeta
    ) -> int:
        done = await self.handle(
            RecordFileTransfer(
                sandbox_id=file.target.view.id,
                direction="upload" if direction == "upload" else "download",
                path=file.path,
                service=file.target.service,
                size=size,
                sha256=digest,
                meta=meta,
            )
        )
        return done.seq
