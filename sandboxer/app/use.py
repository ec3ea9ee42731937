"""Using a sandbox through the service: exec, files and logs, wired together."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sandboxer.app.access import SandboxAccess
from sandboxer.app.execution import CommandRunner, Handle
from sandboxer.app.files import DEFAULT_MAX_FILE_BYTES, FileTransfers
from sandboxer.app.logs import LogReader
from sandboxer.app.manager import SandboxManager


@dataclass(frozen=True)
class SandboxUse:
    access: SandboxAccess
    commands: CommandRunner
    files: FileTransfers
    logs: LogReader

    @classmethod
    def build(
        cls,
        manager: SandboxManager,
        handle: Handle,
        spool_dir: Path,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ) -> SandboxUse:
        """`handle`: the bus's, which records on the sandbox's own worker."""
        access = SandboxAccess(
            manager.runner, manager.store, manager.extensions, manager.steps, manager
        )
        manager.steps.before_teardown.append(access.inflight.drain)
        return cls(
            access=access,
            commands=CommandRunner(access, handle),
            files=FileTransfers(access, handle, spool_dir, max_file_bytes),
            logs=LogReader(access, handle),
        )
