"""A compose sandbox's lifetime through the service (ext.compose-local, real
podman-compose): traffic to its published port and a log follower keep it from going
idle (the backend's counters, `logs`), and with `pause_mode: stop` its files, its
container's filesystem and its named volume survive three pause/resume cycles, its
server answering on the port each resume reports."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from extensions.compose import project_name
from tests.conftest import RunningService, StartService
from tests.helpers import create, wait_state
from tests.infra import IMAGE, Podman, write_repo
from tests.paths import ROOT

pytestmark = pytest.mark.timeout(300)

IDLE = 6  # seconds
USE_FOR = 2.5 * IDLE
PACE = 0.5  # seconds between two uses: the rhythm of the use, not a wait on anything

# web serves /srv (a named volume); nothing in it runs unless asked but its
# healthcheck, which asks it over loopback every second (and must not count as use).
REPO = {
    "compose.yml": (
        "services:\n"
        "  web:\n"
        f"    image: {IMAGE}\n"
        '    command: ["httpd", "-f", "-p", "8080", "-h", "/srv"]\n'
        "    stop_signal: SIGKILL\n"
        '    volumes: ["site:/srv"]\n'
        '    ports: ["8080"]\n'
        "    healthcheck:\n"
        '      test: ["CMD-SHELL", "wget -q -O /dev/null http://127.0.0.1:8080/ || test -d /srv"]\n'
        "      interval: 1s\n"
        "volumes:\n"
        "  site: {}\n"
    ),
}


@pytest.fixture
def local_env(podman: Podman, tmp_path: Path) -> dict[str, str]:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    base = yaml.safe_load((ROOT / "profiles" / "profile.compose-local.yaml").read_text())
    for name, extra in [
        ("compose-idle", {"idle_timeout_seconds": IDLE}),
        ("compose-stop", {"pause_mode": "stop"}),
    ]:
        profile = {**base, "name": f"profile.{name}", **extra}
        (profiles / f"profile.{name}.yaml").write_text(yaml.safe_dump(profile))
    return {
        "SANDBOXER_COMPOSE_LOCAL_CMD": podman.compose_cmd,
        "SANDBOXER_COMPOSE_LOCAL_ENGINE_CMD": podman.engine_cmd,
        "SANDBOXER_COMPOSE_LOCAL_STOP_TIMEOUT": "1",
        "SANDBOXER_REPO_ROOTS": str(tmp_path),
        "SANDBOXER_PROFILES_PATH": str(profiles),
    }


async def events(svc: RunningService, sandbox_id: str) -> list[dict[str, Any]]:
    async with svc.http.get(f"{svc.url}/v1/sandboxes/{sandbox_id}/events") as resp:
        return [e["event"] for e in (await resp.json())["events"]]


def fetch(view: dict[str, Any], path: str = "/") -> str:
    (port,) = [p for p in view["endpoints"] if p["container_port"] == 8080]
    url = f"http://{port['host']}:{port['host_port']}{path}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


async def ready(svc: RunningService, profile: str, repo: Path) -> dict[str, Any]:
    made = await create(svc.http, svc.url, profile=profile, inputs={"repo": str(repo)})
    return await wait_state(svc.http, svc.url, made["id"], {"ready"}, timeout=180)


async def ends_idle(svc: RunningService, sandbox_id: str) -> set[str]:
    async with svc.http.get(f"{svc.url}/v1/sandboxes/{sandbox_id}") as resp:
        assert (await resp.json())["state"] == "ready"
    await wait_state(svc.http, svc.url, sandbox_id, {"destroyed"}, timeout=IDLE * 6)
    recorded = await events(svc, sandbox_id)
    reasons = [e["reason"] for e in recorded if e["type"] == "DestroyRequested"]
    assert reasons == ["idle"]
    return {k for e in recorded if e["type"] == "ActivitySeen" for k in e["kinds"]}


async def test_traffic_and_a_log_follower_keep_it_then_it_goes_idle(
    start_service: StartService, local_env: dict[str, str], tmp_path: Path
) -> None:
    repo = write_repo(tmp_path / "repo", REPO)
    svc = await start_service(**local_env)
    served, followed = await asyncio.gather(
        ready(svc, "profile.compose-idle", repo), ready(svc, "profile.compose-idle", repo)
    )
    loop = asyncio.get_running_loop()

    async def traffic() -> None:  # from outside: only the backend's counters see it
        end = loop.time() + USE_FOR
        while loop.time() < end:
            with pytest.raises(OSError):  # 404: an empty /srv; the request is the use
                await asyncio.to_thread(fetch, served, "/nothing-here")
            await asyncio.sleep(PACE)

    async def follow() -> None:
        url = f"{svc.url}/v1/sandboxes/{followed['id']}/logs"
        async with svc.http.get(url, params={"follow": "1"}) as resp:
            assert resp.status == 200
            async for _line in resp.content:
                pass

    follower = asyncio.create_task(follow())
    try:
        await traffic()  # meanwhile the follower reads
        assert not follower.done(), "the follower's stream ended while the sandbox was used"
    finally:
        follower.cancel()
    kinds_served, kinds_followed = await asyncio.gather(
        ends_idle(svc, served["id"]), ends_idle(svc, followed["id"])
    )
    assert kinds_served == {"backend"}
    assert "logs" in kinds_followed


async def test_stop_mode_keeps_files_and_volumes_over_three_cycles(
    start_service: StartService, local_env: dict[str, str], tmp_path: Path
) -> None:
    repo = write_repo(tmp_path / "repo", REPO)
    svc = await start_service(**local_env)
    view = await ready(svc, "profile.compose-stop", repo)
    sid = view["id"]
    files = f"{svc.url}/v1/sandboxes/{sid}/files"
    for cycle in range(3):
        for path in (f"/srv/page{cycle}.html", f"/tmp/layer{cycle}"):  # volume, container fs
            async with svc.http.put(
                files, params={"path": path, "service": "web"}, data=b"cycle %d\n" % cycle
            ) as resp:
                assert resp.status == 201, await resp.text()
        async with svc.http.post(f"{svc.url}/v1/sandboxes/{sid}/pause") as resp:
            assert resp.status == 202, await resp.text()
        paused = await wait_state(svc.http, svc.url, sid, {"paused"}, timeout=120)
        with pytest.raises(OSError):
            await asyncio.to_thread(fetch, paused, "/")  # stopped: nothing answers
        async with svc.http.post(f"{svc.url}/v1/sandboxes/{sid}/resume") as resp:
            assert resp.status == 202, await resp.text()
        view = await wait_state(svc.http, svc.url, sid, {"ready"}, timeout=120)
        for kept in range(cycle + 1):
            page = await asyncio.to_thread(fetch, view, f"/page{kept}.html")
            assert page == f"cycle {kept}\n"
            async with svc.http.get(
                files, params={"path": f"/tmp/layer{kept}", "service": "web"}
            ) as resp:
                assert resp.status == 200
                assert await resp.read() == b"cycle %d\n" % kept
    modes = [e["mode"] for e in await events(svc, sid) if e["type"] == "Paused"]
    assert modes == ["stop"] * 3
    async with svc.http.delete(f"{svc.url}/v1/sandboxes/{sid}") as resp:
        assert resp.status == 202
    await wait_state(svc.http, svc.url, sid, {"destroyed"}, timeout=120)


async def test_a_frozen_sandbox_is_destroyed_without_leftovers(
    start_service: StartService, local_env: dict[str, str], podman: Podman, tmp_path: Path
) -> None:
    """Paused in the default mode (its processes frozen), then destroyed: nothing of
    its project stays."""
    repo = write_repo(tmp_path / "repo", REPO)
    svc = await start_service(**local_env)
    view = await ready(svc, "profile.compose-idle", repo)
    sid = view["id"]
    async with svc.http.post(f"{svc.url}/v1/sandboxes/{sid}/pause") as resp:
        assert resp.status == 202, await resp.text()
    await wait_state(svc.http, svc.url, sid, {"paused"}, timeout=120)
    states = {c["State"] for c in podman.containers(project_name(sid))}
    assert states == {"paused"}, states
    async with svc.http.delete(f"{svc.url}/v1/sandboxes/{sid}") as resp:
        assert resp.status == 202
    await wait_state(svc.http, svc.url, sid, {"destroyed"}, timeout=120)
    assert podman.containers(project_name(sid)) == []
