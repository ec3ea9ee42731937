"""ext.vm-packer attach mode against a real sshd standing in for the VM."""

from __future__ import annotations

import getpass
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, cast

import pytest
import yaml

from extensions import (
    Commanding,
    CommandRefused,
    ExtensionRegistry,
    FileRefused,
    FileTransferring,
    LoadedExtension,
    RuntimeInfo,
    StepContext,
)
from extensions.conformance import ExtensionConformance, Leftovers
from tests.conftest import StartService
from tests.helpers import create, destroy, event_types, wait_state
from tests.infra import SSHHost

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def vm_root(tmp_path: Path) -> Path:
    """The "VM": /build lives here, and a sentinel beside it that must survive."""
    vm = tmp_path / "vm"
    (vm / "build").mkdir(parents=True)
    (vm / "home-sentinel").write_text("the VM's own data\n")
    (vm / "build" / "other-workspace-sentinel").write_text("not ours\n")
    return vm


@pytest.fixture
def vm_env(
    ssh_hosts: list[SSHHost], tmp_path: Path, vm_root: Path
) -> Callable[..., dict[str, str]]:
    host = ssh_hosts[0]
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(
        "Host haskell-vm\n"
        "  HostName 127.0.0.1\n"
        f"  Port {host.port}\n"
        f"  User {getpass.getuser()}\n"
        f"  IdentityFile {host.client_key}\n"
        "  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {host.known_hosts}\n"
    )
    tunnel = {
        "name": "tunnel-vm",
        "host": "127.0.0.1",
        "port": host.port,
        "user": getpass.getuser(),
        "identity_file": str(host.client_key),
        "known_hosts": str(host.known_hosts),
        "root": str(vm_root / "build"),
    }
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "profile.vm-test.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "profile.vm-test",
                "extension": "vm-packer",
                "ttl_seconds": 600,
                "inputs": {"vm": {"required": True}, "repo": {}},
                "config": {"tools": ["rsync --version", "sh -c 'test -w .'"]},
            }
        )
    )

    def env(capacity: int = 2) -> dict[str, str]:
        vms = [
            {
                "name": "haskell-vm",
                "alias": "haskell-vm",
                "capacity": capacity,
                "root": str(vm_root / "build"),
            },
            {**tunnel, "capacity": capacity},
        ]
        return {
            "SANDBOXER_VM_PACKER_VMS": json.dumps(vms),
            "SANDBOXER_VM_PACKER_SSH_CONFIG": str(ssh_config),
            "SANDBOXER_PROFILES_PATH": str(profiles),
            "SANDBOXER_REPO_ROOTS": str(tmp_path),
        }

    return env


def workspaces(vm_root: Path) -> list[str]:
    return sorted(p.name for p in (vm_root / "build").iterdir() if p.name.startswith("sbx-"))


def sentinels_intact(vm_root: Path) -> bool:
    return (vm_root / "home-sentinel").read_text() == "the VM's own data\n" and (
        vm_root / "build" / "other-workspace-sentinel"
    ).exists()


@pytest.mark.parametrize("vm", ["haskell-vm", "tunnel-vm"])
async def test_workspace_with_repo_then_destroy(
    start_service: StartService,
    vm_env: Callable[..., dict[str, str]],
    vm_root: Path,
    compose_repo: Path,
    vm: str,
) -> None:
    svc = await start_service(**vm_env())
    made = await create(
        svc.http, svc.url, profile="profile.vm-test", inputs={"vm": vm, "repo": str(compose_repo)}
    )
    ready = await wait_state(svc.http, svc.url, made["id"], {"ready"}, timeout=60)
    workspace = vm_root / "build" / made["id"]
    assert ready["host"] == vm
    assert ready["handle"] == {"vm": vm, "workspace": str(workspace)}
    assert ready["services"] == ["workspace", "rsync", "sh"]
    assert (workspace / "site" / "index.html").read_text() == "served from the rsynced repo\n"
    assert not (workspace / "ignored.log").exists()
    await destroy(svc.http, svc.url, made["id"])
    await wait_state(svc.http, svc.url, made["id"], {"destroyed"}, timeout=60)
    assert not workspace.exists()
    assert sentinels_intact(vm_root)


