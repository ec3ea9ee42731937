"""Warm pools (docs/pools.md): filled in the background, claimed atomically across
workers, refilled, recycled, drained; a crashed claimer's intent undone."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from events import EventMeta
from sandboxer.app.commands import CreateSandbox
from sandboxer.app.pools import PoolKeeper
from sandboxer.ids import idempotent_sandbox_id
from sandboxer.store.nats_server import EmbeddedNats
from tests.conftest import RunningService, StartService
from tests.helpers import audit, create, event_types, grant, wait_settled, wait_state
from tests.infra import Podman, ServeProcess, free_port

pytestmark = pytest.mark.timeout(180)

PROFILE = "profile.warm"


def write_pool(
    folder: Path,
    *,
    size: int,
    latency_ms: int = 0,
    max_age: int = 3600,
    ttl: int = 600,
    pool: bool = True,
    extension: str = "plain-stub",
    extra: dict[str, Any] | None = None,
) -> dict[str, str]:
    """A non-metered stub extension (the saas-stub adapter without metering: its
    instances are JSON files under `state`) and a profile with a pool; the env to
    start a service with them. Called again, it rewrites the profile."""
    ext_dir, prof_dir = folder / "ext", folder / "prof"
    ext_dir.mkdir(parents=True, exist_ok=True)
    prof_dir.mkdir(parents=True, exist_ok=True)
    (ext_dir / "ext.plain-stub.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "plain-stub",
                "version": "0.0.1",
                "entry_point": "extensions.saas_stub:SaasStub",
                "capabilities": [
                    "provision",
                    "wait_ready",
                    "teardown",
                    "inventory",
                    "remove_orphan",
                ],
                "config": {
                    "state_dir": {"type": "str", "default": str(folder / "state")},
                    "latency_ms": {"type": "int", "default": latency_ms},
                },
            }
        )
    )
    profile: dict[str, Any] = {
        "name": PROFILE,
        "extension": extension,
        "ttl_seconds": ttl,
        "inputs": {"flavour": {"default": "plain", "choices": ["plain", "spicy"]}},
        **(extra or {}),
    }
    if pool:
        profile["pool"] = {"size": size, "max_age_seconds": max_age}
    (prof_dir / f"{PROFILE}.yaml").write_text(yaml.safe_dump(profile))
    return {
        "SANDBOXER_EXTENSIONS_PATH": str(ext_dir),
        "SANDBOXER_PROFILES_PATH": str(prof_dir),
    }


def instances(folder: Path) -> list[str]:
    """What the stub backend holds now (one JSON file per live instance)."""
    return sorted(p.stem for p in (folder / "state").glob("*.json"))


async def pools(http: aiohttp.ClientSession, url: str) -> dict[str, dict[str, Any]]:
    async with http.get(f"{url}/v1/pools") as resp:
        body = await resp.json()
        assert resp.status == 200, body
    assert isinstance(body, list), body  # a bare array, one entry per pool
    return {p["profile"]: p for p in body}


async def until(
    check: Callable[[], Awaitable[bool]], timeout: float = 30.0, what: str = ""
) -> None:
    """Poll a condition under a deadline (never a bare sleep as synchronization)."""
    try:
        async with asyncio.timeout(timeout):
            while not await check():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def pool_is(
    svc: RunningService, *, ready: int, provisioning: int = 0, timeout: float = 30.0
) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def check() -> bool:
        nonlocal seen
        seen = (await pools(svc.http, svc.url)).get(PROFILE, {})
        return seen.get("ready") == ready and seen.get("provisioning") == provisioning

    await until(check, timeout, f"pool ready={ready} provisioning={provisioning}")
    return seen


def keeper(svc: RunningService) -> PoolKeeper:
    assert svc.service.pools is not None
    return svc.service.pools


async def passes(svc: RunningService, more: int) -> None:
    """Let the worker's keeper make `more` full passes over its pools."""
    start = keeper(svc).passes

    async def check() -> bool:
        return keeper(svc).passes >= start + more

    await until(check, 30, "keeper passes")


