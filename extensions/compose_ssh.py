"""ext.compose-ssh: a docker compose project per sandbox on an SSH host from a pool.

provision: SSH to the placed host → an isolated directory `<root>/<sandbox id>` →
rsync the `repo` input into it → `<compose> -p sandboxer-<id> up -d`.
wait_ready: every service of the project has a running container (compose `ps`);
no HTTP health checks: the validator owns those.
teardown: compose down (volumes, orphans) and remove the directory; idempotent.
"""

from __future__ import annotations

import asyncio
import json
import posixpath
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from extensions.sdk import (
    ExtensionError,
    Handle,
    NoCapacity,
    Placement,
    RuntimeInfo,
    StepContext,
)
from extensions.ssh import SSHPool, SSHTarget, rsync

ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{2,62}$")
HOST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
COMPOSE_FILES = ("compose.yml", "compose.yaml", "docker-compose.yml", "docker-compose.yaml")
RUNNING = {"running"}
DEAD = {"exited", "dead", "stopped", "removing"}

# Creates <root>/<id> as a real directory: never through a symlink, never outside root.
PREPARE = r"""
set -eu
root=$1; dir=$2
mkdir -p -- "$root"
real_root=$(cd -P -- "$root" && pwd -P)
if [ -L "$dir" ]; then echo "refusing: $dir is a symlink" >&2; exit 3; fi
mkdir -p -- "$dir"
real_dir=$(cd -P -- "$dir" && pwd -P)
case "$real_dir" in "$real_root"/*) ;; *) echo "refusing: $dir is outside $root" >&2; exit 3;; esac
"""

# compose down (when a compose file is there), then remove the directory. Idempotent.
TEARDOWN = r"""
set -u
dir=$1; stop=$2; project=$3; shift 3
if [ -L "$dir" ]; then rm -f -- "$dir"; exit 0; fi
[ -d "$dir" ] || exit 0
cd -- "$dir" || exit 1
for f in compose.yml compose.yaml docker-compose.yml docker-compose.yaml; do
  if [ -f "$f" ]; then
    "$@" -p "$project" -f "$f" down -v --remove-orphans -t "$stop" || exit 1
    break
  fi
done
cd / && rm -rf -- "$dir"
"""


@dataclass(frozen=True)
class ComposeHost:
    name: str
    target: SSHTarget
    capacity: int
    root: str
    compose_cmd: list[str]


def _check_root(root: str, where: str) -> str:
    normal = posixpath.normpath(root)
    if not root.startswith("/") or normal in ("/", "//") or ".." in root.split("/"):
        raise ExtensionError(f"{where}: root must be an absolute path below /, got {root!r}")
    return normal


def parse_hosts(config: Mapping[str, Any]) -> dict[str, ComposeHost]:
    default_cmd = shlex.split(str(config.get("compose_cmd") or "docker compose"))
    default_root = str(config.get("root") or "/srv/sandboxer")
    hosts: dict[str, ComposeHost] = {}
    for index, raw in enumerate(config.get("hosts") or []):
        where = f"compose-ssh hosts[{index}]"
        if not isinstance(raw, dict):
            raise ExtensionError(f"{where}: must be a mapping")
        name = str(raw.get("name") or raw.get("host") or "")
        if not HOST_NAME_RE.match(name):
            raise ExtensionError(f"{where}: name {name!r} must match {HOST_NAME_RE.pattern}")
        if name in hosts:
            raise ExtensionError(f"{where}: host name {name!r} is used twice")
        capacity = raw.get("capacity", 4)
        if not isinstance(capacity, int) or capacity < 0:
            raise ExtensionError(f"{where}: capacity must be a whole number >= 0")
        cmd = shlex.split(str(raw["compose_cmd"])) if raw.get("compose_cmd") else default_cmd
        hosts[name] = ComposeHost(
            name=name,
            target=SSHTarget.from_config(raw, where),
            capacity=capacity,
            root=_check_root(str(raw.get("root") or default_root), where),
            compose_cmd=cmd,
        )
    return hosts


def project_name(sandbox_id: str) -> str:
    return f"sandboxer-{sandbox_id}"


def parse_ps(output: str) -> dict[str, str]:
    """Service → state, from `ps --format json` of docker compose (JSON lines or an
    array) or podman-compose (podman's array, services in compose labels)."""
    text = output.strip()
    if not text:
        return {}
    try:
        data = json.loads(text)
        items = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        items = [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]
    states: dict[str, str] = {}
    for item in items:
        labels = item.get("Labels") or {}
        if isinstance(labels, str):  # docker: "k=v,k=v"
            labels = dict(p.split("=", 1) for p in labels.split(",") if "=" in p)
        service = item.get("Service") or labels.get("com.docker.compose.service")
        state = str(item.get("State") or "").lower()
        if service:
            # Any running container of a service counts; otherwise keep the worst.
            if states.get(service) not in RUNNING:
                states[service] = state
    return states


