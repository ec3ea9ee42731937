"""Using a compose sandbox through the service (ext.compose-local, real podman-compose
containers): exec over HTTP with exit codes, streams kept apart and in order, argv run
literally, 50 MB of output through serve with its memory bounded, files in and out of
a container, logs, tokens; and a caller that leaves or a destroy stopping the process
inside the container."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from extensions.compose import project_name
from tests.conftest import RunningService, StartService
from tests.helpers import create, wait_state
from tests.infra import IMAGE, Podman, write_repo

pytestmark = pytest.mark.timeout(300)

REPO = {
    "compose.yml": (
        "services:\n"
        "  app:\n"
        f"    image: {IMAGE}\n"
        '    command: ["sh", "-c", "echo app started; echo app warns >&2; exec sleep 3600"]\n'
        "    stop_signal: SIGKILL\n"
        "  web:\n"
        f"    image: {IMAGE}\n"
        '    command: ["httpd", "-f", "-p", "8080", "-h", "/"]\n'
        "    stop_signal: SIGKILL\n"
    ),
}
TOKENS = [
    {"name": "ops", "token": "admin-token-0123456789", "account": "default", "role": "admin"},
    {"name": "acme-ci", "token": "acme-token-0123456789", "account": "acme"},
    {"name": "beta-ci", "token": "beta-token-0123456789", "account": "beta"},
]
ADMIN, ACME, BETA = ({"Authorization": f"Bearer {t['token']}"} for t in TOKENS)
MB = 1024 * 1024
LINE = "the quick brown fox jumps over the lazy dog 0123456789"


def local_env(podman: Podman, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "SANDBOXER_COMPOSE_LOCAL_CMD": podman.compose_cmd,
        "SANDBOXER_COMPOSE_LOCAL_ENGINE_CMD": podman.engine_cmd,
        "SANDBOXER_COMPOSE_LOCAL_STOP_TIMEOUT": "1",
        "SANDBOXER_REPO_ROOTS": str(tmp_path),
        **extra,
    }


async def ready_sandbox(svc: RunningService, repo: Path, **kw: Any) -> str:
    made = await create(
        svc.http, svc.url, profile="profile.compose-local", inputs={"repo": str(repo)}, **kw
    )
    await wait_state(svc.http, svc.url, made["id"], ["ready"], timeout=120)
    return str(made["id"])


class Run:
    """One exec's frames, folded."""

    def __init__(self, frames: list[dict[str, Any]]) -> None:
        self.frames = frames
        self.stdout = "".join(f["data"] for f in frames if f["type"] == "stdout")
        self.stderr = "".join(f["data"] for f in frames if f["type"] == "stderr")
        self.end = frames[-1]
        assert self.end["type"] == "exit", frames[-3:]


