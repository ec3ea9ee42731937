"""Commands: what a caller asks the service to do, as data.

The HTTP API builds them, the message bus (sandboxer/app/bus.py) hands each to its one
handler, and a command for a sandbox another worker drives travels to that worker as
the same Struct (JSON, tagged by `command`) and runs in the same handler there.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from events import EventMeta


class Command(msgspec.Struct, frozen=True, kw_only=True, tag_field="command", tag=True):
    meta: EventMeta


class CreateSandbox(Command, frozen=True, kw_only=True):
    profile: str
    inputs: dict[str, str] = {}
    ttl_seconds: int | None = None
    account: str = "default"
    from_checkpoint: str | None = None
    sandbox_id: str | None = None  # from an idempotency key; None: a fresh random id
    labels: dict[str, str] = {}


class DestroySandbox(Command, frozen=True, kw_only=True):
    sandbox_id: str
    reason: str = "user"


class RequestCheckpoint(Command, frozen=True, kw_only=True):
    sandbox_id: str


class RestoreCheckpoint(Command, frozen=True, kw_only=True):
    sandbox_id: str
    checkpoint_id: str


class DeleteCheckpoint(Command, frozen=True, kw_only=True):
    checkpoint_id: str
    reason: str


class GrantCredits(Command, frozen=True, kw_only=True):
    account: str
    amount: int
    reason: str = ""


class StartCommand(Command, frozen=True, kw_only=True):
    """Record that a command starts in a ready sandbox (the exec itself runs on the
    worker the caller reached; the sandbox's own worker records it)."""

    sandbox_id: str
    command_id: str
    argv: list[str] = []
    shell: str | None = None
    service: str | None = None
    workdir: str | None = None
    env_names: list[str] = []
    timeout_seconds: float


class FinishCommand(Command, frozen=True, kw_only=True):
    sandbox_id: str
    command_id: str
    outcome: str
    exit_code: int | None = None
    duration_seconds: float
    stdout_bytes: int
    stdout_sha256: str
    stderr_bytes: int
    stderr_sha256: str
    error: str | None = None


class RecordFileTransfer(Command, frozen=True, kw_only=True):
    sandbox_id: str
    direction: Literal["upload", "download"]
    path: str
    service: str | None = None
    size: int
    sha256: str


class ExtendTtl(Command, frozen=True, kw_only=True):
    """The sandbox ends `ttl_seconds` from now (within the profile's max_ttl_seconds)."""

    sandbox_id: str
    ttl_seconds: int


class PauseSandbox(Command, frozen=True, kw_only=True):
    sandbox_id: str
    reason: str = "user"


class ResumeSandbox(Command, frozen=True, kw_only=True):
    sandbox_id: str
    reason: str = "user"


ACTIVITY_KINDS = ("exec", "files", "logs", "keepalive", "backend")


class NoteActivity(Command, frozen=True, kw_only=True):
    """Someone uses the sandbox (`kind`: one of ACTIVITY_KINDS): its driving worker
    notes it, and records an ActivitySeen when one is due."""

    sandbox_id: str
    kind: str


class ClaimSandbox(Command, frozen=True, kw_only=True):
    """Record that a create took this warm pool member (sandboxer/app/pools.py): its
    driving worker records SandboxClaimed if the claim intent `claim_id` still holds
    the member and nobody claimed it before."""

    sandbox_id: str
    claim_id: str
    account: str
    ttl_seconds: int
    labels: dict[str, str] = {}
    idempotency_id: str | None = None  # the create's Idempotency-Key, as its derived id


AnyCommand = (
    CreateSandbox
    | DestroySandbox
    | RequestCheckpoint
    | RestoreCheckpoint
    | DeleteCheckpoint
    | GrantCredits
    | StartCommand
    | FinishCommand
    | RecordFileTransfer
    | ExtendTtl
    | PauseSandbox
    | ResumeSandbox
    | NoteActivity
    | ClaimSandbox
)


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """What a handler recorded: the stream sequence to wait for, and the ids it made."""

    seq: int = 0
    sandbox_id: str | None = None
    checkpoint_id: str | None = None


def encode_command(command: Command) -> dict[str, Any]:
    return msgspec.to_builtins(command)  # type: ignore[no-any-return]


_LEGACY_OPS = {
    "destroy": "DestroySandbox",
    "checkpoint": "RequestCheckpoint",
    "restore": "RestoreCheckpoint",
    "delete_checkpoint": "DeleteCheckpoint",
}


def decode_command(body: dict[str, Any]) -> AnyCommand:
    """A forwarded command; also in the `{"op": ...}` form the previous release sent,
    so workers of both can share a cluster while it is upgraded."""
    if "command" not in body:
        op = str(body.get("op"))
        if op not in _LEGACY_OPS:
            raise ValueError(f"not a command: op {op[:40]!r}")
        body = {**{k: v for k, v in body.items() if k != "op"}, "command": _LEGACY_OPS[op]}
    command: AnyCommand = msgspec.convert(body, AnyCommand)
    return command
