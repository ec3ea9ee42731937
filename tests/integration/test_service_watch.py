"""Watching a ready sandbox's services (sandboxer/app/watch.py), through the saas-stub,
whose vendor record plays the backend: each change recorded once, shown in the view,
kept across a restart, and `on_service_exit: fail` ending the sandbox `failed`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import RunningService, StartService
from tests.helpers import create, event_types, get, wait_state
from tests.paths import ROOT


def watched_profiles(folder: Path) -> Path:
    folder.mkdir()
    base = yaml.safe_load((ROOT / "profiles" / "profile.saas-stub.yaml").read_text())
    for name, policy in [("saas-watched", "report"), ("saas-watched-fail", "fail")]:
        profile = {
            **base,
            "name": f"profile.{name}",
            "config": {"watch_interval": 0.1, "on_service_exit": policy},
        }
        (folder / f"profile.{name}.yaml").write_text(yaml.safe_dump(profile))
    return folder


async def start(start_service: StartService, tmp_path: Path) -> RunningService:
    folder = tmp_path / "profiles"
    if not folder.exists():
        watched_profiles(folder)
    return await start_service(SANDBOXER_PROFILES_PATH=str(folder))


def tell(svc: RunningService, sandbox_id: str, **told: Any) -> None:
    """What the vendor says of the instance from now on (written whole, atomically)."""
    record = svc.data_dir / "saas-stub" / f"{sandbox_id}.json"
    changed = {**json.loads(record.read_text()), "services": {"instance": told}}
    scratch = record.with_suffix(".tmp")
    scratch.write_text(json.dumps(changed))
    scratch.replace(record)


def looks(svc: RunningService, sandbox_id: str) -> int:
    adapter = svc.service.manager.extensions.get("saas-stub").adapter
    return int(adapter.looks.get(sandbox_id, 0))


async def wait_looks(svc: RunningService, sandbox_id: str, more: int) -> None:
    """Until the watch has looked `more` times from now (it polls every 0.1 s)."""
    target = looks(svc, sandbox_id) + more
    async with asyncio.timeout(20):
        while looks(svc, sandbox_id) < target:
            await asyncio.sleep(0.05)  # polling an in-process counter


async def wait_service(svc: RunningService, sandbox_id: str, **want: Any) -> dict[str, Any]:
    async with asyncio.timeout(20):
        while True:
            view = await get(svc.http, svc.url, sandbox_id)
            states = {s["service"]: s for s in view["service_states"]}
            got = states.get("instance", {})
            if all(got.get(k) == v for k, v in want.items()):
                return view
            await wait_looks(svc, sandbox_id, 1)


async def test_each_change_is_recorded_once_and_shown(
    start_service: StartService, tmp_path: Path
) -> None:
    svc = await start(start_service, tmp_path)
    made = await create(svc.http, svc.url, profile="profile.saas-watched")
    sid = made["id"]
    ready = await wait_state(svc.http, svc.url, sid, {"ready"})
    assert ready["service_states"] == [
        {"service": "instance", "state": "running", "health": "none", "exit_code": None}
    ]
    assert ready["endpoints"] == []

    tell(svc, sid, health="unhealthy", output="probe: connection refused")
    await wait_service(svc, sid, health="unhealthy")
    await wait_looks(svc, sid, 5)  # still unhealthy: nothing more to record
    tell(svc, sid, state="exited", exit_code=3)
    view = await wait_service(svc, sid, state="exited", exit_code=3)
    await wait_looks(svc, sid, 5)
    assert view["state"] == "ready", "report: the sandbox stays ready"
    tell(svc, sid, state="running", health="healthy")
    await wait_service(svc, sid, state="running", health="healthy")
    await wait_looks(svc, sid, 5)

    types = await event_types(svc.http, svc.url, sid)
    watched = [t for t in types if t.startswith("Service")]
    assert watched == ["ServiceUnhealthy", "ServiceExited", "ServiceRecovered"]
    async with svc.http.get(f"{svc.url}/v1/sandboxes/{sid}/events") as resp:
        events = [e["event"] for e in (await resp.json())["events"]]
    unhealthy = next(e for e in events if e["type"] == "ServiceUnhealthy")
    assert unhealthy["output"] == "probe: connection refused"
    assert unhealthy["actor"] == "system:service-watch"
    exited = next(e for e in events if e["type"] == "ServiceExited")
    assert (exited["service"], exited["exit_code"]) == ("instance", 3)


async def test_an_exit_ends_the_sandbox_failed_with_fail_policy(
    start_service: StartService, tmp_path: Path
) -> None:
    svc = await start(start_service, tmp_path)
    made = await create(svc.http, svc.url, profile="profile.saas-watched-fail")
    sid = made["id"]
    await wait_state(svc.http, svc.url, sid, {"ready"})
    tell(svc, sid, state="exited", exit_code=1)
    final = await wait_state(svc.http, svc.url, sid, {"failed"})
    assert final["reason"] == "destroy requested (service_exited) by system:service-watch"
    types = await event_types(svc.http, svc.url, sid)
    assert types[-3:] == ["ServiceExited", "DestroyRequested", "TornDown"]
    assert not (svc.data_dir / "saas-stub" / f"{sid}.json").exists()


async def test_the_watch_resumes_after_a_restart(
    start_service: StartService, tmp_path: Path
) -> None:
    svc = await start(start_service, tmp_path)
    made = await create(svc.http, svc.url, profile="profile.saas-watched")
    sid = made["id"]
    await wait_state(svc.http, svc.url, sid, {"ready"})
    await svc.stop()
    again = await start(start_service, tmp_path)
    tell(again, sid, state="exited", exit_code=2)
    view = await wait_service(again, sid, state="exited", exit_code=2)
    assert view["state"] == "ready"


async def test_a_bad_watch_policy_is_refused_at_create(
    start_service: StartService, tmp_path: Path
) -> None:
    folder = watched_profiles(tmp_path / "profiles")
    bad = yaml.safe_load((folder / "profile.saas-watched.yaml").read_text())
    bad["name"] = "profile.saas-bad-watch"
    bad["config"]["on_service_exit"] = "explode"
    (folder / "profile.saas-bad-watch.yaml").write_text(yaml.safe_dump(bad))
    svc = await start_service(SANDBOXER_PROFILES_PATH=str(folder))
    async with svc.http.post(
        f"{svc.url}/v1/sandboxes", json={"profile": "profile.saas-bad-watch"}
    ) as resp:
        body = await resp.json()
    assert resp.status == 400, body
    assert "on_service_exit" in body["error"]["message"]
