"""A saas-stub sandbox through its whole lifecycle over real HTTP and a real JetStream."""

from __future__ import annotations

import asyncio
import itertools

from nats.aio.client import Client as NatsClient

from events import ALL_EVENTS
from sandboxer.store.event_store import RecordedEvent
from tests.conftest import RunningService, StartService
from tests.helpers import METERED_LIFECYCLE, create, destroy, event_types, get, grant, wait_state


async def test_full_lifecycle_subjects_and_projection(api: RunningService, nc: NatsClient) -> None:
    seen: list[tuple[str, str]] = []
    states: list[str] = []
    done = asyncio.Event()
    http, url = api.http, api.url

    async def on_msg(msg) -> None:  # type: ignore[no-untyped-def]
        sandbox_id = msg.subject.split(".")[2]
        seen.append((msg.subject, sandbox_id))
        if msg.subject.endswith(".TornDown"):
            done.set()

    runner = api.service.runner
    assert runner is not None

    def on_applied(recorded: RecordedEvent) -> None:
        # The projection's state right after each sandbox event is applied.
        if recorded.subject.startswith("sandboxer.sandbox."):
            view = runner.projection.get(recorded.event.aggregate_id)
            assert view is not None and view.last_seq == recorded.seq
            states.append(view.state)

    runner.listeners.append(on_applied)

    sub = await nc.jetstream().subscribe("sandboxer.sandbox.>", cb=on_msg, ordered_consumer=True)
    created = await create(http, url, inputs={"size": "medium", "api_key": "hunter2-secret"})
    sandbox_id = created["id"]
    assert created["state"] == "requested"
    assert created["inputs"] == {"size": "medium"}, "secret inputs are never shown"
    ready = await wait_state(http, url, sandbox_id, {"ready"})
    assert ready["handle"]["instance"] == sandbox_id
    assert ready["services"] == ["instance"]
    assert ready["route_reason"]
    gone = await destroy(http, url, sandbox_id)
    assert gone["state"] == "tearing_down"
    final = await wait_state(http, url, sandbox_id, {"destroyed"})
    assert final["terminal"] and final["events"] == 7
    async with asyncio.timeout(10):
        await done.wait()
    await sub.unsubscribe()

    expected = [f"sandboxer.sandbox.{sandbox_id}.{t}" for t in METERED_LIFECYCLE]
    assert [s for s, _ in seen] == expected
    assert states == [
        "requested",
        "reserving",
        "provisioning",
        "starting",
        "ready",
        "tearing_down",
        "destroyed",
    ]
    assert await event_types(http, url, sandbox_id) == METERED_LIFECYCLE

    async with http.get(f"{url}/v1/sandboxes/{sandbox_id}/events") as resp:
        body = await resp.text()
        events = (await resp.json())["events"]
    assert "hunter2" not in body, "a secret input reached an event"
    first = events[0]["event"]
    assert first["secret_inputs"] == ["api_key"]
    versions = {t.type_name(): t.VERSION for t in ALL_EVENTS}
    deleted = next(e["event"] for e in events if e["event"]["type"] == "DestroyRequested")
    for e in events:
        ev = e["event"]
        assert ev["aggregate_id"] == sandbox_id
        assert ev["schema_version"] == versions[ev["type"]]
        assert ev["occurred_at"].endswith("Z") and ev["event_id"] and ev["correlation_id"]
        # Each step carries the correlation id of the request it follows from.
        after_destroy = ev["type"] in ("DestroyRequested", "TornDown")
        chain = deleted if after_destroy else first
        assert ev["correlation_id"] == chain["correlation_id"], ev
    actors = {e["event"]["type"]: e["event"]["actor"] for e in events}
    assert actors["SandboxRequested"] == "api:anonymous"
    assert actors["DestroyRequested"] == "api:anonymous"
    assert actors["Provisioned"] == "system:manager"
    # Each event names the one before it as its cause.
    for prev, nxt in itertools.pairwise(events):
        if nxt["event"]["type"] == "CreditsHeld":  # follows the ledger's reservation
            assert nxt["event"]["causation_id"] == f"{sandbox_id}.reserve"
        elif nxt["event"]["type"] != "DestroyRequested":
            assert nxt["event"]["causation_id"] == prev["event"]["event_id"]
    assert not list((api.data_dir / "saas-stub").glob("*.json")), "instance left behind"


