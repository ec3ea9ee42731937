"""A compose-ssh host alone in a network namespace is cut off (veth down) while a
sandbox is provisioned on it, then healed. The sandbox must end cleanly, within a
deadline: failed with a StepFailed naming provision and then torn down, or ready once
the link is back (and then destroyed). Afterwards nothing of it may remain on the host:
no workspace, no container, pod, network or volume of its compose project, no command
of it still running there. No reconciliation sweep is involved: this is what teardown
alone leaves."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from extensions.compose_ssh import project_name
from tests.conftest import RunningService, StartService
from tests.helpers import TERMINAL
from tests.infra import IMAGE, NetnsSSHHost, Podman

END_DEADLINE = 120.0  # seconds from the cut to the sandbox's end: it must never hang
IDLE_SERVICES = 4  # beside web and worker: compose up stays in flight longer (~0.3 s each)


@pytest.fixture
def netns_host(tmp_path: Path) -> Iterator[NetnsSSHHost]:
    host = NetnsSSHHost(tmp_path / "sshd-netns").start()
    try:
        yield host
    finally:
        host.stop()


@pytest.fixture
def repo(compose_repo: Path) -> Path:
    """The two-service test project with a few idle services more, so that compose up
    is still creating containers for a while after the first one exists."""
    path = compose_repo / "compose.yml"
    doc = yaml.safe_load(path.read_text())
    for i in range(IDLE_SERVICES):
        doc["services"][f"idle{i}"] = {
            "image": IMAGE,
            "command": ["sleep", "3600"],
            "stop_signal": "SIGKILL",
        }
    path.write_text(yaml.safe_dump(doc))
    return compose_repo


async def sandbox(svc: RunningService, sandbox_id: str) -> dict[str, Any]:
    async with svc.http.get(f"{svc.url}/v1/sandboxes/{sandbox_id}") as resp:
        data: dict[str, Any] = await resp.json()
        assert resp.status == 200, data
        return data


async def events(svc: RunningService, sandbox_id: str) -> list[dict[str, Any]]:
    async with svc.http.get(f"{svc.url}/v1/sandboxes/{sandbox_id}/events") as resp:
        data: dict[str, Any] = await resp.json()
        assert resp.status == 200, data
    return [e["event"] for e in data["events"]]


async def until(
    what: str, check: Callable[[], Awaitable[Any]], done: Callable[[Any], bool], timeout: float
) -> Any:
    """Poll `check` until `done` holds, under a deadline (a sandbox's live step and
    progress are not events, and the host's containers are not the service's)."""
    last: Any = None
    try:
        async with asyncio.timeout(timeout):
            while not done(last := await check()):
                await asyncio.sleep(0.05)  # polling a condition, under a deadline
    except TimeoutError:
        raise AssertionError(f"no {what} within {timeout}s; last seen: {last}") from None
    return last


def leftovers(
    podman: Podman, host: NetnsSSHHost, root: Path, sandbox_id: str
) -> dict[str, list[str]]:
    """Everything of the sandbox still on the host, by kind."""
    project = project_name(sandbox_id)
    label, pod = f"label=com.docker.compose.project={project}", f"pod_{project}"
    found = {
        "workspace": [str(root / sandbox_id)] if (root / sandbox_id).exists() else [],
        "containers": [f"{c['Names'][0]} ({c['State']})" for c in podman.containers(project)],
        "pods": [pod] if podman("pod", "exists", pod).returncode == 0 else [],
        "networks": [n for n in podman.networks() if n.startswith(f"{project}_")],
        "volumes": podman("volume", "ls", "-q", "--filter", label).stdout.split(),
        "commands": [c for c in host.commands() if sandbox_id in c],
    }
    return {kind: items for kind, items in found.items() if items}


def remove_project(podman: Podman, sandbox_id: str) -> None:
    """After a failed test: leave nothing for the next one (never part of the check)."""
    project = project_name(sandbox_id)
    label = f"label=com.docker.compose.project={project}"
    ids = podman("ps", "-aq", "--filter", label).stdout.split()
    if ids:
        podman("rm", "-f", *ids)
    podman("pod", "rm", "-f", "--ignore", f"pod_{project}")
    for network in [n for n in podman.networks() if n.startswith(f"{project}_")]:
        podman("network", "rm", "-f", network)
    for volume in podman("volume", "ls", "-q", "--filter", label).stdout.split():
        podman("volume", "rm", "-f", volume)


@pytest.mark.timeout(200)
@pytest.mark.parametrize(
    ("cut_when", "heal_when"),
    [
        pytest.param("compose up starts", "the sandbox left provisioning", id="cut-at-up"),
        pytest.param("containers exist", "the sandbox left provisioning", id="cut-mid-up"),
        pytest.param("compose up starts", "containers exist", id="blip"),
    ],
)
async def test_cut_during_provision_ends_cleanly_and_leaves_nothing(
    cut_when: str,
    heal_when: str,
    start_service: StartService,
    netns_host: NetnsSSHHost,
    podman: Podman,
    repo: Path,
    tmp_path: Path,
) -> None:
    root = tmp_path / "remote-netns"
    host = netns_host.host_config(
        "cut0",
        root,
        podman.compose_cmd,
        engine_cmd=podman.engine_cmd,
        connect_timeout=2,  # SSHTarget: asyncssh's and OpenSSH's (rsync) connect timeout
        keepalive_interval=1,  # a dead link is noticed after 3 missed keepalives
    )
    svc = await start_service(
        SANDBOXER_COMPOSE_HOSTS=json.dumps([host]),
        SANDBOXER_COMPOSE_CMD=podman.compose_cmd,
        SANDBOXER_COMPOSE_ENGINE_CMD=podman.engine_cmd,
        SANDBOXER_COMPOSE_STOP_TIMEOUT="1",
        SANDBOXER_RECONCILE="off",  # nothing but teardown may clean up the host
        SANDBOXER_REPO_ROOTS=str(repo.parent),
    )
    started = time.monotonic()
    async with svc.http.post(
        f"{svc.url}/v1/sandboxes",
        json={"profile": "profile.compose-e2e", "inputs": {"repo": str(repo)}},
    ) as resp:
        made = await resp.json()
        assert resp.status == 202, made
    sandbox_id = made["id"]
    project = project_name(sandbox_id)

    async def view() -> dict[str, Any]:
        return await sandbox(svc, sandbox_id)

    async def containers() -> list[dict[str, Any]]:
        return await asyncio.to_thread(podman.containers, project)

    def compose_up(s: dict[str, Any]) -> bool:
        assert s["state"] in ("requested", "reserving", "provisioning"), f"ended early: {s}"
        return "compose up" in ((s.get("progress") or {}).get("message") or "")

    try:
        # The moment of the cut: compose up has started (the command is in flight), or
        # its containers exist on the host while the command is still in flight.
        await until("compose up", view, compose_up, 60)
        if cut_when == "containers exist":
            await until("container on the host", containers, bool, 60)
        assert (await view())["state"] == "provisioning"
        netns_host.cut()
        cut_at = time.monotonic()
        try:
            if heal_when == "containers exist":  # a blip: the host goes on without us
                await until("container on the host", containers, bool, 60)
            else:
                await until("reaction to the cut", view, lambda s: s["state"] != "provisioning", 60)
        finally:
            netns_host.heal()
        healed_at = time.monotonic()
        ended = (*TERMINAL, "ready")
        deadline = END_DEADLINE - (healed_at - cut_at)
        end = await until("end", view, lambda s: s["state"] in ended, deadline)
        ended_at = time.monotonic()

        if end["state"] == "ready":  # it resumed after the link came back: use it, destroy it
            assert len(end["services"]) == 2 + IDLE_SERVICES, end
            async with svc.http.delete(f"{svc.url}/v1/sandboxes/{sandbox_id}") as resp:
                assert resp.status == 202, await resp.json()
            end = await until("teardown", view, lambda s: s["state"] in TERMINAL, 60)
            assert end["state"] == "destroyed", end
        else:
            assert end["state"] == "failed", end
        history = await events(svc, sandbox_id)
        types = [e["type"] for e in history]
        failed = [e for e in history if e["type"] == "StepFailed"]
        if end["state"] == "failed":
            assert [e["step"] for e in failed] == ["provision"], history
            # A clear reason: the link to this host, not just "exited -1".
            error = failed[0]["error"]
            assert error.startswith("SSHError: ") and netns_host.address in error, error
            assert (end["reason"] or "").startswith("provision failed: "), end
        else:
            assert failed == [], history
        assert types[-1] == "TornDown", history  # the last word is a successful teardown
        print(
            f"\npartition: cut when {cut_when}, healed when {heal_when}: {end['state']};",
            f"cut after {cut_at - started:.1f}s, healed {healed_at - cut_at:.1f}s later,",
            f"ended {ended_at - cut_at:.1f}s after the cut;",
            json.dumps({"reason": end["reason"], "events": types}),
            json.dumps({"errors": [e.get("error") for e in history if e.get("error")]}),
        )

        # Commands the cut orphaned on the host (compose up goes on without its client)
        # must end before the host is inspected, else they could create things after
        # it. (A container's monitor, conmon, lives as long as its container: that is
        # for the container check.) Still running after the deadline: reported below.
        def orphaned(commands: list[str]) -> list[str]:
            return [c for c in commands if sandbox_id in c and "conmon" not in c.split()[0]]

        with contextlib.suppress(AssertionError):
            await until(
                "end of the sandbox's commands on the host",
                lambda: asyncio.to_thread(netns_host.commands),
                lambda commands: not orphaned(commands),
                60,
            )
        left = await asyncio.to_thread(leftovers, podman, netns_host, root, sandbox_id)
        assert left == {}, f"left on the host after teardown: {left}; events: {types}"
    finally:
        await asyncio.to_thread(remove_project, podman, sandbox_id)
