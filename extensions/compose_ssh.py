"""ext.compose-ssh: a docker compose project per sandbox on an SSH host from a pool.

provision: SSH to the placed host → an isolated directory `<root>/<sandbox id>` →
rsync the `repo` input into it → `<compose> -p sandboxer-<id> up -d`.
wait_ready: every service of the resolved configuration running, healthy where it
has a healthcheck (extensions.compose_services); the validator owns HTTP checks.
services / endpoints: the services' state and health, the published ports.
teardown: compose down (volumes, orphans) and remove the directory; idempotent.
"""

from __future__ import annotations

import asyncio
import json
import posixpath
import shlex
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from extensions import compose_services
from extensions.hosts import (
    ID_RE,
    PREPARE_WORKSPACE,
    PoolHost,
    check_sandbox_id,
    local_repo,
    parse_pool,
    place_least_loaded,
    pool_host,
    remove_workspace,
    workspace_ids,
    workspace_path,
)
from extensions.sdk import (
    CommandRefused,
    CommandResult,
    Endpoint,
    ExtensionError,
    Handle,
    OutputBuffer,
    OutputFn,
    Placement,
    Resource,
    RuntimeInfo,
    ServiceStatus,
    StepContext,
    check_command,
)
from extensions.ssh import SSHPool, command_line, rsync

COMPOSE_FILES = ("compose.yml", "compose.yaml", "docker-compose.yml", "docker-compose.yaml")
RUNNING = {"running"}
DEAD = {"exited", "dead", "stopped", "removing"}

RESTORE_OVERRIDE = ".sandboxer-restore.yml"

# Moves a restored workspace into place (replacing the old one, never via a symlink).
REPLACE_WORKSPACE = r"""
set -eu
new=$1; dir=$2
[ -d "$new" ] && [ ! -L "$new" ] || { echo "archive has no workspace" >&2; exit 3; }
if [ -L "$dir" ]; then rm -f -- "$dir"; fi
rm -rf -- "$dir"
mv -- "$new" "$dir"
"""

