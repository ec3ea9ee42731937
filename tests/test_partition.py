"""A compose-ssh host in its own network namespace is cut off (veth down) during
provision: the sandbox fails cleanly, nothing hangs, and after the link is back and a
reconciliation sweep has run, nothing of it is left on the host."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from extensions.compose_ssh import project_name
from tests.conftest import RunningService, StartService
from tests.helpers import TERMINAL, event_types
from tests.infra import NetnsSSHHost, Podman


@pytest.fixture
def netns_host(tmp_path: Path) -> Iterator[NetnsSSHHost]:
    host = NetnsSSHHost(tmp_path / "sshd-netns").start()
    try:
        yield host
    finally:
        host.stop()


async def sandbox(svc: RunningService, sandbox_id: str) -> dict[str, Any]:
    async with svc.http.get(f"{svc.url}/v1/sandboxes/{sandbox_id}") as resp:
        data: dict[str, Any] = await resp.json()
        assert resp.status == 200, data
        return data


async def until(svc: RunningService, sandbox_id: str, what: str, done: Any, timeout: float) -> None:
    """Poll the sandbox (its live step and progress are not events) under a deadline."""
    last: dict[str, Any] = {}
    try:
        async with asyncio.timeout(timeout):
            while not done(last := await sandbox(svc, sandbox_id)):
                await asyncio.sleep(0.05)  # polling a condition, under a deadline
    except TimeoutError:
        raise AssertionError(f"no {what} in {timeout}s: {last}") from None


@pytest.mark.timeout(240)
@pytest.mark.parametrize("moment", ["compose up starts", "containers exist"])
async def test_cut_during_provision_fails_cleanly_and_leaves_nothing(
    moment: str,
    start_service: StartService,
    netns_host: NetnsSSHHost,
    podman: Podman,
    compose_repo: Path,
    tmp_path: Path,
) -> None:
    root = tmp_path / "remote-netns"
    host = netns_host.host_config(
        "cut0",
        root,
        podman.compose_cmd,
        engine_cmd=podman.engine_cmd,
        connect_timeout=2,
        keepalive_interval=1,
    )
    svc = await start_service(
        SANDBOXER_COMPOSE_HOSTS=json.dumps([host]),
        SANDBOXER_COMPOSE_ENGINE_CMD=podman.engine_cmd,
        SANDBOXER_RECONCILE="off",
    )
    async with svc.http.post(
        f"{svc.url}/v1/sandboxes",
        json={"profile": "profile.compose-e2e", "inputs": {"repo": str(compose_repo)}},
    ) as resp:
        made = await resp.json()
        assert resp.status == 202, made
    sandbox_id = made["id"]

    # Cut the link as compose up starts, or once its containers exist on the host
    # (the command in flight: the host goes on without us).
    def compose_up(s: dict[str, Any]) -> bool:
        message = (s.get("progress") or {}).get("message") or ""
        return "compose up" in message or s["state"] != "provisioning"

    await until(svc, sandbox_id, "compose up", compose_up, 30)
    if moment == "containers exist":
        async with asyncio.timeout(60):
            while not podman.containers(project_name(sandbox_id)):
                await asyncio.sleep(0.05)  # polling the host, under a deadline
    before = await sandbox(svc, sandbox_id)
    netns_host.cut()
    try:
        await until(svc, sandbox_id, "a failed step", lambda s: s["state"] != before["state"], 60)
    finally:
        netns_host.heal()
    await until(svc, sandbox_id, "an end", lambda s: s["state"] in (*TERMINAL, "ready"), 120)

    view = await sandbox(svc, sandbox_id)
    types = await event_types(svc.http, svc.url, sandbox_id)
    print("partition:", moment, json.dumps({"reason": view["reason"], "events": types}))
    if view["state"] == "ready":  # resumed when the link came back: a working sandbox
        async with svc.http.delete(f"{svc.url}/v1/sandboxes/{sandbox_id}") as resp:
            assert resp.status == 202
        await until(svc, sandbox_id, "destroyed", lambda s: s["state"] in TERMINAL, 120)
        assert (await sandbox(svc, sandbox_id))["state"] == "destroyed"
    else:
        assert view["state"] == "failed", view
        assert "StepFailed" in types and "failed:" in (view["reason"] or ""), (types, view)
        assert types[-1] in ("TornDown", "TeardownFailed"), types

    # What compose up went on making on the host while the link was down is the
    # sweep's to find; afterwards nothing of the sandbox remains.
    async with svc.http.post(f"{svc.url}/v1/reconcile", params={"remove": "true"}) as resp:
        report = await resp.json()
        assert resp.status == 200, report
    assert report["errors"] == {}, report
    assert all(o["removed"] for o in report["orphans"]), report
    print("partition sweep:", json.dumps([(o["kind"], o["why"]) for o in report["orphans"]]))
    assert podman.containers(project_name(sandbox_id)) == []
    assert not (root / sandbox_id).exists()
    async with svc.http.post(f"{svc.url}/v1/reconcile", params={"remove": "false"}) as resp:
        again = await resp.json()
    assert [o for o in again["orphans"] if o["sandbox_id"] == sandbox_id] == []