async def test_request_id_becomes_correlation_id(api: RunningService) -> None:
    async with api.http.post(
        f"{api.url}/v1/sandboxes",
        json={"profile": "profile.saas-stub"},
        headers={"X-Request-Id": "req-42"},
    ) as resp:
        sandbox_id = (await resp.json())["id"]
    await wait_state(api.http, api.url, sandbox_id, {"ready"})
    async with api.http.get(f"{api.url}/v1/sandboxes/{sandbox_id}/events") as resp:
        events = (await resp.json())["events"]
    assert {e["event"]["correlation_id"] for e in events} == {"req-42"}


async def test_listing_profiles_health_and_openapi(api: RunningService) -> None:
    async with api.http.get(f"{api.url}/v1/profiles") as resp:
        profiles = (await resp.json())["profiles"]
    stub = next(p for p in profiles if p["name"] == "profile.saas-stub")
    assert stub["extension"] == "saas-stub"
    assert {i["name"]: i["secret"] for i in stub["inputs"]}["api_key"] is True
    async with api.http.get(f"{api.url}/healthz") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "ok"
    async with api.http.get(f"{api.url}/openapi.json") as resp:
        doc = await resp.json()
    assert doc["openapi"].startswith("3.")
    for path in (
        "/v1/sandboxes",
        "/v1/sandboxes/{id}",
        "/v1/sandboxes/{id}/events",
        "/v1/profiles",
        "/healthz",
    ):
        assert path in doc["paths"]
    assert "CreateBody" in doc["components"]["schemas"]


async def test_list_filters_and_replay_equals_live(api: RunningService) -> None:
    await grant(api.http, api.url, "acme", 30)
    a = await create(api.http, api.url)
    b = await create(api.http, api.url, account="acme")
    await wait_state(api.http, api.url, a["id"], {"ready"})
    await wait_state(api.http, api.url, b["id"], {"ready"})
    await destroy(api.http, api.url, a["id"])
    await wait_state(api.http, api.url, a["id"], {"destroyed"})
    async with api.http.get(f"{api.url}/v1/sandboxes", params={"account": "acme"}) as resp:
        rows = (await resp.json())["sandboxes"]
    assert [r["id"] for r in rows] == [b["id"]]
    async with api.http.get(f"{api.url}/v1/sandboxes", params={"state": "destroyed"}) as resp:
        assert [r["id"] for r in (await resp.json())["sandboxes"]] == [a["id"]]
    async with api.http.post(f"{api.url}/v1/replay") as resp:
        report = await resp.json()
    assert report["equal"] is True and report["sandboxes"] == 2


async def test_restart_on_same_stream_keeps_everything(
    start_service: StartService,
) -> None:
    first = await start_service()
    made = await create(first.http, first.url)
    await wait_state(first.http, first.url, made["id"], {"ready"})
    await first.stop()
    second = await start_service()
    assert (await get(second.http, second.url, made["id"]))["state"] == "ready"
    await destroy(second.http, second.url, made["id"])
    await wait_state(second.http, second.url, made["id"], {"destroyed"})


async def test_list_rows_follow_every_change(api: RunningService) -> None:
    """Rows are encoded once per state without a step and reused: every list must still
    show each sandbox exactly as GET shows it, before and after it changes."""

    async def listed() -> dict[str, dict[str, object]]:
        async with api.http.get(f"{api.url}/v1/sandboxes") as resp:
            assert resp.status == 200 and resp.content_type == "application/json"
            body = await resp.json()
        assert body["count"] == len(body["sandboxes"])
        return {row["id"]: row for row in body["sandboxes"]}

    made = await create(api.http, api.url)
    await wait_state(api.http, api.url, made["id"], {"ready"})
    for _ in range(2):  # the second list answers from the encoded rows
        assert (await listed())[made["id"]] == await get(api.http, api.url, made["id"])
    await destroy(api.http, api.url, made["id"])
    await wait_state(api.http, api.url, made["id"], {"destroyed"})
    rows = await listed()
    assert rows[made["id"]]["state"] == "destroyed"
    assert rows[made["id"]] == await get(api.http, api.url, made["id"])