# Removes every container, network and volume of one compose project, whatever made
# it (used for orphans, whose directory and compose file may be gone). Idempotent.
REMOVE_PROJECT = r"""
set -u
project=$1; shift
label="label=com.docker.compose.project=$project"
ids=$("$@" ps -aq --filter "$label") || exit 1
if [ -n "$ids" ]; then "$@" rm -f $ids >/dev/null || exit 1; fi
for n in $("$@" network ls -q --filter "$label"); do "$@" network rm "$n" >/dev/null; done
for v in $("$@" volume ls -q --filter "$label"); do "$@" volume rm "$v" >/dev/null; done
"$@" pod rm -f "pod_$project" >/dev/null 2>&1 || true  # podman-compose's pod; docker has none
exit 0
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


PROJECT_PREFIX = "sandboxer-"


def project_name(sandbox_id: str) -> str:
    return f"{PROJECT_PREFIX}{sandbox_id}"


def container_labels(item: Mapping[str, Any]) -> dict[str, str]:
    labels = item.get("Labels") or {}
    if isinstance(labels, str):  # docker: "k=v,k=v"
        labels = dict(p.split("=", 1) for p in labels.split(",") if "=" in p)
    return {str(k): str(v) for k, v in labels.items()}


def ps_items(output: str) -> list[dict[str, Any]]:
    text = output.strip()
    if not text:
        return []
    try:
        data = json.loads(text)
        return list(data) if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]


def service_of(item: Mapping[str, Any]) -> str | None:
    service = item.get("Service") or container_labels(item).get("com.docker.compose.service")
    return str(service) if service else None


def container_names(output: str) -> dict[str, str]:
    """Service → the name of its (first) container, from `ps --format json`."""
    names: dict[str, str] = {}
    for item in ps_items(output):
        service = service_of(item)
        raw = item.get("Names") or item.get("Name")
        name = raw[0] if isinstance(raw, list) and raw else raw
        if service and isinstance(name, str) and service not in names:
            names[service] = name
    return names


def running_container(output: str, service: str) -> str | None:
    """The name of a running container of `service`, from `ps --format json` of the
    project (found by the compose labels, whatever the engine named it)."""
    for item in ps_items(output):
        raw = item.get("Names") or item.get("Name")
        name = raw[0] if isinstance(raw, list) and raw else raw
        state = str(item.get("State") or "").lower()
        if service_of(item) == service and state in RUNNING and isinstance(name, str):
            return name
    return None


def parse_ps(output: str) -> dict[str, str]:
    """Service → state, from `ps --format json` of docker compose (JSON lines or an
    array) or podman-compose (podman's array, services in compose labels)."""
    states: dict[str, str] = {}
    for item in ps_items(output):
        service = service_of(item)
        state = str(item.get("State") or "").lower()
        # Any running container of a service counts; otherwise keep the worst.
        if service and states.get(service) not in RUNNING:
            states[service] = state
    return states


def _handle(
    host: PoolHost, directory: str, project: str, compose_file: str, services: str
) -> Handle:
    return {
        "host": host.name,
        "address": host.target.host,
        "directory": directory,
        "project": project,
        "compose_file": compose_file,
        "services": services,
    }


def checkpoint_tag(project: str, service: str, checkpoint: str) -> str:
    return f"sandboxer-ckpt/{project}-{service}:{checkpoint}"


def engine_cmd(host: PoolHost, config: Mapping[str, Any]) -> list[str]:
    """The container engine CLI beside the compose command (commit, save, load)."""
    return shlex.split(str(host.raw.get("engine_cmd") or config.get("engine_cmd") or "docker"))


class ComposeSSH:
    def __init__(self, config: dict[str, Any], runtime: RuntimeInfo) -> None:
        self.runtime = runtime
        self.base_config = config
        self.pool = SSHPool()
        self._monitors: dict[str, compose_services.ServiceMonitor] = {}

    # ---- config ----------------------------------------------------------------------

    def _host(self, ctx: StepContext) -> PoolHost:
        return pool_host(parse_hosts(ctx.config), ctx.host, "compose-ssh host")

    @staticmethod
    def _directory(host: PoolHost, sandbox_id: str) -> str:
        return workspace_path(host, sandbox_id)

    def _repo(self, ctx: StepContext) -> Path:
        raw = ctx.inputs.get("repo")
        if not raw:
            raise ExtensionError("compose-ssh: input 'repo' is required")
        return local_repo(raw, "compose-ssh", self.runtime.repo_roots)

    @staticmethod
    def _compose_file(ctx: StepContext, repo: Path) -> tuple[str, list[str]]:
        configured = str(ctx.config.get("compose_file") or "")
        candidates = [configured] if configured else list(COMPOSE_FILES)
        for name in candidates:
            if "/" in name or name.startswith("."):
                raise ExtensionError(f"compose_file must be a file name, got {name!r}")
            path = repo / name
            if path.is_file():
                if not path.resolve().is_relative_to(repo):
                    # rsync would not copy such a link (--safe-links); never read it here
                    raise ExtensionError(f"{name} is a link out of the repo")
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
        return place_least_loaded(parse_hosts(ctx.config), load, "host pool")

    # ---- hooks -----------------------------------------------------------------------

    async def provision(self, ctx: StepContext) -> Handle:
        host = self._host(ctx)
        repo = self._repo(ctx)
        compose_file, services = self._compose_file(ctx, repo)
        directory = self._directory(host, ctx.sandbox_id)
        project = project_name(ctx.sandbox_id)
        ctx.progress(f"preparing {directory} on {host.name}")
        await self.pool.run(
            host.target, ["sh", "-c", PREPARE_WORKSPACE, "sh", host.root, directory], timeout=60
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
            [*compose_cmd(host, ctx.config), "-p", project, "-f", compose_file, "up", "-d"],
            cwd=directory,
            timeout=float(ctx.config.get("up_timeout", 600)),
        )
        return _handle(host, directory, project, compose_file, ",".join(services))

    async def wait_ready(self, ctx: StepContext, handle: Handle) -> list[str]:
        """Every service of the resolved configuration running, each with a
        healthcheck healthy (see extensions.compose_services)."""
        started = time.monotonic()
        monitor = await self._monitor(ctx, handle)
        return await compose_services.wait_ready(
            monitor,
            ctx.progress,
            poll_interval=float(ctx.config.get("poll_interval", 0.5)),
            settle_polls=int(ctx.config.get("settle_polls", 2)),
            timeout=float(ctx.config.get("ready_timeout", 290)),
            started=started,
        )

    # ---- watching --------------------------------------------------------------------

    async def _monitor(self, ctx: StepContext, handle: Handle) -> compose_services.ServiceMonitor:
        """The sandbox's service monitor, kept in memory (rebuilt after a restart)."""
        monitor = self._monitors.get(ctx.sandbox_id)
        if monitor is None:
            host = self._host(ctx)
            pool, target = self.pool, host.target

            async def run(argv: list[str]) -> tuple[int, str, str]:
                # compose_services puts its own limit on each call
                result = await pool.run(target, argv, timeout=600, check=False)
                return result.exit_status, result.stdout, result.stderr

            monitor = await compose_services.build_monitor(
                run,
                compose=compose_cmd(host, ctx.config),
                engine=engine_cmd(host, ctx.config),
                project=handle.get("project") or project_name(ctx.sandbox_id),
                directory=handle.get("directory") or self._directory(host, ctx.sandbox_id),
                handle=handle,
                run_healthchecks=str(ctx.config.get("run_healthchecks", "auto")),
            )
            self._monitors[ctx.sandbox_id] = monitor
        return monitor

    async def services(self, ctx: StepContext, handle: Handle) -> list[ServiceStatus]:
        """One poll: each service's state and health (running the due healthchecks)."""
        return await (await self._monitor(ctx, handle)).poll()

    async def endpoints(self, ctx: StepContext, handle: Handle) -> list[Endpoint]:
        """The published ports, `host` the compose host's address for a wildcard bind."""
        monitor = await self._monitor(ctx, handle)
        await monitor.ps()
        return monitor.endpoints(handle.get("address") or self._host(ctx).target.host)

    async def teardown(self, ctx: StepContext, handle: Handle | None) -> None:
        self._monitors.pop(ctx.sandbox_id, None)
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
                *compose_cmd(host, ctx.config),
            ],
            timeout=float(ctx.config.get("down_timeout", 300)),
        )

    # ---- commands --------------------------------------------------------------------

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
    ) -> CommandResult:
        """On the host, in the sandbox's directory (`service` None), or inside a
        running container of a service through `<engine> exec`; over the host's
        pooled SSH connection, every argument quoted."""
        variables = check_command(argv, env)
        host = self._host(ctx)
        directory = self._directory(host, ctx.sandbox_id)
        output = OutputBuffer(on_output)
        started = time.monotonic()
        async with asyncio.timeout(timeout):
            if service is None:
                cwd = posixpath.join(directory, workdir) if workdir else directory
                command = command_line(argv, cwd=cwd, env=variables)
            else:
                project = handle.get("project") or project_name(ctx.sandbox_id)
                container = running_container(await self._ps(host, ctx, project), service)
                if container is None:
                    raise CommandRefused(
                        f"compose-ssh: service {service!r} has no running container "
                        f"in project {project}"
                    )
                exec_argv = [*engine_cmd(host, ctx.config), "exec"]
                if workdir:
                    exec_argv += ["-w", workdir]
                for name, value in variables.items():
                    exec_argv += ["-e", f"{name}={value}"]
                command = command_line([*exec_argv, container, *argv])
            code = await self.pool.run_streaming(host.target, command, output, timeout=timeout)
        return output.result(code, time.monotonic() - started)

    # ---- checkpoints -----------------------------------------------------------------

    async def _ps(self, host: PoolHost, ctx: StepContext, project: str) -> str:
        """The project's containers as the engine's `ps --format json`, by the compose
        project label: asking the engine takes a fraction of a compose tool's `ps`
        (podman-compose is a Python program: ~0.7 s a call, two calls per readiness)."""
        result = await self.pool.run(
            host.target,
            [
                *engine_cmd(host, ctx.config),
                "ps",
                "-a",
                "--filter",
                f"label=com.docker.compose.project={project}",
                "--format",
                "json",
            ],
            timeout=60,
        )
        return result.stdout

    async def snapshot(self, ctx: StepContext, handle: Handle, target: Path) -> dict[str, str]:
        """Pause the services, commit and save each container's filesystem, stream the
        workspace and the images as one tar into `target`, unpause."""
        host = self._host(ctx)
        directory = self._directory(host, ctx.sandbox_id)
        project = handle.get("project") or project_name(ctx.sandbox_id)
        checkpoint = ctx.checkpoint_id or ""
        if not ID_RE.fullmatch(checkpoint):
            raise ExtensionError(f"invalid checkpoint id {checkpoint!r}")
        compose = [
            *compose_cmd(host, ctx.config),
            "-p",
            project,
            "-f",
            handle.get("compose_file") or COMPOSE_FILES[0],
        ]
        engine = engine_cmd(host, ctx.config)
        scratch = f"{host.root}/.ckpt-{checkpoint}"
        names = container_names(await self._ps(host, ctx, project))
        tags = {service: checkpoint_tag(project, service, checkpoint) for service in names}
        timeout = float(ctx.config.get("checkpoint_timeout", 1800))
        ctx.progress("pausing services")
        await self.pool.run(host.target, [*compose, "pause"], cwd=directory, timeout=120)
        try:
            await self.pool.run(host.target, ["mkdir", "-p", "--", f"{scratch}/images"])
            for service, name in sorted(names.items()):
                ctx.progress(f"committing {service}")
                await self.pool.run(
                    host.target, [*engine, "commit", name, tags[service]], timeout=timeout
                )
                await self.pool.run(
                    host.target,
                    [*engine, "save", "-o", f"{scratch}/images/{service}.tar", tags[service]],
                    timeout=timeout,
                )
            ctx.progress("streaming the archive")
            await self.pool.stream_to_file(
                host.target,
                ["tar", "-cf", "-", "-C", host.root, ctx.sandbox_id, "-C", scratch, "images"],
                target,
                timeout=timeout,
                progress=lambda n: ctx.progress(f"streamed {n // (1024 * 1024)} MiB"),
            )
        finally:
            await self.pool.run(
                host.target, [*compose, "unpause"], cwd=directory, timeout=120, check=False
            )
            await self.pool.run(host.target, ["rm", "-rf", "--", scratch], check=False)
            if tags:
                await self.pool.run(
                    host.target, [*engine, "rmi", *tags.values()], check=False, timeout=120
                )
        return {
            "source_sandbox": ctx.sandbox_id,
            "project": project,
            "compose_file": handle.get("compose_file") or COMPOSE_FILES[0],
            "services": ",".join(sorted(names)),
            "images": ",".join(f"{s}={t}" for s, t in sorted(tags.items())),
        }

    async def restore(
        self, ctx: StepContext, handle: Handle | None, source: Path, metadata: dict[str, str]
    ) -> Handle:
        """Put a checkpoint back: into this sandbox (its project is stopped first), or
        into a fresh one (a clone, `handle` None). The project comes up on the images
        committed at checkpoint time."""
        host = self._host(ctx)
        directory = self._directory(host, ctx.sandbox_id)
        project = project_name(ctx.sandbox_id)
        old = check_sandbox_id(metadata["source_sandbox"])
        compose_file = metadata.get("compose_file") or COMPOSE_FILES[0]
        compose = [*compose_cmd(host, ctx.config), "-p", project, "-f", compose_file]
        engine = engine_cmd(host, ctx.config)
        staging = f"{host.root}/.restore-{ctx.sandbox_id}"
        timeout = float(ctx.config.get("checkpoint_timeout", 1800))
        stop = str(int(ctx.config.get("stop_timeout", 10)))
        if handle is not None:
            ctx.progress("stopping the project")
            await self.pool.run(
                host.target,
                [*compose, "down", "-v", "--remove-orphans", "-t", stop],
                cwd=directory,
                timeout=300,
            )
        await self.pool.run(
            host.target, ["sh", "-c", PREPARE_WORKSPACE, "sh", host.root, staging], timeout=60
        )
        try:
            ctx.progress("streaming the archive back")
            await self.pool.stream_from_file(
                host.target, ["tar", "-xf", "-", "-C", staging], source, timeout=timeout
            )
            await self.pool.run(
                host.target,
                ["sh", "-c", REPLACE_WORKSPACE, "sh", f"{staging}/{old}", directory],
                timeout=300,
            )
            images: dict[str, str] = dict(
                pair.split("=", 1) for pair in metadata.get("images", "").split(",") if pair
            )
            for service in sorted(images):
                ctx.progress(f"loading the image of {service}")
                await self.pool.run(
                    host.target,
                    [*engine, "load", "-i", f"{staging}/images/{service}.tar"],
                    timeout=timeout,
                )
        finally:
            await self.pool.run(host.target, ["rm", "-rf", "--", staging], check=False)
        override = {"services": {s: {"image": tag} for s, tag in images.items()}}
        await self.pool.run(
            host.target,
            ["sh", "-c", 'cat > "$1"', "sh", f"{directory}/{RESTORE_OVERRIDE}"],
            stdin=yaml.safe_dump(override),
        )
        ctx.progress("compose up on the checkpoint's images")
        await self.pool.run(
            host.target,
            [*compose, "-f", RESTORE_OVERRIDE, "up", "-d"],
            cwd=directory,
            timeout=float(ctx.config.get("up_timeout", 600)),
        )
        return _handle(host, directory, project, compose_file, metadata.get("services", ""))

    # ---- reconciliation --------------------------------------------------------------

    async def inventory(self, config: Mapping[str, Any]) -> list[Resource]:
        """Per host: workspaces under the root, and compose projects named like ours
        (`sandboxer-<id>`) that have containers, with or without their workspace."""
        found: list[Resource] = []
        for host in parse_hosts(config).values():
            for sandbox_id in await workspace_ids(self.pool, host):
                found.append(
                    Resource(sandbox_id, host.name, "workspace", workspace_path(host, sandbox_id))
                )
            result = await self.pool.run(
                host.target,
                [
                    *engine_cmd(host, config),
                    "ps",
                    "-a",
                    "--filter",
                    "label=com.docker.compose.project",
                    "--format",
                    "json",
                ],
                timeout=60,
            )
            projects = {
                container_labels(item).get("com.docker.compose.project", "")
                for item in ps_items(result.stdout)
            }
            for project in sorted(projects):
                sandbox_id = project.removeprefix(PROJECT_PREFIX)
                if project.startswith(PROJECT_PREFIX) and ID_RE.fullmatch(sandbox_id):
                    found.append(Resource(sandbox_id, host.name, "compose_project", project))
        return found

    async def remove_orphan(self, config: Mapping[str, Any], resource: Resource) -> None:
        host = pool_host(parse_hosts(config), resource.host, "compose-ssh host")
        sandbox_id = check_sandbox_id(resource.sandbox_id)
        if resource.kind == "workspace":
            await self.teardown(
                StepContext(sandbox_id, "", {}, config, host=resource.host), None
            )  # compose down from the workspace's own file, then the directory
            await remove_workspace(self.pool, host, sandbox_id)
        elif resource.kind == "compose_project":
            await self.pool.run(
                host.target,
                [
                    "sh",
                    "-c",
                    REMOVE_PROJECT,
                    "sh",
                    project_name(sandbox_id),
                    *engine_cmd(host, config),
                ],
                timeout=float(config.get("down_timeout", 300)),
            )
        else:
            raise ExtensionError(f"compose-ssh: no such resource kind {resource.kind!r}")

    async def close(self) -> None:
        await self.pool.close()