async def run(
    svc: RunningService, sandbox_id: str, headers: dict[str, str] | None = None, **body: Any
) -> Run:
    async with svc.http.post(
        f"{svc.url}/v1/sandboxes/{sandbox_id}/exec", json=body, headers=headers
    ) as resp:
        assert resp.status == 200, await resp.text()
        return Run([json.loads(line) async for line in resp.content if line.strip()])


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_exec_files_and_logs_in_compose_services(
    start_service: StartService, podman: Podman, tmp_path: Path
) -> None:
    svc = await start_service(**local_env(podman, tmp_path))
    sandbox_id = await ready_sandbox(svc, write_repo(tmp_path / "repo", REPO))
    url = f"{svc.url}/v1/sandboxes/{sandbox_id}"

    # Two services: the command must name one.
    async with svc.http.post(f"{url}/exec", json={"argv": ["true"]}) as resp:
        answer = await resp.json()
        assert resp.status == 400 and answer["error"]["field"] == "service", answer

    said = await run(svc, sandbox_id, argv=["echo", "hi"], service="app")
    assert (said.stdout, said.end["exit_code"], said.end["outcome"]) == ("hi\n", 0, "exited")
    assert (await run(svc, sandbox_id, shell="exit 7", service="app")).end["exit_code"] == 7

    # Each stream apart and in order.
    both = await run(
        svc,
        sandbox_id,
        shell="for i in 1 2 3; do echo out$i; echo err$i >&2; done",
        service="app",
    )
    assert both.stdout == "out1\nout2\nout3\n" and both.stderr == "err1\nerr2\nerr3\n"

    # Quotes, `;`, `$(...)`, newlines: arguments, never shell syntax.
    hostile = ["a b", "'q'", '"dq"', "; rm -rf /", "$(touch /owned)", "`id`", "x\ny", "ü"]
    literal = await run(
        svc, sandbox_id, argv=["sh", "-c", 'printf "%s|" "$@"', "sh", *hostile], service="app"
    )
    assert literal.stdout == "".join(f"{a}|" for a in hostile)
    owned = await run(svc, sandbox_id, argv=["ls", "/owned"], service="app")
    assert owned.end["exit_code"] != 0, "the $(...) was run"

    # An env variable and a workdir.
    env = await run(
        svc, sandbox_id, shell='echo "$GREETING" "$(pwd)"', service="app",
        env={"GREETING": "hello there"}, workdir="/etc",
    )  # fmt: skip
    assert env.stdout == "hello there /etc\n"

    # 50 MB of output through serve: counted and hashed, memory bounded.
    size = 50 * MB
    before = rss()
    peak = before

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss())
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    sha = hashlib.sha256()
    received = 0
    async with svc.http.post(
        f"{url}/exec",
        json={"shell": f"busybox yes {LINE} | busybox head -c {size}", "service": "app"},
    ) as resp:
        async for line in resp.content:
            frame = json.loads(line)
            if frame["type"] == "stdout":
                chunk = frame["data"].encode()
                received += len(chunk)
                sha.update(chunk)
            elif frame["type"] == "exit":
                end = frame
    sampler.cancel()
    assert received == size and end["stdout_bytes"] == size
    whole = ((LINE + "\n") * (size // (len(LINE) + 1) + 1)).encode()[:size]
    assert end["stdout_sha256"] == sha.hexdigest() == hashlib.sha256(whole).hexdigest()
    assert peak - before < 40 * MB, f"serve grew {(peak - before) / MB:.1f} MiB"

    # Files: in and out of a container, unicode names, parents made; `..` refused; a
    # link inside the container resolves inside it, never to this machine's files.
    files = f"{url}/files"
    data = bytes(range(256)) * (4 * 4096)  # 4 MiB
    path = "/data/sub/ünïcødé file.bin"
    async with svc.http.put(files, params={"path": path, "service": "app"}, data=data) as resp:
        out = await resp.json()
        assert resp.status == 201, out
    assert out["sha256"] == hashlib.sha256(data).hexdigest() and out["service"] == "app"
    async with svc.http.get(files, params={"path": path, "service": "app"}) as resp:
        assert resp.status == 200 and await resp.read() == data
    seen = await run(svc, sandbox_id, argv=["busybox", "sha256sum", path], service="app")
    assert seen.stdout.split()[0] == out["sha256"]
    async with svc.http.get(files, params={"path": "/../etc/hostname", "service": "app"}) as resp:
        answer = await resp.json()
        assert resp.status == 400 and answer["error"]["field"] == "path", answer
    await run(
        svc, sandbox_id, argv=["busybox", "ln", "-s", "../../../../etc/hostname", "/link"],
        service="app",
    )  # fmt: skip
    inside = await run(svc, sandbox_id, argv=["cat", "/etc/hostname"], service="app")
    async with svc.http.get(files, params={"path": "/link", "service": "app"}) as resp:
        linked = await resp.read()
        assert resp.status == 200
    assert linked.decode() == inside.stdout != Path("/etc/hostname").read_text()
    async with svc.http.get(files, params={"path": "/no/such", "service": "app"}) as resp:
        assert resp.status == 404, await resp.text()

    # Logs: each service's lines, both streams, with the service named.
    async with svc.http.get(f"{url}/logs", params={"service": "app"}) as resp:
        assert resp.status == 200
        lines = [json.loads(line) async for line in resp.content if line.strip()]
    assert {"service": "app", "stream": "stdout", "line": "app started"} in lines
    assert {"service": "app", "stream": "stderr", "line": "app warns"} in lines
    async with svc.http.get(f"{url}/logs", params={"tail": "1", "service": "nope"}) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["field"] == "service"

    # Following: a line written after the request arrives on the open answer.
    async with svc.http.get(f"{url}/logs", params={"service": "app", "follow": "1"}) as resp:
        assert resp.status == 200
        first = json.loads(await resp.content.readline())
        assert first["line"] in ("app started", "app warns")
    events = await svc.http.get(f"{url}/events")
    types = [e["event"]["type"] for e in (await events.json())["events"]]
    assert types.count("CommandStarted") == types.count("CommandFinished") >= 9
    assert types.count("FileUploaded") == 1 and types.count("FileDownloaded") == 2


async def test_members_use_only_their_accounts_sandboxes(
    start_service: StartService, podman: Podman, tmp_path: Path
) -> None:
    svc = await start_service(
        **local_env(podman, tmp_path), SANDBOXER_TOKENS=yaml.safe_dump(TOKENS)
    )
    repo = write_repo(tmp_path / "repo", REPO)
    async with svc.http.post(
        f"{svc.url}/v1/sandboxes",
        json={"profile": "profile.compose-local", "inputs": {"repo": str(repo)}},
        headers=ACME,
    ) as resp:
        made = await resp.json()
        assert resp.status == 202, made
    sandbox_id = made["id"]
    async with asyncio.timeout(120):
        while made["state"] != "ready":
            async with svc.http.get(
                f"{svc.url}/v1/sandboxes/{sandbox_id}",
                params={"wait": "10", "after_seq": str(made["last_seq"])},
                headers=ACME,
            ) as resp:
                made = await resp.json()
    url = f"{svc.url}/v1/sandboxes/{sandbox_id}"
    body = {"argv": ["true"], "service": "app"}
    for headers, status in [({}, 401), (BETA, 403), (ACME, 200), (ADMIN, 200)]:
        async with svc.http.post(f"{url}/exec", json=body, headers=headers) as resp:
            await resp.read()
            assert resp.status == status, headers
        params = {"path": "/x", "service": "app"}
        async with svc.http.put(f"{url}/files", params=params, data=b"x", headers=headers) as r:
            assert r.status == (201 if status == 200 else status), headers
        async with svc.http.get(f"{url}/logs", params={"service": "app"}, headers=headers) as r:
            await r.read()
            assert r.status == status, headers
    started = await svc.http.get(f"{url}/events", headers=ACME)
    actors = {
        e["event"]["actor"]
        for e in (await started.json())["events"]
        if e["event"]["type"] == "CommandStarted"
    }
    assert actors == {"api:acme-ci", "api:ops"}


async def wait_running(podman: Podman, container: str, marker: str, running: bool) -> None:
    """Until the container runs (or no longer runs) a process whose args hold `marker`."""
    async with asyncio.timeout(30):
        while (marker in podman("top", container, "args").stdout) != running:
            await asyncio.sleep(0.2)


async def test_leaving_or_destroying_stops_the_process_in_the_container(
    start_service: StartService, podman: Podman, tmp_path: Path
) -> None:
    svc = await start_service(**local_env(podman, tmp_path))
    sandbox_id = await ready_sandbox(svc, write_repo(tmp_path / "repo", REPO))
    container = next(
        c["Names"][0]
        for c in podman.containers(project_name(sandbox_id))
        if c["Labels"].get("com.docker.compose.service") == "app"
    )
    url = f"{svc.url}/v1/sandboxes/{sandbox_id}"

    # The caller goes away while the command prints nothing.
    session = aiohttp.ClientSession()
    resp = await session.post(f"{url}/exec", json={"argv": ["sleep", "301"], "service": "app"})
    started = json.loads(await resp.content.readline())
    assert started["type"] == "started"
    await wait_running(podman, container, "sleep 301", True)
    resp.close()
    await session.close()
    await wait_running(podman, container, "sleep 301", False)

    # A destroy stops the one running now, and its end is recorded before the teardown.
    async with svc.http.post(
        f"{url}/exec", json={"argv": ["sleep", "302"], "service": "app"}
    ) as resp:
        assert json.loads(await resp.content.readline())["type"] == "started"
        await wait_running(podman, container, "sleep 302", True)
        async with svc.http.delete(url) as gone:
            assert gone.status == 202
        rest = [json.loads(line) async for line in resp.content if line.strip()]
    assert rest[-1]["outcome"] == "destroyed" and rest[-1]["seq"] > 0
    await wait_state(svc.http, svc.url, sandbox_id, ["destroyed"], timeout=120)
    events = await svc.http.get(f"{url}/events")
    finished = {
        e["event"]["command_id"]: e["event"]["outcome"]
        for e in (await events.json())["events"]
        if e["event"]["type"] == "CommandFinished"
    }
    assert finished == {started["command_id"]: "disconnected", rest[-1]["command_id"]: "destroyed"}