async def test_without_repo_the_workspace_is_empty(
    start_service: StartService,
    vm_env: Callable[..., dict[str, str]],
    vm_root: Path,
) -> None:
    svc = await start_service(**vm_env())
    made = await create(svc.http, svc.url, profile="profile.vm-test", inputs={"vm": "tunnel-vm"})
    await wait_state(svc.http, svc.url, made["id"], {"ready"}, timeout=60)
    assert list((vm_root / "build" / made["id"]).iterdir()) == []
    await destroy(svc.http, svc.url, made["id"])
    await wait_state(svc.http, svc.url, made["id"], {"destroyed"}, timeout=60)
    assert workspaces(vm_root) == []


async def test_failing_tool_check_names_the_tool_and_removes_the_workspace(
    start_service: StartService,
    vm_env: Callable[..., dict[str, str]],
    vm_root: Path,
) -> None:
    """The shipped Haskell profile on a "VM" without ghc."""
    svc = await start_service(**vm_env())
    made = await create(
        svc.http, svc.url, profile="profile.vm-haskell-build", inputs={"vm": "haskell-vm"}
    )
    final = await wait_state(svc.http, svc.url, made["id"], {"failed"}, timeout=60)
    assert final["reason"].startswith("wait_ready failed: ")
    assert "tool check failed: ghc" in final["reason"]
    assert await event_types(svc.http, svc.url, made["id"]) == [
        "SandboxRequested",
        "RouteChosen",
        "Provisioned",
        "StepFailed",
        "TornDown",
    ]
    assert workspaces(vm_root) == []
    assert sentinels_intact(vm_root)


async def test_two_sandboxes_on_one_vm_then_capacity(
    start_service: StartService,
    vm_env: Callable[..., dict[str, str]],
    vm_root: Path,
) -> None:
    svc = await start_service(**vm_env(capacity=2))
    a = await create(svc.http, svc.url, profile="profile.vm-test", inputs={"vm": "haskell-vm"})
    b = await create(svc.http, svc.url, profile="profile.vm-test", inputs={"vm": "haskell-vm"})
    await wait_state(svc.http, svc.url, a["id"], {"ready"}, timeout=60)
    await wait_state(svc.http, svc.url, b["id"], {"ready"}, timeout=60)
    assert workspaces(vm_root) == sorted([a["id"], b["id"]])
    c = await create(svc.http, svc.url, profile="profile.vm-test", inputs={"vm": "haskell-vm"})
    rejected = await wait_state(svc.http, svc.url, c["id"], {"rejected"}, timeout=60)
    assert rejected["reason"] == "vm-packer: VM is full (haskell-vm 2/2)"
    await destroy(svc.http, svc.url, a["id"])
    await wait_state(svc.http, svc.url, a["id"], {"destroyed"}, timeout=60)
    assert workspaces(vm_root) == [b["id"]], "b's workspace is independent of a's teardown"
    await destroy(svc.http, svc.url, b["id"])
    await wait_state(svc.http, svc.url, b["id"], {"destroyed"}, timeout=60)
    assert workspaces(vm_root) == [] and sentinels_intact(vm_root)


@pytest.mark.parametrize("vm_input", ["x; touch {m}", "$(touch {m})", "../../", "haskell-vm "])
async def test_crafted_vm_input_is_rejected_and_inert(
    start_service: StartService,
    vm_env: Callable[..., dict[str, str]],
    vm_root: Path,
    tmp_path: Path,
    vm_input: str,
) -> None:
    marker = tmp_path / "pwned"
    svc = await start_service(**vm_env())
    made = await create(
        svc.http, svc.url, profile="profile.vm-test", inputs={"vm": vm_input.format(m=marker)}
    )
    final = await wait_state(svc.http, svc.url, made["id"], {"rejected"}, timeout=60)
    assert "is not registered" in final["reason"]
    assert not marker.exists() and sentinels_intact(vm_root)


