"""Pause and resume through the service, against a real JetStream on the saas-stub:
the states pausing → paused → resuming → ready, files kept over three cycles, use
refused while paused, idempotent requests, pause on idle, metering that leaves the
paused intervals out (and the ledger audit that checks it), and a pause that holds
across a serve restart (also one interrupted halfway)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sandboxer.client import Client
from tests.conftest import StartService
from tests.helpers import audit, create, grant, wait_settled, wait_state
from tests.infra import ServeProcess, free_port

IDLE_PAUSE_PROFILE = """\
name: profile.saas-nap
extension: saas-stub
ttl_seconds: 600
max_ttl_seconds: 3600
idle_timeout_seconds: 4
on_idle: pause
inputs:
  size:
    default: small
config: {}
"""


def parse(ts: str) -> dt.datetime:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))


async def post(svc_url: str, http: aiohttp.ClientSession, path: str) -> tuple[int, Any]:
    async with http.post(f"{svc_url}{path}") as resp:
        return resp.status, await resp.json()


async def events(http: aiohttp.ClientSession, url: str, sandbox_id: str) -> list[dict[str, Any]]:
    async with http.get(f"{url}/v1/sandboxes/{sandbox_id}/events") as resp:
        return [e["event"] for e in (await resp.json())["events"]]


async def pause(http: aiohttp.ClientSession, url: str, sandbox_id: str) -> dict[str, Any]:
    status, out = await post(url, http, f"/v1/sandboxes/{sandbox_id}/pause")
    assert status == 202, out
    assert out["state"] in ("pausing", "paused")
    return await wait_state(http, url, sandbox_id, {"paused"})


async def resume(http: aiohttp.ClientSession, url: str, sandbox_id: str) -> dict[str, Any]:
    status, out = await post(url, http, f"/v1/sandboxes/{sandbox_id}/resume")
    assert status == 202, out
    assert out["state"] in ("resuming", "ready")
    return await wait_state(http, url, sandbox_id, {"ready"})


async def test_three_cycles_keep_the_files_and_refuse_use_while_paused(
    start_service: StartService,
) -> None:
    svc = await start_service()
    http, url = svc.http, svc.url
    await grant(http, url, "default", 10_000)
    made = await create(http, url)
    sid = made["id"]
    await wait_state(http, url, sid, {"ready"})
    files = f"{url}/v1/sandboxes/{sid}/files"
    for cycle in range(3):
        async with http.put(files, params={"path": f"f{cycle}"}, data=b"%d" % cycle) as resp:
            assert resp.status == 201
        paused = await pause(http, url, sid)
        assert paused["paused_at"] is not None
        async with http.post(f"{url}/v1/sandboxes/{sid}/exec", json={"argv": ["true"]}) as resp:
            answer = await resp.json()
            assert resp.status == 409, answer
            assert answer["error"]["field"] == "state"
        async with http.get(files, params={"path": "f0"}) as resp:
            assert resp.status == 409
        ready = await resume(http, url, sid)
        assert ready["paused_at"] is None and ready["paused_seconds"] > 0
        for kept in range(cycle + 1):
            async with http.get(files, params={"path": f"f{kept}"}) as resp:
                assert resp.status == 200
                assert await resp.read() == b"%d" % kept
    types = [e["type"] for e in await events(http, url, sid)]
    assert [t for t in types if "ause" in t or "esume" in t] == [
        "PauseRequested",
        "Paused",
        "ResumeRequested",
        "Resumed",
    ] * 3
    paused_events = [e for e in await events(http, url, sid) if e["type"] == "Paused"]
    assert {e["mode"] for e in paused_events} == {"pause"}


async def test_requests_that_do_not_fit_the_state(start_service: StartService) -> None:
    svc = await start_service(SANDBOXER_SAAS_STUB_LATENCY_MS="400")
    http, url = svc.http, svc.url
    await grant(http, url, "default", 10_000)
    made = await create(http, url)
    sid = made["id"]
    status, out = await post(url, http, f"/v1/sandboxes/{sid}/pause")
    assert status == 409, out  # still being provisioned
    assert out["error"]["field"] == "state"
    await wait_state(http, url, sid, {"ready"})
    status, out = await post(url, http, f"/v1/sandboxes/{sid}/resume")
    assert status == 202 and out["state"] == "ready", out  # nothing to resume: a no-op
    await pause(http, url, sid)
    status, out = await post(url, http, f"/v1/sandboxes/{sid}/pause")
    assert status == 202 and out["state"] == "paused", out  # asked again: as it is
    assert [e["type"] for e in await events(http, url, sid)].count("PauseRequested") == 1
    # A paused sandbox is destroyed like any other.
    async with http.delete(f"{url}/v1/sandboxes/{sid}") as resp:
        assert resp.status == 202
    await wait_state(http, url, sid, {"destroyed"})
    status, out = await post(url, http, f"/v1/sandboxes/{sid}/pause")
    assert status == 409, out
    status, out = await post(url, http, "/v1/sandboxes/sbx-000000000000/pause")
    assert status == 404, out


async def test_paused_time_is_not_metered_and_the_audit_holds(
    start_service: StartService,
) -> None:
    svc = await start_service()
    http, url = svc.http, svc.url
    await grant(http, url, "acme", 1000)
    made = await create(http, url, account="acme", ttl_seconds=600)
    sid = made["id"]
    await wait_state(http, url, sid, {"ready"})
    for _ in range(2):
        await pause(http, url, sid)
        await asyncio.sleep(1.0)  # the time being left out of the bill, not a wait
        await resume(http, url, sid)
    await pause(http, url, sid)  # destroyed while paused: paused up to its end
    async with http.delete(f"{url}/v1/sandboxes/{sid}") as resp:
        assert resp.status == 202
    await wait_state(http, url, sid, {"destroyed"})
    await wait_settled(http, url, "acme")
    recorded = await events(http, url, sid)
    at = {e["type"]: [] for e in recorded}  # type: dict[str, list[dt.datetime]]
    for e in recorded:
        at[e["type"]].append(parse(e["occurred_at"]))
    ended = at["TornDown"][0]
    paused = sum(
        (b - a).total_seconds()
        for a, b in zip(at["Paused"], [*at["ResumeRequested"], ended], strict=True)
    )
    assert paused >= 2.0
    async with http.get(f"{url}/v1/accounts/acme/ledger", params={"limit": "100"}) as resp:
        entries = [e["event"] for e in (await resp.json())["entries"]]
    (debit,) = [e for e in entries if e["type"] == "CreditsDebited"]
    basis = debit["basis"]
    assert basis["paused_seconds"] == pytest.approx(paused, abs=0.002)
    total = (ended - at["Provisioned"][0]).total_seconds()
    assert basis["seconds"] == pytest.approx(total - paused, abs=0.002)
    report = await audit(http, url)
    assert report["ok"], report["violations"]


async def test_an_idle_sandbox_is_paused_when_the_profile_says_so(
    start_service: StartService, tmp_path: Path
) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "profile.saas-nap.yaml").write_text(IDLE_PAUSE_PROFILE)
    svc = await start_service(SANDBOXER_PROFILES_PATH=str(profiles))
    http, url = svc.http, svc.url
    await grant(http, url, "default", 10_000)
    made = await create(http, url, profile="profile.saas-nap")
    sid = made["id"]
    await wait_state(http, url, sid, {"ready"})
    await wait_state(http, url, sid, {"paused"}, timeout=20)
    await resume(http, url, sid)
    await wait_state(http, url, sid, {"paused"}, timeout=20)  # idle again after the resume
    requests = [e for e in await events(http, url, sid) if e["type"] == "PauseRequested"]
    assert [(e["reason"], e["actor"]) for e in requests] == [("idle", "system:idle-watch")] * 2


async def test_client_and_cli_pause_and_resume(start_service: StartService) -> None:
    svc = await start_service()
    await grant(svc.http, svc.url, "default", 10_000)
    made = await create(svc.http, svc.url)
    await wait_state(svc.http, svc.url, made["id"], {"ready"})

    def with_client() -> tuple[str, str]:
        with Client(svc.url) as client:
            sandbox = client.sandbox(made["id"])
            paused = sandbox.pause().state
            ready = sandbox.resume().state
        return paused, ready

    assert await asyncio.to_thread(with_client) == ("paused", "ready")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sandboxer", "--url", svc.url, *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = await asyncio.to_thread(cli, "pause", made["id"], "--wait", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state"] == "paused"
    done = await asyncio.to_thread(cli, "resume", made["id"], "--wait", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state"] == "ready"


async def test_a_pause_holds_across_a_serve_restart(tmp_path: Path) -> None:
    """Paused, then the service restarts: still paused (nothing runs it), and resumes.
    Then one stopped in the middle of pausing: the next start finishes the pause."""
    data = tmp_path / "data"
    port = free_port()
    nats_port = str(free_port())
    env = {"SANDBOXER_NATS_PORT": nats_port, "SANDBOXER_SAAS_STUB_LATENCY_MS": "0"}
    async with aiohttp.ClientSession() as http:
        serve = ServeProcess(data, port, **env)
        try:
            await serve.wait_healthy(http)
            url = serve.url
            await grant(http, url, "default", 10_000)
            made = await create(http, url)
            sid = made["id"]
            await wait_state(http, url, sid, {"ready"})
            await pause(http, url, sid)
        finally:
            assert serve.terminate() == 0, serve.output()
        serve = ServeProcess(data, port, **{**env, "SANDBOXER_SAAS_STUB_LATENCY_MS": "3000"})
        try:
            await serve.wait_healthy(http)
            assert (await wait_state(http, url, sid, {"paused"}))["state"] == "paused"
            types = [e["type"] for e in await events(http, url, sid)]
            assert types[-1] == "Paused"
            await resume(http, url, sid)
            status, out = await post(url, http, f"/v1/sandboxes/{sid}/pause")
            assert status == 202 and out["state"] == "pausing", out
            serve.kill()  # in the middle of the pause (its hook takes 3 s)
        finally:
            if serve.proc.poll() is None:
                serve.kill()
        serve = ServeProcess(data, port, **env)
        try:
            await serve.wait_healthy(http)
            await wait_state(http, url, sid, {"paused"})
            await resume(http, url, sid)
            recorded = [e["type"] for e in await events(http, url, sid)]
            assert recorded.count("Paused") == 2 and recorded.count("Resumed") == 2
            assert "PauseFailed" not in recorded
        finally:
            assert serve.terminate() == 0, serve.output()
