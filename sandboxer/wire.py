"""The API's bodies, answers and stream frames as msgspec Structs: the server
(sandboxer/http/api.py) encodes them and the client library (sandboxer/client)
decodes them, so both speak one definition. The OpenAPI document is generated from
these types."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

import msgspec

from events import PublishedPort, ServiceState
from projections.sandboxes import CommandSummary
from sandboxer.ids import ACCOUNT_RE
from sandboxer.profiles import PROFILE_NAME_RE

Role = Literal["admin", "member"]
CHECKPOINT_ID_RE = re.compile(r"^ckpt-[a-f0-9]{12}$")
MAX_GRANT = 10**12
MAX_REASON = 500
# Text fields and input values: no NUL and no control characters but tab and newline.
PLAIN_TEXT = r"^[^\x00-\x08\x0b-\x1f\x7f-\x9f]*$"
# exec: what one command may carry (the body itself is bounded too)
# Together they stay under MAX_EXEC_BODY, so a body past a limit is a 400 naming it.
MAX_ARGS = 256
MAX_ARG_LENGTH = 4096
MAX_SHELL = 64 * 1024
MAX_ENV = 128
MAX_ENV_VALUE = 4096
MAX_WORKDIR = 4096
MAX_EXEC_BODY = 4 * 1024 * 1024
MAX_EXEC_TIMEOUT = 24 * 3600.0
SERVICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ServiceName = Annotated[str, msgspec.Meta(pattern=SERVICE_NAME_RE.pattern)]


ProfileName = Annotated[
    str,
    msgspec.Meta(
        pattern=f"^({PROFILE_NAME_RE.pattern[1:-1]})?$",
        description="a profile (GET /v1/profiles); empty or omitted with from_checkpoint: "
        "the checkpoint's profile",
    ),
]
AccountName = Annotated[str, msgspec.Meta(pattern=ACCOUNT_RE.pattern)]
CheckpointId = Annotated[str, msgspec.Meta(pattern=CHECKPOINT_ID_RE.pattern)]


class CreateBody(msgspec.Struct, forbid_unknown_fields=True):
    profile: ProfileName = ""  # may be omitted with from_checkpoint: the checkpoint's profile
    inputs: dict[str, Any] = {}  # checked per key below, so errors can name the input
    ttl_seconds: Annotated[int, msgspec.Meta(ge=1)] | None = None
    account: AccountName = "default"
    from_checkpoint: CheckpointId | None = None
    labels: dict[str, str] = {}  # checked per key (the error names `labels.<key>`)


class ExtendBody(msgspec.Struct, forbid_unknown_fields=True):
    """The sandbox ends `ttl_seconds` from now (within its profile's max_ttl_seconds)."""

    ttl_seconds: Annotated[int, msgspec.Meta(ge=1, le=10**9)]


class RestoreBody(msgspec.Struct, forbid_unknown_fields=True):
    checkpoint: CheckpointId


class CheckpointOut(msgspec.Struct):
    id: str
    sandbox_id: str
    status: str
    requested_at: dt.datetime
    created_at: dt.datetime | None
    size: int | None
    digest: str | None
    store_key: str | None
    error: str | None
    deleted_reason: str | None
    last_seq: int


class CheckpointList(msgspec.Struct):
    checkpoints: list[CheckpointOut]


class Progress(msgspec.Struct):
    step: str
    since: dt.datetime
    message: str | None = None


class SandboxOut(msgspec.Struct):
    """A sandbox as the API shows it: the projection row plus the live step, if any."""

    id: str
    state: str
    profile: str
    extension: str
    account: str
    inputs: dict[str, str]
    ttl_seconds: int
    created_at: dt.datetime
    updated_at: dt.datetime
    expires_at: dt.datetime
    last_seq: int
    events: int
    host: str | None
    handle: dict[str, str]
    services: list[str]
    # Each service's state and health as last reported, and where its ports are.
    service_states: list[ServiceState]
    endpoints: list[PublishedPort]
    route_reason: str | None
    reason: str | None
    needs_reconciliation: bool
    terminal: bool
    metered: bool
    credits_held: int
    validation: str | None = None
    validation_exit_code: int | None = None
    validation_output: str | None = None
    validation_reason: str | None = None
    progress: Progress | None = None
    labels: dict[str, str] = {}
    commands: list[CommandSummary] = []  # the last 20, oldest first
    commands_run: int = 0
    files_uploaded: int = 0
    files_downloaded: int = 0
    # a warm pool member: the pool's profile; claimed_at once a create took it
    pool: str | None = None
    claimed_at: dt.datetime | None = None
    # the current pause's start (None: not paused), the paused seconds so far
    paused_at: dt.datetime | None = None
    paused_seconds: float = 0.0
    last_activity_at: dt.datetime | None = None  # the latest use recorded


class SandboxList(msgspec.Struct):
    sandboxes: list[SandboxOut]
    count: int  # rows on this page
    next_cursor: str | None = None  # the page after this one (None: the last page)


class EventOut(msgspec.Struct):
    seq: int
    subject: str
    event: dict[str, Any]


class EventList(msgspec.Struct):
    events: list[EventOut]
    last_seq: int


class InputOut(msgspec.Struct):
    name: str
    description: str
    required: bool
    default: str | None
    secret: bool
    choices: list[str] | None


class ProfileOut(msgspec.Struct):
    name: str
    description: str
    extension: str
    ttl_seconds: int
    max_ttl_seconds: int
    inputs: list[InputOut]


class ProfileList(msgspec.Struct):
    profiles: list[ProfileOut]


class PoolOut(msgspec.Struct, kw_only=True):
    """A warm pool (docs/pools.md): its size, its unclaimed members ready and still
    coming up, and the members creates claimed that are still live."""

    profile: str
    size: int
    ready: int
    provisioning: int
    claimed: int
    max_age_seconds: int


class GrantBody(msgspec.Struct, forbid_unknown_fields=True):
    amount: Annotated[int, msgspec.Meta(ge=1, le=MAX_GRANT)]
    reason: Annotated[str, msgspec.Meta(max_length=MAX_REASON, pattern=PLAIN_TEXT)] = ""


class AccountOut(msgspec.Struct):
    account: str
    last_seq: int
    granted: int
    reserved: int
    debited: int
    released: int
    available: int
    rejected: int
    entries: int
    open_reservations: dict[str, int]


class AccountList(msgspec.Struct):
    accounts: list[AccountOut]


class LedgerPage(msgspec.Struct):
    account: str
    entries: list[EventOut]
    next_after_seq: int | None


class Health(msgspec.Struct):
    status: str
    last_seq: int
    live_sandboxes: int


class Identity(msgspec.Struct):
    """Who the caller is, so a client (the dashboard) can offer only what it may do.
    Without tokens the API is open: anyone may do everything."""

    auth: bool
    name: str
    account: str | None
    role: Role


class ErrorDetail(msgspec.Struct):
    status: int
    code: str
    message: str
    field: str | None = None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


# ---- exec, files, logs -------------------------------------------------------------


class ExecBody(msgspec.Struct, forbid_unknown_fields=True):
    """One command: `argv` (run as given, never through a shell) or `shell` (a script
    for `sh -c`), exactly one. `service` None: the extension's default (a compose
    sandbox with one service: that one)."""

    argv: (
        Annotated[
            list[Annotated[str, msgspec.Meta(max_length=MAX_ARG_LENGTH)]],
            msgspec.Meta(min_length=1, max_length=MAX_ARGS),
        ]
        | None
    ) = None
    shell: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_SHELL)] | None = None
    service: ServiceName | None = None
    # names checked per key (the error names `env.<name>`)
    env: Annotated[
        dict[str, Annotated[str, msgspec.Meta(max_length=MAX_ENV_VALUE)]],
        msgspec.Meta(max_length=MAX_ENV),
    ] = {}
    workdir: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_WORKDIR)] | None = None
    timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=MAX_EXEC_TIMEOUT)] = 60.0


