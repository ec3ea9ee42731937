"""The message bus: every command goes to its one handler through here.

A command about one sandbox runs on the worker that drives it: when another live
worker does, the bus sends it the command (request-reply on its control subject)
and that worker's bus runs the same handler; errors come back as the same
`SandboxerError`s (sandboxer/errors.py). A sandbox whose worker is gone is adopted
here first (`SandboxManager.driven_here`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from events import CommandFinished, CommandStarted, FileDownloaded, FileUploaded
from sandboxer.app.commands import (
    AnyCommand,
    ClaimSandbox,
    Command,
    CreateSandbox,
    DeleteCheckpoint,
    DestroySandbox,
    ExtendTtl,
    FinishCommand,
    GrantCredits,
    NoteActivity,
    Outcome,
    PauseSandbox,
    RecordFileTransfer,
    RequestCheckpoint,
    RestoreCheckpoint,
    ResumeSandbox,
    StartCommand,
    decode_command,
    encode_command,
)
from sandboxer.app.manager import CreateRequest, NotFound, SandboxManager
from sandboxer.app.pools import PoolKeeper
from sandboxer.app.sandbox import redact
from sandboxer.errors import SandboxerError
from sandboxer.store.leases import OwnerUnavailable

FORWARD_TIMEOUT = 30.0


class MessageBus:
    def __init__(self, manager: SandboxManager) -> None:
        self.manager = manager
        self._handlers: dict[type[Command], Callable[[Any], Awaitable[Outcome]]] = {
            CreateSandbox: self._create,
            DestroySandbox: self._destroy,
            RequestCheckpoint: self._checkpoint,
            RestoreCheckpoint: self._restore,
            DeleteCheckpoint: self._delete_checkpoint,
            GrantCredits: self._grant,
            StartCommand: self._start_command,
            FinishCommand: self._finish_command,
            RecordFileTransfer: self._file_transfer,
            ExtendTtl: self._extend,
            PauseSandbox: self._pause,
            ResumeSandbox: self._resume,
            NoteActivity: self._note_activity,
            ClaimSandbox: self._claim,
        }
        self.pools: PoolKeeper | None = None  # set when the warm pools run (bootstrap)

    async def handle(self, command: AnyCommand) -> Outcome:
        """Run the command where its sandbox is driven (here, or forwarded)."""
        target = self._target(command)
        if target is not None and await self._elsewhere(target):
            try:
                return await self._forward(target, command)
            except OwnerUnavailable:
                # Its worker let go between our two looks (it finished the sandbox,
                # or stopped): look once more, adopting it if nobody holds it now.
                if await self._elsewhere(target):
                    raise
        return await self.handle_here(command)

    async def handle_here(self, command: AnyCommand) -> Outcome:
        return await self._handlers[type(command)](command)

    async def on_control(self, body: dict[str, Any]) -> dict[str, Any]:
        """The driving worker's side of a forwarded command."""
        command = decode_command(body)
        target = self._target(command)
        if target is not None and target not in self.manager.sandboxes:
            return NotFound(target).to_wire()
        try:
            outcome = await self.handle_here(command)
        except SandboxerError as exc:
            if exc.wire is None:
                raise
            return exc.to_wire()
        return {"seq": outcome.seq, **_ids(outcome)}

    # ---- routing ---------------------------------------------------------------------

    def _target(self, command: AnyCommand) -> str | None:
        """The sandbox whose worker must run the command (None: any worker may)."""
        if isinstance(command, DeleteCheckpoint):
            view = self.manager.runner.checkpoints.get(command.checkpoint_id)
            return view.sandbox_id if view is not None else None
        if isinstance(
            command,
            (
                DestroySandbox,
                RequestCheckpoint,
                RestoreCheckpoint,
                StartCommand,
                FinishCommand,
                RecordFileTransfer,
                ExtendTtl,
                PauseSandbox,
                ResumeSandbox,
                NoteActivity,
                ClaimSandbox,
            ),
        ):
            return command.sandbox_id
        return None

    async def _elsewhere(self, sandbox_id: str) -> bool:
        """Whether another live worker drives the sandbox. Ours, finished or unknown:
        no (the handler here decides); one whose worker is gone is adopted here."""
        manager = self.manager
        if sandbox_id in manager.sandboxes or sandbox_id not in manager.foreign:
            return False
        try:
            return await manager.driven_here(sandbox_id) is None
        except NotFound:
            return False  # it finished meanwhile

    async def _forward(self, sandbox_id: str, command: AnyCommand) -> Outcome:
        owner = await self.manager.leases.owner(sandbox_id)
        if owner is None:
            raise OwnerUnavailable(f"sandbox {sandbox_id} is between workers; retry shortly")
        answer = await self.manager.leases.forward(
            owner, encode_command(command), timeout=FORWARD_TIMEOUT
        )
        raised = SandboxerError.decode({"sandbox_id": sandbox_id, **answer})
        if raised is not None:
            raise raised
        if answer.get("error") is not None:
            raise RuntimeError(f"worker {owner}: {answer.get('message', answer['error'])}")
        return Outcome(
            seq=int(answer.get("seq") or 0),
            sandbox_id=answer.get("sandbox_id"),
            checkpoint_id=answer.get("checkpoint_id"),
        )

    # ---- handlers ----------------------------------------------------------------------

    async def check_retry(self, sandbox_id: str, command: CreateSandbox) -> None:
        """IdempotencyMismatch unless `command` is the create recorded as `sandbox_id`."""
        await self.manager.check_retry(sandbox_id, _request(command))

    async def _create(self, command: CreateSandbox) -> Outcome:
        if self.pools is not None and (claimed := await self.pools.claim(command)) is not None:
            return claimed  # a warm pool member (sandboxer/app/pools.py)
        sandbox, seq = await self.manager.create(_request(command), command.meta)
        if self.pools is not None:
            self.pools.created_cold(command)
        return Outcome(seq=seq, sandbox_id=sandbox.sandbox_id)

    async def _destroy(self, command: DestroySandbox) -> Outcome:
        seq = await self.manager.destroy(command.sandbox_id, command.meta, command.reason)
        return Outcome(seq=seq, sandbox_id=command.sandbox_id)

    async def _checkpoint(self, command: RequestCheckpoint) -> Outcome:
        checkpoint_id, seq = await self.manager.checkpoints.request(
            command.sandbox_id, command.meta
        )
        return Outcome(seq=seq, sandbox_id=command.sandbox_id, checkpoint_id=checkpoint_id)

    async def _restore(self, command: RestoreCheckpoint) -> Outcome:
        seq = await self.manager.checkpoints.request_restore(
            command.sandbox_id, command.checkpoint_id, command.meta
        )
        return Outcome(seq=seq, sandbox_id=command.sandbox_id, checkpoint_id=command.checkpoint_id)

    async def _delete_checkpoint(self, command: DeleteCheckpoint) -> Outcome:
        await self.manager.checkpoints.delete(command.checkpoint_id, command.meta, command.reason)
        view = self.manager.runner.checkpoints.get(command.checkpoint_id)
        return Outcome(
            seq=view.last_seq if view is not None else 0, checkpoint_id=command.checkpoint_id
        )

    async def _grant(self, command: GrantCredits) -> Outcome:
        view = await self.manager.ledger.grant(
            command.account, command.amount, command.meta, reason=command.reason
        )
        return Outcome(seq=view.last_seq)

    async def _extend(self, command: ExtendTtl) -> Outcome:
        seq = await self.manager.extend(command.sandbox_id, command.ttl_seconds, command.meta)
        return Outcome(seq=seq, sandbox_id=command.sandbox_id)

    async def _pause(self, command: PauseSandbox) -> Outcome:
        seq = await self.manager.pause(command.sandbox_id, command.meta, command.reason)
        return Outcome(seq=seq, sandbox_id=command.sandbox_id)

    async def _resume(self, command: ResumeSandbox) -> Outcome:
        seq = await self.manager.resume(command.sandbox_id, command.meta, command.reason)
        return Outcome(seq=seq, sandbox_id=command.sandbox_id)

    async def _note_activity(self, command: NoteActivity) -> Outcome:
        self.manager.note_use(command.sandbox_id, command.kind)
        return Outcome(sandbox_id=command.sandbox_id)

    async def _start_command(self, command: StartCommand) -> Outcome:
        self.manager.note_use(command.sandbox_id, "exec")
        sbx = self.manager.get(command.sandbox_id)
        secrets = sbx.secrets if sbx is not None else {}
        seq = await self.manager.record_step(
            command.sandbox_id,
            lambda e: CommandStarted(
                **e,
                command_id=command.command_id,
                argv=[redact(a, secrets) for a in command.argv],
                shell=None if command.shell is None else redact(command.shell, secrets),
                service=command.service,
                workdir=command.workdir,
                env_names=command.env_names,
                timeout_seconds=command.timeout_seconds,
            ),
            command.meta,
            event_id=f"{command.command_id}.started",
        )
        return Outcome(seq=seq, sandbox_id=command.sandbox_id)

    async def _finish_command(self, command: FinishCommand) -> Outcome:
        self.manager.note_use(command.sandbox_id, "exec")
        seq = await self.manager.record_step(
            command.sandbox_id,
            lambda e: CommandFinished(
                **e,
                command_id=command.command_id,
                outcome=command.outcome,
                exit_code=command.exit_code,
                duration_seconds=command.duration_seconds,
                stdout_bytes=command.stdout_bytes,
                stdout_sha256=command.stdout_sha256,
                stderr_bytes=command.stderr_bytes,
                stderr_sha256=command.stderr_sha256,
                error=command.error,
            ),
            msgspec.structs.replace(command.meta, causation_id=f"{command.command_id}.started"),
            event_id=f"{command.command_id}.finished",
        )
        return Outcome(seq=seq, sandbox_id=command.sandbox_id)

    async def _file_transfer(self, command: RecordFileTransfer) -> Outcome:
        self.manager.note_use(command.sandbox_id, "files")
        kind = FileUploaded if command.direction == "upload" else FileDownloaded
        seq = await self.manager.record_step(
            command.sandbox_id,
            lambda e: kind(
                **e,
                path=command.path,
                service=command.service,
                size=command.size,
                sha256=command.sha256,
            ),
            command.meta,
        )
        return Outcome(seq=seq, sandbox_id=command.sandbox_id)

    async def _claim(self, command: ClaimSandbox) -> Outcome:
        if self.pools is None:
            raise NotFound(command.sandbox_id)
        return await self.pools.record_claim(command)


def _request(command: CreateSandbox) -> CreateRequest:
    return CreateRequest(
        profile=command.profile,
        inputs=command.inputs,
        ttl_seconds=command.ttl_seconds,
        account=command.account,
        from_checkpoint=command.from_checkpoint,
        sandbox_id=command.sandbox_id,
        labels=command.labels,
    )


def _ids(outcome: Outcome) -> dict[str, str]:
    return {
        k: v
        for k, v in (("sandbox_id", outcome.sandbox_id), ("checkpoint_id", outcome.checkpoint_id))
        if v is not None
    }
