"""ext.compose-ssh end to end: real sshd, real rsync, real podman-compose and containers."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, ClassVar, cast

import aiohttp
import pytest

from extensions import (
    Commanding,
    ExtensionError,
    ExtensionRegistry,
    Handle,
    LoadedExtension,
    Reconciling,
    RuntimeInfo,
    Snapshotting,
    StepContext,
)
from extensions.compose_ssh import project_name
from extensions.conformance import ExtensionConformance, Leftovers
from tests.conftest import StartService
from tests.helpers import create, destroy, event_types, wait_state
from tests.infra import (
    CI_REPO,
    DOTENV_REPO,
    IMAGE,
    OVERRIDE_REPO,
    SUBFOLDER_REPO,
    Podman,
    ServeProcess,
    SSHHost,
    free_port,
    kill_while_provisioning,
    write_repo,
)

pytestmark = pytest.mark.timeout(300)


def remote_dirs(tmp_path: Path, index: int = 0) -> list[str]:
    root = tmp_path / f"remote{index}"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def served(podman: Podman, project: str) -> str:
    out = podman(
        "exec", f"{project}_worker_1", "wget", "-q", "-O", "-", "http://web:8080/index.html"
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def assert_nothing_left(podman: Podman, tmp_path: Path, sandbox_id: str) -> None:
    project = project_name(sandbox_id)
    assert podman.containers(project) == []
    assert f"{project}_default" not in podman.networks()
    assert sandbox_id not in remote_dirs(tmp_path, 0) + remote_dirs(tmp_path, 1)


async def test_lifecycle_serves_the_repo_and_leaves_nothing(
    start_service: StartService,
    compose_env: Callable[..., dict[str, str]],
    compose_repo: Path,
    podman: Podman,
    tmp_path: Path,
) -> None:
    svc = await start_service(**compose_env())
    made = await create(
        svc.http, svc.url, profile="profile.compose-e2e", inputs={"repo": str(compose_repo)}
    )
    ready = await wait_state(svc.http, svc.url, made["id"], {"ready"}, timeout=120)
    project = project_name(made["id"])
    assert ready["host"] == "host0"
    assert ready["handle"]["project"] == project
    assert sorted(ready["services"]) == ["web", "worker"]
    workspace = tmp_path / "remote0" / made["id"]
    assert ready["handle"]["directory"] == str(workspace)
    assert (workspace / "compose.yml").exists()
    assert not (workspace / "ignored.log").exists(), ".gitignore is honoured"
    assert served(podman, project) == "served from the rsynced repo\n"
    states = {
        c["Labels"]["com.docker.compose.service"]: c["State"] for c in podman.containers(project)
    }
    assert states == {"web": "running", "worker": "running"}

    await destroy(svc.http, svc.url, made["id"])
    await wait_state(svc.http, svc.url, made["id"], {"destroyed"}, timeout=120)
    assert_nothing_left(podman, tmp_path, made["id"])
    assert await event_types(svc.http, svc.url, made["id"]) == [
        "SandboxRequested",
        "RouteChosen",
        "Provisioned",
        "BecameReady",
        "DestroyRequested",
        "TornDown",
    ]


async def test_two_sandboxes_of_one_repo_are_isolated(
    start_service: StartService,
    compose_env: Callable[..., dict[str, str]],
    compose_repo: Path,
    podman: Podman,
    tmp_path: Path,
) -> None:
    svc = await start_service(**compose_env())
    a, b = await asyncio.gather(
        *(
            create(
                svc.http, svc.url, profile="profile.compose-e2e", inputs={"repo": str(compose_repo)}
            )
            for _ in range(2)
        )
    )
    ra, rb = await asyncio.gather(
        *(wait_state(svc.http, svc.url, s["id"], {"ready"}, timeout=120) for s in (a, b))
    )
    assert ra["handle"]["directory"] != rb["handle"]["directory"]
    pa, pb = ra["handle"]["project"], rb["handle"]["project"]
    assert pa != pb
    networks = podman.networks()
    assert f"{pa}_default" in networks and f"{pb}_default" in networks
    # web of one project is not reachable from the other project's network.
    cross = podman(
        "exec",
        f"{pb}_worker_1",
        "wget",
        "-q",
        "-T",
        "2",
        "-O",
        "-",
        f"http://{pa}_web_1:8080/index.html",
    )
    assert cross.returncode != 0
    await destroy(svc.http, svc.url, a["id"])
    await wait_state(svc.http, svc.url, a["id"], {"destroyed"}, timeout=120)
    assert_nothing_left(podman, tmp_path, a["id"])
    assert served(podman, pb).startswith("served"), "the other sandbox is untouched"
    await destroy(svc.http, svc.url, b["id"])
    await wait_state(svc.http, svc.url, b["id"], {"destroyed"}, timeout=120)
    assert_nothing_left(podman, tmp_path, b["id"])


async def test_host_pool_places_on_least_loaded_and_rejects_when_full(
    start_service: StartService,
    compose_env: Callable[..., dict[str, str]],
    compose_repo: Path,
    podman: Podman,
    tmp_path: Path,
) -> None:
    svc = await start_service(**compose_env(capacities=(1, 1)))
    made = await asyncio.gather(
        *(
            create(
                svc.http, svc.url, profile="profile.compose-e2e", inputs={"repo": str(compose_repo)}
            )
            for _ in range(3)
        )
    )
    finals = await asyncio.gather(
        *(wait_state(svc.http, svc.url, m["id"], {"ready", "rejected"}, timeout=120) for m in made)
    )
    ready = [f for f in finals if f["state"] == "ready"]
    rejected = [f for f in finals if f["state"] == "rejected"]
    assert len(ready) == 2 and len(rejected) == 1
    assert {r["host"] for r in ready} == {"host0", "host1"}
    assert all("least loaded" in r["route_reason"] for r in ready)
    assert "host pool is full (host0 1/1, host1 1/1)" in rejected[0]["reason"]
    for r in ready:
        await destroy(svc.http, svc.url, r["id"])
    for r in ready:
        await wait_state(svc.http, svc.url, r["id"], {"destroyed"}, timeout=120)
        assert_nothing_left(podman, tmp_path, r["id"])


async def test_unknown_host_key_fails_and_creates_nothing(
    start_service: StartService,
    compose_env: Callable[..., dict[str, str]],
    compose_repo: Path,
    ssh_hosts: list[SSHHost],
    tmp_path: Path,
) -> None:
    other = ssh_hosts[1].known_hosts.read_text().split()
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[127.0.0.1]:{ssh_hosts[0].port} {other[1]} {other[2]}\n")
    svc = await start_service(**compose_env(known_hosts=str(wrong)))
    made = await create(
        svc.http, svc.url, profile="profile.compose-e2e", inputs={"repo": str(compose_repo)}
    )
    final = await wait_state(svc.http, svc.url, made["id"], {"failed"}, timeout=60)
    assert "host key" in final["reason"] and "not trusted" in final["reason"]
    assert remote_dirs(tmp_path) == []


@pytest.mark.parametrize(
    "repo_input",
    [
        "x; touch {marker}",
        "$(touch {marker})",
        "`touch {marker}`",
        "../../{marker}",
    ],
)
async def test_injection_through_inputs_is_inert(
    start_service: StartService,
    compose_env: Callable[..., dict[str, str]],
    tmp_path: Path,
    repo_input: str,
) -> None:
    """Refused at create (not a directory under the repo roots), before anything runs."""
    marker = tmp_path / "pwned"
    svc = await start_service(**compose_env())
    body = {"profile": "profile.compose-e2e", "inputs": {"repo": repo_input.format(marker=marker)}}
    async with svc.http.post(f"{svc.url}/v1/sandboxes", json=body) as resp:
        error = await resp.json()
        assert resp.status == 400, error
    assert error["error"]["field"] == "inputs.repo"
    assert not marker.exists()
    assert remote_dirs(tmp_path) == []


async def test_shell_metacharacters_in_a_real_repo_path(
    start_service: StartService,
    compose_env: Callable[..., dict[str, str]],
    compose_repo: Path,
    podman: Podman,
    tmp_path: Path,
) -> None:
    odd = tmp_path / "repo; touch PWNED $(touch PWNED) `touch PWNED`"
    compose_repo.rename(odd)
    places = [tmp_path, tmp_path / "remote0", Path.home(), Path("/"), Path.cwd()]
    svc = await start_service(**compose_env())
    made = await create(svc.http, svc.url, profile="profile.compose-e2e", inputs={"repo": str(odd)})
    ready = await wait_state(svc.http, svc.url, made["id"], {"ready"}, timeout=120)
    places.append(Path(ready["handle"]["directory"]))
    assert not [p for p in places if (p / "PWNED").exists()]
    await destroy(svc.http, svc.url, made["id"])
    await wait_state(svc.http, svc.url, made["id"], {"destroyed"}, timeout=120)
    assert not [p for p in places if (p / "PWNED").exists()]
    assert_nothing_left(podman, tmp_path, made["id"])


class TestComposeSSHConformance(ExtensionConformance):
    """Adapter-level: teardown twice, without a handle, after compose up failed, ..."""

    failing_config: ClassVar[dict[str, Any] | None] = {"compose_file": "broken.yml"}

    @pytest.fixture
    def extension(
        self, tmp_path: Path, compose_env: Callable[..., dict[str, str]]
    ) -> LoadedExtension:
        registry = ExtensionRegistry.discover(
            RuntimeInfo(tmp_path, (tmp_path.resolve(),)), entry_points=False, environ=compose_env()
        )
        return registry.get("compose-ssh")

    @pytest.fixture
    def make_context(
        self, extension: LoadedExtension, compose_repo: Path
    ) -> Callable[[str, dict[str, Any]], StepContext]:
        def make(sandbox_id: str, overrides: dict[str, Any]) -> StepContext:
            return StepContext(
                sandbox_id=sandbox_id,
                profile="profile.compose-e2e",
                inputs={"repo": str(compose_repo)},
                config=extension.config_for(overrides),
                host="host0",
            )

        return make

    @pytest.fixture
    def leftovers(self, podman: Podman, tmp_path: Path) -> Leftovers:
        async def left(sandbox_id: str) -> list[str]:
            found = [f"dir {d}" for d in remote_dirs(tmp_path) if d == sandbox_id]
            found += [
                f"container {c['Names']}" for c in podman.containers(project_name(sandbox_id))
            ]
            return found

        return left

    async def test_exited_service_fails_wait_ready_naming_it(
        self,
        extension: LoadedExtension,
        make_context: Callable[[str, dict[str, Any]], StepContext],
        leftovers: Leftovers,
    ) -> None:
        ctx = make_context("sbx-exits", {"compose_file": "exits.yml"})
        handle = await extension.adapter.provision(ctx)
        with pytest.raises(Exception, match="service 'migrate' is exited"):
            async with asyncio.timeout(60):
                await extension.adapter.wait_ready(ctx, handle)
        await extension.adapter.teardown(ctx, handle)
        assert await leftovers("sbx-exits") == []

    async def test_path_escape_is_refused(
        self,
        extension: LoadedExtension,
        make_context: Callable[[str, dict[str, Any]], StepContext],
        tmp_path: Path,
    ) -> None:
        sentinel = tmp_path / "sentinel"
        sentinel.write_text("keep")
        for bad in ("../..", "..", "a/../../b", "x; rm -rf /"):
            with pytest.raises(Exception, match="invalid sandbox id"):
                await extension.adapter.teardown(make_context(bad, {}), None)
        assert sentinel.read_text() == "keep"

    async def test_symlinked_workspace_is_not_followed(
        self,
        extension: LoadedExtension,
        make_context: Callable[[str, dict[str, Any]], StepContext],
        tmp_path: Path,
    ) -> None:
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "keep").write_text("keep")
        root = tmp_path / "remote0"
        root.mkdir(exist_ok=True)
        (root / "sbx-link").symlink_to(outside)
        with pytest.raises(Exception, match="symlink"):
            await extension.adapter.provision(make_context("sbx-link", {}))
        await extension.adapter.teardown(make_context("sbx-link", {}), None)
        assert (outside / "keep").read_text() == "keep"
        assert not (root / "sbx-link").exists()

    async def test_exec_on_the_host_and_in_a_service(
        self,
        extension: LoadedExtension,
        make_context: Callable[[str, dict[str, Any]], StepContext],
        leftovers: Leftovers,
        tmp_path: Path,
    ) -> None:
        """On the host: in the sandbox's directory (`workdir` relative to it). In a
        service: its container, found by the compose labels, through the engine's exec."""
        adapter = cast(Commanding, extension.adapter)
        ctx = make_context("sbx-commands", {})
        handle = await extension.adapter.provision(ctx)
        try:
            await extension.adapter.wait_ready(ctx, handle)
            here = await adapter.exec(ctx, handle, ["pwd"])
            assert here.stdout.strip() == str(tmp_path / "remote0" / "sbx-commands")
            page = await adapter.exec(ctx, handle, ["cat", "index.html"], workdir="site")
            expected = (tmp_path / "repo" / "site" / "index.html").read_text()
            assert (page.exit_code, page.stdout) == (0, expected)
            get = ["wget", "-q", "-O", "-", "http://127.0.0.1:8080/index.html"]
            served = await adapter.exec(ctx, handle, get, service="web")
            assert (served.exit_code, served.stdout) == (0, page.stdout)
            inside = await adapter.exec(
                ctx,
                handle,
                ["sh", "-c", 'echo "$WHO" in $(pwd)'],
                service="worker",
                workdir="/bin",  # the image has no /tmp
                env={"WHO": "me; id"},
            )
            assert inside.stdout == "me; id in /bin\n", inside
            get[-1] = "http://127.0.0.1:8080/nope.html"
            missing = await adapter.exec(ctx, handle, get, service="web")
            assert missing.exit_code != 0
        finally:
            await extension.adapter.teardown(ctx, handle)
        assert await leftovers("sbx-commands") == []


