"""SIGKILL the service mid-lifecycle; the next start finishes every sandbox consistently."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import TERMINAL, create, destroy, event_types
from tests.infra import ServeProcess, free_port

ALLOWED_ENDS = TERMINAL | {"ready"}


def nats_pid(data_dir: Path) -> int | None:
    pid_file = data_dir / "nats" / "nats-server.pid"
    return int(pid_file.read_text()) if pid_file.exists() else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return (
        Path(f"/proc/{pid}").exists()
        and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    )


@pytest.mark.timeout(240)
async def test_sigkill_mid_lifecycle_then_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {"SANDBOXER_SAAS_STUB_LATENCY_MS": "700"}
    async with aiohttp.ClientSession() as http:
        first = ServeProcess(data_dir, free_port(), **env)
        try:
            await first.wait_healthy(http)
            made = [await create(http, first.url) for _ in range(12)]
            ids = [m["id"] for m in made]
            # Some sandboxes get a destroy request too, so teardowns are in flight as well.
            for sandbox_id in ids[:4]:
                await destroy(http, first.url, sandbox_id)
            async with http.get(f"{first.url}/v1/sandboxes") as resp:
                before = {s["id"]: s["state"] for s in (await resp.json())["sandboxes"]}
            assert any(s not in ALLOWED_ENDS for s in before.values()), before
            pid = nats_pid(data_dir)
            assert pid is not None and alive(pid)
        finally:
            first.kill()

        # The embedded server must not outlive its parent.
        async with asyncio.timeout(15):
            while alive(pid):
                await asyncio.sleep(0.05)

        second = ServeProcess(data_dir, free_port(), **env)
        try:
            await second.wait_healthy(http)
            async with asyncio.timeout(90):
                while True:
                    async with http.get(f"{second.url}/v1/sandboxes") as resp:
                        rows = (await resp.json())["sandboxes"]
                    if all(r["state"] in ALLOWED_ENDS for r in rows):
                        break
                    await asyncio.sleep(0.1)  # polling a condition, under a deadline
            states = {r["id"]: r for r in rows}
            assert set(states) == set(ids)
            for sandbox_id in ids[:4]:
                assert states[sandbox_id]["state"] in {"destroyed", "failed"}
            for sandbox_id, row in states.items():
                types = await event_types(http, second.url, sandbox_id)
                if row["state"] == "ready":
                    assert types[-1] == "BecameReady"
                elif row["state"] == "destroyed":
                    assert types[-1] == "TornDown" and "StepFailed" not in types
                elif row["state"] == "failed":
                    assert "StepFailed" in types and types[-1] == "TornDown"
                    events = await _events(http, second.url, sandbox_id)
                    failed = next(e for e in events if e["type"] == "StepFailed")
                    assert failed["actor"] == "system:recovery"
            # Nothing of a finished sandbox is left at the vendor.
            leftover = {p.stem for p in (data_dir / "saas-stub").glob("*.json")}
            assert leftover == {i for i, r in states.items() if r["state"] == "ready"}
            async with http.post(f"{second.url}/v1/replay") as resp:
                report = await resp.json()
            assert report["equal"] is True, report
            second_nats = nats_pid(data_dir)
            assert second.terminate() == 0, "SIGTERM stops serve cleanly"
            assert second_nats is not None and not alive(second_nats), "and its nats-server"
            assert nats_pid(data_dir) is None
        finally:
            if second.proc.poll() is None:
                second.kill()


async def _events(http: aiohttp.ClientSession, url: str, sandbox_id: str) -> list[dict]:  # type: ignore[type-arg]
    async with http.get(f"{url}/v1/sandboxes/{sandbox_id}/events") as resp:
        return [e["event"] for e in (await resp.json())["events"]]
