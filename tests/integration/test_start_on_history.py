"""A worker that starts on (or is handed) a large history keeps its lease: the fold
never starves its event loop. A second worker watches its session key the whole
time and adopts nothing."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import nats
import nats.js.errors
from nats.aio.client import Client as NatsClient

from events import (
    BecameReady,
    CreditsGranted,
    DestroyRequested,
    Event,
    EventMeta,
    Provisioned,
    RouteChosen,
    SandboxRequested,
    TornDown,
    envelope,
)
from events.codec import default_codec
from events.subjects import subject_for
from sandboxer.bootstrap import Service
from sandboxer.config import Settings
from sandboxer.store.event_store import JetStreamEventStore
from sandboxer.store.leases import LEASES_BUCKET, WORKERS_BUCKET
from sandboxer.store.nats_server import EmbeddedNats
from tests.helpers import create, wait_state
from tests.infra import ServeProcess, free_port

META = EventMeta(actor="history", correlation_id="history")
LIFECYCLES = 25_000  # 150,000 events: seconds of folding, with a lease TTL of 1 s
TAIL_GRANTS = 60_000


def lifecycle(index: int) -> list[Event]:
    sid = f"sbx-h{index:010d}"
    return [
        SandboxRequested(
            **envelope(sid, META),
            profile="profile.saas-stub",
            extension="saas-stub",
            inputs={},
            ttl_seconds=600,
        ),
        RouteChosen(**envelope(sid, META), extension="saas-stub", reason="history"),
        Provisioned(**envelope(sid, META), handle={"instance": sid}),
        BecameReady(**envelope(sid, META), services=["instance"]),
        DestroyRequested(**envelope(sid, META), reason="user"),
        TornDown(**envelope(sid, META)),
    ]


def grants(count: int) -> Iterator[Event]:
    for i in range(count):
        yield CreditsGranted(**envelope("tail", META, f"tail-{i}"), amount=1, reason="tail")


async def publish_raw(store: JetStreamEventStore, events: Iterator[Event], window: int) -> None:
    """History as data: core publishes straight to the stream, in order on one
    connection, at most `window` of them not yet stored; then wait until the stream
    holds them all. The window stands in for the acks of real appends: a flood of
    unacknowledged publishes, each synced to disk, keeps the server from delivering
    to consumers or answering anyone for seconds, which is not what is tested here."""
    codec = default_codec()
    nc = store.nc
    expected = await store.last_seq()
    for event in events:
        await nc.publish(subject_for(event), codec.encode(event))
        expected += 1
        if expected % window == 0:
            await stored(store, expected - window)
    await stored(store, expected)


async def stored(store: JetStreamEventStore, count: int) -> None:
    await store.nc.flush(timeout=30)
    async with asyncio.timeout(120):
        while await store.last_seq() < count:
            await asyncio.sleep(0.02)


def history(count: int) -> Iterator[Event]:
    for i in range(count):
        yield from lifecycle(i)


async def session(nc: NatsClient, worker: str) -> str | None:
    kv = await nc.jetstream().key_value(WORKERS_BUCKET)
    try:
        entry = await kv.get(worker)
    except nats.js.errors.KeyNotFoundError:
        return None
    return (entry.value or b"").decode()


async def test_a_worker_on_a_large_history_keeps_its_lease_and_the_other_adopts_nothing(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    nc = await nats.connect(**nats_server.connect_options())
    store = JetStreamEventStore(nc)
    await store.ensure_stream()
    await publish_raw(store, history(LIFECYCLES), window=20_000)
    env = {
        **os.environ,
        "SANDBOXER_NATS_URL": nats_server.service_url,
        "SANDBOXER_LEASE_TTL": "1",
    }
    watcher = Service(
        Settings.from_env(
            {**env, "SANDBOXER_DATA_DIR": str(tmp_path / "watcher")}, worker_name="watcher"
        )
    )
    await watcher.start()
    starter = ServeProcess(
        tmp_path / "starter",
        free_port(),
        SANDBOXER_NATS_URL=nats_server.service_url,
        SANDBOXER_LEASE_TTL="1",
        SANDBOXER_WORKER_NAME="starter",
    )
    http = aiohttp.ClientSession()
    try:
        # While it starts: its session key, once written, never goes or changes.
        sessions: list[str | None] = []
        async with asyncio.timeout(120):
            while True:
                sessions.append(await session(nc, "starter"))
                assert starter.proc.poll() is None, starter.output()
                try:
                    async with http.get(f"{starter.url}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)  # sampling the key, under a deadline
        first = next(i for i, s in enumerate(sessions) if s is not None)
        assert first < len(sessions) - 1, "the session was written only once started"
        assert len(set(sessions[first:])) == 1, (sessions[first:], starter.output())
        assert sessions[-1] == await session(nc, "starter")

        # It drives a sandbox; then a long tail arrives while it runs.
        made = await create(http, starter.url)
        await wait_state(http, starter.url, made["id"], {"ready"})
        tail = asyncio.create_task(publish_raw(store, grants(TAIL_GRANTS), window=1_000))
        async with asyncio.timeout(180):
            while True:
                async with asyncio.timeout(2):  # health answers throughout
                    async with http.get(f"{starter.url}/healthz") as resp:
                        assert resp.status == 200
                assert await session(nc, "starter") == sessions[-1], starter.output()
                async with http.get(f"{starter.url}/v1/accounts/tail") as resp:
                    granted = (await resp.json()).get("granted") if resp.status == 200 else 0
                if tail.done() and granted == TAIL_GRANTS:
                    break
                await asyncio.sleep(0.1)  # sampling, under a deadline
        await tail

        output = starter.output()
        for lapse in ("could not renew", "session expired", "giving up every lease"):
            assert lapse not in output, output
        leases = await nc.jetstream().key_value(LEASES_BUCKET)
        lease = await leases.get(made["id"])
        assert (lease.value or b"").decode().startswith("starter/")
        assert watcher.manager is not None and watcher.manager.sandboxes == {}
        assert await session(nc, "watcher") is not None
    finally:
        await http.close()
        starter.terminate()
        await watcher.stop()
        await nc.close()