def test_ps_parsers_for_docker_and_podman() -> None:
    from extensions.compose_ssh import parse_ps

    docker_lines = "\n".join(
        json.dumps(x)
        for x in [{"Service": "web", "State": "running"}, {"Service": "db", "State": "exited"}]
    )
    assert parse_ps(docker_lines) == {"web": "running", "db": "exited"}
    docker_array = json.dumps(
        [{"Service": "web", "State": "running", "Labels": "com.docker.compose.service=web,a=b"}]
    )
    assert parse_ps(docker_array) == {"web": "running"}
    podman_array = json.dumps(
        [{"Labels": {"com.docker.compose.service": "worker"}, "State": "running"}]
    )
    assert parse_ps(podman_array) == {"worker": "running"}
    assert parse_ps("") == {}


async def test_kill_during_compose_up_then_restart_leaves_no_orphans(
    compose_env: Callable[..., dict[str, str]],
    compose_repo: Path,
    podman: Podman,
    tmp_path: Path,
) -> None:
    """SIGKILL serve while compose up runs (seen through the CLI's progress line)."""
    data_dir = tmp_path / "data"
    env = compose_env()
    async with aiohttp.ClientSession() as http:
        first = ServeProcess(data_dir, free_port(), **env)
        cli: subprocess.Popen[str] | None = None
        try:
            await first.wait_healthy(http)
            cli = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sandboxer",
                    "--url",
                    first.url,
                    "create",
                    "--profile",
                    "profile.compose-e2e",
                    "--input",
                    f"repo={compose_repo}",
                    "--wait",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert cli.stderr is not None
            seen: list[str] = []
            async with asyncio.timeout(60):
                while not any("compose up" in line for line in seen):
                    line = await asyncio.to_thread(cli.stderr.readline)
                    assert line, f"the CLI ended before compose up: {seen}"
                    seen.append(line)
            assert any("provisioning" in line for line in seen)
            sandbox_id = seen[-1].split(":")[0]
        finally:
            first.kill()
            if cli is not None:
                cli.kill()
                cli.wait()

        second = ServeProcess(data_dir, free_port(), **env)
        try:
            await second.wait_healthy(http)
            final = await wait_state(http, second.url, sandbox_id, {"failed"}, timeout=120)
            assert final["reason"].startswith("provision failed: interrupted")
            types = await event_types(http, second.url, sandbox_id)
            assert types == ["SandboxRequested", "RouteChosen", "StepFailed", "TornDown"]
            assert_nothing_left(podman, tmp_path, sandbox_id)
            assert second.terminate() == 0
        finally:
            if second.proc.poll() is None:
                second.kill()