class TestVmPackerConformance(ExtensionConformance):
    failing_config: ClassVar[dict[str, Any] | None] = {"rsync_timeout": 0.0}

    @pytest.fixture
    def extension(self, tmp_path: Path, vm_env: Callable[..., dict[str, str]]) -> LoadedExtension:
        registry = ExtensionRegistry.discover(
            RuntimeInfo(tmp_path, (tmp_path.resolve(),)),
            entry_points=False,
            environ=vm_env(capacity=8),
        )
        return registry.get("vm-packer")

    @pytest.fixture
    def make_context(
        self, extension: LoadedExtension, compose_repo: Path
    ) -> Callable[[str, dict[str, Any]], StepContext]:
        def make(sandbox_id: str, overrides: dict[str, Any]) -> StepContext:
            return StepContext(
                sandbox_id=sandbox_id,
                profile="profile.vm-test",
                inputs={"vm": "haskell-vm", "repo": str(compose_repo)},
                config=extension.config_for(overrides),
                host="haskell-vm",
            )

        return make

    @pytest.fixture
    def leftovers(self, vm_root: Path) -> Leftovers:
        async def left(sandbox_id: str) -> list[str]:
            assert sentinels_intact(vm_root)
            return [
                w
                for w in workspaces(vm_root) + [p.name for p in (vm_root / "build").iterdir()]
                if w == sandbox_id
            ]

        return left

    async def test_ids_cannot_reach_outside_the_workspace(
        self,
        extension: LoadedExtension,
        make_context: Callable[[str, dict[str, Any]], StepContext],
        vm_root: Path,
    ) -> None:
        for bad in ("..", "../..", "../home-sentinel", "x/../..", "sbx-a; rm -rf /"):
            with pytest.raises(Exception, match="invalid sandbox id"):
                await extension.adapter.teardown(make_context(bad, {}), None)
        (vm_root / "build" / "sbx-link").symlink_to(vm_root)
        await extension.adapter.teardown(make_context("sbx-link", {}), None)
        assert not (vm_root / "build" / "sbx-link").exists()
        assert sentinels_intact(vm_root)

    async def test_exec_in_the_workspace_and_no_services(
        self,
        extension: LoadedExtension,
        make_context: Callable[[str, dict[str, Any]], StepContext],
        leftovers: Leftovers,
        vm_root: Path,
    ) -> None:
        adapter = cast(Commanding, extension.adapter)
        ctx = make_context("sbx-commands", {})
        handle = await extension.adapter.provision(ctx)
        try:
            here = await adapter.exec(ctx, handle, ["pwd"])
            assert here.stdout.strip() == str(vm_root / "build" / "sbx-commands")
            page = await adapter.exec(ctx, handle, ["cat", "index.html"], workdir="site")
            assert page.exit_code == 0 and page.stdout
            with pytest.raises(CommandRefused, match="no services"):
                await adapter.exec(ctx, handle, ["true"], service="web")
        finally:
            await extension.adapter.teardown(ctx, handle)
        assert await leftovers("sbx-commands") == []

    async def test_files_stay_in_the_workspace(
        self,
        extension: LoadedExtension,
        make_context: Callable[[str, dict[str, Any]], StepContext],
        leftovers: Leftovers,
        vm_root: Path,
        tmp_path: Path,
    ) -> None:
        """put_file/get_file with the workspace as the root: a link out of it is
        refused both ways (nothing planted outside), a name with unicode works."""
        files = cast(FileTransferring, extension.adapter)
        ctx = make_context("sbx-files", {})
        handle = await extension.adapter.provision(ctx)
        try:
            workspace = vm_root / "build" / "sbx-files"
            secret = tmp_path / "secret.txt"
            secret.write_text("not yours\n")
            (workspace / "out").symlink_to(secret)
            (workspace / "out-dir").symlink_to(tmp_path)
            source = tmp_path / "up.txt"
            source.write_text("ünï\n")
            with pytest.raises(FileRefused, match="leads out"):
                await files.get_file(ctx, handle, "/out", max_bytes=100)
            with pytest.raises(FileRefused, match="leads out"):
                await files.put_file(ctx, handle, "out-dir/planted.txt", source)
            assert not (tmp_path / "planted.txt").exists()
            await files.put_file(ctx, handle, "dir/ünï.txt", source)
            stream = await files.get_file(ctx, handle, "/dir/ünï.txt", max_bytes=100)
            assert b"".join([c async for c in stream.chunks]) == "ünï\n".encode()
            with pytest.raises(CommandRefused, match="no services"):
                await files.get_file(ctx, handle, "dir/ünï.txt", service="web", max_bytes=9)
        finally:
            await extension.adapter.teardown(ctx, handle)
        assert await leftovers("sbx-files") == []
