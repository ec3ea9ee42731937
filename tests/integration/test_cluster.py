"""Two workers on a real three-node JetStream cluster; one worker and one node SIGKILLed
mid-run. Every sandbox must end, no event may be lost or doubled, the ledger must balance.

Sizes come from the environment so docs/reliability.md can quote a longer run of the
same test: SANDBOXER_CLUSTER_SANDBOXES (default 100).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest

from events import CreditsDebited
from sandboxer.store.event_store import JetStreamEventStore
from tests.helpers import TERMINAL, audit, grant, wait_settled
from tests.infra import NatsCluster, ServeProcess, free_port

SANDBOXES = int(os.environ.get("SANDBOXER_CLUSTER_SANDBOXES", "100"))
LEASE_TTL = 10.0  # the default: longer than a JetStream leader election
RETRYABLE = {502, 503}


class Client:
    """Talks to whichever API node still answers, as a load balancer would."""

    def __init__(self, http: aiohttp.ClientSession, urls: list[str]) -> None:
        self.http = http
        self.urls = urls
        self.retries = 0

    async def call(
        self, method: str, path: str, *, prefer: int = 0, ok: set[int], **kw: Any
    ) -> tuple[int, dict[str, Any]]:
        async with asyncio.timeout(90):
            attempt = 0
            while True:
                url = self.urls[(prefer + attempt) % len(self.urls)]
                attempt += 1
                try:
                    async with self.http.request(method, f"{url}{path}", **kw) as resp:
                        body: dict[str, Any] = await resp.json()
                        if resp.status in ok:
                            return resp.status, body
                        assert resp.status in RETRYABLE or resp.status == 409, (resp.status, body)
                        if resp.status == 409:
                            return resp.status, body
                except (aiohttp.ClientConnectionError, TimeoutError):
                    pass
                self.retries += 1
                await asyncio.sleep(0.2)  # back-off between retries, under the deadline


async def lifecycle(client: Client, index: int, created: asyncio.Queue[str]) -> str:
    # Retried on another node after a lost answer: the key makes it the same sandbox.
    _, sbx = await client.call(
        "POST",
        "/v1/sandboxes",
        prefer=index,
        ok={200, 202},
        json={"profile": "profile.saas-stub"},
        headers={"Idempotency-Key": f"cluster-test-{index}"},
    )
    sandbox_id = str(sbx["id"])
    created.put_nowait(sandbox_id)
    seq = int(sbx["last_seq"])  # another node answers once it has seen the create

    async def until(states: set[str]) -> str:
        """Long-poll the sandbox until it is in one of `states` or finished."""
        nonlocal seq
        while True:
            _, view = await client.call(
                "GET",
                f"/v1/sandboxes/{sandbox_id}",
                prefer=index,
                ok={200},
                params={"wait": "5", "after_seq": str(seq)},
            )
            seq = view["last_seq"]
            if view["state"] in states | TERMINAL:
                return str(view["state"])

    async with asyncio.timeout(120):
        state = await until({"ready"})
        if state in TERMINAL:
            return state
        await client.call("DELETE", f"/v1/sandboxes/{sandbox_id}", prefer=index, ok={202})
        return await until(TERMINAL)


@pytest.mark.timeout(600)
async def test_workers_survive_a_killed_worker_and_a_killed_node(tmp_path: Path) -> None:
    vendor = tmp_path / "vendor"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        cluster = NatsCluster(tmp_path / "nats")
        workers: list[ServeProcess] = []
        try:
            await cluster.start(http)
            env = {
                "SANDBOXER_NATS_URL": cluster.urls,
                "SANDBOXER_STREAM_REPLICAS": "3",
                "SANDBOXER_LEASE_TTL": str(LEASE_TTL),
                "SANDBOXER_SAAS_STUB_LATENCY_MS": "100",
                "SANDBOXER_SAAS_STUB_STATE_DIR": str(vendor),
                "SANDBOXER_STARTER_CREDITS": "0",
            }
            for name in ("wa", "wb"):
                worker = ServeProcess(tmp_path / name, free_port(), "--worker-name", name, **env)
                workers.append(worker)
                await worker.wait_healthy(http)
            wa, wb = workers
            await grant(http, wa.url, "default", 1_000_000)

            client = Client(http, [wa.url, wb.url])
            created: asyncio.Queue[str] = asyncio.Queue()
            runs = [asyncio.create_task(lifecycle(client, i, created)) for i in range(SANDBOXES)]
            async with asyncio.timeout(120):  # faults land mid-run: half the creates done
                for _ in range(SANDBOXES // 2):
                    await created.get()
            wb.kill()
            cluster.nodes[1].kill()
            client.urls = [wa.url]
            ends = await asyncio.gather(*runs)
            assert set(ends) <= TERMINAL
            assert Counter(ends)["destroyed"] >= SANDBOXES // 2, Counter(ends)

            # The ledger balances (reserved = debited + released per sandbox, nothing open);
            # a gone worker's unsettled ends are settled by the survivor's sweep.
            try:
                await wait_settled(http, wa.url, "default", timeout=60)
            except TimeoutError:
                _, account = await client.call("GET", "/v1/accounts/default", ok={200})
                stuck = {}
                for sandbox_id in list(account["open_reservations"])[:5]:
                    _, history = await client.call(
                        "GET", f"/v1/sandboxes/{sandbox_id}/events", ok={200}
                    )
                    _, view = await client.call("GET", f"/v1/sandboxes/{sandbox_id}", ok={200})
                    types = [e["event"]["type"] for e in history["events"]]
                    stuck[sandbox_id] = [view["state"], view["last_seq"], *types]
                raise AssertionError(f"reservations left open: {stuck}") from None
            report = await audit(http, wa.url)
            assert report["ok"], report

            # The stream itself: no event twice, every sandbox's history is whole.
            nc = await nats.connect(servers=cluster.urls.split(","))
            try:
                store = JetStreamEventStore(nc)
                events = [r async for r in store.read(1)]
            finally:
                await nc.close()
            ids = Counter(r.event.event_id for r in events)
            assert [i for i, n in ids.items() if n > 1] == []
            by_sandbox: dict[str, list[str]] = {}
            debits: Counter[str] = Counter()
            for r in events:
                if r.subject.startswith("sandboxer.sandbox."):
                    by_sandbox.setdefault(r.event.aggregate_id, []).append(r.event.type_name())
                if isinstance(r.event, CreditsDebited):
                    debits[r.event.sandbox_id] += 1
            assert len(by_sandbox) == SANDBOXES
            for sandbox_id, types in by_sandbox.items():
                assert types[0] == "SandboxRequested", (sandbox_id, types)
                assert types[-1] in ("TornDown", "SandboxRejected"), (sandbox_id, types)
            assert max(debits.values(), default=0) <= 1
            # Nothing left billing at the vendor: every instance file was torn down, and
            # the reconciliation sweep agrees.
            assert sorted(p.name for p in vendor.glob("*.json")) == []
            _, sweep = await client.call("POST", "/v1/reconcile", ok={200})
            assert sweep["orphans"] == [] and sweep["errors"] == {}, sweep

            figures = {
                "sandboxes": SANDBOXES,
                "ends": dict(Counter(ends)),
                "events": len(events),
                "duplicated_events": 0,
                "duplicated_debits": 0,
                "client_retries": client.retries,
                "orphans_left": len(sweep["orphans"]),
                "faults": ["SIGKILL worker wb", "SIGKILL nats node n2"],
            }
            print("cluster figures:", json.dumps(figures, sort_keys=True))
        finally:
            for worker in workers:
                if worker.proc.poll() is None:
                    worker.terminate()
            cluster.stop()