async def test_kill_while_ten_provision_then_restart_leaves_nothing(
    compose_env: Callable[..., dict[str, str]], podman: Podman, tmp_path: Path
) -> None:
    """SIGKILL serve while ten compose-ssh sandboxes provision (one in compose up,
    building its image), restart: each ends failed (torn down) or ready; after
    destroy nothing is left on the host, images included."""
    repo = write_repo(tmp_path / "ci-repo", CI_REPO)
    data_dir = tmp_path / "data"
    env = compose_env(capacities=(10,))
    body = {
        "profile": "profile.compose-e2e",
        "inputs": {"repo": str(repo), "compose_file": "compose.ci.yml"},
    }
    async with aiohttp.ClientSession() as http:
        ids = await kill_while_provisioning(http, data_dir, env, body)
    for sandbox_id in ids:
        assert podman.leftovers(project_name(sandbox_id)) == [], sandbox_id
        assert sandbox_id not in remote_dirs(tmp_path, 0)


# ---- compose files, teardown of everything, the repo transfer (issue 18) --------------


@pytest.fixture
async def ssh_ext(
    tmp_path: Path, compose_env: Callable[..., dict[str, str]]
) -> AsyncIterator[LoadedExtension]:
    registry = ExtensionRegistry.discover(
        RuntimeInfo(tmp_path, (tmp_path.resolve(),)), entry_points=False, environ=compose_env()
    )
    yield registry.get("compose-ssh")
    await registry.close()


