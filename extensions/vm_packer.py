"""ext.vm-packer: attach mode for pre-built VMs.

The VM already exists (building it with Packer or importing an OVA stays with the
operator). provision: SSH to the VM, by an alias of an ssh config file or a tunnel
port on loopback → the workspace `<root>/<sandbox id>` (`/build/sbx-<hex>/`) →
optional rsync of the `repo` input. wait_ready: the workspace exists and the
profile's tool checks answer. teardown: removes the workspace only; the VM persists.
"""

from __future__ import annotations

import asyncio
import posixpath
import shlex
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from extensions.files import (
    GET_WORKSPACE_FILE,
    PUT_WORKSPACE_FILE,
    TAG_NAME,
    file_chunks,
    new_tag,
    open_workspace_file,
    refusal,
    stop_tagged_argv,
)
from extensions.hosts import (
    PREPARE_WORKSPACE,
    REMOVE_WORKSPACE,
    PoolHost,
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
    ExtensionError,
    FileStream,
    Handle,
    OutputBuffer,
    OutputFn,
    Placement,
    Resource,
    RuntimeInfo,
    StepContext,
    check_command,
    check_file_path,
)
from extensions.ssh import CommandFailed, SSHPool, command_line, rsync


def parse_vms(config: Mapping[str, Any]) -> dict[str, PoolHost]:
    shared_config = str(config.get("ssh_config") or "")
    entries = []
    for raw in config.get("vms") or []:
        if isinstance(raw, dict) and raw.get("alias") and not raw.get("ssh_config"):
            raw = {**raw, "ssh_config": shared_config}
        entries.append(raw)
    return parse_pool(
        entries,
        what="vm-packer vms",
        default_root=str(config.get("root") or "/build"),
        default_capacity=1,
    )


