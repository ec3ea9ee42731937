"""The adapter protocol every extension implements.

An adapter is built once per service with its resolved base config; each hook gets a
`StepContext` naming the sandbox, its inputs (secrets included: they live only in
memory) and the config after profile overrides. `teardown` must be idempotent and
must work from the sandbox id alone, because a crash can lose the handle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

Handle = dict[str, str]
ProgressFn = Callable[[str], None]

REQUIRED_HOOKS = ("provision", "wait_ready", "teardown")
OPTIONAL_HOOKS = ("snapshot", "restore", "estimate_cost", "meter_actual")


def _no_progress(_message: str) -> None:
    return None


@dataclass(frozen=True)
class RuntimeInfo:
    """Where the service keeps its files; adapters put local state under data_dir."""

    data_dir: Path


@dataclass(frozen=True)
class StepContext:
    sandbox_id: str
    profile: str
    inputs: Mapping[str, str]
    config: Mapping[str, Any]
    host: str | None = None
    progress: ProgressFn = field(default=_no_progress, compare=False)


class ExtensionError(Exception):
    """A hook failed in a way the adapter understands; the message goes into the event."""


@runtime_checkable
class Extension(Protocol):
    async def provision(self, ctx: StepContext) -> Handle: ...

    async def wait_ready(self, ctx: StepContext, handle: Handle) -> list[str]: ...

    async def teardown(self, ctx: StepContext, handle: Handle | None) -> None: ...