def step(
    ext: LoadedExtension,
    sandbox_id: str,
    repo: Path,
    config: dict[str, Any] | None = None,
    inputs: dict[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
    checkpoint_id: str | None = None,
) -> StepContext:
    extra: dict[str, Any] = {} if progress is None else {"progress": progress}
    return StepContext(
        sandbox_id=sandbox_id,
        profile="profile.compose-e2e",
        inputs={"repo": str(repo), **(inputs or {})},
        config=ext.config_for(config or {}),
        host="host0",
        checkpoint_id=checkpoint_id,
        **extra,
    )


async def in_service(ext: LoadedExtension, ctx: StepContext, handle: Handle, *argv: str) -> str:
    adapter = cast(Commanding, ext.adapter)
    result = await adapter.exec(ctx, handle, list(argv), service=argv_service(handle))
    assert result.exit_code == 0, result
    return result.stdout


def argv_service(handle: Handle) -> str:
    return handle["services"].split(",")[0]


async def test_profile_with_compose_ci_yml_is_destroyed_cleanly(
    start_service: StartService,
    compose_env: Callable[..., dict[str, str]],
    podman: Podman,
    tmp_path: Path,
) -> None:
    """The leak of issue 18: `compose_file: compose.ci.yml` in a profile's config.
    Destroy removes the containers, the pod, the network, the named volume and the
    image built for the project, and the handle recorded exactly that file."""
    repo = write_repo(tmp_path / "ci-repo", CI_REPO)
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "profile.compose-ci.yaml").write_text(
        "name: profile.compose-ci\nextension: compose-ssh\n"
        "inputs:\n  repo: {required: true}\nconfig:\n  compose_file: compose.ci.yml\n"
    )
    svc = await start_service(**compose_env(), SANDBOXER_PROFILES_PATH=str(profiles))
    made = await create(svc.http, svc.url, profile="profile.compose-ci", inputs={"repo": str(repo)})
    ready = await wait_state(svc.http, svc.url, made["id"], {"ready"}, timeout=180)
    project = project_name(made["id"])
    assert ready["handle"]["compose_file"] == "compose.ci.yml"
    assert ready["handle"]["compose_files"] == "compose.ci.yml"
    made_things = podman.leftovers(project)
    for kind in ("container", "pod", "network", "volume", "image"):
        assert any(t.startswith(kind) for t in made_things), (kind, made_things)
    assert f"image localhost/{project}_built" in made_things
    await destroy(svc.http, svc.url, made["id"])
    await wait_state(svc.http, svc.url, made["id"], {"destroyed"}, timeout=120)
    assert podman.leftovers(project) == []
    assert_nothing_left(podman, tmp_path, made["id"])
    assert podman("image", "exists", IMAGE).returncode == 0, "a used image is kept"


