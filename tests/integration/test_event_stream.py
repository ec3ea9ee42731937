"""The public event contract: SSE with Last-Event-ID resume, and the JSON Schema."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import aiohttp
import jsonschema_rs

from sandboxer.http.api import event_schema, event_subjects
from tests.conftest import RunningService
from tests.helpers import METERED_LIFECYCLE, create, destroy, wait_state
from tests.paths import ROOT


async def read_sse(resp: aiohttp.ClientResponse, count: int) -> list[dict[str, Any]]:
    """Parse `count` events off a text/event-stream response."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    async with asyncio.timeout(30):
        while len(events) < count:
            line = (await resp.content.readline()).decode().rstrip("\n")
            if line.startswith(":"):
                continue
            if not line:
                if current:
                    events.append(current)
                    current = {}
                continue
            key, _, value = line.partition(": ")
            current[key] = json.loads(value) if key == "data" else value
    return events


async def test_sse_resume_with_last_event_id(api: RunningService) -> None:
    http, url = api.http, api.url
    first = await create(http, url)
    await wait_state(http, url, first["id"], {"ready"})
    received: list[dict[str, Any]] = []
    async with http.get(f"{url}/v1/events/stream") as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        received += await read_sse(resp, 3)
    last_id = received[-1]["id"]
    # Events keep happening while the client is away.
    await destroy(http, url, first["id"])
    await wait_state(http, url, first["id"], {"destroyed"})
    second = await create(http, url)
    await wait_state(http, url, second["id"], {"ready"})
    async with http.get(f"{url}/v1/events") as resp:
        total = (await resp.json())["last_seq"]
    async with http.get(f"{url}/v1/events/stream", headers={"Last-Event-ID": last_id}) as resp:
        received += await read_sse(resp, total - int(last_id))
    seqs = [int(e["id"]) for e in received]
    assert seqs == list(range(1, total + 1)), "every event once, in order"
    for e in received:
        assert e["event"] == e["data"]["event"]["type"]
        assert int(e["id"]) == e["data"]["seq"]


async def test_sse_filters(api: RunningService) -> None:
    http, url = api.http, api.url
    a = await create(http, url)
    b = await create(http, url)
    await wait_state(http, url, a["id"], {"ready"})
    await wait_state(http, url, b["id"], {"ready"})
    params = {"sandbox": b["id"], "type": "SandboxRequested,BecameReady"}
    async with http.get(f"{url}/v1/events/stream", params=params) as resp:
        got = await read_sse(resp, 2)
    assert [e["event"] for e in got] == ["SandboxRequested", "BecameReady"]
    assert {e["data"]["event"]["aggregate_id"] for e in got} == {b["id"]}
    async with http.get(
        f"{url}/v1/events/stream", params={"account": "default", "type": "CreditsReserved"}
    ) as resp:
        got = await read_sse(resp, 2)
    assert {e["data"]["event"]["sandbox_id"] for e in got} == {a["id"], b["id"]}
    for bad, field in [({"type": "Nope"}, "type"), ({"sandbox": "a.b"}, "sandbox")]:
        async with http.get(f"{url}/v1/events/stream", params=bad) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["field"] == field
    async with http.get(f"{url}/v1/events/stream", headers={"Last-Event-ID": "x"}) as resp:
        assert resp.status == 400


async def test_cli_follow_uses_the_stream(api: RunningService) -> None:
    made = await create(api.http, api.url)
    await wait_state(api.http, api.url, made["id"], {"ready"})
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sandboxer",
        "--url",
        api.url,
        "events",
        "--follow",
        "--json",
        "--sandbox",
        made["id"],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        lines = []
        async with asyncio.timeout(30):
            for _ in range(6):
                lines.append(json.loads(await proc.stdout.readline()))
            await destroy(api.http, api.url, made["id"])
            for _ in range(4):
                lines.append(json.loads(await proc.stdout.readline()))
    finally:
        proc.terminate()
        await proc.wait()
    # The sandbox's own events and the ledger events of its charge (?sandbox= on SSE).
    expected = [*METERED_LIFECYCLE, "CreditsDebited", "CreditsReleased"]
    expected.insert(2, "CreditsReserved")
    assert [x["event"]["type"] for x in lines] == expected


def meaning(schema: Any) -> Any:
    """A schema as a validator reads it: descriptions are prose, so their line breaks
    and indentation (which msgspec releases render differently) do not count."""
    if isinstance(schema, dict):
        return {
            k: " ".join(v.split()) if k == "description" and isinstance(v, str) else meaning(v)
            for k, v in schema.items()
        }
    if isinstance(schema, list):
        return [meaning(v) for v in schema]
    return schema


