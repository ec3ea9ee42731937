"""The adapter protocol every extension implements.

An adapter is built once per service with its resolved base config; each hook gets a
`StepContext` naming the sandbox, its inputs (secrets included: they live only in
memory) and the config after profile overrides. `teardown` must be idempotent and
must work from the sandbox id alone, because a crash can lose the handle.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import posixpath
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

Handle = dict[str, str]
ProgressFn = Callable[[str], None]

REQUIRED_HOOKS = ("provision", "wait_ready", "teardown")
OPTIONAL_HOOKS = (
    "place",
    "snapshot",
    "restore",
    "estimate_cost",
    "meter_actual",
    "inventory",
    "remove_orphan",
    "exec",
    "put_file",
    "get_file",
    "logs",
    "services",
    "endpoints",
    "pause",
    "resume",
    "activity",
)
# Old names a third-party manifest or adapter may still use: read as the new ones.
ALIASES = {"run_command": "exec"}


def _no_progress(_message: str) -> None:
    return None


@dataclass(frozen=True)
class RuntimeInfo:
    """Where the service keeps its files; adapters put local state under data_dir.
    `repo_roots`: the only directories a path input (`repo`) may lie under."""

    data_dir: Path
    repo_roots: tuple[Path, ...] = ()


class PathRefused(ValueError):
    """A path input outside the operator's repo roots, or not a directory."""


def confine_path(raw: str, roots: Sequence[Path]) -> Path:
    """The directory a path input names, symlinks resolved, if it lies under one of
    `roots` (themselves resolved). The lexical path is checked before anything on
    disk is looked at, so a refused path is not probed; the resolved one again, so
    no link leads out. Relative paths are relative to the service's directory."""
    if not roots:
        raise PathRefused("no repo roots are configured (SANDBOXER_REPO_ROOTS)")
    if "\x00" in raw:
        raise PathRefused("contains a NUL byte")
    lexical = Path(os.path.abspath(raw))
    if not any(lexical.is_relative_to(root) for root in roots):
        raise PathRefused("is not under a repo root (SANDBOXER_REPO_ROOTS)")
    try:
        resolved = lexical.resolve(strict=True)
    except (OSError, RuntimeError):
        raise PathRefused("does not exist") from None
    if not any(resolved.is_relative_to(root) for root in roots):
        raise PathRefused("leads out of the repo roots through a link")
    if not resolved.is_dir():
        raise PathRefused("is not a directory")
    return resolved


@dataclass(frozen=True)
class StepContext:
    sandbox_id: str
    profile: str
    inputs: Mapping[str, str]
    config: Mapping[str, Any]
    host: str | None = None
    progress: ProgressFn = field(default=_no_progress, compare=False)
    checkpoint_id: str | None = None  # set for snapshot and restore


class ExtensionError(Exception):
    """A hook failed in a way the adapter understands; the message goes into the event."""


class NoCapacity(ExtensionError):
    """`place` found no host with room; the sandbox is rejected with this reason."""


@dataclass(frozen=True)
class Cost:
    """Credits (whole) and how they were computed; the basis is recorded in the ledger."""

    amount: int
    basis: dict[str, str | int | float | bool]


@dataclass(frozen=True)
class Placement:
    """Where a sandbox goes, and why (recorded in `RouteChosen`)."""

    host: str
    reason: str


@runtime_checkable
class Extension(Protocol):
    async def provision(self, ctx: StepContext) -> Handle: ...

    async def wait_ready(self, ctx: StepContext, handle: Handle) -> list[str]: ...

    async def teardown(self, ctx: StepContext, handle: Handle | None) -> None: ...


class Metered(Protocol):
    """Optional capabilities `estimate_cost` + `meter_actual` (they go together).

    `estimate_cost` is reserved on create (it may raise to refuse the sandbox);
    `meter_actual` gets the provisioned seconds as the events recorded them, so a
    replay computes the same number. The manager never debits more than it reserved.
    """

    async def estimate_cost(self, ctx: StepContext, ttl_seconds: int) -> Cost: ...

    async def meter_actual(self, ctx: StepContext, seconds: float) -> Cost: ...