async def test_subfolder_compose_file_with_build_and_env_file(
    ssh_ext: LoadedExtension, podman: Podman, tmp_path: Path
) -> None:
    """`deploy/compose.yml`: `build: ./app` and `env_file: app.env` are relative to
    deploy/ (the compose spec); destroy removes the built image and the volume."""
    repo = write_repo(tmp_path / "sub-repo", SUBFOLDER_REPO)
    ctx = step(ssh_ext, "sbx-subfolder", repo, {"compose_file": "./deploy//compose.yml"})
    handle = await ssh_ext.adapter.provision(ctx)
    try:
        assert handle["compose_files"] == "deploy/compose.yml"
        assert await ssh_ext.adapter.wait_ready(ctx, handle) == ["app"]
        assert await in_service(ssh_ext, ctx, handle, "cat", "/greeting") == (
            "built from deploy/app\n"
        )
        said = await in_service(ssh_ext, ctx, handle, "sh", "-c", 'echo "$GREETING"')
        assert said == "from deploy/app.env\n"
        assert podman.images(project_name("sbx-subfolder")) == [
            "localhost/sandboxer-sbx-subfolder_app"
        ]
    finally:
        await ssh_ext.adapter.teardown(ctx, handle)
    assert podman.leftovers(project_name("sbx-subfolder")) == []
    assert_nothing_left(podman, tmp_path, "sbx-subfolder")


