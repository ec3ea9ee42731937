"""The adapter protocol every extension implements.

An adapter is built once per service with its resolved base config; each hook gets a
`StepContext` naming the sandbox, its inputs (secrets included: they live only in
memory) and the config after profile overrides. `teardown` must be idempotent and
must work from the sandbox id alone, because a crash can lose the handle.
"""

from __future__ import annotations

import os
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
