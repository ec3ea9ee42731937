"""exec, files and logs over HTTP against the saas-stub (no infrastructure): NDJSON
frames in order, the start and end recorded with counts and digests but no output,
refusals before anything runs, cancel on disconnect and on destroy, labels."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import aiohttp

from tests.conftest import RunningService
from tests.helpers import create, event_types, get, wait_state

EMPTY = hashlib.sha256(b"").hexdigest()


async def ready(api: RunningService, **body: Any) -> str:
    made = await create(api.http, api.url, **body)
    await wait_state(api.http, api.url, made["id"], ["ready"])
    return str(made["id"])


async def exec_frames(api: RunningService, sandbox_id: str, **body: Any) -> list[dict[str, Any]]:
    async with api.http.post(f"{api.url}/v1/sandboxes/{sandbox_id}/exec", json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        return [json.loads(line) async for line in resp.content if line.strip()]


async def sandbox_events(api: RunningService, sandbox_id: str) -> list[dict[str, Any]]:
    async with api.http.get(f"{api.url}/v1/sandboxes/{sandbox_id}/events") as resp:
        return [e["event"] for e in (await resp.json())["events"]]


async def test_exec_streams_frames_and_records_start_and_end(api: RunningService) -> None:
    sandbox_id = await ready(api)
    frames = await exec_frames(api, sandbox_id, argv=["echo", "hello", "world"])
    assert frames[0]["type"] == "started"
    assert frames[-1]["type"] == "exit"
    out = "".join(f["data"] for f in frames if f["type"] == "stdout")
    assert out == "hello world\n"
    end = frames[-1]
    assert end["outcome"] == "exited" and end["exit_code"] == 0
    assert end["stdout_bytes"] == len(out.encode())
    assert end["stdout_sha256"] == hashlib.sha256(out.encode()).hexdigest()
    assert end["stderr_bytes"] == 0 and end["stderr_sha256"] == EMPTY
    assert end["seq"] > frames[0]["seq"] > 0

    failed = await exec_frames(api, sandbox_id, argv=["exit", "3"])
    assert failed[-1]["exit_code"] == 3 and failed[-1]["outcome"] == "exited"

    events = await sandbox_events(api, sandbox_id)
    started = [e for e in events if e["type"] == "CommandStarted"]
    finished = [e for e in events if e["type"] == "CommandFinished"]
    assert [e["argv"] for e in started] == [["echo", "hello", "world"], ["exit", "3"]]
    assert started[0]["command_id"] == frames[0]["command_id"]
    assert finished[0]["stdout_sha256"] == end["stdout_sha256"]
    assert "hello" not in json.dumps(finished)  # the output is never an event
    view = await get(api.http, api.url, sandbox_id)
    assert view["commands_run"] == 2
    assert [(c["exit_code"], c["outcome"]) for c in view["commands"]] == [
        (0, "exited"),
        (3, "exited"),
    ]


async def test_exec_refusals_name_the_field_and_record_nothing(api: RunningService) -> None:
    sandbox_id = await ready(api)
    url = f"{api.url}/v1/sandboxes/{sandbox_id}/exec"
    before = len(await sandbox_events(api, sandbox_id))
    cases: list[tuple[dict[str, Any], int, str | None]] = [
        ({}, 400, "argv"),
        ({"argv": ["true"], "shell": "true"}, 400, "argv"),
        ({"argv": []}, 400, "argv"),
        ({"argv": ["true"], "env": {"A B": "x"}}, 400, "env"),
        ({"argv": ["true"], "timeout_seconds": 0}, 400, "timeout_seconds"),
        ({"argv": ["true"], "service": "bad name"}, 400, "service"),
        ({"argv": ["true"], "extra": 1}, 400, "extra"),
    ]
    for body, status, field in cases:
        async with api.http.post(url, json=body) as resp:
            answer = await resp.json()
            assert resp.status == status, (body, answer)
            assert answer["error"]["field"] == field, (body, answer)
    async with api.http.post(
        f"{api.url}/v1/sandboxes/sbx-000000000000/exec", json={"argv": ["true"]}
    ) as resp:
        assert resp.status == 404
    assert len(await sandbox_events(api, sandbox_id)) == before


async def test_exec_timeout_and_disconnect_stop_the_command(api: RunningService) -> None:
    sandbox_id = await ready(api)
    frames = await exec_frames(api, sandbox_id, argv=["sleep", "30"], timeout_seconds=0.5)
    assert frames[-1]["outcome"] == "timeout" and frames[-1]["exit_code"] is None

    # A caller that goes away: its command ends `disconnected`, recorded.
    session = aiohttp.ClientSession()
    resp = await session.post(
        f"{api.url}/v1/sandboxes/{sandbox_id}/exec", json={"argv": ["sleep", "60"]}
    )
    first = json.loads(await resp.content.readline())
    assert first["type"] == "started"
    resp.close()
    await session.close()
    async with asyncio.timeout(20):
        while True:
            events = await sandbox_events(api, sandbox_id)
            ends = [
                e
                for e in events
                if e["type"] == "CommandFinished" and e["command_id"] == first["command_id"]
            ]
            if ends:
                break
            await api.service.runner.wait_for(api.service.runner.last_seq + 1, 1.0)
    assert ends[0]["outcome"] == "disconnected"


async def test_destroy_stops_a_running_command(api: RunningService) -> None:
    sandbox_id = await ready(api)
    url = f"{api.url}/v1/sandboxes/{sandbox_id}/exec"
    async with api.http.post(url, json={"argv": ["sleep", "60"]}) as resp:
        first = json.loads(await resp.content.readline())
        assert first["type"] == "started"
        async with api.http.delete(f"{api.url}/v1/sandboxes/{sandbox_id}") as gone:
            assert gone.status == 202
        rest = [json.loads(line) async for line in resp.content if line.strip()]
    assert rest[-1]["type"] == "exit" and rest[-1]["outcome"] == "destroyed"
    await wait_state(api.http, api.url, sandbox_id, ["destroyed"])
    types = await event_types(api.http, api.url, sandbox_id)
    assert types.index("CommandFinished") > types.index("DestroyRequested")


async def test_files_round_trip_and_refusals(api: RunningService) -> None:
    sandbox_id = await ready(api)
    url = f"{api.url}/v1/sandboxes/{sandbox_id}/files"
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    async with api.http.put(url, params={"path": "/data/ünï.bin"}, data=data) as resp:
        out = await resp.json()
        assert resp.status == 201, out
    assert out["size"] == len(data) and out["sha256"] == hashlib.sha256(data).hexdigest()
    async with api.http.get(url, params={"path": "/data/ünï.bin"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(data))
        assert await resp.read() == data
    for path, status in [("/a/../../etc/passwd", 400), ("", 400), ("/nope/missing", 404)]:
        async with api.http.get(url, params={"path": path}) as resp:
            answer = await resp.json()
            assert resp.status == status, (path, answer)
            assert answer["error"]["field"] == "path"
    events = await sandbox_events(api, sandbox_id)
    assert [e["type"] for e in events if e["type"].startswith("File")] == [
        "FileUploaded",
        "FileDownloaded",
    ]
    assert all(e["sha256"] == out["sha256"] for e in events if e["type"].startswith("File"))


async def test_file_size_limit(start_service: Any) -> None:
    api = await start_service(SANDBOXER_MAX_FILE_BYTES="1000")
    sandbox_id = await ready(api)
    url = f"{api.url}/v1/sandboxes/{sandbox_id}/files"
    async with api.http.put(url, params={"path": "big"}, data=b"x" * 1001) as resp:
        assert resp.status == 413, await resp.text()

    async def chunked() -> Any:  # no Content-Length: refused once past the limit
        for _ in range(4):
            yield b"y" * 400

    async with api.http.put(url, params={"path": "big"}, data=chunked()) as resp:
        assert resp.status == 413, await resp.text()
    async with api.http.put(url, params={"path": "small"}, data=b"z" * 1000) as resp:
        assert resp.status == 201


async def test_labels_on_create_filter_and_view(api: RunningService) -> None:
    a = await create(api.http, api.url, labels={"team": "ci", "run": "42"})
    b = await create(api.http, api.url, labels={"team": "web"})
    assert a["labels"] == {"team": "ci", "run": "42"}
    async with api.http.get(f"{api.url}/v1/sandboxes", params={"label": "team=ci"}) as resp:
        listed = await resp.json()
    assert [s["id"] for s in listed["sandboxes"]] == [a["id"]]
    async with api.http.get(
        f"{api.url}/v1/sandboxes", params=[("label", "team=web"), ("label", "run=42")]
    ) as resp:
        assert (await resp.json())["count"] == 0
    assert b["id"]
    for labels, field in [({"bad key": "x"}, "labels"), ({"k": "v\n"}, "labels.k")]:
        async with api.http.post(
            f"{api.url}/v1/sandboxes", json={"profile": "profile.saas-stub", "labels": labels}
        ) as resp:
            answer = await resp.json()
            assert resp.status == 400 and answer["error"]["field"] == field, answer
    async with api.http.get(f"{api.url}/v1/sandboxes", params={"label": "nokv"}) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["field"] == "label"


async def test_stopping_serve_ends_running_commands_and_records_them(
    start_service: Any,
) -> None:
    api = await start_service()
    sandbox_id = await ready(api)
    session = aiohttp.ClientSession()
    try:
        resp = await session.post(
            f"{api.url}/v1/sandboxes/{sandbox_id}/exec", json={"argv": ["sleep", "120"]}
        )
        started = json.loads(await resp.content.readline())
        async with asyncio.timeout(30):  # not the command's 120 s
            await api.stop()
        resp.close()
    finally:
        await session.close()
    again = await start_service()
    events = await sandbox_events(again, sandbox_id)
    (end,) = [e for e in events if e["type"] == "CommandFinished"]
    assert end["command_id"] == started["command_id"]
    assert end["outcome"] == "disconnected"
