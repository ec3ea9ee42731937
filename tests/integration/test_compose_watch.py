"""A compose sandbox through the service (ext.compose-local, real podman-compose):
ready only once its healthcheck passes, BecameReady reporting each service's health
and the published port (which answers), and a service that exits after ready
recorded as ServiceExited while the sandbox stays ready (or ends it with `fail`)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from extensions.compose import project_name
from tests.conftest import RunningService, StartService
from tests.helpers import create, destroy, get, wait_state
from tests.infra import IMAGE, Podman, write_repo
from tests.paths import ROOT

pytestmark = pytest.mark.timeout(300)

# db is healthy once it has made /tmp/ok (after ~2 s); web waits for that; job runs
# until the test tells it to stop, then exits 4.
WATCHED_REPO = {
    "compose.yml": (
        "services:\n"
        "  db:\n"
        f"    image: {IMAGE}\n"
        '    command: ["sh", "-c", "mkdir -p /tmp; sleep 2; touch /tmp/ok; exec sleep 3600"]\n'
        "    stop_signal: SIGKILL\n"
        "    healthcheck:\n"
        '      test: ["CMD-SHELL", "test -f /tmp/ok"]\n'
        "      interval: 1s\n"
        "      retries: 30\n"
        "  web:\n"
        f"    image: {IMAGE}\n"
        '    command: ["httpd", "-f", "-p", "8080", "-h", "/srv"]\n'
        "    stop_signal: SIGKILL\n"
        '    volumes: ["./site:/srv:ro"]\n'
        '    ports: ["8080"]\n'
        "    depends_on:\n"
        "      db: {condition: service_healthy}\n"
        "  job:\n"
        f"    image: {IMAGE}\n"
        "    command:\n"
        '      ["sh", "-c", "mkdir -p /tmp; until [ -f /tmp/stop ]; do sleep 0.2; done; exit 4"]\n'
        "    stop_signal: SIGKILL\n"
    ),
    "site/index.html": "<h1>watched</h1>\n",
}


@pytest.fixture
def local_env(podman: Podman, tmp_path: Path) -> dict[str, str]:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    base = yaml.safe_load((ROOT / "profiles" / "profile.compose-local.yaml").read_text())
    for name, policy in [("compose-watched", "report"), ("compose-watched-fail", "fail")]:
        profile = {
            **base,
            "name": f"profile.{name}",
            "config": {**(base.get("config") or {}), "watch_interval": 0.5,
                       "on_service_exit": policy},
        }  # fmt: skip
        (profiles / f"profile.{name}.yaml").write_text(yaml.safe_dump(profile))
    return {
        "SANDBOXER_COMPOSE_LOCAL_CMD": podman.compose_cmd,
        "SANDBOXER_COMPOSE_LOCAL_ENGINE_CMD": podman.engine_cmd,
        "SANDBOXER_COMPOSE_LOCAL_STOP_TIMEOUT": "1",
        "SANDBOXER_REPO_ROOTS": str(tmp_path),
        "SANDBOXER_PROFILES_PATH": str(profiles),
    }


async def events_of(svc: RunningService, sandbox_id: str) -> list[dict[str, Any]]:
    async with svc.http.get(f"{svc.url}/v1/sandboxes/{sandbox_id}/events") as resp:
        body = await resp.json()
        assert resp.status == 200, body
    return [e["event"] for e in body["events"]]


async def wait_event(svc: RunningService, sandbox_id: str, type_name: str) -> dict[str, Any]:
    seq = 0
    async with asyncio.timeout(60):
        while True:
            for event in await events_of(svc, sandbox_id):
                if event["type"] == type_name:
                    return event
            view = await get(svc.http, svc.url, sandbox_id)
            async with svc.http.get(
                f"{svc.url}/v1/sandboxes/{sandbox_id}",
                params={"wait": "5", "after_seq": str(max(seq, view["last_seq"]))},
            ) as resp:
                seq = (await resp.json())["last_seq"]


def stop_job(podman: Podman, sandbox_id: str) -> None:
    (job,) = [
        c["Names"][0]
        for c in podman.containers(project_name(sandbox_id))
        if c["Labels"]["com.docker.compose.service"] == "job"
    ]
    assert podman("exec", job, "touch", "/tmp/stop").returncode == 0


async def test_ready_after_health_with_endpoints_then_an_exit_is_recorded(
    start_service: StartService, local_env: dict[str, str], podman: Podman, tmp_path: Path
) -> None:
    repo = write_repo(tmp_path / "repo", WATCHED_REPO)
    svc = await start_service(**local_env)
    made = await create(
        svc.http, svc.url, profile="profile.compose-watched", inputs={"repo": str(repo)}
    )
    sid = made["id"]
    ready = await wait_state(svc.http, svc.url, sid, {"ready"}, timeout=180)
    states = {s["service"]: s for s in ready["service_states"]}
    assert states["db"]["health"] == "healthy" and states["db"]["state"] == "running"
    assert states["web"]["health"] == "none" and states["job"]["state"] == "running"
    (port,) = ready["endpoints"]
    assert (port["service"], port["container_port"], port["protocol"]) == ("web", 8080, "tcp")
    assert port["host"] == "127.0.0.1" and port["host_port"] != 8080
    url = f"http://{port['host']}:{port['host_port']}/index.html"
    page = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
    assert page == b"<h1>watched</h1>\n"
    became = next(e for e in await events_of(svc, sid) if e["type"] == "BecameReady")
    assert became["endpoints"] == ready["endpoints"]
    assert became["schema_version"] == 2

    stop_job(podman, sid)
    exited = await wait_event(svc, sid, "ServiceExited")
    assert (exited["service"], exited["exit_code"]) == ("job", 4)
    view = await get(svc.http, svc.url, sid)
    assert view["state"] == "ready"
    assert {s["service"]: s["state"] for s in view["service_states"]}["job"] == "exited"
    await destroy(svc.http, svc.url, sid)
    await wait_state(svc.http, svc.url, sid, {"destroyed"}, timeout=120)
    assert podman.leftovers(project_name(sid)) == []


async def test_an_exit_ends_the_sandbox_failed_with_fail_policy(
    start_service: StartService, local_env: dict[str, str], podman: Podman, tmp_path: Path
) -> None:
    repo = write_repo(tmp_path / "repo", WATCHED_REPO)
    svc = await start_service(**local_env)
    made = await create(
        svc.http, svc.url, profile="profile.compose-watched-fail", inputs={"repo": str(repo)}
    )
    sid = made["id"]
    await wait_state(svc.http, svc.url, sid, {"ready"}, timeout=180)
    stop_job(podman, sid)
    final = await wait_state(svc.http, svc.url, sid, {"failed"}, timeout=120)
    assert final["reason"] == "destroy requested (service_exited) by system:service-watch"
    assert podman.leftovers(project_name(sid)) == []
    assert json.dumps(final["service_states"]).count('"exited"') == 1
