"""Creates and destroys that race, against real `sandboxer serve` processes over HTTP.

Outside testing found: two creates with one Idempotency-Key at once answered 202 and
500 and left a sandbox nobody could delete; concurrent DELETEs on two nodes answered
"is new"; and `ledger audit` said ok while a reservation stayed open past its TTL.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from sandboxer.store.nats_server import EmbeddedNats
from tests.helpers import TERMINAL
from tests.infra import ServeProcess, free_port

ADMIN = "admin-token-0123456789abcdef"
MEMBER = "member-token-0123456789abcdef"
TOKENS = yaml.safe_dump(
    [
        {"name": "ops", "token": ADMIN, "account": "default", "role": "admin"},
        {"name": "acme-ci", "token": MEMBER, "account": "acme"},
    ]
)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Node:
    def __init__(self, proc: ServeProcess, http: aiohttp.ClientSession) -> None:
        self.proc = proc
        self.url = proc.url
        self.http = http

    async def call(
        self, method: str, path: str, token: str = MEMBER, **kw: Any
    ) -> tuple[int, dict[str, Any]]:
        headers = {**auth(token), **kw.pop("headers", {})}
        async with self.http.request(method, f"{self.url}{path}", headers=headers, **kw) as r:
            return r.status, await r.json()

    async def wait_state(self, sandbox_id: str, states: set[str]) -> dict[str, Any]:
        seq = 0
        async with asyncio.timeout(60):
            while True:
                params = {"wait": "10", "after_seq": str(seq)}
                status, view = await self.call("GET", f"/v1/sandboxes/{sandbox_id}", params=params)
                assert status == 200, view
                if view["state"] in states:
                    return view
                assert view["state"] not in TERMINAL, view
                seq = view["last_seq"]

    async def wait_settled(self, sandbox_id: str, account: str = "acme") -> None:
        """Until the sandbox's reservation is released (settlement follows the end:
        a debit, then the release of the rest)."""
        after = 0
        async with asyncio.timeout(30):
            while True:
                params = {"wait": "10", "after_seq": str(after)}
                status, view = await self.call("GET", f"/v1/accounts/{account}", params=params)
                assert status == 200, view
                status, page = await self.call("GET", f"/v1/accounts/{account}/ledger")
                if any(
                    e["event"]["type"] == "CreditsReleased"
                    and e["event"]["sandbox_id"] == sandbox_id
                    for e in page["entries"]
                ):
                    return
                after = view["last_seq"]


@pytest.fixture
async def nodes(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[list[Node]]:
    """Two serve processes on one JetStream, with tokens (a member acts for `acme`)."""
    env = {
        "SANDBOXER_NATS_URL": nats_server.service_url,
        "SANDBOXER_TOKENS": TOKENS,
        "SANDBOXER_LEASE_TTL": "30",  # a stopped node keeps its leases through a test
        "SANDBOXER_RECONCILE": "off",
    }
    procs = [ServeProcess(tmp_path / f"node{i}", free_port(), **env) for i in range(2)]
    async with aiohttp.ClientSession() as http:
        try:
            for proc in procs:
                await proc.wait_healthy(http)
            first = Node(procs[0], http)
            status, body = await first.call(
                "POST", "/v1/accounts/acme/credits", ADMIN, json={"amount": 1000}
            )
            assert status == 201, body
            yield [Node(p, http) for p in procs]
        finally:
            for proc in procs:
                if proc.proc.poll() is None:
                    os.kill(proc.proc.pid, signal.SIGCONT)
                    proc.kill()


async def racing_creates(
    nodes: list[Node], key: str, count: int, **body: Any
) -> list[tuple[int, dict[str, Any]]]:
    body.setdefault("profile", "profile.saas-stub")
    headers = {"Idempotency-Key": key}
    return await asyncio.gather(
        *(
            nodes[i % len(nodes)].call("POST", "/v1/sandboxes", json=body, headers=headers)
            for i in range(count)
        )
    )


async def sandboxes_requested(node: Node, sandbox_id: str) -> int:
    status, body = await node.call("GET", f"/v1/sandboxes/{sandbox_id}/events")
    assert status == 200, body
    return sum(e["event"]["type"] == "SandboxRequested" for e in body["events"])


async def test_creates_with_one_key_at_once_make_one_sandbox_on_one_node(
    nodes: list[Node],
) -> None:
    node = nodes[0]
    for round_ in range(3):
        answers = await racing_creates([node], f"race-one-node-{round_}", 8)
        statuses = sorted(status for status, _ in answers)
        assert statuses == [200] * 7 + [202], answers
        ids = {body["id"] for _, body in answers}
        assert len(ids) == 1, answers
        (sandbox_id,) = ids
        assert await sandboxes_requested(node, sandbox_id) == 1
        await node.wait_state(sandbox_id, {"ready"})
        status, body = await node.call("DELETE", f"/v1/sandboxes/{sandbox_id}")
        assert status == 202, body
        await node.wait_state(sandbox_id, {"destroyed"})
        await node.wait_settled(sandbox_id)
    status, report = await node.call("POST", "/v1/ledger/audit", ADMIN, params={"ttl_grace": "0"})
    assert status == 200 and report["ok"], report["violations"]
    assert "Task exception was never retrieved" not in node.proc.output()


async def test_creates_with_one_key_on_two_nodes_then_racing_deletes(nodes: list[Node]) -> None:
    answers = await racing_creates(nodes, "race-two-nodes", 30)
    assert all(status in (200, 202) for status, _ in answers), answers
    assert sum(status == 202 for status, _ in answers) == 1, answers
    ids = {body["id"] for _, body in answers}
    assert len(ids) == 1, answers
    (sandbox_id,) = ids
    assert await sandboxes_requested(nodes[1], sandbox_id) == 1
    await nodes[1].wait_state(sandbox_id, {"ready"})

    deletes = await asyncio.gather(
        *(nodes[i % 2].call("DELETE", f"/v1/sandboxes/{sandbox_id}") for i in range(10))
    )
    for status, body in deletes:
        if status == 202:
            assert body["state"] in ("tearing_down", "destroyed"), body
        else:
            # What is true: it is finished already (never "new", never a 500).
            assert status == 409, body
            assert "already destroyed" in body["error"]["message"], body
    assert any(status == 202 for status, _ in deletes), deletes
    for node in nodes:
        await node.wait_state(sandbox_id, {"destroyed"})
        await node.wait_settled(sandbox_id)
    status, events = await nodes[0].call("GET", f"/v1/sandboxes/{sandbox_id}/events")
    types = [e["event"]["type"] for e in events["events"]]
    assert types.count("DestroyRequested") == 1 and types.count("TornDown") == 1, types
    status, report = await nodes[0].call("POST", "/v1/ledger/audit", ADMIN)
    assert report["ok"], report["violations"]
    assert report["accounts"]["acme"]["reserved"] == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"inputs": {"size": "large"}}, "inputs.size"),
        ({"ttl_seconds": 60}, "ttl_seconds"),
        ({"inputs": {"api_key": "s3cr3t-value"}}, "inputs.api_key"),
    ],
)
async def test_the_same_key_with_another_request_is_refused(
    nodes: list[Node], body: dict[str, Any], field: str
) -> None:
    first = await racing_creates(nodes[:1], "reused-key", 1, inputs={"size": "small"})
    assert first[0][0] == 202, first
    sandbox_id = first[0][1]["id"]
    for node in nodes:
        (answer,) = await racing_creates([node], "reused-key", 1, **body)
        status, error = answer
        assert status == 422, error
        assert error["error"]["code"] == "idempotency_mismatch"
        assert error["error"]["field"] == field
        assert sandbox_id in error["error"]["message"]
        assert "s3cr3t" not in error["error"]["message"]
    # The same request again is still a retry of the first.
    (again,) = await racing_creates(nodes[1:], "reused-key", 1, inputs={"size": "small"})
    assert again == (200, again[1]) and again[1]["id"] == sandbox_id
    status, listed = await nodes[0].call("GET", "/v1/sandboxes")
    assert [s["id"] for s in listed["sandboxes"]] == [sandbox_id]


async def test_audit_flags_a_reservation_open_past_its_ttl(nodes: list[Node]) -> None:
    """A worker that stops (here: SIGSTOP) after ready holds its sandbox past the TTL;
    the other node's audit says so, and is ok again once the sandbox is reaped."""
    driver, auditor = nodes
    status, made = await driver.call(
        "POST", "/v1/sandboxes", json={"profile": "profile.saas-stub", "ttl_seconds": 2}
    )
    assert status == 202, made
    sandbox_id = made["id"]
    await auditor.wait_state(sandbox_id, {"ready"})
    os.kill(driver.proc.proc.pid, signal.SIGSTOP)
    try:
        async with asyncio.timeout(30):
            while True:
                status, report = await auditor.call(
                    "POST", "/v1/ledger/audit", ADMIN, params={"ttl_grace": "1"}
                )
                assert status == 200, report
                if not report["ok"]:
                    break
                await asyncio.sleep(0.2)  # polling a condition (the clock), under a deadline
        (violation,) = report["violations"]
        assert sandbox_id in violation and "after its TTL ended" in violation, violation
        # Within the default grace it is not (yet) a violation.
        status, lenient = await auditor.call("POST", "/v1/ledger/audit", ADMIN)
        assert lenient["ok"], lenient["violations"]
    finally:
        os.kill(driver.proc.proc.pid, signal.SIGCONT)
    await auditor.wait_state(sandbox_id, {"destroyed"})
    await auditor.wait_settled(sandbox_id)
    status, report = await auditor.call(
        "POST", "/v1/ledger/audit", ADMIN, params={"ttl_grace": "1"}
    )
    assert report["ok"], report["violations"]