def members(svc: RunningService) -> list[Any]:
    """Every live unclaimed member the worker's read model knows (any worker's)."""
    return keeper(svc).members(PROFILE)


async def test_a_create_claims_a_ready_member_and_the_pool_refills(
    start_service: StartService, tmp_path: Path
) -> None:
    svc = await start_service(**write_pool(tmp_path, size=2))
    await pool_is(svc, ready=2)
    before = {m.id for m in members(svc)}
    made = await create(svc.http, svc.url, profile=PROFILE, account="alice", labels={"t": "1"})
    assert made["id"] in before  # a warm member, handed over at once
    assert made["state"] == "ready" and made["account"] == "alice"
    assert made["labels"] == {"t": "1"}
    types = await event_types(svc.http, svc.url, made["id"])
    assert types[-1] == "SandboxClaimed" and types.count("SandboxClaimed") == 1
    async with svc.http.get(f"{svc.url}/v1/sandboxes/{made['id']}/events") as resp:
        claimed = (await resp.json())["events"][-1]["event"]
    assert claimed["event_id"] == f"{made['id']}.claimed", claimed
    assert len(claimed["claim_id"]) == 32 and claimed["account"] == "alice"
    assert claimed["actor"] != "system:pool-keeper"
    # The claimer's TTL starts at the claim: the profile's 600 s from then.
    assert made["ttl_seconds"] == 600
    # Refilled: two unclaimed members again, one claimed.
    status = await pool_is(svc, ready=2)
    assert status["size"] == 2 and status["claimed"] == 1
    # Other inputs than the defaults: a cold create, no member taken.
    cold = await create(svc.http, svc.url, profile=PROFILE, inputs={"flavour": "spicy"})
    assert cold["id"] not in {m.id for m in members(svc)} | before
    assert "SandboxClaimed" not in await event_types(svc.http, svc.url, cold["id"])
    # /metrics counts both, and the pool's members by status.
    async with svc.http.get(f"{svc.url}/metrics") as resp:
        text = await resp.text()
        assert resp.status == 200, text
    for line in (
        f'sandboxer_pool_creates_total{{outcome="warm",profile="{PROFILE}"}} 1.0',
        f'sandboxer_pool_creates_total{{outcome="cold",profile="{PROFILE}"}} 1.0',
        f'sandboxer_pool_size{{profile="{PROFILE}"}} 2.0',
        f'sandboxer_pool_members{{profile="{PROFILE}",status="ready"}} 2.0',
        f'sandboxer_pool_members{{profile="{PROFILE}",status="claimed"}} 1.0',
    ):
        assert line in text.splitlines(), (line, text)
    await pool_is(svc, ready=2)


async def test_creates_sharing_a_request_id_never_share_a_member(
    start_service: StartService, tmp_path: Path
) -> None:
    """A claim refused because another create took the member first looks whether
    its own claim landed after all: by its claim id, not by the correlation id, which
    creates sent with one X-Request-Id share. The late claim is run directly on the
    member the first create took (racing creates hit it only now and then)."""
    svc = await start_service(**write_pool(tmp_path, size=2))
    await pool_is(svc, ready=2)
    headers = {"X-Request-Id": "one-request-id"}
    async with svc.http.post(
        f"{svc.url}/v1/sandboxes", json={"profile": PROFILE}, headers=headers
    ) as resp:
        first = await resp.json()
        assert resp.status == 202, first
    late = CreateSandbox(
        profile=PROFILE,
        account="other",
        meta=EventMeta(actor="test", correlation_id="one-request-id"),
    )
    assert await keeper(svc)._claim_one(first["id"], late, 600, {}) is None
    types = await event_types(svc.http, svc.url, first["id"])
    assert types.count("SandboxClaimed") == 1, types
    made = await create(svc.http, svc.url, profile=PROFILE, account="other")
    assert made["id"] != first["id"]


