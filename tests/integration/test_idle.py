"""Idle timeouts against a real JetStream on the saas-stub: a sandbox nobody uses for
its profile's `idle_timeout_seconds` is destroyed (reason idle); each kind of use
keeps it alive (exec, a running command, file transfers, keepalive), recorded
sparingly as ActivitySeen. (Following logs and the backend's counters need a backend
that runs on its own: tests/integration/test_idle_compose.py.)"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningService, StartService
from tests.helpers import create, grant, wait_state

IDLE = 4  # seconds: the least a profile may say
USE_FOR = 2.5 * IDLE  # how long each test keeps using its sandbox
PACE = 0.5  # seconds between two uses: the rhythm of the use, not a wait on anything

PROFILE = f"""\
name: profile.saas-idle
extension: saas-stub
ttl_seconds: 600
max_ttl_seconds: 3600
idle_timeout_seconds: {IDLE}
inputs:
  size:
    default: small
config: {{}}
"""


def parse(ts: str) -> dt.datetime:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))


@pytest.fixture
async def svc(start_service: StartService, tmp_path: Path) -> RunningService:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "profile.saas-idle.yaml").write_text(PROFILE)
    running = await start_service(SANDBOXER_PROFILES_PATH=str(profiles))
    await grant(running.http, running.url, "default", 100_000)
    return running


async def ready_sandbox(svc: RunningService) -> dict[str, Any]:
    made = await create(svc.http, svc.url, profile="profile.saas-idle")
    return await wait_state(svc.http, svc.url, made["id"], {"ready"})


async def events(svc: RunningService, sandbox_id: str) -> list[dict[str, Any]]:
    async with svc.http.get(f"{svc.url}/v1/sandboxes/{sandbox_id}/events") as resp:
        return [e["event"] for e in (await resp.json())["events"]]


async def keep_using(use: Callable[[], Awaitable[None]], seconds: float = USE_FOR) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        await use()
        await asyncio.sleep(PACE)


async def ends_idle(svc: RunningService, sandbox_id: str) -> list[dict[str, Any]]:
    """The sandbox is still ready now, then ends destroyed for being idle."""
    async with svc.http.get(f"{svc.url}/v1/sandboxes/{sandbox_id}") as resp:
        assert (await resp.json())["state"] == "ready"
    await wait_state(svc.http, svc.url, sandbox_id, {"destroyed"}, timeout=IDLE * 4)
    recorded = await events(svc, sandbox_id)
    destroys = [e for e in recorded if e["type"] == "DestroyRequested"]
    assert [(e["reason"], e["actor"]) for e in destroys] == [("idle", "system:idle-watch")]
    return recorded


def activity(recorded: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in recorded if e["type"] == "ActivitySeen"]


async def test_unused_sandbox_is_destroyed_after_its_idle_timeout(svc: RunningService) -> None:
    sandbox = await ready_sandbox(svc)
    await wait_state(svc.http, svc.url, sandbox["id"], {"destroyed"}, timeout=IDLE * 4)
    recorded = await events(svc, sandbox["id"])
    ready_at = next(parse(e["occurred_at"]) for e in recorded if e["type"] == "BecameReady")
    destroy = next(e for e in recorded if e["type"] == "DestroyRequested")
    assert destroy["reason"] == "idle"
    idle_for = (parse(destroy["occurred_at"]) - ready_at).total_seconds()
    assert IDLE <= idle_for < IDLE * 2, idle_for
    assert activity(recorded) == []


async def test_keepalive_keeps_it_and_is_recorded_sparingly(svc: RunningService) -> None:
    sandbox = await ready_sandbox(svc)
    url = f"{svc.url}/v1/sandboxes/{sandbox['id']}/keepalive"
    calls = 0

    async def keepalive() -> None:
        nonlocal calls
        for _ in range(5):  # a chatty client: many calls, few events
            async with svc.http.post(url) as resp:
                assert resp.status == 200, await resp.text()
            calls += 1

    await keep_using(keepalive)
    recorded = await ends_idle(svc, sandbox["id"])
    seen = activity(recorded)
    assert seen and all(e["kinds"] == ["keepalive"] for e in seen)
    # At most one every quarter of the idle timeout.
    assert len(seen) <= USE_FOR / (IDLE / 4) + 2 < calls / 5
    times = [parse(e["occurred_at"]) for e in seen]
    assert all((b - a).total_seconds() >= IDLE / 4 - 0.05 for a, b in itertools.pairwise(times))


async def test_commands_keep_it(svc: RunningService) -> None:
    sandbox = await ready_sandbox(svc)
    url = f"{svc.url}/v1/sandboxes/{sandbox['id']}/exec"

    async def run() -> None:
        async with svc.http.post(url, json={"argv": ["true"]}) as resp:
            assert resp.status == 200
            await resp.read()

    await keep_using(run)
    recorded = await ends_idle(svc, sandbox["id"])
    # The stub's own counters (commands run) move too: its `backend` kind.
    kinds = {kind for e in activity(recorded) for kind in e["kinds"]}
    assert "exec" in kinds and kinds <= {"exec", "backend"}, kinds


async def test_a_running_command_keeps_it(svc: RunningService) -> None:
    """One command that runs longer than the idle timeout is use all along."""
    sandbox = await ready_sandbox(svc)
    url = f"{svc.url}/v1/sandboxes/{sandbox['id']}/exec"
    async with svc.http.post(url, json={"argv": ["sleep", str(USE_FOR)]}) as resp:
        assert resp.status == 200
        await resp.read()
    recorded = await ends_idle(svc, sandbox["id"])
    assert [e["outcome"] for e in recorded if e["type"] == "CommandFinished"] == ["exited"]


async def test_file_transfers_keep_it(svc: RunningService) -> None:
    sandbox = await ready_sandbox(svc)
    url = f"{svc.url}/v1/sandboxes/{sandbox['id']}/files"

    async def copy() -> None:
        async with svc.http.put(url, params={"path": "notes.txt"}, data=b"x" * 100) as resp:
            assert resp.status == 201, await resp.text()

    await keep_using(copy)
    recorded = await ends_idle(svc, sandbox["id"])
    # The stub's own counters (bytes moved) move too: its `backend` kind.
    kinds = {kind for e in activity(recorded) for kind in e["kinds"]}
    assert "files" in kinds and kinds <= {"files", "backend"}, kinds


async def test_keepalive_of_a_sandbox_that_is_not_ready(svc: RunningService) -> None:
    sandbox = await ready_sandbox(svc)
    async with svc.http.delete(f"{svc.url}/v1/sandboxes/{sandbox['id']}") as resp:
        assert resp.status == 202
    await wait_state(svc.http, svc.url, sandbox["id"], {"destroyed"})
    async with svc.http.post(f"{svc.url}/v1/sandboxes/{sandbox['id']}/keepalive") as resp:
        answer = await resp.json()
        assert resp.status == 409, answer
        assert answer["error"]["field"] == "state"
