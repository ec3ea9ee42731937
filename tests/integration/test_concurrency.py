"""Many sandboxes at once: none lost, none duplicated, counted on the stream itself."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NatsClient

from tests.conftest import RunningService
from tests.helpers import METERED_LIFECYCLE, create, destroy, wait_settled, wait_state

N = 200
PER_LIFECYCLE = len(METERED_LIFECYCLE)
ESTIMATE = 30  # saas-stub small: 0.05 credits/s for the 600 s default TTL


async def test_200_concurrent_lifecycles(api: RunningService, nc: NatsClient) -> None:
    http, url = api.http, api.url
    async with http.post(
        f"{url}/v1/accounts/default/credits", json={"amount": N * ESTIMATE}
    ) as resp:
        assert resp.status == 201
    made = await asyncio.gather(*(create(http, url) for _ in range(N)))
    ids = [m["id"] for m in made]
    assert len(set(ids)) == N
    await asyncio.gather(*(wait_state(http, url, i, {"ready"}, timeout=120) for i in ids))
    await asyncio.gather(*(destroy(http, url, i) for i in ids))
    await asyncio.gather(*(wait_state(http, url, i, {"destroyed"}, timeout=120) for i in ids))

    info = await nc.jetstream().stream_info("SANDBOXER", subjects_filter="sandboxer.sandbox.>")
    subjects = info.state.subjects or {}
    assert sum(subjects.values()) == N * PER_LIFECYCLE
    assert len(subjects) == N * PER_LIFECYCLE
    assert set(subjects.values()) == {1}, "every lifecycle event exactly once"
    for sandbox_id in ids:
        for event_type in METERED_LIFECYCLE:
            assert f"sandboxer.sandbox.{sandbox_id}.{event_type}" in subjects
    async with http.post(f"{url}/v1/replay") as resp:
        report = await resp.json()
    assert report["equal"] is True and report["sandboxes"] == N

    # Every reservation was settled exactly once, and the ledger audit holds.
    await wait_settled(http, url, "default")
    ledger = await nc.jetstream().stream_info("SANDBOXER", subjects_filter="sandboxer.ledger.>")
    counts = ledger.state.subjects or {}
    for event_type in ("CreditsReserved", "CreditsDebited", "CreditsReleased"):
        assert counts[f"sandboxer.ledger.default.{event_type}"] == N
    async with http.post(f"{url}/v1/ledger/audit") as resp:
        audit = await resp.json()
    assert audit["ok"] is True, audit["violations"]
    assert len(audit["debits"]) == N