async def keyed(
    http: aiohttp.ClientSession, url: str, key: str, **body: Any
) -> tuple[int, dict[str, Any]]:
    """POST /v1/sandboxes with an Idempotency-Key: the status and the answer."""
    body.setdefault("profile", PROFILE)
    headers = {"Idempotency-Key": key}
    async with http.post(f"{url}/v1/sandboxes", json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_an_idempotency_key_claims_one_member_once(
    start_service: StartService, tmp_path: Path
) -> None:
    a, b = await two_workers(start_service, tmp_path, write_pool(tmp_path, size=2))
    await pool_is(a, ready=2)
    await pool_is(b, ready=2)
    warm = {m.id for m in members(a)}
    body: dict[str, Any] = {"ttl_seconds": 300, "labels": {"run": "k1"}}

    # Eight creates with one key at once, half on each worker: one member, claimed
    # once; one answer 202, the others 200 with the same sandbox.
    answers = await asyncio.gather(*[keyed(w.http, w.url, "key-1", **body) for w in [a, b] * 4])
    assert sorted(status for status, _ in answers) == [200] * 7 + [202], answers
    ids = {answer["id"] for _, answer in answers}
    assert len(ids) == 1 and ids <= warm, (ids, warm)
    (sandbox_id,) = ids
    for _, answer in answers:
        assert answer["account"] == "default" and answer["labels"] == {"run": "k1"}
        assert answer["ttl_seconds"] == 300
    async with a.http.get(f"{a.url}/v1/sandboxes/{sandbox_id}/events") as resp:
        recorded = [e["event"] for e in (await resp.json())["events"]]
    claims = [e for e in recorded if e["type"] == "SandboxClaimed"]
    assert len(claims) == 1, recorded
    assert claims[0]["idempotency_id"] == idempotent_sandbox_id("default", "key-1")
    # The derived id itself was never made.
    async with a.http.get(f"{a.url}/v1/sandboxes/{claims[0]['idempotency_id']}") as resp:
        assert resp.status == 404

    # A later retry, on either worker: the same member, 200.
    for w in (a, b):
        status, again = await keyed(w.http, w.url, "key-1", **body)
        assert (status, again["id"]) == (200, sandbox_id), again
    # The key reused with another request: 422 naming the first difference.
    for change, field in (
        ({"ttl_seconds": 400}, "ttl_seconds"),
        ({"labels": {"run": "k2"}}, "labels"),
        ({"inputs": {"flavour": "spicy"}}, "inputs.flavour"),
    ):
        status, wrong = await keyed(b.http, b.url, "key-1", **{**body, **change})
        assert status == 422 and wrong["error"]["field"] == field, wrong

    # A key whose create cannot claim (other inputs) is cold under its derived id,
    # and stays so: a retry with the defaults is another request (422), never a claim.
    status, cold = await keyed(a.http, a.url, "key-2", inputs={"flavour": "spicy"})
    assert status == 202 and cold["id"] == idempotent_sandbox_id("default", "key-2"), cold
    status, wrong = await keyed(b.http, b.url, "key-2")
    assert status == 422 and wrong["error"]["field"] == "inputs.flavour", wrong
    status, same = await keyed(b.http, b.url, "key-2", inputs={"flavour": "spicy"})
    assert (status, same["id"]) == (200, cold["id"])
    assert "SandboxClaimed" not in await event_types(a.http, a.url, cold["id"])

    # Refilled after the one claim; the backend holds the members, the claimed one
    # and the cold one: nothing was made twice.
    await pool_is(a, ready=2)
    await passes(a, 2)
    assert len(instances(tmp_path)) == 2 + 1 + 1


async def two_workers(
    start_service: StartService, tmp_path: Path, env: dict[str, str]
) -> list[RunningService]:
    return [
        await start_service(
            SANDBOXER_DATA_DIR=str(tmp_path / name),
            SANDBOXER_WORKER_NAME=name,
            SANDBOXER_LEASE_TTL="2",
            **env,
        )
        for name in ("wa", "wb")
    ]


async def test_two_workers_never_overfill_and_never_claim_one_member_twice(
    start_service: StartService, tmp_path: Path
) -> None:
    size = 3
    a, b = await two_workers(start_service, tmp_path, write_pool(tmp_path, size=size))
    await pool_is(a, ready=size)
    await pool_is(b, ready=size)
    # Both keepers go on filling: still the pool's size, not twice it.
    await passes(a, 3)
    await passes(b, 3)
    assert len(members(a)) == size and len(members(b)) == size
    assert len(instances(tmp_path)) == size
    warm = {m.id for m in members(a)}

    # Twice as many creates as members, half on each worker, all at once.
    made = await asyncio.gather(
        *[
            create(w.http, w.url, profile=PROFILE, account=f"acct-{i}")
            for i, w in enumerate([a, b] * size)
        ]
    )
    ids = [m["id"] for m in made]
    assert len(set(ids)) == len(ids)  # nobody got a sandbox another create got
    claimed = [i for i in ids if i in warm]
    assert sorted(claimed) == sorted(warm)  # every member went to exactly one create
    for sandbox_id in claimed:
        types = await event_types(a.http, a.url, sandbox_id)
        assert types.count("SandboxClaimed") == 1, types
    for m in made:
        await wait_state(a.http, a.url, m["id"], {"ready"})

    # Refilled by both keepers together, and never above the size while they do.
    async def refilled() -> bool:
        for w in (a, b):
            status = (await pools(w.http, w.url))[PROFILE]
            assert status["ready"] + status["provisioning"] <= size, status
        return (await pools(a.http, a.url))[PROFILE]["ready"] == size

    await until(refilled, 30, "the refill")
    await passes(a, 2)
    await passes(b, 2)
    assert len(members(a)) == size and len(members(b)) == size
    assert len(instances(tmp_path)) == size + len(ids)  # the members, and what was made


async def test_a_claim_then_a_crash_then_a_restart(
    start_service: StartService, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """A claimer killed after it won a member's claim intent, before SandboxClaimed:
    the member is claimed by nobody, and once the claimer's session is gone (its
    restart) the intent is undone: the member goes back to the pool and a create
    claims it."""
    env = write_pool(tmp_path, size=1)
    a = await start_service(
        SANDBOXER_DATA_DIR=str(tmp_path / "wa"), SANDBOXER_WORKER_NAME="wa", **env
    )
    await pool_is(a, ready=1)
    (member,) = members(a)
    common = {**env, "SANDBOXER_NATS_URL": nats_server.service_url, "SANDBOXER_WORKER_NAME": "wc"}
    crasher = ServeProcess(
        tmp_path / "wc", free_port(), SANDBOXER_FAILPOINTS="pool-claim-intent", **common
    )
    try:
        await crasher.wait_healthy(a.http)
        with pytest.raises(aiohttp.ClientError):
            await keyed(a.http, crasher.url, "crash-key", account="bob")
        assert crasher.proc.wait(10) != 0
    finally:
        crasher.kill()
    # Not claimed: no SandboxClaimed, the pool still counts it, not refilled beside it.
    assert "SandboxClaimed" not in await event_types(a.http, a.url, member.id)
    await passes(a, 2)
    assert [m.id for m in members(a)] == [member.id]

    # The crashed create retried with its key: it claims the member (once).
    again = ServeProcess(tmp_path / "wc", free_port(), **common)
    try:
        await again.wait_healthy(a.http)
        status, made = await keyed(a.http, again.url, "crash-key", account="bob")
        assert status == 202, made
        status, retried = await keyed(a.http, a.url, "crash-key", account="bob")
    finally:
        again.terminate()
    assert made["id"] == member.id and made["account"] == "bob"
    assert (status, retried["id"]) == (200, member.id)
    types = await event_types(a.http, a.url, member.id)
    assert types.count("SandboxClaimed") == 1
    await pool_is(a, ready=1)
    assert len(instances(tmp_path)) == 2


async def test_a_slow_backend_neither_overfills_nor_blocks_a_create(
    start_service: StartService, tmp_path: Path
) -> None:
    svc = await start_service(**write_pool(tmp_path, size=2, latency_ms=1500))
    status = await pool_is(svc, ready=0, provisioning=2)
    assert status["size"] == 2
    # While the members come up, a create does not wait for them: it is cold.
    async with asyncio.timeout(5):
        cold = await create(svc.http, svc.url, profile=PROFILE)
    assert cold["state"] != "ready" and cold["id"] not in {m.id for m in members(svc)}
    await passes(svc, 3)  # passes while the members still provision: no extra member
    assert len(members(svc)) == 2
    await pool_is(svc, ready=2, timeout=60)
    assert len(members(svc)) == 2
    await wait_state(svc.http, svc.url, cold["id"], {"ready"})


async def test_old_members_are_recycled(start_service: StartService, tmp_path: Path) -> None:
    svc = await start_service(**write_pool(tmp_path, size=1, max_age=10))
    await pool_is(svc, ready=1)
    (first,) = members(svc)
    done = await wait_state(svc.http, svc.url, first.id, {"destroyed"}, timeout=40)
    assert "(pool_recycle)" in done["reason"], done
    await pool_is(svc, ready=1)
    assert [m.id for m in members(svc)] != [first.id]


async def test_a_changed_then_removed_profile_drains_its_members(
    start_service: StartService, tmp_path: Path
) -> None:
    env = write_pool(tmp_path, size=2)
    svc = await start_service(**env)
    await pool_is(svc, ready=2)
    old = {m.id for m in members(svc)}
    await svc.stop()

    # A profile change (its TTL): the old members are drained, new ones made.
    write_pool(tmp_path, size=2, ttl=900)
    svc = await start_service(**env)
    for sandbox_id in old:
        done = await wait_state(svc.http, svc.url, sandbox_id, {"destroyed"})
        assert "(pool_drain)" in done["reason"], done
    await pool_is(svc, ready=2)
    new = {m.id for m in members(svc)}
    assert not new & old
    await svc.stop()

    # The profile loses its pool: every member goes, nothing leaks on the backend.
    write_pool(tmp_path, size=2, pool=False)
    svc = await start_service(**env)
    for sandbox_id in new:
        done = await wait_state(svc.http, svc.url, sandbox_id, {"destroyed"})
        assert "(pool_drain)" in done["reason"], done
    assert instances(tmp_path) == []
    assert members(svc) == []

    # A member whose profile file is gone altogether is drained the same way.
    await svc.stop()
    write_pool(tmp_path, size=1)
    svc = await start_service(**env)
    await pool_is(svc, ready=1)
    (last,) = members(svc)
    await svc.stop()
    (tmp_path / "prof" / f"{PROFILE}.yaml").unlink()
    svc = await start_service(**env)
    done = await wait_state(svc.http, svc.url, last.id, {"destroyed"})
    assert "(pool_drain)" in done["reason"], done
    assert instances(tmp_path) == []
    assert await pools(svc.http, svc.url) == {}


async def test_reconcile_knows_pool_members(start_service: StartService, tmp_path: Path) -> None:
    svc = await start_service(**write_pool(tmp_path, size=2))
    await pool_is(svc, ready=2)
    async with svc.http.post(f"{svc.url}/v1/reconcile") as resp:
        report = await resp.json()
        assert resp.status == 200, report
    assert report["orphans"] == [], report
    assert len(instances(tmp_path)) == 2


def parse(ts: str) -> dt.datetime:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))


