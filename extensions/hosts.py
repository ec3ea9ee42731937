"""Host pools and remote workspaces, shared by the SSH-based extensions.

A pool entry names an SSH target, how many sandboxes it may hold, and the remote
root under which each sandbox gets its own directory. The shell scripts here take
every value as a positional argument (never pasted into the script), refuse
symlinks, and never act outside the root.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extensions.sdk import ExtensionError, NoCapacity, PathRefused, Placement, confine_path
from extensions.ssh import SSHPool, SSHTarget

ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{2,62}$")
HOST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

# Creates <root>/<name> as a real directory: never through a symlink, never outside root.
PREPARE_WORKSPACE = r"""
set -eu
root=$1; dir=$2
mkdir -p -- "$root"
real_root=$(cd -P -- "$root" && pwd -P)
if [ -L "$dir" ]; then echo "refusing: $dir is a symlink" >&2; exit 3; fi
mkdir -p -- "$dir"
real_dir=$(cd -P -- "$dir" && pwd -P)
case "$real_dir" in "$real_root"/*) ;; *) echo "refusing: $dir is outside $root" >&2; exit 3;; esac
"""

# Removes <dir> (a symlink only as a link). Missing is success: teardown is idempotent.
REMOVE_WORKSPACE = r"""
set -eu
dir=$1
if [ -L "$dir" ]; then rm -f -- "$dir"; exit 0; fi
if [ -d "$dir" ]; then cd / && rm -rf -- "$dir"; fi
"""


# Lists `<root>/<name>` directories (not symlinks), one name per line.
LIST_WORKSPACES = r"""
set -eu
root=$1
[ -d "$root" ] || exit 0
for d in "$root"/*; do
  if [ -d "$d" ] && [ ! -L "$d" ]; then printf '%s\n' "${d##*/}"; fi
done
"""


@dataclass(frozen=True)
class PoolHost:
    name: str
    target: SSHTarget
    capacity: int
    root: str
    raw: Mapping[str, Any]


def check_root(root: str, where: str) -> str:
    normal = posixpath.normpath(root)
    if not root.startswith("/") or normal in ("/", "//") or ".." in root.split("/"):
        raise ExtensionError(f"{where}: root must be an absolute path below /, got {root!r}")
    return normal


def check_sandbox_id(sandbox_id: str) -> str:
    if not ID_RE.fullmatch(sandbox_id):
        raise ExtensionError(f"invalid sandbox id {sandbox_id!r}")
    return sandbox_id


def workspace_path(host: PoolHost, sandbox_id: str) -> str:
    """`<root>/<sandbox id>`: the id is checked first, so it cannot leave the root."""
    return f"{host.root}/{check_sandbox_id(sandbox_id)}"


def parse_pool(
    entries: Any, *, what: str, default_root: str, default_capacity: int = 4
) -> dict[str, PoolHost]:
    pool: dict[str, PoolHost] = {}
    for index, raw in enumerate(entries or []):
        where = f"{what}[{index}]"
        if not isinstance(raw, dict):
            raise ExtensionError(f"{where}: must be a mapping")
        name = str(raw.get("name") or raw.get("alias") or raw.get("host") or "")
        if not HOST_NAME_RE.fullmatch(name):
            raise ExtensionError(f"{where}: name {name!r} must match {HOST_NAME_RE.pattern}")
        if name in pool:
            raise ExtensionError(f"{where}: name {name!r} is used twice")
        capacity = raw.get("capacity", default_capacity)
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
            raise ExtensionError(f"{where}: capacity must be a whole number >= 0")
        pool[name] = PoolHost(
            name=name,
            target=SSHTarget.from_config(raw, where),
            capacity=capacity,
            root=check_root(str(raw.get("root") or default_root), where),
            raw=raw,
        )
    return pool


def place_least_loaded(
    pool: Mapping[str, PoolHost],
    load: Mapping[str, int],
    what: str,
    only: str | None = None,
) -> Placement:
    """The least-loaded host with room (or the one asked for, if it has room)."""
    if not pool:
        raise NoCapacity(f"no {what} configured")
    if only is not None:
        if only not in pool:
            raise NoCapacity(
                f"{what} {only!r} is not registered (registered: {', '.join(sorted(pool))})"
            )
        candidates = [pool[only]]
    else:
        candidates = list(pool.values())
    with_room = [h for h in candidates if load.get(h.name, 0) < h.capacity]
    if not with_room:
        usage = ", ".join(f"{h.name} {load.get(h.name, 0)}/{h.capacity}" for h in candidates)
        raise NoCapacity(f"{what} is full ({usage})")
    best = min(with_room, key=lambda h: (load.get(h.name, 0) / max(h.capacity, 1), h.name))
    used = load.get(best.name, 0)
    why = "was asked for and has room" if only else "is the least loaded with room"
    return Placement(best.name, f"{best.name} {why} ({used}/{best.capacity} in use)")


def local_repo(raw: str, what: str, roots: Sequence[Path]) -> Path:
    """The `repo` input: a directory on the machine sandboxer runs on, under one of
    the operator's repo roots (checked at create too; again here, where it is read)."""
    try:
        return confine_path(raw, roots)
    except PathRefused as exc:
        raise ExtensionError(f"{what}: repo {raw[:200]!r} {exc}") from None


def pool_host(pool: Mapping[str, PoolHost], name: str | None, what: str) -> PoolHost:
    if name is None or name not in pool:
        raise ExtensionError(f"{what} {name!r} is not configured")
    return pool[name]


async def workspace_ids(ssh: SSHPool, host: PoolHost) -> list[str]:
    """Sandbox ids that have a workspace directory under the host's root."""
    result = await ssh.run(host.target, ["sh", "-c", LIST_WORKSPACES, "sh", host.root], timeout=60)
    return [name for name in result.stdout.split() if ID_RE.fullmatch(name)]


async def remove_workspace(ssh: SSHPool, host: PoolHost, sandbox_id: str) -> None:
    directory = workspace_path(host, sandbox_id)
    await ssh.run(host.target, ["sh", "-c", REMOVE_WORKSPACE, "sh", directory], timeout=300)
