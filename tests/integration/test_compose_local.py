"""ext.compose-local: the compose core on this machine, no SSH. Real rsync, real
podman-compose and containers; the same conformance suite as compose-ssh."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import stat
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, ClassVar, cast

import pytest

from extensions import (
    Commanding,
    ExtensionError,
    ExtensionRegistry,
    LoadedExtension,
    RuntimeInfo,
    Snapshotting,
    StepContext,
)
from extensions.compose import project_name
from extensions.conformance import ExtensionConformance, Leftovers
from tests.conftest import StartService
from tests.helpers import create, destroy, event_types, wait_state
from tests.infra import (
    CI_REPO,
    DOTENV_REPO,
    SUBFOLDER_REPO,
    Podman,
    compose_processes,
    kill_while_provisioning,
    write_repo,
)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def local_env(podman: Podman, tmp_path: Path) -> dict[str, str]:
    return {
        "SANDBOXER_COMPOSE_LOCAL_CMD": podman.compose_cmd,
        "SANDBOXER_COMPOSE_LOCAL_ENGINE_CMD": podman.engine_cmd,
        "SANDBOXER_COMPOSE_LOCAL_STOP_TIMEOUT": "1",
        "SANDBOXER_REPO_ROOTS": str(tmp_path),
    }


def workspaces(data_dir: Path) -> Path:
    return data_dir / "compose-local" / "workspaces"


def local_leftovers(podman: Podman, data_dir: Path, sandbox_id: str) -> list[str]:
    found = podman.leftovers(project_name(sandbox_id))
    if (workspaces(data_dir) / sandbox_id).exists():
        found.append(f"workspace {sandbox_id}")
    return found


@pytest.fixture
async def local_ext(tmp_path: Path, local_env: dict[str, str]) -> AsyncIterator[LoadedExtension]:
    registry = ExtensionRegistry.discover(
        RuntimeInfo(tmp_path / "data", (tmp_path.resolve(),)),
        entry_points=False,
        environ=local_env,
    )
    yield registry.get("compose-local")
    await registry.close()


def step(
    ext: LoadedExtension,
    sandbox_id: str,
    repo: Path,
    config: dict[str, Any] | None = None,
    inputs: dict[str, str] | None = None,
    checkpoint_id: str | None = None,
) -> StepContext:
    return StepContext(
        sandbox_id=sandbox_id,
        profile="profile.compose-local",
        inputs={"repo": str(repo), **(inputs or {})},
        config=ext.config_for(config or {}),
        host="local",
        checkpoint_id=checkpoint_id,
    )


class TestComposeLocalConformance(ExtensionConformance):
    failing_config: ClassVar[dict[str, Any] | None] = {"compose_file": "broken.yml"}

    @pytest.fixture
    def extension(self, local_ext: LoadedExtension) -> LoadedExtension:
        return local_ext

    @pytest.fixture
    def make_context(
        self, extension: LoadedExtension, compose_repo: Path
    ) -> Callable[[str, dict[str, Any]], StepContext]:
        return lambda sandbox_id, overrides: step(extension, sandbox_id, compose_repo, overrides)

    @pytest.fixture
    def leftovers(self, podman: Podman, tmp_path: Path) -> Leftovers:
        async def left(sandbox_id: str) -> list[str]:
            return local_leftovers(podman, tmp_path / "data", sandbox_id)

        return left

    async def test_workspace_is_private_and_commands_run_in_it(
        self,
        extension: LoadedExtension,
        make_context: Callable[[str, dict[str, Any]], StepContext],
        leftovers: Leftovers,
        tmp_path: Path,
    ) -> None:
        adapter = cast(Commanding, extension.adapter)
        ctx = make_context("sbx-local-cmd", {})
        handle = await extension.adapter.provision(ctx)
        try:
            root = workspaces(tmp_path / "data")
            assert stat.S_IMODE(root.stat().st_mode) == 0o700
            assert handle["host"] == "local" and handle["directory"] == str(
                (root / "sbx-local-cmd").resolve()
            )
            await extension.adapter.wait_ready(ctx, handle)
            # compose up is over: its lock is free (no container monitor inherited it)
            lock = root / ".lock-sbx-local-cmd"
            assert lock.is_file()
            assert subprocess.run(["flock", "-n", str(lock), "true"]).returncode == 0
            here = await adapter.exec(ctx, handle, ["pwd"])
            assert here.stdout.strip() == handle["directory"]
            page = await adapter.exec(ctx, handle, ["cat", "index.html"], workdir="site")
            get = ["wget", "-q", "-O", "-", "http://127.0.0.1:8080/index.html"]
            served = await adapter.exec(ctx, handle, get, service="web")
            assert (served.exit_code, served.stdout) == (0, page.stdout)
            missing = await adapter.exec(ctx, handle, ["no-such-program-here"])
            assert missing.exit_code == 127
        finally:
            await extension.adapter.teardown(ctx, handle)
        assert await leftovers("sbx-local-cmd") == []


async def test_placement_refuses_beyond_capacity(
    local_ext: LoadedExtension, compose_repo: Path
) -> None:
    from extensions import NoCapacity, Placing

    adapter = cast(Placing, local_ext.adapter)
    ctx = step(local_ext, "sbx-place", compose_repo, {"capacity": 2})
    assert adapter.place(ctx, {"local": 1}).host == "local"
    with pytest.raises(NoCapacity, match=r"local 2/2"):
        adapter.place(ctx, {"local": 2})


async def test_subfolder_build_volume_and_checkpoint_leave_nothing(
    local_ext: LoadedExtension, podman: Podman, tmp_path: Path
) -> None:
    """The shapes of issue 18 through compose-local: a subfolder compose file with a
    relative build: and env_file, a named volume, a checkpoint restored into a clone;
    teardown of both leaves no container, pod, network, volume or image."""
    repo = write_repo(tmp_path / "sub-repo", SUBFOLDER_REPO)
    data = tmp_path / "data"
    adapter = cast(Snapshotting, local_ext.adapter)
    commands = cast(Commanding, local_ext.adapter)
    ctx = step(local_ext, "sbx-local-sub", repo, inputs={"compose_file": "deploy/compose.yml"})
    clone = step(local_ext, "sbx-local-clone", repo, checkpoint_id="ckpt-local")
    handle = await local_ext.adapter.provision(ctx)
    try:
        assert await local_ext.adapter.wait_ready(ctx, handle) == ["app"]
        said = await commands.exec(
            ctx, handle, ["sh", "-c", 'cat /greeting; echo "$GREETING"'], service="app"
        )
        assert said.stdout == "built from deploy/app\nfrom deploy/app.env\n"
        archive = tmp_path / "local.tar"
        snap_ctx = step(
            local_ext,
            "sbx-local-sub",
            repo,
            inputs={"compose_file": "deploy/compose.yml"},
            checkpoint_id="ckpt-local",
        )
        metadata = await adapter.snapshot(snap_ctx, handle, archive)
        assert metadata["compose_files"] == "deploy/compose.yml"
        cloned = await adapter.restore(clone, None, archive, metadata)
        assert await local_ext.adapter.wait_ready(clone, cloned) == ["app"]
        assert podman.images(project_name("sbx-local-clone")) == [
            "localhost/sandboxer-ckpt/sandboxer-sbx-local-clone-app"
        ]
    finally:
        await local_ext.adapter.teardown(clone, None)
        await local_ext.adapter.teardown(ctx, handle)
    assert local_leftovers(podman, data, "sbx-local-sub") == []
    assert local_leftovers(podman, data, "sbx-local-clone") == []


async def test_ignored_dotenv_is_named_then_included(
    local_ext: LoadedExtension, podman: Podman, tmp_path: Path
) -> None:
    repo = write_repo(tmp_path / "dotenv-repo", DOTENV_REPO)
    with pytest.raises(ExtensionError, match=r"filter dropped \.env.*includes"):
        await local_ext.adapter.provision(step(local_ext, "sbx-local-env", repo))
    await local_ext.adapter.teardown(step(local_ext, "sbx-local-env", repo), None)
    ctx = step(local_ext, "sbx-local-env", repo, {"includes": [".env"]})
    handle = await local_ext.adapter.provision(ctx)
    await local_ext.adapter.teardown(ctx, handle)
    assert local_leftovers(podman, tmp_path / "data", "sbx-local-env") == []


async def test_profile_compose_local_through_the_service_leaves_nothing(
    start_service: StartService,
    local_env: dict[str, str],
    podman: Podman,
    tmp_path: Path,
) -> None:
    """profile.compose-local with its `compose_file` input: create → ready → destroy;
    the repo input is confined to the repo roots as for compose-ssh."""
    repo = write_repo(tmp_path / "ci-repo", CI_REPO)
    svc = await start_service(**local_env)
    made = await create(
        svc.http,
        svc.url,
        profile="profile.compose-local",
        inputs={"repo": str(repo), "compose_file": "compose.ci.yml"},
    )
    ready = await wait_state(svc.http, svc.url, made["id"], {"ready"}, timeout=180)
    assert ready["host"] == "local"
    assert ready["handle"]["compose_files"] == "compose.ci.yml"
    assert sorted(ready["services"]) == ["built", "web"]
    project = project_name(made["id"])
    assert podman.leftovers(project)
    await destroy(svc.http, svc.url, made["id"])
    await wait_state(svc.http, svc.url, made["id"], {"destroyed"}, timeout=120)
    assert local_leftovers(podman, svc.data_dir, made["id"]) == []
    assert await event_types(svc.http, svc.url, made["id"]) == [
        "SandboxRequested",
        "RouteChosen",
        "Provisioned",
        "BecameReady",
        "DestroyRequested",
        "TornDown",
    ]

    outside = tmp_path.parent / f"outside-{os.getpid()}"
    body = {"profile": "profile.compose-local", "inputs": {"repo": str(outside)}}
    async with svc.http.post(f"{svc.url}/v1/sandboxes", json=body) as resp:
        error = await resp.json()
        assert resp.status == 400, error
    assert error["error"]["field"] == "inputs.repo"


async def test_kill_during_provisioning_then_restart_leaves_nothing(
    local_env: dict[str, str], podman: Podman, tmp_path: Path
) -> None:
    """SIGKILL serve while ten compose-local sandboxes provision (one in compose up,
    building its image), restart: each is recovered (failed and torn down, or ready);
    after destroy nothing is left, images included, even from a compose process the
    dead serve had started."""
    import aiohttp

    repo = write_repo(tmp_path / "ci-repo", CI_REPO)
    data_dir = tmp_path / "serve-data"
    body = {
        "profile": "profile.compose-local",
        "inputs": {"repo": str(repo), "compose_file": "compose.ci.yml"},
    }
    env = {**local_env, "SANDBOXER_COMPOSE_LOCAL_CAPACITY": "10"}
    async with aiohttp.ClientSession() as http:
        ids = await kill_while_provisioning(http, data_dir, env, body)
    for sandbox_id in ids:
        assert local_leftovers(podman, data_dir, sandbox_id) == [], sandbox_id


async def test_inventory_lists_only_what_this_data_dir_made(
    local_ext: LoadedExtension, podman: Podman, compose_repo: Path, tmp_path: Path
) -> None:
    """The machine's engine is shared (another service, compose-ssh on loopback): a
    `sandboxer-*` project compose-local did not make is never listed, so a sweep
    cannot remove it. Its own headless project and orphan image are."""
    from extensions import Reconciling

    adapter = cast(Reconciling, local_ext.adapter)
    foreign = project_name("sbx-foreign-one")
    made = subprocess.run(
        [*shlex.split(podman.compose_cmd), "-p", foreign, "-f", "compose.yml", "up", "-d"],
        cwd=compose_repo,
        capture_output=True,
        text=True,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    repo = write_repo(tmp_path / "ci-repo", CI_REPO)
    ctx = step(local_ext, "sbx-local-orphan", repo, {"compose_file": "compose.ci.yml"})
    try:
        await local_ext.adapter.provision(ctx)
        shutil.rmtree(workspaces(tmp_path / "data") / "sbx-local-orphan")
        found = await adapter.inventory(ctx.config)
        assert "sbx-foreign-one" not in {r.sandbox_id for r in found}
        mine = sorted((r.kind, r.detail) for r in found if r.sandbox_id == "sbx-local-orphan")
        assert mine == [
            ("compose_project", project_name("sbx-local-orphan")),
            ("image", f"localhost/{project_name('sbx-local-orphan')}_built:latest"),
        ]
        for resource in [r for r in found if r.sandbox_id == "sbx-local-orphan"]:
            await adapter.remove_orphan(ctx.config, resource)
        assert podman.leftovers(project_name("sbx-local-orphan")) == []
        assert podman.containers(foreign), "the foreign project is untouched"
    finally:
        await local_ext.adapter.teardown(ctx, None)
        podman("rm", "-f", *[c["Id"] for c in podman.containers(foreign)])
        podman("pod", "rm", "-f", f"pod_{foreign}")
        podman("network", "rm", f"{foreign}_default")
    assert podman.leftovers(foreign) == []


async def test_teardown_waits_for_a_compose_up_its_caller_left_running(
    local_ext: LoadedExtension, podman: Podman, compose_repo: Path, tmp_path: Path
) -> None:
    """A compose up started by a serve that died holds the sandbox's lock; teardown
    waits for it, then removes what it made. The orphaned up is held on a FIFO until
    teardown is seen waiting on the lock, so without the wait it would create its
    containers after the sweep."""
    ctx = step(local_ext, "sbx-local-late", compose_repo)
    handle = await local_ext.adapter.provision(ctx)
    await local_ext.adapter.teardown(ctx, handle)
    root = workspaces(tmp_path / "data")
    workspace = root / "sbx-local-late"
    shutil.copytree(compose_repo, workspace)
    lock = root / ".lock-sbx-local-late"
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    up = [
        *shlex.split(podman.compose_cmd),
        "-p",
        project_name("sbx-local-late"),
        "-f",
        "compose.yml",
    ]
    script = 'read go < "$1"; shift; exec "$@"'
    orphan = subprocess.Popen(
        ["flock", "-o", str(lock), "sh", "-c", script, "sh", str(fifo), *up, "up", "-d"],
        cwd=workspace,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(30):
            while not lock.exists():
                await asyncio.sleep(0.02)  # polling a condition, under a deadline
        teardown = asyncio.ensure_future(local_ext.adapter.teardown(ctx, None))
        async with asyncio.timeout(30):
            # teardown is waiting on the lock: its `flock <lock> true` runs
            while not [c for c in compose_processes({str(lock)}) if c.endswith(" true")]:
                assert not teardown.done(), "teardown did not wait for the lock"
                await asyncio.sleep(0.02)  # polling a condition, under a deadline
        await asyncio.to_thread(fifo.write_text, "go\n")
        async with asyncio.timeout(120):
            await teardown
        assert orphan.wait(30) == 0
    finally:
        if orphan.poll() is None:
            os.killpg(orphan.pid, 9)
            orphan.wait()
        await local_ext.adapter.teardown(ctx, None)
    assert local_leftovers(podman, tmp_path / "data", "sbx-local-late") == []
    assert not lock.exists()
