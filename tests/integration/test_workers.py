"""Several workers on one stream: leases, forwarded commands, adoption, idempotent create."""

from __future__ import annotations

import json

import nats
import pytest
from nats.js.errors import KeyNotFoundError

from sandboxer.config import Settings, SettingsError
from sandboxer.store.leases import LEASES_BUCKET
from sandboxer.store.nats_server import EmbeddedNats
from tests.conftest import RunningService, StartService
from tests.helpers import METERED_LIFECYCLE, create, event_types, wait_state


async def lease_holder(server: EmbeddedNats, sandbox_id: str) -> str | None:
    nc = await nats.connect(**server.connect_options())
    try:
        kv = await nc.jetstream().key_value(LEASES_BUCKET)
        try:
            entry = await kv.get(sandbox_id)
        except KeyNotFoundError:
            return None
        return (entry.value or b"").decode()
    finally:
        await nc.close()


async def two_workers(start_service: StartService, tmp_path: object) -> list[RunningService]:
    return [
        await start_service(
            SANDBOXER_DATA_DIR=f"{tmp_path}/{name}",
            SANDBOXER_WORKER_NAME=name,
            SANDBOXER_LEASE_TTL="2",
            SANDBOXER_SAAS_STUB_LATENCY_MS="50",
        )
        for name in ("wa", "wb")
    ]


async def test_a_command_sent_to_another_node_runs_on_the_owner(
    start_service: StartService, nats_server: EmbeddedNats, tmp_path: object
) -> None:
    a, b = await two_workers(start_service, tmp_path)
    sandbox_id = (await create(a.http, a.url))["id"]
    holder = await lease_holder(nats_server, sandbox_id)
    assert holder is not None and holder.startswith("wa/")
    await wait_state(a.http, b.url, sandbox_id, {"ready"})
    assert b.service.manager is not None and sandbox_id in b.service.manager.foreign

    async with b.http.delete(f"{b.url}/v1/sandboxes/{sandbox_id}") as r:
        assert r.status == 202, await r.json()
    done = await wait_state(a.http, b.url, sandbox_id, {"destroyed"})
    assert done["state"] == "destroyed"
    # The owner drove the teardown; B never took the sandbox.
    assert await event_types(a.http, a.url, sandbox_id) == METERED_LIFECYCLE
    assert b.service.manager is not None and sandbox_id not in b.service.manager.sandboxes
    # A finished sandbox holds no lease.
    assert await lease_holder(nats_server, sandbox_id) is None


async def test_a_stopped_workers_sandbox_is_adopted_by_the_next_command(
    start_service: StartService, nats_server: EmbeddedNats, tmp_path: object
) -> None:
    a, b = await two_workers(start_service, tmp_path)
    sandbox_id = (await create(a.http, a.url))["id"]
    await wait_state(a.http, b.url, sandbox_id, {"ready"})
    await a.stop()  # leaves the cluster: its session key is deleted, its leases are free

    async with b.http.delete(f"{b.url}/v1/sandboxes/{sandbox_id}") as r:
        assert r.status == 202, await r.json()
    await wait_state(b.http, b.url, sandbox_id, {"destroyed"})
    holder = await lease_holder(nats_server, sandbox_id)
    assert holder is None  # B adopted it, finished it and let the lease go


async def test_an_idempotency_key_names_one_sandbox(api: RunningService) -> None:
    body = {"profile": "profile.saas-stub"}
    headers = {"Idempotency-Key": "deploy-42:attempt"}
    async with api.http.post(f"{api.url}/v1/sandboxes", json=body, headers=headers) as r:
        first = await r.json()
        assert r.status == 202, first
    async with api.http.post(f"{api.url}/v1/sandboxes", json=body, headers=headers) as r:
        again = await r.json()
        assert r.status == 200, again
    assert again["id"] == first["id"]
    async with api.http.get(f"{api.url}/v1/sandboxes") as r:
        listed = await r.json()
    assert [s["id"] for s in listed["sandboxes"]] == [first["id"]]

    async with api.http.post(
        f"{api.url}/v1/sandboxes", json=body, headers={"Idempotency-Key": "no spaces; here"}
    ) as r:
        error = await r.json()
        assert r.status == 400, error
    assert error["error"]["field"] == "Idempotency-Key"


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("SANDBOXER_STREAM_REPLICAS", "two", "must be 1, 3 or 5, got 'two'"),
        ("SANDBOXER_STREAM_REPLICAS", "2", "must be 1, 3 or 5, got '2'"),
        ("SANDBOXER_STARTER_CREDITS", "-5", "must be a whole number >= 0"),
        ("SANDBOXER_CHECKPOINT_STORE", "s3", "must be 'jetstream' or 'fs', got 's3'"),
        ("SANDBOXER_LEASE_TTL", "0.5", "must be seconds between 1 and 600, got '0.5'"),
        ("SANDBOXER_LEASE_TTL", "soon", "must be seconds between 1 and 600"),
        ("SANDBOXER_WORKER_NAME", "a b", "use 1-64 letters, digits"),
        ("SANDBOXER_RECONCILE", "delete", "must be 'report', 'off' or 'remove'"),
        ("SANDBOXER_RECONCILE_INTERVAL", "-1", "must be seconds >= 0"),
    ],
)
def test_bad_settings_name_the_variable_and_the_problem(name: str, value: str, says: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({name: value})
    assert name in str(raised.value) and says in str(raised.value)


def test_settings_defaults_for_workers_and_reconciliation() -> None:
    settings = Settings.from_env({})
    assert (settings.lease_ttl, settings.reconcile, settings.reconcile_interval) == (
        10.0,
        "report",
        300.0,
    )
    assert Settings.from_env({}, worker_name="w-1").worker_name == "w-1"


async def test_exec_on_a_worker_that_does_not_drive_the_sandbox(
    start_service: StartService, nats_server: EmbeddedNats, tmp_path: object
) -> None:
    """The command runs where the caller is; its start and end are recorded by the
    driving worker (forwarded through the bus), in order with its other events."""
    vendor = f"{tmp_path}/vendor"  # one vendor for both workers, as a real SaaS is
    a, b = [
        await start_service(
            SANDBOXER_DATA_DIR=f"{tmp_path}/{name}",
            SANDBOXER_WORKER_NAME=name,
            SANDBOXER_SAAS_STUB_STATE_DIR=vendor,
        )
        for name in ("wa", "wb")
    ]
    sandbox_id = (await create(a.http, a.url))["id"]
    await wait_state(b.http, b.url, sandbox_id, {"ready"})
    assert b.service.manager is not None and sandbox_id in b.service.manager.foreign
    async with b.http.post(
        f"{b.url}/v1/sandboxes/{sandbox_id}/exec", json={"argv": ["echo", "from b"]}
    ) as resp:
        assert resp.status == 200
        frames = [json.loads(line) async for line in resp.content if line.strip()]
    assert frames[-1]["exit_code"] == 0 and frames[-1]["seq"] > frames[0]["seq"] > 0
    assert "".join(f["data"] for f in frames if f["type"] == "stdout") == "from b\n"
    types = await event_types(a.http, a.url, sandbox_id)
    assert types[-2:] == ["CommandStarted", "CommandFinished"]
    assert b.service.manager is not None and sandbox_id not in b.service.manager.sandboxes