@pytest.mark.parametrize("bad", ["../compose.yml", "/etc/compose.yml", "deploy/../../x.yml"])
async def test_compose_file_outside_the_repo_is_refused(
    ssh_ext: LoadedExtension, tmp_path: Path, bad: str
) -> None:
    repo = write_repo(tmp_path / "sub-repo", SUBFOLDER_REPO)
    with pytest.raises(ExtensionError, match="compose_file"):
        await ssh_ext.adapter.provision(step(ssh_ext, "sbx-escape", repo, {"compose_file": bad}))
    assert remote_dirs(tmp_path) == []


async def test_override_file_is_applied_by_default_discovery_and_lists_work(
    ssh_ext: LoadedExtension, podman: Podman, tmp_path: Path
) -> None:
    repo = write_repo(tmp_path / "override-repo", OVERRIDE_REPO)
    ctx = step(ssh_ext, "sbx-override", repo)
    handle = await ssh_ext.adapter.provision(ctx)
    try:
        assert handle["compose_files"] == "compose.yml\ncompose.override.yml"
        assert await ssh_ext.adapter.wait_ready(ctx, handle) == ["sidecar", "web"]
        adapter = cast(Commanding, ssh_ext.adapter)
        env = await adapter.exec(ctx, handle, ["sh", "-c", "echo $FROM_OVERRIDE"], service="web")
        assert env.stdout == "yes\n"
    finally:
        await ssh_ext.adapter.teardown(ctx, handle)
    assert podman.leftovers(project_name("sbx-override")) == []

    # A list (the input, comma-separated): exactly those files, in order, no override.
    listed = step(
        ssh_ext, "sbx-list", repo, inputs={"compose_file": "compose.yml,compose.extra.yml"}
    )
    handle = await ssh_ext.adapter.provision(listed)
    try:
        assert handle["compose_files"] == "compose.yml\ncompose.extra.yml"
        assert await ssh_ext.adapter.wait_ready(listed, handle) == ["extra", "web"]
        services = {
            c["Labels"]["com.docker.compose.service"]
            for c in podman.containers(project_name("sbx-list"))
        }
        assert services == {"extra", "web"}
        # Teardown uses the recorded list: the workspace's own discovery would name
        # compose.override.yml's sidecar, never extra.
    finally:
        await ssh_ext.adapter.teardown(listed, handle)
    assert podman.leftovers(project_name("sbx-list")) == []
    assert_nothing_left(podman, tmp_path, "sbx-list")


