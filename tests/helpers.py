"""Waiting on the service's own signals (long-polls) with deadlines: never bare sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import aiohttp

TERMINAL = {"destroyed", "failed", "rejected"}
# A metered (saas-stub) sandbox's whole life: the credit hold sits between the route
# and provisioning.
METERED_LIFECYCLE = [
    "SandboxRequested",
    "RouteChosen",
    "CreditsHeld",
    "Provisioned",
    "BecameReady",
    "DestroyRequested",
    "TornDown",
]


async def create(http: aiohttp.ClientSession, url: str, **body: Any) -> dict[str, Any]:
    body.setdefault("profile", "profile.saas-stub")
    async with http.post(f"{url}/v1/sandboxes", json=body) as resp:
        data: dict[str, Any] = await resp.json()
        assert resp.status == 202, data
        return data


async def destroy(http: aiohttp.ClientSession, url: str, sandbox_id: str) -> dict[str, Any]:
    async with http.delete(f"{url}/v1/sandboxes/{sandbox_id}") as resp:
        data: dict[str, Any] = await resp.json()
        assert resp.status == 202, data
        return data


async def get(http: aiohttp.ClientSession, url: str, sandbox_id: str) -> dict[str, Any]:
    async with http.get(f"{url}/v1/sandboxes/{sandbox_id}") as resp:
        data: dict[str, Any] = await resp.json()
        assert resp.status == 200, data
        return data


async def wait_state(
    http: aiohttp.ClientSession,
    url: str,
    sandbox_id: str,
    states: Iterable[str],
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Long-poll the sandbox until it is in one of `states` (fails fast on a wrong terminal)."""
    wanted = set(states)
    seq = 0
    async with asyncio.timeout(timeout):
        while True:
            async with http.get(
                f"{url}/v1/sandboxes/{sandbox_id}", params={"wait": "10", "after_seq": str(seq)}
            ) as resp:
                data: dict[str, Any] = await resp.json()
                assert resp.status == 200, data
            if data["state"] in wanted:
                return data
            if data["state"] in TERMINAL:
                raise AssertionError(f"{sandbox_id} ended {data['state']}: {data['reason']}")
            seq = data["last_seq"]


async def event_types(http: aiohttp.ClientSession, url: str, sandbox_id: str) -> list[str]:
    async with http.get(f"{url}/v1/sandboxes/{sandbox_id}/events") as resp:
        data = await resp.json()
        assert resp.status == 200, data
    return [e["event"]["type"] for e in data["events"]]


async def grant(http: aiohttp.ClientSession, url: str, account: str, amount: int) -> dict[str, Any]:
    async with http.post(f"{url}/v1/accounts/{account}/credits", json={"amount": amount}) as r:
        data: dict[str, Any] = await r.json()
        assert r.status == 201, data
        return data


async def audit(
    http: aiohttp.ClientSession, url: str, account: str | None = None
) -> dict[str, Any]:
    params = {"account": account} if account else {}
    async with http.post(f"{url}/v1/ledger/audit", params=params) as resp:
        data: dict[str, Any] = await resp.json()
        assert resp.status == 200, data
        return data


async def wait_settled(
    http: aiohttp.ClientSession, url: str, account: str, timeout: float = 30.0
) -> dict[str, Any]:
    """Long-poll the account until no reservation is open (settlement follows the end)."""
    seq = 0
    async with asyncio.timeout(timeout):
        while True:
            async with http.get(
                f"{url}/v1/accounts/{account}", params={"wait": "10", "after_seq": str(seq)}
            ) as resp:
                data: dict[str, Any] = await resp.json()
                assert resp.status == 200, data
            if not data["open_reservations"]:
                return data
            seq = data["last_seq"]
