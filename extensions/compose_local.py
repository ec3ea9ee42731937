"""ext.compose-local: a docker compose project per sandbox on the machine `serve` runs
on, without SSH.

The same compose core as ext.compose-ssh (`extensions/compose.py`) over a
`LocalTransport`: asyncio subprocesses from argv lists and a local rsync. One host,
`local`, with room for `capacity` sandboxes; workspaces under
`<data dir>/compose-local/workspaces` (0700).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from extensions.compose import ComposeAdapter, ComposeHost, default_cmd
from extensions.sdk import NoCapacity, Placement, RuntimeInfo, StepContext
from extensions.transport import LocalTransport

HOST = "local"


def local_compose_cmd(config: Mapping[str, Any]) -> list[str]:
    """The configured compose command, else podman-compose if on PATH, else docker compose."""
    raw = str(config.get("compose_cmd") or "")
    return shlex.split(
        raw or default_cmd([("podman-compose", "podman-compose"), ("docker", "docker compose")])
    )


def local_engine_cmd(config: Mapping[str, Any]) -> list[str]:
    """The configured engine, else podman if on PATH, else docker."""
    raw = str(config.get("engine_cmd") or "")
    return shlex.split(raw or default_cmd([("podman", "podman"), ("docker", "docker")]))


class ComposeLocal(ComposeAdapter):
    what = "compose-local"
    scoped = True  # this machine's engine is shared: only what our data dir shows

    def __init__(self, config: dict[str, Any], runtime: RuntimeInfo) -> None:
        super().__init__(config, runtime)
        self.root = Path(runtime.data_dir).resolve() / "compose-local" / "workspaces"
        self.transport = LocalTransport()

    def hosts(self, config: Mapping[str, Any]) -> dict[str, ComposeHost]:
        return {
            HOST: ComposeHost(
                name=HOST,
                address=str(config.get("address") or "127.0.0.1"),
                root=str(self.root),
                transport=self.transport,
                compose_cmd=tuple(local_compose_cmd(config)),
                engine_cmd=tuple(local_engine_cmd(config)),
            )
        }

    def host(self, ctx: StepContext) -> ComposeHost:
        return self.hosts(ctx.config)[HOST]  # one host, whatever was recorded

    def placed(self, ctx: StepContext) -> bool:
        return True  # a crash before RouteChosen may still have left a workspace here

    async def prepare_root(self, host: ComposeHost) -> None:
        def make() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            os.chmod(self.root.parent, 0o700)
            os.chmod(self.root, 0o700)

        await asyncio.to_thread(make)

    def engine_present(self, host: ComposeHost) -> bool:
        return shutil.which(host.engine_cmd[0]) is not None if host.engine_cmd else False

    def place(self, ctx: StepContext, load: Mapping[str, int]) -> Placement:
        capacity = int(ctx.config.get("capacity", 8))
        used = load.get(HOST, 0)
        if used >= capacity:
            raise NoCapacity(f"this machine is full ({HOST} {used}/{capacity})")
        return Placement(HOST, f"this machine has room ({used}/{capacity} in use)")