async def test_teardown_without_a_handle_removes_a_non_default_project(
    ssh_ext: LoadedExtension, podman: Podman, tmp_path: Path
) -> None:
    """A crash lost the handle: the sandbox id alone finds everything by the label."""
    repo = write_repo(tmp_path / "ci-repo", CI_REPO)
    ctx = step(ssh_ext, "sbx-nohandle", repo, {"compose_file": "compose.ci.yml"})
    await ssh_ext.adapter.provision(ctx)
    assert podman.leftovers(project_name("sbx-nohandle"))
    await ssh_ext.adapter.teardown(ctx, None)
    assert podman.leftovers(project_name("sbx-nohandle")) == []
    assert_nothing_left(podman, tmp_path, "sbx-nohandle")


async def test_restore_loaded_images_are_removed_on_teardown(
    ssh_ext: LoadedExtension, podman: Podman, compose_repo: Path, tmp_path: Path
) -> None:
    """A clone comes up on the checkpoint's images, tagged for its own project; its
    teardown removes them (and the source's teardown its own)."""
    adapter = cast(Snapshotting, ssh_ext.adapter)
    source = step(ssh_ext, "sbx-ckpt-src", compose_repo, checkpoint_id="ckpt-one")
    handle = await ssh_ext.adapter.provision(source)
    archive = tmp_path / "ckpt.tar"
    clone = step(ssh_ext, "sbx-ckpt-clone", compose_repo, checkpoint_id="ckpt-one")
    try:
        await ssh_ext.adapter.wait_ready(source, handle)
        metadata = await adapter.snapshot(source, handle, archive)
        assert podman.images(project_name("sbx-ckpt-src")) == [], "snapshot keeps no tags"
        cloned = await adapter.restore(clone, None, archive, metadata)
        assert await ssh_ext.adapter.wait_ready(clone, cloned) == ["web", "worker"]
        assert podman.images(project_name("sbx-ckpt-clone")) == [
            f"localhost/sandboxer-ckpt/{project_name('sbx-ckpt-clone')}-web",
            f"localhost/sandboxer-ckpt/{project_name('sbx-ckpt-clone')}-worker",
        ]
        await ssh_ext.adapter.teardown(clone, cloned)
        assert podman.leftovers(project_name("sbx-ckpt-clone")) == []
        # restore into the source itself: loaded, used, removed on its teardown
        await adapter.restore(source, handle, archive, metadata)
        assert len(podman.images(project_name("sbx-ckpt-src"))) == 2
    finally:
        await ssh_ext.adapter.teardown(clone, None)
        await ssh_ext.adapter.teardown(source, handle)
    assert podman.leftovers(project_name("sbx-ckpt-src")) == []
    assert_nothing_left(podman, tmp_path, "sbx-ckpt-src")
    assert_nothing_left(podman, tmp_path, "sbx-ckpt-clone")