async def events_of(svc: RunningService, sandbox_id: str) -> list[dict[str, Any]]:
    async with svc.http.get(f"{svc.url}/v1/sandboxes/{sandbox_id}/events") as resp:
        return [e["event"] for e in (await resp.json())["events"]]


async def metered_pool(start_service: StartService, tmp_path: Path) -> RunningService:
    """A pool of one on the metered saas-stub, the accounts `pool` and `acme` granted
    first (a member the pool cannot pay for is rejected, and its pool waits)."""
    env = write_pool(tmp_path, size=0, extension="saas-stub")
    first = await start_service(**env)
    for account in ("pool", "acme"):
        await grant(first.http, first.url, account, 1000)
    await first.stop()
    env = write_pool(tmp_path, size=1, extension="saas-stub")
    return await start_service(**env)


async def ledger_of(svc: RunningService, account: str) -> list[dict[str, Any]]:
    async with svc.http.get(
        f"{svc.url}/v1/accounts/{account}/ledger", params={"limit": "1000"}
    ) as resp:
        return [e["event"] for e in (await resp.json())["entries"]]


async def test_a_metered_pool_bills_the_wait_to_the_pool_and_the_use_to_the_claimer(
    start_service: StartService, tmp_path: Path
) -> None:
    svc = await metered_pool(start_service, tmp_path)
    await pool_is(svc, ready=1)
    (member,) = members(svc)
    await asyncio.sleep(1.0)  # the wait the pool pays for, not a wait on anything
    made = await create(svc.http, svc.url, profile=PROFILE, account="acme", ttl_seconds=600)
    assert made["id"] == member.id and made["account"] == "acme"
    assert made["credits_held"] == 30  # 600 s at 0.05 credits/s, the claimer's
    pool = await ledger_of(svc, "pool")
    phases = {e["event_id"].rsplit(".", 1)[1]: e for e in pool if e.get("sandbox_id") == member.id}
    assert set(phases) == {"reserve", "pool-debit", "pool-release"}
    waited = phases["pool-debit"]["basis"]["seconds"]
    assert waited >= 1.0
    assert (
        phases["pool-debit"]["amount"] + phases["pool-release"]["amount"]
        == (phases["reserve"]["amount"])
    )
    acme = [e for e in await ledger_of(svc, "acme") if e.get("sandbox_id") == member.id]
    assert [e["event_id"] for e in acme] == [f"{member.id}.claim-reserve"]
    assert acme[0]["amount"] == 30
    async with svc.http.delete(f"{svc.url}/v1/sandboxes/{member.id}") as resp:
        assert resp.status == 202
    await wait_state(svc.http, svc.url, member.id, {"destroyed"})
    await wait_settled(svc.http, svc.url, "acme")
    recorded = await events_of(svc, member.id)
    claimed_at = next(parse(e["occurred_at"]) for e in recorded if e["type"] == "SandboxClaimed")
    torn_at = next(parse(e["occurred_at"]) for e in recorded if e["type"] == "TornDown")
    acme = [e for e in await ledger_of(svc, "acme") if e.get("sandbox_id") == member.id]
    (debit,) = [e for e in acme if e["type"] == "CreditsDebited"]
    # The claimer pays from the claim, not for the wait before it.
    assert debit["basis"]["seconds"] == pytest.approx(
        (torn_at - claimed_at).total_seconds(), abs=0.01
    )
    report = await audit(svc.http, svc.url)
    assert report["ok"], report["violations"]
    # the refill's reservation, if it is made: its TTL (max_age + 300 s) at 0.05/s
    assert report["accounts"]["pool"]["reserved"] in (0, 195)