class Snapshotting(Protocol):
    """Optional capabilities `snapshot` + `restore` (they go together).

    `snapshot` writes one archive of the sandbox to a local file (streamed, never held
    in memory) and returns metadata that `restore` needs; `restore` puts it back into
    the sandbox (`handle` given) or into a fresh one, a clone (`handle` None, returns
    the new handle). The manager stores, digests and verifies the file.
    """

    async def snapshot(self, ctx: StepContext, handle: Handle, target: Path) -> dict[str, str]: ...

    async def restore(
        self, ctx: StepContext, handle: Handle | None, source: Path, metadata: dict[str, str]
    ) -> Handle: ...


class Placing(Protocol):
    """Optional capability `place`: pick a host from a pool, given what each holds now.

    Called under a per-extension lock together with recording the choice, so two
    sandboxes never both take the last slot of a host.
    """

    def place(self, ctx: StepContext, load: Mapping[str, int]) -> Placement: ...


@dataclass(frozen=True)
class Resource:
    """Something an extension made for a sandbox, as `inventory` finds it on a host."""

    sandbox_id: str
    host: str
    kind: str  # workspace, compose_project, checkpoint_image, instance, ...
    detail: str  # what it is there: a path, a project or image name


class Reconciling(Protocol):
    """Optional capabilities `inventory` + `remove_orphan` (they go together).

    `inventory` lists what exists on every host of the config that carries a sandbox
    id in our naming (and only that: never someone else's files); `remove_orphan`
    removes one such thing, idempotently. The reconciliation sweep decides which are
    orphans from the events, never the adapter.
    """

    async def inventory(self, config: Mapping[str, Any]) -> list[Resource]: ...

    async def remove_orphan(self, config: Mapping[str, Any], resource: Resource) -> None: ...


HEALTH = ("healthy", "unhealthy", "starting", "none")  # "none": no healthcheck defined


@dataclass(frozen=True)
class ServiceStatus:
    """One service of a sandbox as the backend sees it now. `state` is the engine's
    (running, exited, created, paused, ...); `health` one of `HEALTH`; `exit_code` set
    once the service's container has exited; `output` the last healthcheck's output
    (its tail, at most 1,000 characters)."""

    service: str
    state: str
    health: str = "none"
    exit_code: int | None = None
    output: str = ""


@dataclass(frozen=True)
class Endpoint:
    """A published port: where a client reaches `container_port` of `service`.
    `host` is the address a client uses (the compose host's own for an SSH host)."""

    service: str
    container_port: int
    protocol: str  # tcp or udp
    host: str
    host_port: int


class Watching(Protocol):
    """Optional capabilities `services` + `endpoints` (they go together).

    `services` answers the state and health of every service of the resolved
    configuration; the manager calls it every `watch_interval` seconds while the
    sandbox is ready and records a service that exits or turns unhealthy. Where the
    engine does not run healthchecks itself, the adapter runs those that are due on
    this call. `endpoints` lists the published ports once the sandbox is ready.
    """

    async def services(self, ctx: StepContext, handle: Handle) -> list[ServiceStatus]: ...

    async def endpoints(self, ctx: StepContext, handle: Handle) -> list[Endpoint]: ...


PAUSE_MODES = ("pause", "stop")


class Pausing(Protocol):
    """Optional capabilities `pause` + `resume` (they go together).

    `pause` holds the sandbox still, keeping its files and named volumes: `mode`
    "pause" freezes its processes (the engine's pause), "stop" stops its containers.
    `resume` with the same mode lets it run again and returns once its services run
    (the manager then asks `services` and `endpoints`: a stopped container comes
    back on new host ports). Both must be safe to call again after a crash halfway
    (pausing a paused sandbox, resuming a running one: no error).
    """

    async def pause(self, ctx: StepContext, handle: Handle, mode: str) -> None: ...

    async def resume(self, ctx: StepContext, handle: Handle, mode: str) -> None: ...