async def test_reconcile_finds_and_removes_an_orphan_image(
    ssh_ext: LoadedExtension, podman: Podman, tmp_path: Path
) -> None:
    """What a crash can leave: the image built for a sandbox, its containers and
    workspace gone. Inventory lists it (kind `image`) under the sandbox id."""
    adapter = cast(Reconciling, ssh_ext.adapter)
    repo = write_repo(tmp_path / "ci-repo", CI_REPO)
    ctx = step(ssh_ext, "sbx-orphan-img", repo, {"compose_file": "compose.ci.yml"})
    await ssh_ext.adapter.provision(ctx)
    project = project_name("sbx-orphan-img")
    podman("rm", "-f", *[c["Id"] for c in podman.containers(project)])
    shutil.rmtree(tmp_path / "remote0" / "sbx-orphan-img")
    assert podman.images(project) == [f"localhost/{project}_built"]
    found = [r for r in await adapter.inventory(ctx.config) if r.sandbox_id == "sbx-orphan-img"]
    assert [(r.kind, r.detail) for r in found if r.kind == "image"] == [
        ("image", f"localhost/{project}_built:latest")
    ]
    for resource in found:
        await adapter.remove_orphan(ctx.config, resource)
        await adapter.remove_orphan(ctx.config, resource)  # idempotent
    assert podman.leftovers(project) == []
    after = [r for r in await adapter.inventory(ctx.config) if r.sandbox_id == "sbx-orphan-img"]
    assert after == []


async def test_ignored_dotenv_fails_naming_it_and_includes_copies_it(
    ssh_ext: LoadedExtension, podman: Podman, tmp_path: Path
) -> None:
    repo = write_repo(tmp_path / "dotenv-repo", DOTENV_REPO)
    ctx = step(ssh_ext, "sbx-dotenv", repo)
    with pytest.raises(ExtensionError) as failed:
        await ssh_ext.adapter.provision(ctx)
    message = str(failed.value)
    assert "filter dropped .env" in message and "includes" in message, message
    await ssh_ext.adapter.teardown(ctx, None)
    assert_nothing_left(podman, tmp_path, "sbx-dotenv")

    included = step(ssh_ext, "sbx-dotenv", repo, {"includes": [".env"]})
    handle = await ssh_ext.adapter.provision(included)
    try:
        await ssh_ext.adapter.wait_ready(included, handle)
        said = await in_service(ssh_ext, included, handle, "sh", "-c", 'echo "$SECRET_ISH"')
        assert said == "from the ignored .env\n"
    finally:
        await ssh_ext.adapter.teardown(included, handle)
    assert podman.leftovers(project_name("sbx-dotenv")) == []


async def test_rsync_progress_shows_the_bytes_transferred(
    ssh_ext: LoadedExtension, compose_repo: Path, podman: Podman, tmp_path: Path
) -> None:
    (compose_repo / "big.bin").write_bytes(os.urandom(50 * 1024 * 1024))
    seen: list[str] = []
    ctx = step(ssh_ext, "sbx-big", compose_repo, progress=seen.append)
    handle = await ssh_ext.adapter.provision(ctx)
    try:
        done = [m for m in seen if m.startswith("rsync 100%")]
        assert done and "52.4 MB transferred" in done[-1], seen
        assert not any("0% of" in m for m in seen), seen
    finally:
        await ssh_ext.adapter.teardown(ctx, handle)
    assert_nothing_left(podman, tmp_path, "sbx-big")
