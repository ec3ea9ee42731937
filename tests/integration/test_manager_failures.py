"""Failures, cancellation, timeouts and TTL: each ends in the state its events say."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.conftest import RunningService, StartService
from tests.helpers import create, destroy, event_types, get, wait_state


def instances(service: RunningService) -> list[Path]:
    return sorted((service.data_dir / "saas-stub").glob("*.json"))


async def test_failed_provision_is_torn_down_and_ends_failed(
    start_service: StartService,
) -> None:
    svc = await start_service(SANDBOXER_SAAS_STUB_FAIL_HOOK="provision")
    made = await create(svc.http, svc.url)
    final = await wait_state(svc.http, svc.url, made["id"], {"failed"})
    assert "provision failed" in final["reason"]
    assert await event_types(svc.http, svc.url, made["id"]) == [
        "SandboxRequested",
        "RouteChosen",
        "CreditsHeld",
        "StepFailed",
        "TornDown",
    ]
    assert instances(svc) == [], "the half-made instance was cleaned up"


async def test_failed_wait_ready_is_torn_down(start_service: StartService) -> None:
    svc = await start_service(SANDBOXER_SAAS_STUB_FAIL_HOOK="wait_ready")
    made = await create(svc.http, svc.url)
    final = await wait_state(svc.http, svc.url, made["id"], {"failed"})
    assert final["reason"].startswith("wait_ready failed")
    assert await event_types(svc.http, svc.url, made["id"]) == [
        "SandboxRequested",
        "RouteChosen",
        "CreditsHeld",
        "Provisioned",
        "StepFailed",
        "TornDown",
    ]
    assert instances(svc) == []


async def test_teardown_retries_then_fails_flagged_for_reconciliation(
    start_service: StartService,
) -> None:
    svc = await start_service(SANDBOXER_SAAS_STUB_FAIL_HOOK="teardown")
    made = await create(svc.http, svc.url)
    await wait_state(svc.http, svc.url, made["id"], {"ready"})
    await destroy(svc.http, svc.url, made["id"])
    final = await wait_state(svc.http, svc.url, made["id"], {"failed"})
    assert final["needs_reconciliation"] is True
    assert final["reason"].startswith("teardown failed")
    types = await event_types(svc.http, svc.url, made["id"])
    assert types[-4:] == ["TeardownFailed"] * 4  # 1 try + 3 retries from the manifest
    async with svc.http.get(f"{svc.url}/v1/sandboxes/{made['id']}/events") as resp:
        events = (await resp.json())["events"]
    assert [e["event"]["final"] for e in events[-4:]] == [False, False, False, True]
    assert [e["event"]["attempt"] for e in events[-4:]] == [1, 2, 3, 4]


async def test_destroy_during_provision_cancels_the_step(start_service: StartService) -> None:
    svc = await start_service(SANDBOXER_SAAS_STUB_LATENCY_MS="1500")
    made = await create(svc.http, svc.url)
    current = await wait_state(svc.http, svc.url, made["id"], {"provisioning"})
    assert current["progress"] is None or current["progress"]["step"] == "provision"
    await destroy(svc.http, svc.url, made["id"])
    await wait_state(svc.http, svc.url, made["id"], {"destroyed"})
    types = await event_types(svc.http, svc.url, made["id"])
    assert types == [
        "SandboxRequested",
        "RouteChosen",
        "CreditsHeld",
        "DestroyRequested",
        "StepCancelled",
        "TornDown",
    ]
    async with svc.http.get(f"{svc.url}/v1/sandboxes/{made['id']}/events") as resp:
        cancelled = (await resp.json())["events"][4]["event"]
    assert cancelled["step"] == "provision" and cancelled["reason"] == "destroy requested"
    assert instances(svc) == []


async def test_ttl_expiry_destroys(api: RunningService) -> None:
    made = await create(api.http, api.url, ttl_seconds=1)
    final = await wait_state(api.http, api.url, made["id"], {"destroyed"}, timeout=20)
    assert "ttl" in final["reason"]
    async with api.http.get(f"{api.url}/v1/sandboxes/{made['id']}/events") as resp:
        events = (await resp.json())["events"]
    destroy_event = next(e["event"] for e in events if e["event"]["type"] == "DestroyRequested")
    assert destroy_event["actor"] == "system:ttl-reaper"
    assert destroy_event["reason"] == "ttl"


async def test_hook_timeout_from_manifest(start_service: StartService, tmp_path: Path) -> None:
    ext_dir, prof_dir = tmp_path / "ext", tmp_path / "prof"
    ext_dir.mkdir()
    prof_dir.mkdir()
    (ext_dir / "ext.slow-stub.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "slow-stub",
                "version": "0.0.1",
                "entry_point": "extensions.saas_stub:SaasStub",
                "capabilities": ["provision", "wait_ready", "teardown"],
                "config": {
                    "latency_ms": {"type": "int", "default": 1500},
                    "state_dir": {"type": "str", "default": str(tmp_path / "slow")},
                },
                "hooks": {"provision": {"timeout": 0.5}, "teardown": {"timeout": 10}},
            }
        )
    )
    (prof_dir / "profile.slow.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "profile.slow",
                "extension": "slow-stub",
                "ttl_seconds": 60,
            }
        )
    )
    svc = await start_service(
        SANDBOXER_EXTENSIONS_PATH=str(ext_dir), SANDBOXER_PROFILES_PATH=str(prof_dir)
    )
    made = await create(svc.http, svc.url, profile="profile.slow")
    final = await wait_state(svc.http, svc.url, made["id"], {"failed"})
    assert final["reason"] == "provision failed: timed out after 0.5s"
    assert not list((tmp_path / "slow").glob("*.json"))


async def test_destroy_twice_and_after_the_end(api: RunningService) -> None:
    made = await create(api.http, api.url)
    await wait_state(api.http, api.url, made["id"], {"ready"})
    await destroy(api.http, api.url, made["id"])
    await wait_state(api.http, api.url, made["id"], {"destroyed"})
    async with api.http.delete(f"{api.url}/v1/sandboxes/{made['id']}") as resp:
        assert resp.status == 409
        error = (await resp.json())["error"]
    assert error["code"] == "conflict" and "already destroyed" in error["message"]
    assert (await get(api.http, api.url, made["id"]))["events"] == 7