class ActivityCounting(Protocol):
    """Optional capability `activity`: counters of the sandbox's own work that only
    grow while it is used (compose: each container's CPU time and network bytes),
    as `{name: value}`. The manager compares two samples: any counter that moved is
    use (`ActivitySeen` kind `backend`), and keeps a sandbox with an idle timeout
    alive. Names are the adapter's; a counter that disappears is not use."""

    async def activity(self, ctx: StepContext, handle: Handle) -> dict[str, int]: ...


OutputFn = Callable[[str, bytes], Awaitable[None]]
"""`await on_output(stream, data)`: raw bytes of a running command's output as they
arrive; `stream` is "stdout" or "stderr". The adapter reads no more of that stream
until it returns (backpressure: a slow consumer slows the command, memory stays
bounded); order within each stream is preserved."""

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
OUTPUT_KEEP = 1024 * 1024  # characters of each stream a CommandResult keeps (its tail)
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class CommandResult:
    """How a command ended. `stdout`/`stderr` hold (the last `OUTPUT_KEEP` characters
    of) each stream, decoded as UTF-8 (errors replaced); `on_output` saw all of it, in
    order, while it ran. `*_bytes` and `*_sha256` count and digest every raw byte of
    each stream, kept or not."""

    exit_code: int
    stdout: str
    stderr: str
    duration: float  # seconds
    truncated: bool = False  # a stream was longer than what is kept
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    stdout_sha256: str = EMPTY_SHA256
    stderr_sha256: str = EMPTY_SHA256


class CommandRefused(ExtensionError):
    """The command could not be started: no such service, `service` not supported,
    a bad env name. (A command that ran and exited non-zero is a `CommandResult`.)"""


class Commanding(Protocol):
    """Optional capability `exec` (formerly `run_command`): run a command in a ready
    sandbox.

    `argv` is run as given, never through a shell (pass `["sh", "-c", script]` for
    one); every argument reaches the backend quoted. `service=None` runs it in the
    sandbox's workspace (a relative `workdir` is taken from there); a service name
    runs it inside that service (its container), `workdir` there as given. `env`
    adds variables (names match `ENV_NAME_RE`). `on_output` is awaited with the raw
    output as it arrives (see `OutputFn`); the result keeps its tail, counts and
    digests.

    Past `timeout` seconds the command is stopped (TERM, then KILL after ~2 s) and
    `TimeoutError` is raised. If the awaiting task is cancelled (the client went away,
    the sandbox is destroyed), the adapter stops the remote process the same way
    within ~5 s and re-raises `CancelledError`: killing a local client (`ssh`,
    `podman exec`) is not enough where the process lives on. A command that cannot be
    started raises `CommandRefused` (or another `ExtensionError`). The manifest's
    `hooks.exec.timeout` is the longest a caller may ask for; callers pass
    `min(theirs, that)`. `retries` must stay 0: a command is not idempotent.
    """

    async def exec(
        self,
        ctx: StepContext,
        handle: Handle,
        argv: Sequence[str],
        *,
        service: str | None = None,
        workdir: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        on_output: OutputFn | None = None,
    ) -> CommandResult: ...


def check_command(argv: Sequence[str], env: Mapping[str, str] | None) -> dict[str, str]:
    """The checks every `exec` makes first: a non-empty argv of strings, and env
    names that are plain identifiers (values may be anything but a NUL byte)."""
    if not argv or not all(isinstance(a, str) for a in argv):
        raise CommandRefused("argv must be a non-empty list of strings")
    if any("\x00" in a for a in argv):
        raise CommandRefused("argv contains a NUL byte")
    checked: dict[str, str] = {}
    for name, value in (env or {}).items():
        if not ENV_NAME_RE.fullmatch(name):
            raise CommandRefused(f"env name {name[:64]!r} must match {ENV_NAME_RE.pattern}")
        if "\x00" in value:
            raise CommandRefused(f"env {name} contains a NUL byte")
        checked[name] = value
    return checked


class _Stream:
    """One stream of a command: its count, digest, decoder and kept tail."""

    def __init__(self) -> None:
        self.count = 0
        self.digest = hashlib.sha256()
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.parts: list[str] = []
        self.size = 0


