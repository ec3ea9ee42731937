"""Checkpoints against real NATS (Object Store), real sshd and podman-compose."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
import yaml

from sandboxer.store.nats_server import EmbeddedNats
from tests.conftest import RunningService, StartService
from tests.helpers import create, destroy, wait_state
from tests.infra import Podman, ServeProcess, free_port
from tests.paths import ROOT

pytestmark = pytest.mark.timeout(600)
Factory = Callable[..., dict[str, str]]


async def checkpoint(
    http: aiohttp.ClientSession, url: str, sid: str, status: str = "created"
) -> dict[str, Any]:
    async with http.post(f"{url}/v1/sandboxes/{sid}/checkpoints") as resp:
        made: dict[str, Any] = await resp.json()
        assert resp.status == 202, made
    assert made["status"] == "requested" and made["id"].startswith("ckpt-")
    return await wait_checkpoint(http, url, made, status)


async def wait_checkpoint(
    http: aiohttp.ClientSession, url: str, made: dict[str, Any], status: str, timeout: float = 300
) -> dict[str, Any]:
    current = made
    async with asyncio.timeout(timeout):
        while current["status"] == "requested" or (
            current["status"] != status and status == "deleted"
        ):
            async with http.get(
                f"{url}/v1/checkpoints/{made['id']}",
                params={"wait": "10", "after_seq": str(current["last_seq"])},
            ) as resp:
                current = await resp.json()
    assert current["status"] == status, current
    return current


async def restore(http: aiohttp.ClientSession, url: str, sid: str, cid: str) -> list[str]:
    async with http.post(f"{url}/v1/sandboxes/{sid}/restore", json={"checkpoint": cid}) as r:
        body = await r.json()
        assert r.status == 202, body
    assert body["state"] == "restoring"
    await wait_state(http, url, sid, {"ready"}, timeout=300)
    async with http.get(f"{url}/v1/sandboxes/{sid}/events") as resp:
        return [e["event"]["type"] for e in (await resp.json())["events"]]


def exec_in(podman: Podman, container: str, *cmd: str) -> str:
    out = podman("exec", container, *cmd)
    assert out.returncode == 0, out.stderr
    return out.stdout


async def test_saas_stub_round_trip_and_retention(start_service: StartService) -> None:
    svc = await start_service()
    http, url = svc.http, svc.url
    made = await create(http, url)
    await wait_state(http, url, made["id"], {"ready"})
    instance = svc.data_dir / "saas-stub" / f"{made['id']}.json"
    before = instance.read_text()
    ckpt = await checkpoint(http, url, made["id"])
    assert ckpt["size"] == len(before) and ckpt["digest"].startswith("sha256:")
    instance.write_text(json.dumps({"id": made["id"], "size": "changed"}))
    types = await restore(http, url, made["id"], ckpt["id"])
    assert types[-2:] == ["RestoreRequested", "Restored"]
    assert json.loads(instance.read_text()) == json.loads(before)
    async with http.get(f"{url}/v1/sandboxes/{made['id']}/checkpoints") as resp:
        listed = (await resp.json())["checkpoints"]
    assert [c["id"] for c in listed] == [ckpt["id"]]

    # Clone: a new sandbox provisioned from the checkpoint.
    clone = await create(http, url, from_checkpoint=ckpt["id"])
    ready = await wait_state(http, url, clone["id"], {"ready"})
    assert ready["profile"] == "profile.saas-stub"
    cloned = json.loads((svc.data_dir / "saas-stub" / f"{clone['id']}.json").read_text())
    assert cloned["id"] == clone["id"] and cloned["size"] == json.loads(before)["size"]

    # Destroying applies retention: the default profile keeps artifacts 7 days, so an
    # explicit delete is the way here; the projection equals a fresh replay after it.
    async with http.delete(f"{url}/v1/checkpoints/{ckpt['id']}") as resp:
        assert (await resp.json())["status"] == "deleted"
    for sid in (made["id"], clone["id"]):
        await destroy(http, url, sid)
        await wait_state(http, url, sid, {"destroyed"})
    async with http.post(f"{url}/v1/replay") as resp:
        assert (await resp.json())["equal"] is True


async def test_checkpoint_without_the_capability_is_409(
    start_service: StartService, tmp_path: Path
) -> None:
    ext_dir, prof_dir = tmp_path / "ext", tmp_path / "prof"
    ext_dir.mkdir()
    prof_dir.mkdir()
    (ext_dir / "ext.plain-stub.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "plain-stub",
                "version": "0.0.1",
                "entry_point": "extensions.saas_stub:SaasStub",
                "capabilities": ["provision", "wait_ready", "teardown"],
                "config": {"state_dir": {"type": "str", "default": str(tmp_path / "plain")}},
            }
        )
    )
    (prof_dir / "profile.plain.yaml").write_text(
        yaml.safe_dump({"name": "profile.plain", "extension": "plain-stub"})
    )
    svc = await start_service(
        SANDBOXER_EXTENSIONS_PATH=str(ext_dir), SANDBOXER_PROFILES_PATH=str(prof_dir)
    )
    made = await create(svc.http, svc.url, profile="profile.plain")
    await wait_state(svc.http, svc.url, made["id"], {"ready"})
    async with svc.http.post(f"{svc.url}/v1/sandboxes/{made['id']}/checkpoints") as resp:
        assert resp.status == 409
        error = (await resp.json())["error"]
    assert error["code"] == "not_capable" and "plain-stub cannot checkpoint" in error["message"]
    async with svc.http.post(
        f"{svc.url}/v1/sandboxes/{made['id']}/restore", json={"checkpoint": "ckpt-000000000000"}
    ) as resp:
        assert resp.status == 404


async def corrupt_object(server: EmbeddedNats, bucket: str, key: str) -> None:
    """Flip a byte of a stored chunk: purge the chunk subject, publish it back altered
    (the service user may purge the object store's stream, never the event stream)."""
    nc = await nats.connect(**server.connect_options())
    try:
        js = nc.jetstream()
        store = await js.object_store(bucket)
        info = await store.get_info(key)
        subject = f"$O.{bucket}.C.{info.nuid}"
        stream = f"OBJ_{bucket}"
        chunks = []
        sub = await js.subscribe(subject, ordered_consumer=True)
        for _ in range(info.chunks):
            msg = await sub.next_msg(timeout=10)
            chunks.append(bytes(msg.data))
        await sub.unsubscribe()
        await js.purge_stream(stream, subject=subject)
        first = bytearray(chunks[0])
        first[len(first) // 2] ^= 0xFF
        chunks[0] = bytes(first)
        for chunk in chunks:
            await js.publish(subject, chunk)
    finally:
        await nc.close()


async def test_compose_checkpoint_restore_clone_and_corruption(
    start_service: StartService,
    compose_env: Factory,
    compose_repo: Path,
    podman: Podman,
    nats_server: EmbeddedNats,
    tmp_path: Path,
) -> None:
    svc = await start_service(**compose_env())
    http, url = svc.http, svc.url
    made = await create(
        http, url, profile="profile.compose-e2e", inputs={"repo": str(compose_repo)}
    )
    ready = await wait_state(http, url, made["id"], {"ready"}, timeout=120)
    workspace = Path(ready["handle"]["directory"])
    project = ready["handle"]["project"]
    worker = f"{project}_worker_1"
    (workspace / "site" / "note.txt").write_text("before\n")
    exec_in(podman, worker, "sh", "-c", "echo inside-before > /state.txt")

    ckpt = await checkpoint(http, url, made["id"])
    assert ckpt["size"] > 1_000_000, "the archive holds the workspace and the images"
    assert exec_in(podman, worker, "cat", "/state.txt") == "inside-before\n", "unpaused"

    (workspace / "site" / "note.txt").write_text("after\n")
    exec_in(podman, worker, "sh", "-c", "echo inside-after > /state.txt")
    types = await restore(http, url, made["id"], ckpt["id"])
    assert types[-2:] == ["RestoreRequested", "Restored"]
    assert (workspace / "site" / "note.txt").read_text() == "before\n"
    assert exec_in(podman, worker, "cat", "/state.txt") == "inside-before\n"
    assert (
        exec_in(podman, worker, "wget", "-q", "-O", "-", "http://web:8080/note.txt") == "before\n"
    )
    states = {
        c["Labels"]["com.docker.compose.service"]: c["State"] for c in podman.containers(project)
    }
    assert states == {"web": "running", "worker": "running"}

    # A clone: same content, its own project.
    clone = await create(
        http, url, profile="", from_checkpoint=ckpt["id"], inputs={"repo": str(compose_repo)}
    )
    cloned = await wait_state(http, url, clone["id"], {"ready"}, timeout=300)
    clone_project = cloned["handle"]["project"]
    assert clone_project != project
    clone_dir = Path(cloned["handle"]["directory"])
    assert (clone_dir / "site" / "note.txt").read_text() == "before\n"
    assert exec_in(podman, f"{clone_project}_worker_1", "cat", "/state.txt") == ("inside-before\n")
    await destroy(http, url, clone["id"])
    await wait_state(http, url, clone["id"], {"destroyed"}, timeout=120)

    # A corrupted artifact: restore fails with a digest error, the sandbox stays as is.
    (workspace / "site" / "note.txt").write_text("current\n")
    await corrupt_object(nats_server, "sandboxer-checkpoints", ckpt["store_key"])
    types = await restore(http, url, made["id"], ckpt["id"])
    assert types[-2:] == ["RestoreRequested", "RestoreFailed"]
    async with http.get(f"{url}/v1/sandboxes/{made['id']}/events") as resp:
        failed = (await resp.json())["events"][-1]["event"]
    assert "DigestMismatch" in failed["error"] and "digest mismatch" in failed["error"]
    assert (workspace / "site" / "note.txt").read_text() == "current\n"
    assert exec_in(podman, worker, "cat", "/state.txt") == "inside-before\n"
    await destroy(http, url, made["id"])
    await wait_state(http, url, made["id"], {"destroyed"}, timeout=120)


async def test_profile_checkpoints_on_ready_and_retention_on_destroy(
    start_service: StartService,
    compose_env: Factory,
    compose_repo: Path,
    tmp_path: Path,
) -> None:
    prof_dir = tmp_path / "prof"
    prof_dir.mkdir()
    shipped = yaml.safe_load((ROOT / "profiles" / "profile.compose-checkpoint.yaml").read_text())
    shipped["name"] = "profile.compose-checkpoint-now"
    shipped["checkpoint"]["keep_days_after_destroy"] = 0
    (prof_dir / "profile.compose-checkpoint-now.yaml").write_text(yaml.safe_dump(shipped))
    svc = await start_service(
        SANDBOXER_PROFILES_PATH=str(prof_dir), SANDBOXER_CHECKPOINT_STORE="fs", **compose_env()
    )
    http, url = svc.http, svc.url
    made = await create(
        http, url, profile="profile.compose-checkpoint-now", inputs={"repo": str(compose_repo)}
    )
    await wait_state(http, url, made["id"], {"ready"}, timeout=120)
    async with asyncio.timeout(120):
        while True:
            async with http.get(f"{url}/v1/sandboxes/{made['id']}/checkpoints") as resp:
                rows = (await resp.json())["checkpoints"]
            if rows:
                break
            await wait_state(http, url, made["id"], {"checkpointing"}, timeout=30)
    auto = await wait_checkpoint(http, url, rows[0], "created")
    stored = svc.data_dir / "checkpoints" / auto["store_key"]
    assert stored.stat().st_size == auto["size"]
    await wait_state(http, url, made["id"], {"ready"})
    await destroy(http, url, made["id"])
    await wait_state(http, url, made["id"], {"destroyed"}, timeout=120)
    gone = await wait_checkpoint(http, url, auto, "deleted")
    assert gone["deleted_reason"] == "retention: the sandbox ended"
    assert not stored.exists()
    async with http.post(f"{url}/v1/replay") as resp:
        assert (await resp.json())["equal"] is True


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def test_200_mb_checkpoint_is_streamed(
    compose_env: Factory,
    compose_repo: Path,
    tmp_path: Path,
) -> None:
    big = compose_repo / "data"
    big.mkdir()
    with (big / "blob.bin").open("wb") as f:
        for _ in range(200):
            f.write(os.urandom(1024 * 1024))
    env = compose_env()
    env["SANDBOXER_COMPOSE_HOSTS"] = json.dumps(
        [{**h, "capacity": 4} for h in json.loads(env["SANDBOXER_COMPOSE_HOSTS"])]
    )
    data_dir = tmp_path / "data"
    async with aiohttp.ClientSession() as http:
        serve = ServeProcess(data_dir, free_port(), **env)
        try:
            await serve.wait_healthy(http)
            made = await create(
                http, serve.url, profile="profile.compose-e2e", inputs={"repo": str(compose_repo)}
            )
            await wait_state(http, serve.url, made["id"], {"ready"}, timeout=300)
            before = peak_rss_kib(serve.proc.pid)
            ckpt = await checkpoint(http, serve.url, made["id"])
            peak = peak_rss_kib(serve.proc.pid)
            assert ckpt["size"] > 200 * 1024 * 1024
            print(
                f"\npeak RSS of serve: {before // 1024} MiB before, {peak // 1024} MiB "
                f"after a {ckpt['size'] // (1024 * 1024)} MiB checkpoint"
            )
            assert peak < 100 * 1024, "the artifact was streamed, not held in memory"
            await destroy(http, serve.url, made["id"])
            await wait_state(http, serve.url, made["id"], {"destroyed"}, timeout=120)
            assert serve.terminate() == 0
        finally:
            if serve.proc.poll() is None:
                serve.kill()


def test_cli_checkpoint_commands_exist() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sandboxer", "checkpoint", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for command in ("create", "list", "restore", "delete"):
        assert command in out.stdout


def run_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandboxer", "--url", url, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_cli_checkpoint_round_trip(api: RunningService) -> None:
    made = await create(api.http, api.url)
    await wait_state(api.http, api.url, made["id"], {"ready"})
    created = await asyncio.to_thread(
        run_cli, api.url, "checkpoint", "create", made["id"], "--wait", "--json"
    )
    assert created.returncode == 0, created.stderr
    ckpt = json.loads(created.stdout)
    assert ckpt["status"] == "created"
    listed = await asyncio.to_thread(run_cli, api.url, "checkpoint", "list", made["id"])
    assert ckpt["id"] in listed.stdout and "created" in listed.stdout
    restored = await asyncio.to_thread(
        run_cli, api.url, "checkpoint", "restore", made["id"], ckpt["id"], "--wait", "--json"
    )
    assert restored.returncode == 0 and json.loads(restored.stdout)["state"] == "ready"
    clone = await asyncio.to_thread(
        run_cli, api.url, "create", "--from-checkpoint", ckpt["id"], "--wait", "--json"
    )
    assert clone.returncode == 0, clone.stderr
    assert json.loads(clone.stdout)["profile"] == "profile.saas-stub"
    deleted = await asyncio.to_thread(
        run_cli, api.url, "checkpoint", "delete", ckpt["id"], "--json"
    )
    assert json.loads(deleted.stdout)["status"] == "deleted"
    again = await asyncio.to_thread(
        run_cli, api.url, "checkpoint", "restore", made["id"], ckpt["id"]
    )
    assert again.returncode == 3 and "is deleted" in again.stderr
