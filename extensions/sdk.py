"""The adapter protocol every extension implements.

An adapter is built once per service with its resolved base config; each hook gets a
`StepContext` naming the sandbox, its inputs (secrets included: they live only in
memory) and the config after profile overrides. `teardown` must be idempotent and
must work from the sandbox id alone, because a crash can lose the handle.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
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
    "run_command",
    "services",
    "endpoints",
)


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


OutputFn = Callable[[str, str], None]
"""`on_output(stream, text)`: a piece of a running command's output as it arrives;
`stream` is "stdout" or "stderr". Called on the event loop: it must not block."""

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
OUTPUT_KEEP = 1024 * 1024  # characters of each stream a CommandResult keeps (its tail)


@dataclass(frozen=True)
class CommandResult:
    """How a command ended. `stdout`/`stderr` hold (the last `OUTPUT_KEEP` characters
    of) each stream; `on_output` saw all of it, in order, while it ran."""

    exit_code: int
    stdout: str
    stderr: str
    duration: float  # seconds
    truncated: bool = False  # a stream was longer than what is kept


class CommandRefused(ExtensionError):
    """The command could not be started: no such service, `service` not supported,
    a bad env name. (A command that ran and exited non-zero is a `CommandResult`.)"""


class Commanding(Protocol):
    """Optional capability `run_command`: run a command in a ready sandbox.

    `argv` is run as given, never through a shell (pass `["sh", "-c", script]` for
    one); every argument reaches the backend quoted. `service=None` runs it in the
    sandbox's workspace (a relative `workdir` is taken from there); a service name
    runs it inside that service (its container), `workdir` there as given. `env`
    adds variables (names match `ENV_NAME_RE`). `on_output` gets the output as it
    arrives (the later exec feature streams it to users); the result keeps its tail.

    Past `timeout` seconds the command is abandoned (stopped where the backend can)
    and `TimeoutError` is raised. A command that cannot be started raises
    `CommandRefused` (or another `ExtensionError`). The manifest's
    `hooks.run_command.timeout` is the longest a caller may ask for; callers pass
    `min(theirs, that)`. `retries` must stay 0: a command is not idempotent.
    """

    async def run_command(
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
    """The checks every `run_command` makes first: a non-empty argv of strings, and env
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


class OutputBuffer:
    """Collects a command's streams for a `CommandResult`: passes every piece to
    `on_output` and keeps the tail of each stream (at most `keep` characters)."""

    def __init__(self, on_output: OutputFn | None = None, keep: int = OUTPUT_KEEP) -> None:
        self.on_output = on_output
        self.keep = keep
        self.parts: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.sizes = {"stdout": 0, "stderr": 0}
        self.truncated = False

    def add(self, stream: str, text: str) -> None:
        if not text:
            return
        if self.on_output is not None:
            self.on_output(stream, text)
        parts = self.parts[stream]
        parts.append(text)
        self.sizes[stream] += len(text)
        if self.sizes[stream] > 2 * self.keep:  # compact now and then, not per piece
            tail = "".join(parts)[-self.keep :]
            parts[:] = [tail]
            self.sizes[stream] = len(tail)
            self.truncated = True

    def text(self, stream: str) -> str:
        joined = "".join(self.parts[stream])
        if len(joined) > self.keep:
            self.truncated = True
        return joined[-self.keep :]

    def result(self, exit_code: int, duration: float) -> CommandResult:
        stdout, stderr = self.text("stdout"), self.text("stderr")
        return CommandResult(exit_code, stdout, stderr, round(duration, 3), self.truncated)
