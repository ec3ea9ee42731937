"""ext.compose-ssh: a docker compose project per sandbox on an SSH host from a pool.

Every hook is the shared compose core (`extensions/compose.py`); this module only
says where the hosts are (the `hosts` pool) and gives each an `SSHTransport` over one
pooled connection per host.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

from extensions.compose import (
    COMPOSE_FILES,
    PROJECT_PREFIX,
    RESTORE_OVERRIDE,
    ComposeAdapter,
    ComposeHost,
    checkpoint_tag,
    container_names,
    parse_ps,
    project_name,
    running_container,
)
from extensions.hosts import PoolHost, parse_pool, place_least_loaded
from extensions.sdk import Placement, RuntimeInfo, StepContext
from extensions.ssh import SSHPool
from extensions.transport import SSHTransport

__all__ = [
    "COMPOSE_FILES",
    "PROJECT_PREFIX",
    "RESTORE_OVERRIDE",
    "ComposeSSH",
    "checkpoint_tag",
    "compose_cmd",
    "container_names",
    "engine_cmd",
    "parse_hosts",
    "parse_ps",
    "project_name",
    "running_container",
]


def parse_hosts(config: Mapping[str, Any]) -> dict[str, PoolHost]:
    return parse_pool(
        config.get("hosts"),
        what="compose-ssh hosts",
        default_root=str(config.get("root") or "/srv/sandboxer"),
    )


def compose_cmd(host: PoolHost, config: Mapping[str, Any]) -> list[str]:
    """The host's own compose command, else the configured one."""
    return shlex.split(
        str(host.raw.get("compose_cmd") or config.get("compose_cmd") or "docker compose")
    )


def engine_cmd(host: PoolHost, config: Mapping[str, Any]) -> list[str]:
    """The container engine CLI beside the compose command (ps, commit, save, load)."""
    return shlex.split(str(host.raw.get("engine_cmd") or config.get("engine_cmd") or "docker"))


class ComposeSSH(ComposeAdapter):
    what = "compose-ssh"

    def __init__(self, config: dict[str, Any], runtime: RuntimeInfo) -> None:
        super().__init__(config, runtime)
        self.pool = SSHPool()

    def hosts(self, config: Mapping[str, Any]) -> dict[str, ComposeHost]:
        return {
            name: ComposeHost(
                name=name,
                address=host.target.host,
                root=host.root,
                transport=SSHTransport(self.pool, host.target, name),
                compose_cmd=tuple(compose_cmd(host, config)),
                engine_cmd=tuple(engine_cmd(host, config)),
            )
            for name, host in parse_hosts(config).items()
        }

    def place(self, ctx: StepContext, load: Mapping[str, int]) -> Placement:
        return place_least_loaded(parse_hosts(ctx.config), load, "host pool")

    async def close(self) -> None:
        await self.pool.close()