class OutputBuffer:
    """Collects a command's streams for a `CommandResult`: awaits `on_output` with
    every piece, counts and digests all bytes and keeps the tail of each stream (at
    most `keep` characters; `keep=0` keeps nothing, for a stream only passed on)."""

    def __init__(self, on_output: OutputFn | None = None, keep: int = OUTPUT_KEEP) -> None:
        self.on_output = on_output
        self.keep = keep
        self.streams = {"stdout": _Stream(), "stderr": _Stream()}
        self.truncated = False

    async def add(self, stream: str, data: bytes) -> None:
        """One piece of `stream` as it arrived; returns once `on_output` took it."""
        if not data:
            return
        if self.on_output is not None:
            await self.on_output(stream, data)
        self._keep(stream, data)

    def add_text(self, stream: str, text: str) -> None:
        """Output the adapter itself makes (a simulated command, an error line), kept
        and counted like the command's; not passed to `on_output` (use `add`)."""
        self._keep(stream, text.encode())

    def _keep(self, stream: str, data: bytes) -> None:
        state = self.streams[stream]
        state.count += len(data)
        state.digest.update(data)
        if self.keep <= 0:
            self.truncated = True
            return
        text = state.decoder.decode(data)
        state.parts.append(text)
        state.size += len(text)
        if state.size > 2 * self.keep:  # compact now and then, not per piece
            tail = "".join(state.parts)[-self.keep :]
            state.parts[:] = [tail]
            state.size = len(tail)
            self.truncated = True

    def text(self, stream: str) -> str:
        state = self.streams[stream]
        if self.keep <= 0:
            return ""
        joined = "".join(state.parts) + state.decoder.decode(b"", final=True)
        state.parts[:] = [joined]
        if len(joined) > self.keep:
            self.truncated = True
        return joined[-self.keep :]

    def result(self, exit_code: int, duration: float) -> CommandResult:
        stdout, stderr = self.text("stdout"), self.text("stderr")
        out, err = self.streams["stdout"], self.streams["stderr"]
        return CommandResult(
            exit_code,
            stdout,
            stderr,
            round(duration, 3),
            self.truncated,
            stdout_bytes=out.count,
            stderr_bytes=err.count,
            stdout_sha256=out.digest.hexdigest(),
            stderr_sha256=err.digest.hexdigest(),
        )


# ---- files ----------------------------------------------------------------------------

MAX_PATH_BYTES = 4096
FILE_CHUNK = 1024 * 1024  # the largest piece a FileStream yields
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class FileRefused(ExtensionError):
    """A path that is not allowed or not there: leaves the root, has a `..` part, a
    NUL, is a directory, does not exist, parent is not a directory, a link out of the
    workspace."""


class FileMissing(FileRefused):
    """There is no file at the path (the API answers 404)."""


class FileTooLarge(ExtensionError):
    """The file is bigger than the caller's `max_bytes` (nothing was streamed)."""


def check_file_path(path: str) -> str:
    """The normalized absolute POSIX path `path` names; refuses '', NUL, control
    characters, any '..' component and paths longer than `MAX_PATH_BYTES`; 'a/b' is
    taken as '/a/b'. Looks at nothing on disk."""
    if not isinstance(path, str) or not path:
        raise FileRefused("the path is empty")
    if "\x00" in path:
        raise FileRefused("the path contains a NUL byte")
    if _CONTROL_RE.search(path):
        raise FileRefused("the path contains a control character")
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        raise FileRefused("the path is not valid UTF-8") from None
    if size > MAX_PATH_BYTES:
        raise FileRefused(f"the path is longer than {MAX_PATH_BYTES} bytes")
    if ".." in path.split("/"):
        raise FileRefused("the path has a '..' component")
    normalized = posixpath.normpath("/" + path.lstrip("/"))
    if normalized == "/":
        raise FileRefused("the path names the root directory")
    return normalized