class ComposeSSH:
    def __init__(self, config: dict[str, Any], runtime: RuntimeInfo) -> None:
        self.runtime = runtime
        self.base_config = config
        self.pool = SSHPool()

    # ---- config ----------------------------------------------------------------------

    def _host(self, ctx: StepContext) -> ComposeHost:
        hosts = parse_hosts(ctx.config)
        if ctx.host is None or ctx.host not in hosts:
            raise ExtensionError(f"compose-ssh: host {ctx.host!r} is not configured")
        return hosts[ctx.host]

    @staticmethod
    def _directory(host: ComposeHost, sandbox_id: str) -> str:
        if not ID_RE.match(sandbox_id):
            raise ExtensionError(f"invalid sandbox id {sandbox_id!r}")
        return f"{host.root}/{sandbox_id}"

    @staticmethod
    def _repo(ctx: StepContext) -> Path:
        raw = ctx.inputs.get("repo")
        if not raw:
            raise ExtensionError("compose-ssh: input 'repo' is required")
        repo = Path(raw).expanduser().resolve()
        if not repo.is_dir():
            raise ExtensionError(f"compose-ssh: repo {raw!r} is not a directory")
        return repo

    @staticmethod
    def _compose_file(ctx: StepContext, repo: Path) -> tuple[str, list[str]]:
        configured = str(ctx.config.get("compose_file") or "")
        candidates = [configured] if configured else list(COMPOSE_FILES)
        for name in candidates:
            if "/" in name or name.startswith("."):
                raise ExtensionError(f"compose_file must be a file name, got {name!r}")
            path = repo / name
            if path.is_file():
                try:
                    doc = yaml.safe_load(path.read_text())
                    services = sorted((doc or {}).get("services") or {})
                except (yaml.YAMLError, AttributeError) as exc:
                    raise ExtensionError(f"{name}: not a compose file: {exc}") from exc
                if not services:
                    raise ExtensionError(f"{name}: defines no services")
                return name, services
        raise ExtensionError(f"no compose file in repo (looked for {', '.join(candidates)})")

    # ---- placement -------------------------------------------------------------------

    def place(self, ctx: StepContext, load: Mapping[str, int]) -> Placement:
        hosts = parse_hosts(ctx.config)
        if not hosts:
            raise NoCapacity("compose-ssh: no hosts configured")
        with_room = [h for h in hosts.values() if load.get(h.name, 0) < h.capacity]
        if not with_room:
            usage = ", ".join(
                f"{h.name} {load.get(h.name, 0)}/{h.capacity}" for h in hosts.values()
            )
            raise NoCapacity(f"host pool is full ({usage})")
        best = min(with_room, key=lambda h: (load.get(h.name, 0) / max(h.capacity, 1), h.name))
        used = load.get(best.name, 0)
        return Placement(
            best.name,
            f"host {best.name} is the least loaded with room ({used}/{best.capacity} in use)",
        )

    # ---- hooks -----------------------------------------------------------------------

    async def provision(self, ctx: StepContext) -> Handle:
        host = self._host(ctx)
        repo = self._repo(ctx)
        compose_file, services = self._compose_file(ctx, repo)
        directory = self._directory(host, ctx.sandbox_id)
        project = project_name(ctx.sandbox_id)
        ctx.progress(f"preparing {directory} on {host.name}")
        await self.pool.run(
            host.target, ["sh", "-c", PREPARE, "sh", host.root, directory], timeout=60
        )
        ctx.progress("rsync 0%")
        await rsync(
            host.target,
            repo,
            directory,
            excludes=[str(e) for e in ctx.config.get("excludes") or []],
            filters=[":- .gitignore"] if ctx.config.get("gitignore", True) else [],
            progress=ctx.progress,
            timeout=float(ctx.config.get("rsync_timeout", 600)),
        )
        ctx.progress(f"compose up ({len(services)} services)")
        await self.pool.run(
            host.target,
            [*host.compose_cmd, "-p", project, "-f", compose_file, "up", "-d"],
            cwd=directory,
            timeout=float(ctx.config.get("up_timeout", 600)),
        )
        return {
            "host": host.name,
            "address": host.target.host,
            "directory": directory,
            "project": project,
            "compose_file": compose_file,
            "services": ",".join(services),
        }

    async def wait_ready(self, ctx: StepContext, handle: Handle) -> list[str]:
        host = self._host(ctx)
        directory = handle.get("directory") or self._directory(host, ctx.sandbox_id)
        project = handle.get("project") or project_name(ctx.sandbox_id)
        expected = [s for s in handle.get("services", "").split(",") if s]
        poll = float(ctx.config.get("poll_interval", 0.5))
        # All services running on this many polls in a row: a service that dies at
        # once (a crashing entrypoint) is caught instead of reported ready.
        settle = max(int(ctx.config.get("settle_polls", 2)), 1)
        streak = 0
        compose = [
            *host.compose_cmd,
            "-p",
            project,
            "-f",
            handle.get("compose_file") or COMPOSE_FILES[0],
        ]
        while True:
            # docker compose needs -a to show exited containers; podman-compose always
            # shows them and refuses -a.
            result = await self.pool.run(
                host.target,
                [*compose, "ps", "-a", "--format", "json"],
                cwd=directory,
                timeout=60,
                check=False,
            )
            if result.exit_status != 0:
                result = await self.pool.run(
                    host.target, [*compose, "ps", "--format", "json"], cwd=directory, timeout=60
                )
            states = parse_ps(result.stdout)
            for service in expected:
                if states.get(service) in DEAD:
                    raise ExtensionError(f"service {service!r} is {states[service]}")
            waiting = [s for s in expected if states.get(s) not in RUNNING]
            streak = 0 if waiting else streak + 1
            if streak >= settle:
                return expected
            if waiting:
                ctx.progress(f"waiting for {', '.join(waiting)}")
            await asyncio.sleep(poll)  # polling the remote engine; the hook has a timeout

    async def teardown(self, ctx: StepContext, handle: Handle | None) -> None:
        if ctx.host is None:
            return  # never placed: nothing was made
        host = self._host(ctx)
        directory = self._directory(host, ctx.sandbox_id)
        stop = str(int(ctx.config.get("stop_timeout", 10)))
        ctx.progress("compose down")
        await self.pool.run(
            host.target,
            [
                "sh",
                "-c",
                TEARDOWN,
                "sh",
                directory,
                stop,
                project_name(ctx.sandbox_id),
                *host.compose_cmd,
            ],
            timeout=float(ctx.config.get("down_timeout", 300)),
        )

    async def close(self) -> None:
        await self.pool.close()