class ExecFrame(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """One line of an exec answer (NDJSON): `started`, then `stdout`/`stderr` chunks
    as they come, then one `exit`."""


class ExecStarted(ExecFrame, frozen=True, kw_only=True, tag="started"):
    command_id: str
    seq: int  # the stream sequence of CommandStarted


class ExecStdout(ExecFrame, frozen=True, kw_only=True, tag="stdout"):
    """`data`: the chunk as text; a chunk that is not UTF-8 comes as `b64` instead."""

    data: str = ""
    b64: str | None = None


class ExecStderr(ExecFrame, frozen=True, kw_only=True, tag="stderr"):
    data: str = ""
    b64: str | None = None


Outcome = Literal["exited", "timeout", "disconnected", "destroyed", "error"]


class ExecExit(ExecFrame, frozen=True, kw_only=True, tag="exit"):
    """How it ended (CommandFinished says the same): `exit_code` is set when
    `outcome` is `exited`; `message` says why otherwise."""

    command_id: str
    outcome: Outcome
    exit_code: int | None
    duration_seconds: float
    stdout_bytes: int
    stdout_sha256: str
    stderr_bytes: int
    stderr_sha256: str
    message: str | None = None
    seq: int = 0  # of CommandFinished (0: it could not be recorded)


AnyExecFrame = ExecStarted | ExecStdout | ExecStderr | ExecExit


class FileOut(msgspec.Struct):
    """A file written into the sandbox (the answer to PUT .../files)."""

    path: str
    service: str | None
    size: int
    sha256: str
    seq: int  # of FileUploaded


class LogLine(msgspec.Struct):
    """One line of a service's log (NDJSON answer of GET .../logs); a line longer than
    64 KiB comes in pieces."""

    service: str
    stream: Literal["stdout", "stderr"]
    line: str