def test_schema_meaning_ignores_only_description_whitespace() -> None:
    base = {"$defs": {"E": {"description": "a\n    b", "type": "object"}}}
    assert meaning(base) == meaning({"$defs": {"E": {"description": "a b", "type": "object"}}})
    assert meaning(base) != meaning({"$defs": {"E": {"description": "a c", "type": "object"}}})
    assert meaning(base) != meaning({"$defs": {"E": {"description": "a b", "type": "string"}}})


async def test_schema_endpoint_equals_the_checked_in_file(api: RunningService) -> None:
    """docs/events.schema.json is regenerated by scripts/schema."""
    async with api.http.get(f"{api.url}/v1/events/schema") as resp:
        served = await resp.json()
    checked_in = json.loads((ROOT / "docs" / "events.schema.json").read_text())
    assert served == json.loads(json.dumps(event_schema()))
    assert meaning(served) == meaning(checked_in)
    assert "BecameReady" in served["$defs"]
    # The subject map lies beside the schema (a strict validator refuses `x-` keywords).
    assert not any(key.startswith("x-") for key in served)
    async with api.http.get(f"{api.url}/v1/events/subjects") as resp:
        subjects = await resp.json()
    assert subjects == json.loads((ROOT / "docs" / "events.subjects.json").read_text())
    assert subjects == json.loads(json.dumps(event_subjects()))
    assert subjects["types"]["ValidationPassed"]["subject"] == (
        "sandboxer.validation.<sandbox_id>.ValidationPassed"
    )


async def test_a_lifecycle_validates_against_the_served_schema(api: RunningService) -> None:
    """Every event of a metered lifecycle, as served, against the schema as served, in
    strict draft 2020-12 with formats (tests/integration/test_event_contract.py does every type)."""
    http, url = api.http, api.url
    made = await create(http, url)
    await wait_state(http, url, made["id"], {"ready"})
    await destroy(http, url, made["id"])
    await wait_state(http, url, made["id"], {"destroyed"})
    async with http.get(f"{url}/v1/events/schema") as resp:
        validator = jsonschema_rs.Draft202012Validator(await resp.json(), validate_formats=True)
    async with http.get(f"{url}/v1/accounts/default") as resp:
        account = await resp.json()
    while account["reserved"]:  # the settlement follows the end
        params = {"wait": "10", "after_seq": str(account["last_seq"])}
        async with http.get(f"{url}/v1/accounts/default", params=params) as resp:
            account = await resp.json()
    async with http.get(f"{url}/v1/events") as resp:
        recorded = (await resp.json())["events"]
    types = {e["event"]["type"] for e in recorded}
    assert {*METERED_LIFECYCLE, "CreditsReserved", "CreditsDebited", "CreditsReleased"} <= types
    for e in recorded:
        problems = [err.message for err in validator.iter_errors(e["event"])]
        assert problems == [], (e["subject"], problems)
        assert e["subject"].split(".")[2] == e["event"]["aggregate_id"]
        assert e["subject"].split(".")[3] == e["event"]["type"]
    assert not validator.is_valid({**recorded[0]["event"], "password": "x"})


async def test_sse_sandbox_filter_includes_its_ledger_events(api: RunningService) -> None:
    """?sandbox= streams the sandbox's own events and the ledger events of its charge;
    without Last-Event-ID or after_seq the stream starts at sequence 1."""
    http, url = api.http, api.url
    other = await create(http, url)
    made = await create(http, url)
    await wait_state(http, url, other["id"], {"ready"})
    await wait_state(http, url, made["id"], {"ready"})
    await destroy(http, url, made["id"])
    await wait_state(http, url, made["id"], {"destroyed"})
    expected = [*METERED_LIFECYCLE]
    expected.insert(2, "CreditsReserved")
    expected += ["CreditsDebited", "CreditsReleased"]
    async with http.get(f"{url}/v1/events/stream", params={"sandbox": made["id"]}) as resp:
        got = await read_sse(resp, len(expected))
    assert [e["event"] for e in got] == expected
    for e in got:
        event = e["data"]["event"]
        assert made["id"] in (event["aggregate_id"], event.get("sandbox_id"))
    async with http.get(f"{url}/v1/events/stream") as resp:
        (first,) = await read_sse(resp, 1)
    assert first["id"] == "1"