async def test_a_claimer_without_credits_creates_cold_and_the_member_waits(
    start_service: StartService, tmp_path: Path
) -> None:
    svc = await metered_pool(start_service, tmp_path)
    await pool_is(svc, ready=1)
    (member,) = members(svc)
    made = await create(svc.http, svc.url, profile=PROFILE, account="poor")
    assert made["id"] != member.id
    rejected = await wait_state(svc.http, svc.url, made["id"], {"rejected"})
    assert "insufficient credits" in rejected["reason"]
    assert [m.id for m in members(svc)] == [member.id]  # still the pool's, still paid for
    charge = keeper(svc).manager.ledger.charge(member.id)
    assert charge is not None and charge.account == "pool" and not charge.closed


def write_local_pool(folder: Path, repo: Path, size: int) -> None:
    """compose-local profiles on the test's repo: one with a pool, one without."""
    prof_dir = folder / "local-prof"
    prof_dir.mkdir(parents=True, exist_ok=True)
    for name, pool in (("profile.warm-local", True), ("profile.cold-local", False)):
        profile: dict[str, Any] = {
            "name": name,
            "extension": "compose-local",
            "ttl_seconds": 600,
            "inputs": {"repo": {"default": str(repo)}},
        }
        if pool:
            profile["pool"] = {"size": size, "max_age_seconds": 3600}
        (prof_dir / f"{name}.yaml").write_text(yaml.safe_dump(profile))


