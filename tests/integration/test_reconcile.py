"""The reconciliation sweep against real backends: saas-stub instance files, and
compose projects and workspaces on a real sshd + podman host."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from extensions import ExtensionRegistry, RuntimeInfo, StepContext
from extensions.compose_ssh import project_name
from sandboxer.cli.main import EXIT_FAILED
from sandboxer.cli.main import main as cli_main
from tests.conftest import RunningService, StartService
from tests.helpers import create, destroy, wait_state
from tests.infra import Podman
from tests.integration.test_compose_ssh import assert_nothing_left

UNKNOWN = "sbx-0000deadbeef"


async def sweep(svc: RunningService, remove: bool) -> dict[str, Any]:
    params = {"remove": "true" if remove else "false"}
    async with svc.http.post(f"{svc.url}/v1/reconcile", params=params) as resp:
        report: dict[str, Any] = await resp.json()
        assert resp.status == 200, report
        return report


async def reconcile_events(svc: RunningService) -> list[dict[str, Any]]:
    async with svc.http.get(f"{svc.url}/v1/events", params={"limit": "5000"}) as resp:
        data = await resp.json()
    return [e["event"] for e in data["events"] if e["subject"].startswith("sandboxer.reconcile.")]


async def test_saas_stub_orphans_are_reported_then_removed(
    start_service: StartService, tmp_path: Path
) -> None:
    vendor = tmp_path / "vendor"
    svc = await start_service(SANDBOXER_SAAS_STUB_STATE_DIR=str(vendor))
    live = await create(svc.http, svc.url)
    await wait_state(svc.http, svc.url, live["id"], {"ready"})
    gone = await create(svc.http, svc.url)
    await wait_state(svc.http, svc.url, gone["id"], {"ready"})
    await destroy(svc.http, svc.url, gone["id"])
    await wait_state(svc.http, svc.url, gone["id"], {"destroyed"})
    # What a failed teardown or a crashed foreign process leaves at the vendor:
    (vendor / f"{gone['id']}.json").write_text(json.dumps({"id": gone["id"]}))
    (vendor / f"{UNKNOWN}.json").write_text(json.dumps({"id": UNKNOWN}))

    report = await sweep(svc, remove=False)
    orphans = {(o["sandbox_id"], o["why"], o["removed"]) for o in report["orphans"]}
    assert orphans == {(gone["id"], "finished", False), (UNKNOWN, "unknown", False)}
    assert report["checked"]["saas-stub"] == 3  # the live one is found, and is not an orphan
    assert (vendor / f"{UNKNOWN}.json").exists()  # a report touches nothing

    report = await sweep(svc, remove=True)
    assert {o["sandbox_id"] for o in report["orphans"] if o["removed"]} == {gone["id"], UNKNOWN}
    assert sorted(p.stem for p in vendor.glob("*.json")) == [live["id"]]
    assert (await sweep(svc, remove=False))["orphans"] == []

    # The CLI: exit 1 while an orphan is left, 0 once `--remove` took it.
    (vendor / f"{UNKNOWN}.json").write_text("{}")
    assert await asyncio.to_thread(cli_main, ["--url", svc.url, "reconcile"]) == EXIT_FAILED
    assert await asyncio.to_thread(cli_main, ["--url", svc.url, "reconcile", "--remove"]) == 0
    assert not (vendor / f"{UNKNOWN}.json").exists()

    events = await reconcile_events(svc)
    types = [(e["type"], e["sandbox_id"]) for e in events]
    assert types.count(("OrphanFound", UNKNOWN)) == 4
    assert types.count(("OrphanRemoved", UNKNOWN)) == 2
    assert all(e["aggregate_id"] == "saas-stub" for e in events)
    assert {e["action"] for e in events if e["type"] == "OrphanFound"} == {"report", "remove"}


async def test_members_may_not_sweep(start_service: StartService, tmp_path: Path) -> None:
    tokens = [
        {"name": "a-ci", "token": "member-token-0123456789", "account": "team-a"},
        {"name": "ops", "token": "admin-token-0123456789", "account": "ops", "role": "admin"},
    ]
    svc = await start_service(SANDBOXER_TOKENS=json.dumps(tokens))
    for token, status in (("member-token-0123456789", 403), ("admin-token-0123456789", 200)):
        async with svc.http.post(
            f"{svc.url}/v1/reconcile", headers={"Authorization": f"Bearer {token}"}
        ) as resp:
            assert resp.status == status, await resp.json()
    async with svc.http.post(
        f"{svc.url}/v1/reconcile",
        params={"remove": "maybe"},
        headers={"Authorization": "Bearer admin-token-0123456789"},
    ) as resp:
        body = await resp.json()
        assert resp.status == 400, body
    assert body["error"]["field"] == "remove"


async def test_compose_orphans_are_removed_from_the_host(
    start_service: StartService,
    compose_env: Callable[..., dict[str, str]],
    compose_repo: Path,
    podman: Podman,
    tmp_path: Path,
) -> None:
    env = compose_env()
    registry = ExtensionRegistry.discover(
        RuntimeInfo(tmp_path, (tmp_path.resolve(),)), entry_points=False, environ=env
    )
    adapter = registry.get("compose-ssh")
    # Two orphans a crash can leave: a whole sandbox nobody recorded (workspace and
    # project), and a project whose workspace is already gone.
    whole, headless = UNKNOWN, "sbx-00000000cafe"
    for sandbox_id in (whole, headless):
        ctx = StepContext(
            sandbox_id=sandbox_id,
            profile="profile.compose-e2e",
            inputs={"repo": str(compose_repo)},
            config=adapter.config_for({}),
            host="host0",
        )
        await adapter.adapter.provision(ctx)
    shutil.rmtree(tmp_path / "remote0" / headless)
    await registry.close()
    assert podman.containers(project_name(headless))

    svc = await start_service(**env)
    live = await create(
        svc.http, svc.url, profile="profile.compose-e2e", inputs={"repo": str(compose_repo)}
    )
    await wait_state(svc.http, svc.url, live["id"], {"ready"}, timeout=120)

    report = await sweep(svc, remove=True)
    found = {(o["sandbox_id"], o["kind"]) for o in report["orphans"] if o["host"] == "host0"}
    assert (whole, "workspace") in found
    assert (headless, "compose_project") in found
    assert all(o["sandbox_id"] != live["id"] for o in report["orphans"])
    assert all(o["removed"] for o in report["orphans"] if o["sandbox_id"] in (whole, headless))
    pods = podman("pod", "ps", "--format", "{{.Name}}").stdout.split()
    for sandbox_id in (whole, headless):
        assert_nothing_left(podman, tmp_path, sandbox_id)
        assert f"pod_{project_name(sandbox_id)}" not in pods
    assert podman.containers(project_name(live["id"]))  # the live sandbox is untouched
    await destroy(svc.http, svc.url, live["id"])
    await wait_state(svc.http, svc.url, live["id"], {"destroyed"}, timeout=120)