class VmPacker:
    def __init__(self, config: dict[str, Any], runtime: RuntimeInfo) -> None:
        self.runtime = runtime
        self.base_config = config
        self.pool = SSHPool()

    def _vm(self, ctx: StepContext) -> PoolHost:
        return pool_host(parse_vms(ctx.config), ctx.host, "VM")

    @staticmethod
    def workspace(vm: PoolHost, sandbox_id: str) -> str:
        return workspace_path(vm, sandbox_id)

    def place(self, ctx: StepContext, load: Mapping[str, int]) -> Placement:
        return place_least_loaded(parse_vms(ctx.config), load, "VM", only=ctx.inputs.get("vm"))

    async def provision(self, ctx: StepContext) -> Handle:
        vm = self._vm(ctx)
        workspace = self.workspace(vm, ctx.sandbox_id)
        raw_repo = ctx.inputs.get("repo")
        repo = local_repo(raw_repo, "vm-packer", self.runtime.repo_roots) if raw_repo else None
        ctx.progress(f"creating {workspace} on {vm.name}")
        await self.pool.run(
            vm.target, ["sh", "-c", PREPARE_WORKSPACE, "sh", vm.root, workspace], timeout=60
        )
        if repo is not None:
            ctx.progress("rsync 0%")
            await rsync(
                vm.target,
                repo,
                workspace,
                excludes=[str(e) for e in ctx.config.get("excludes") or []],
                filters=[":- .gitignore"] if ctx.config.get("gitignore", True) else [],
                progress=ctx.progress,
                timeout=float(ctx.config.get("rsync_timeout", 600)),
            )
        return {"vm": vm.name, "workspace": workspace}

    async def wait_ready(self, ctx: StepContext, handle: Handle) -> list[str]:
        vm = self._vm(ctx)
        workspace = self.workspace(vm, ctx.sandbox_id)
        found = await self.pool.run(vm.target, ["test", "-d", workspace], check=False, timeout=30)
        if found.exit_status != 0:
            raise ExtensionError(f"workspace {workspace} does not exist on {vm.name}")
        checked = ["workspace"]
        for check in ctx.config.get("tools") or []:
            argv = shlex.split(str(check))
            if not argv:
                continue
            ctx.progress(f"checking {argv[0]}")
            result = await self.pool.run(
                vm.target,
                argv,
                cwd=workspace,
                check=False,
                timeout=float(ctx.config.get("tool_timeout", 60)),
            )
            if result.exit_status != 0:
                detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
                raise ExtensionError(
                    f"tool check failed: {argv[0]} ({check!r} exited {result.exit_status} "
                    f"on {vm.name}: {detail[0][:200]})"
                )
            checked.append(argv[0])
        return checked

    async def teardown(self, ctx: StepContext, handle: Handle | None) -> None:
        if ctx.host is None:
            return  # never placed on a VM: nothing was made
        vm = self._vm(ctx)
        workspace = self.workspace(vm, ctx.sandbox_id)
        ctx.progress(f"removing {workspace}")
        await self.pool.run(
            vm.target,
            ["sh", "-c", REMOVE_WORKSPACE, "sh", workspace],
            timeout=float(ctx.config.get("remove_timeout", 300)),
        )

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
    ) -> CommandResult:
        """On the VM, in the sandbox's workspace, over the VM's pooled SSH connection.
        A VM sandbox has no services: `service` is refused. The command carries a tag
        in its environment: a timeout or a cancellation stops it on the VM."""
        variables = check_command(argv, env)
        self._no_service(service)
        vm = self._vm(ctx)
        workspace = self.workspace(vm, ctx.sandbox_id)
        cwd = posixpath.join(workspace, workdir) if workdir else workspace
        output = OutputBuffer(on_output)
        token = new_tag()
        command = command_line(argv, cwd=cwd, env={**variables, TAG_NAME: token})
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                code = await self.pool.run_streaming(vm.target, command, output, timeout=timeout)
        except (TimeoutError, asyncio.CancelledError):
            await asyncio.shield(self._stop_tagged(vm, token))
            raise
        return output.result(code, time.monotonic() - started)

    async def _stop_tagged(self, vm: PoolHost, token: str) -> None:
        try:
            await self.pool.run(vm.target, stop_tagged_argv(token), timeout=10, check=False)
        except (ExtensionError, OSError, TimeoutError):
            pass

    @staticmethod
    def _no_service(service: str | None) -> None:
        if service is not None:
            raise CommandRefused(
                f"vm-packer: a VM sandbox has no services (asked for {service[:64]!r}); "
                "commands and files are in its workspace"
            )

    # ---- files (the workspace is the root) --------------------------------------------

    async def put_file(
        self,
        ctx: StepContext,
        handle: Handle,
        path: str,
        source: Path,
        *,
        service: str | None = None,
    ) -> None:
        checked = check_file_path(path)
        self._no_service(service)
        vm = self._vm(ctx)
        argv = ["sh", "-c", PUT_WORKSPACE_FILE, "sh", self.workspace(vm, ctx.sandbox_id), checked]
        try:
            await self.pool.run_with_input(vm.target, argv, file_chunks(source), timeout=3600)
        except CommandFailed as exc:
            raise refusal(path, exc.exit_status or 1, exc.stderr, "vm-packer") from None

    async def get_file(
        self,
        ctx: StepContext,
        handle: Handle,
        path: str,
        *,
        service: str | None = None,
        max_bytes: int,
    ) -> FileStream:
        checked = check_file_path(path)
        self._no_service(service)
        vm = self._vm(ctx)
        argv = ["sh", "-c", GET_WORKSPACE_FILE, "sh", self.workspace(vm, ctx.sandbox_id), checked]
        reader = await self.pool.open_reader(vm.target, argv)
        return await open_workspace_file(reader, path, max_bytes, "vm-packer")

    # ---- reconciliation --------------------------------------------------------------

    async def inventory(self, config: Mapping[str, Any]) -> list[Resource]:
        """Workspaces under each VM's root (the VMs themselves persist by design)."""
        return [
            Resource(sandbox_id, vm.name, "workspace", self.workspace(vm, sandbox_id))
            for vm in parse_vms(config).values()
            for sandbox_id in await workspace_ids(self.pool, vm)
        ]

    async def remove_orphan(self, config: Mapping[str, Any], resource: Resource) -> None:
        if resource.kind != "workspace":
            raise ExtensionError(f"vm-packer: no such resource kind {resource.kind!r}")
        vm = pool_host(parse_vms(config), resource.host, "vm-packer VM")
        await remove_workspace(self.pool, vm, resource.sandbox_id)

    async def close(self) -> None:
        await self.pool.close()