async def clean_up(svc: RunningService) -> None:
    """Leave nothing running: the keeper stops first, then every live sandbox goes."""
    await keeper(svc).stop()
    assert svc.service.manager is not None
    live = [s.sandbox_id for s in svc.service.manager.live()]
    for sandbox_id in live:
        async with svc.http.delete(f"{svc.url}/v1/sandboxes/{sandbox_id}") as resp:
            assert resp.status in (202, 409), await resp.json()
    for sandbox_id in live:
        await wait_state(svc.http, svc.url, sandbox_id, {"destroyed"}, timeout=60)


async def test_a_pool_stays_within_capacity_and_never_blocks_an_ordinary_create(
    start_service: StartService, podman: Podman, compose_repo: Path, tmp_path: Path
) -> None:
    """Two places on the machine, a pool of three: two members, the third rejected
    for want of a place. An ordinary create then takes a member's place (the member
    is evicted: pool_evict) and comes up; the places in use end at two again."""
    write_local_pool(tmp_path, compose_repo, size=3)
    svc = await start_service(
        SANDBOXER_COMPOSE_LOCAL_CMD=podman.compose_cmd,
        SANDBOXER_COMPOSE_LOCAL_ENGINE_CMD=podman.engine_cmd,
        SANDBOXER_COMPOSE_LOCAL_STOP_TIMEOUT="1",
        SANDBOXER_COMPOSE_LOCAL_CAPACITY="2",
        SANDBOXER_REPO_ROOTS=str(tmp_path),
        SANDBOXER_PROFILES_PATH=str(tmp_path / "local-prof"),
    )

    try:

        async def status() -> dict[str, Any]:
            return (await pools(svc.http, svc.url))["profile.warm-local"]

        async def two_ready_one_rejected() -> bool:
            async with svc.http.get(
                f"{svc.url}/v1/sandboxes", params={"state": "rejected", "account": "pool"}
            ) as resp:
                rejected = (await resp.json())["sandboxes"]
            return (await status())["ready"] == 2 and bool(rejected)

        await until(two_ready_one_rejected, 90, "two members ready, one rejected")
        async with svc.http.get(
            f"{svc.url}/v1/sandboxes", params={"state": "rejected", "account": "pool"}
        ) as resp:
            (rejected, *_) = (await resp.json())["sandboxes"]
        assert "is full (local 2/2)" in rejected["reason"], rejected
        warm = {m.id for m in keeper(svc).members("profile.warm-local")}
        assert len(warm) == 2

        made = await create(svc.http, svc.url, profile="profile.cold-local")
        assert made["id"] not in warm
        await wait_state(svc.http, svc.url, made["id"], {"ready"}, timeout=90)
        evicted = []
        for sandbox_id in warm:
            async with svc.http.get(f"{svc.url}/v1/sandboxes/{sandbox_id}") as resp:
                row = await resp.json()
            if row["state"] in ("tearing_down", "destroyed"):
                evicted.append(sandbox_id)
        assert len(evicted) == 1, evicted
        done = await wait_state(svc.http, svc.url, evicted[0], {"destroyed"}, timeout=60)
        assert "(pool_evict)" in done["reason"], done
        assert sum(keeper(svc).manager._load("compose-local").values()) == 2
    finally:
        await clean_up(svc)


async def test_the_client_lists_pools(start_service: StartService, tmp_path: Path) -> None:
    from sandboxer.client import AsyncClient, Client

    svc = await start_service(**write_pool(tmp_path, size=1))
    await pool_is(svc, ready=1)
    async with AsyncClient(svc.url) as client:
        (pool,) = await client.pools()
    assert (pool.profile, pool.size, pool.ready, pool.provisioning) == (PROFILE, 1, 1, 0)

    def sync_pools() -> list[Any]:
        with Client(svc.url) as client:
            return client.pools()

    (same,) = await asyncio.to_thread(sync_pools)
    assert same == pool