def confine_file(root: Path, path: str, *, for_write: bool = False) -> Path:
    """The local file `path` names with `root` as `/` (a sandbox's workspace), symlinks
    resolved: `FileRefused` if it leads out of `root`, is a directory or (reading) is
    not there. Writing, the parent's resolved path must lie in `root` and the file
    itself is replaced, never followed."""
    relative = check_file_path(path).lstrip("/")
    base = root.resolve()
    lexical = base / relative
    if for_write:
        parent = lexical.parent.resolve()  # missing parts are kept as they are
        if not parent.is_relative_to(base):
            raise FileRefused(f"{path}: its folder leads out of the workspace through a link")
        if parent.exists() and not parent.is_dir():
            raise FileRefused(f"{path}: its parent is not a directory")
        target = parent / lexical.name
        if target.is_dir() and not target.is_symlink():
            raise FileRefused(f"{path}: is a directory")
        return target
    try:
        resolved = lexical.resolve(strict=True)
    except FileNotFoundError:
        raise FileMissing(f"{path}: does not exist") from None
    except (OSError, RuntimeError) as exc:
        raise FileRefused(f"{path}: {exc.__class__.__name__}") from None
    if not resolved.is_relative_to(base):
        raise FileRefused(f"{path}: leads out of the workspace through a link")
    if resolved.is_dir():
        raise FileRefused(f"{path}: is a directory")
    if not resolved.is_file():
        raise FileRefused(f"{path}: is not a regular file")
    return resolved


async def _no_close() -> None:
    return None


@dataclass
class FileStream:
    """A file being read from a sandbox: its `size` (known before the first byte),
    its content as bounded chunks (at most `FILE_CHUNK`), and `aclose` to stop the
    transfer early (helper processes killed). Iterating to the end closes it too."""

    size: int
    chunks: AsyncIterator[bytes]
    closer: Callable[[], Awaitable[None]] = field(default=_no_close, repr=False)

    async def aclose(self) -> None:
        aclose = getattr(self.chunks, "aclose", None)
        if aclose is not None:
            await aclose()
        await self.closer()


class FileTransferring(Protocol):
    """Optional capabilities `put_file` + `get_file` (they go together).

    `path` is checked with `check_file_path` first. With a `service`, the path is
    inside that service's container (the engine resolves it within the container's
    own root, so a link never reaches the host). Without one, the sandbox's workspace
    is the root: "/x/y" and "x/y" both mean <workspace>/x/y, and the resolved path
    (links followed) must stay inside the workspace, else `FileRefused`.

    `put_file` writes the local file `source` (spooled by the caller, its size known)
    to `path`, replacing it; missing parent directories are created. `get_file`
    answers a `FileStream`; `FileTooLarge` if the file is bigger than `max_bytes`,
    before anything is streamed. Neither ever holds the whole file in memory.
    """

    async def put_file(
        self,
        ctx: StepContext,
        handle: Handle,
        path: str,
        source: Path,
        *,
        service: str | None = None,
    ) -> None: ...

    async def get_file(
        self,
        ctx: StepContext,
        handle: Handle,
        path: str,
        *,
        service: str | None = None,
        max_bytes: int,
    ) -> FileStream: ...


# ---- logs -----------------------------------------------------------------------------

LogFn = Callable[[str, str, bytes], Awaitable[None]]
"""`await on_output(service, stream, data)`: a piece of a service's log, raw bytes;
backpressure as for `OutputFn`."""


class Logging(Protocol):
    """Optional capability `logs`: the services' output as the engine kept it.

    `service` None: every service of the sandbox, concurrently. `tail`: only the last
    N lines of each; `since`: a unix timestamp. Without `follow` it returns once
    everything was passed on; following, once every followed container stopped.
    Cancelling the awaiting task stops the engine's log processes. An unknown service
    is a `CommandRefused` naming it and the known ones.
    """

    async def logs(
        self,
        ctx: StepContext,
        handle: Handle,
        *,
        service: str | None = None,
        follow: bool = False,
        tail: int | None = None,
        since: float | None = None,
        on_output: LogFn,
    ) -> None: ...
