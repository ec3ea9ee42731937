"""Extending a sandbox's TTL (`PATCH /v1/sandboxes/{id}`), against a real JetStream:
recorded as TtlExtended, bounded by the profile's max_ttl_seconds, the reaper
following the new end, a metered reservation topped up or the extension refused."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import subprocess
import sys
from typing import Any

import aiohttp

from sandboxer.client import Client
from sandboxer.wire import SandboxOut
from tests.conftest import RunningService, StartService
from tests.helpers import audit, create, destroy, grant, wait_settled, wait_state

RATE_SMALL = 0.05  # saas-stub credits per second, size small


def parse(ts: str) -> dt.datetime:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))


async def patch(
    http: aiohttp.ClientSession, url: str, sandbox_id: str, body: Any
) -> tuple[int, dict[str, Any]]:
    async with http.patch(f"{url}/v1/sandboxes/{sandbox_id}", json=body) as resp:
        return resp.status, await resp.json()


async def events(svc: RunningService, sandbox_id: str) -> list[dict[str, Any]]:
    async with svc.http.get(f"{svc.url}/v1/sandboxes/{sandbox_id}/events") as resp:
        return [e["event"] for e in (await resp.json())["events"]]


async def account(svc: RunningService, name: str) -> dict[str, Any]:
    async with svc.http.get(f"{svc.url}/v1/accounts/{name}") as resp:
        data: dict[str, Any] = await resp.json()
        return data


async def test_extend_tops_up_the_reservation_and_moves_the_end(
    start_service: StartService,
) -> None:
    svc = await start_service()
    http, url = svc.http, svc.url
    await grant(http, url, "acme", 1000)
    made = await create(http, url, account="acme", ttl_seconds=600)
    ready = await wait_state(http, url, made["id"], {"ready"})
    held = ready["credits_held"]
    assert held == round(600 * RATE_SMALL)
    before = dt.datetime.now(dt.UTC)
    status, out = await patch(http, url, made["id"], {"ttl_seconds": 1200})
    assert status == 200, out
    assert out["state"] == "ready"
    ends = parse(out["expires_at"])
    assert before + dt.timedelta(seconds=1199) <= ends <= before + dt.timedelta(seconds=1260)
    extended = [e for e in await events(svc, made["id"]) if e["type"] == "TtlExtended"]
    assert len(extended) == 1
    total = extended[0]["ttl_seconds"]
    assert 1200 <= total <= 1260  # from its creation: the seconds it lived, plus 1200
    assert extended[0]["credits_added"] == math.ceil(total * RATE_SMALL - 1e-9) - held
    assert out["credits_held"] == math.ceil(total * RATE_SMALL - 1e-9)
    acme = await account(svc, "acme")
    assert acme["reserved"] == out["credits_held"]
    ids = [e["event_id"] for e in await ledger(svc, "acme") if e["type"] == "CreditsReserved"]
    assert ids == [f"{made['id']}.reserve", f"{made['id']}.extend-{total}"]
    await destroy(http, url, made["id"])
    await wait_state(http, url, made["id"], {"destroyed"})
    await wait_settled(http, url, "acme")
    report = await audit(http, url)
    assert report["ok"], report["violations"]


async def ledger(svc: RunningService, name: str) -> list[dict[str, Any]]:
    async with svc.http.get(
        f"{svc.url}/v1/accounts/{name}/ledger", params={"limit": "1000"}
    ) as resp:
        return [e["event"] for e in (await resp.json())["entries"]]


async def test_extend_refused_when_the_credits_do_not_cover_it(
    start_service: StartService,
) -> None:
    svc = await start_service()
    http, url = svc.http, svc.url
    await grant(http, url, "poor", 40)  # 30 reserved for 600 s; 1200 s would need 60
    made = await create(http, url, account="poor", ttl_seconds=600)
    ready = await wait_state(http, url, made["id"], {"ready"})
    status, out = await patch(http, url, made["id"], {"ttl_seconds": 1200})
    assert status == 402, out
    assert out["error"]["code"] == "insufficient_credits"
    assert out["error"]["field"] == "ttl_seconds"
    assert "account poor has 10 available" in out["error"]["message"]
    now = await wait_state(http, url, made["id"], {"ready"})
    assert now["expires_at"] == ready["expires_at"]  # nothing recorded, nothing moved
    assert now["credits_held"] == ready["credits_held"]
    assert "TtlExtended" not in [e["type"] for e in await events(svc, made["id"])]
    assert (await account(svc, "poor"))["reserved"] == ready["credits_held"]
    # A shorter TTL costs nothing more: allowed.
    status, out = await patch(http, url, made["id"], {"ttl_seconds": 300})
    assert status == 200, out
    assert out["credits_held"] == ready["credits_held"]


async def test_extend_is_bounded_by_the_profiles_max_ttl(start_service: StartService) -> None:
    svc = await start_service()
    http, url = svc.http, svc.url
    await grant(http, url, "default", 10_000)
    made = await create(http, url, ttl_seconds=60)
    await wait_state(http, url, made["id"], {"ready"})
    status, out = await patch(http, url, made["id"], {"ttl_seconds": 86400})
    assert status == 400, out
    assert out["error"]["field"] == "ttl_seconds"
    assert "max_ttl_seconds (86400)" in out["error"]["message"]
    assert "TtlExtended" not in [e["type"] for e in await events(svc, made["id"])]
    for body, field in (
        ({"ttl_seconds": 0}, "ttl_seconds"),
        ({"ttl_seconds": "600"}, "ttl_seconds"),
        ({}, "ttl_seconds"),
        ({"ttl_seconds": 60, "extra": 1}, "extra"),
    ):
        status, out = await patch(http, url, made["id"], body)
        assert status == 400, (body, out)
        assert out["error"]["field"] == field, (body, out)
    await destroy(http, url, made["id"])
    await wait_state(http, url, made["id"], {"destroyed"})
    status, out = await patch(http, url, made["id"], {"ttl_seconds": 60})
    assert status == 409, out


async def test_the_reaper_follows_the_new_end(start_service: StartService) -> None:
    """Extended, a sandbox outlives the TTL it was created with; shortened, it ends at
    the new one."""
    svc = await start_service()
    http, url = svc.http, svc.url
    await grant(http, url, "default", 10_000)
    # Long enough that the extension lands before the first TTL, also on a busy machine.
    kept = await create(http, url, ttl_seconds=8)
    control = await create(http, url, ttl_seconds=8)
    status, out = await patch(http, url, kept["id"], {"ttl_seconds": 600})
    assert status == 200, out
    ended = await wait_state(http, url, control["id"], {"destroyed"})
    assert parse(ended["updated_at"]) >= parse(control["expires_at"])
    # The control's TTL (the same as kept's first one) is over: kept is still up.
    assert (await wait_state(http, url, kept["id"], {"ready"}))["state"] == "ready"
    status, out = await patch(http, url, kept["id"], {"ttl_seconds": 1})
    assert status == 200, out
    await wait_state(http, url, kept["id"], {"destroyed"})
    reasons = [e.get("reason") for e in await events(svc, kept["id"])]
    assert "ttl" in reasons


async def test_client_and_cli_extend(start_service: StartService) -> None:
    svc = await start_service()
    await grant(svc.http, svc.url, "default", 10_000)
    made = await create(svc.http, svc.url, ttl_seconds=60)
    await wait_state(svc.http, svc.url, made["id"], {"ready"})

    def call() -> SandboxOut:
        with Client(svc.url) as client:
            return client.extend(made["id"], 120)

    out = await asyncio.to_thread(call)
    assert 120 <= out.ttl_seconds <= 180
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "sandboxer",
            "--url",
            svc.url,
            "extend",
            made["id"],
            "--ttl",
            "240",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert 240 <= json.loads(done.stdout)["ttl_seconds"] <= 300
    refused = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "sandboxer",
            "--url",
            svc.url,
            "extend",
            made["id"],
            "--ttl",
            "999999",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 3, refused
    assert "max_ttl_seconds" in refused.stderr
