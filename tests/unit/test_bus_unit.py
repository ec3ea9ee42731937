"""Command handlers on the in-memory recorder: the manager, the ledger book, the
projection runner and the bus without a NATS server, so a decision's rules are
tested in milliseconds.

The end-to-end tests (real nats-server, real serve) stay; these pin the handlers'
decisions on their own: what each command records, in which order, and what it
refuses.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from events import EventMeta
from extensions import ExtensionRegistry, RuntimeInfo
from sandboxer.app.bus import MessageBus
from sandboxer.app.commands import (
    CreateSandbox,
    DeleteCheckpoint,
    DestroySandbox,
    GrantCredits,
    RequestCheckpoint,
)
from sandboxer.app.lifecycle import InvalidTransition
from sandboxer.app.manager import IdempotencyMismatch, SandboxManager
from sandboxer.app.read_model import ProjectionRunner
from sandboxer.profiles import ProfileCatalog, ProfileError
from sandboxer.store.leases import SingleWorkerLeases
from sandboxer.store.memory_store import InMemoryEventStore
from sandboxer.store.snapshots import FileSnapshotStore

META = EventMeta(actor="test", correlation_id="req-1")


@dataclass
class Rig:
    store: InMemoryEventStore
    manager: SandboxManager
    bus: MessageBus

    async def types(self, aggregate_id: str) -> list[str]:
        return [
            r.event.type_name()
            async for r in self.store.read(1)
            if r.event.aggregate_id == aggregate_id
        ]

    async def until(self, aggregate_id: str, event_type: str) -> None:
        """Until the aggregate has an event of `event_type` (a condition, a deadline)."""
        async with asyncio.timeout(10):
            async for recorded in self.store.follow(1):
                event = recorded.event
                if event.aggregate_id == aggregate_id and event.type_name() == event_type:
                    return


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    store = InMemoryEventStore()
    environ = {"SANDBOXER_SAAS_STUB_STATE_DIR": str(tmp_path / "vendor")}
    registry = ExtensionRegistry.discover(
        RuntimeInfo(tmp_path), entry_points=False, environ=environ
    )
    runner = ProjectionRunner(store)
    await runner.start()
    manager = SandboxManager(
        store,
        registry,
        ProfileCatalog.from_env({}),
        snapshots=FileSnapshotStore(tmp_path / "checkpoints"),
        spool_dir=tmp_path / "spool",
        leases=SingleWorkerLeases(),
        runner=runner,
        starter_credits=100,
    )
    await manager.start()
    try:
        yield Rig(store, manager, MessageBus(manager))
    finally:
        await manager.close()
        await registry.close()
        await runner.stop()


async def test_create_then_destroy_records_the_metered_lifecycle(rig: Rig) -> None:
    done = await rig.bus.handle(CreateSandbox(profile="profile.saas-stub", meta=META))
    assert done.sandbox_id is not None and done.seq > 0
    await rig.until(done.sandbox_id, "BecameReady")
    await rig.bus.handle(DestroySandbox(sandbox_id=done.sandbox_id, meta=META))
    await rig.until(done.sandbox_id, "TornDown")
    assert await rig.types(done.sandbox_id) == [
        "SandboxRequested",
        "RouteChosen",
        "CreditsHeld",
        "Provisioned",
        "BecameReady",
        "DestroyRequested",
        "TornDown",
    ]
    await rig.until("default", "CreditsReleased")
    assert await rig.types("default") == [
        "CreditsGranted",
        "CreditsReserved",
        "CreditsDebited",
        "CreditsReleased",
    ]


async def test_a_retry_with_another_request_is_refused(rig: Rig) -> None:
    first = CreateSandbox(profile="profile.saas-stub", sandbox_id="sbx-key000001", meta=META)
    await rig.bus.handle(first)
    again = CreateSandbox(
        profile="profile.saas-stub",
        inputs={"size": "large"},
        sandbox_id="sbx-key000001",
        meta=META,
    )
    with pytest.raises(IdempotencyMismatch) as raised:
        await rig.bus.check_retry("sbx-key000001", again)
    assert raised.value.field == "inputs.size"
    await rig.bus.check_retry("sbx-key000001", first)  # the same request: a retry


async def test_bad_commands_record_nothing(rig: Rig) -> None:
    before = await rig.store.last_seq()
    with pytest.raises(ProfileError):
        await rig.bus.handle(CreateSandbox(profile="profile.nope", meta=META))
    with pytest.raises(ProfileError):
        await rig.bus.handle(
            CreateSandbox(profile="profile.saas-stub", inputs={"size": "huge"}, meta=META)
        )
    assert await rig.store.last_seq() == before


async def test_a_checkpoint_needs_a_ready_sandbox(rig: Rig) -> None:
    done = await rig.bus.handle(CreateSandbox(profile="profile.saas-stub", meta=META))
    assert done.sandbox_id is not None
    await rig.until(done.sandbox_id, "BecameReady")
    made = await rig.bus.handle(RequestCheckpoint(sandbox_id=done.sandbox_id, meta=META))
    assert made.checkpoint_id is not None
    await rig.until(done.sandbox_id, "CheckpointCreated")
    await rig.bus.handle(DestroySandbox(sandbox_id=done.sandbox_id, meta=META))
    await rig.until(done.sandbox_id, "TornDown")
    with pytest.raises(InvalidTransition):
        await rig.bus.handle(RequestCheckpoint(sandbox_id=done.sandbox_id, meta=META))
    await rig.bus.handle(
        DeleteCheckpoint(checkpoint_id=made.checkpoint_id, reason="test", meta=META)
    )
    assert (await rig.types(done.sandbox_id))[-1] == "CheckpointDeleted"


async def test_grants_move_the_balance(rig: Rig) -> None:
    done = await rig.bus.handle(GrantCredits(account="acme", amount=25, meta=META))
    assert done.seq == await rig.store.last_seq()
    (granted,) = [r.event async for r in rig.store.read(1) if r.event.aggregate_id == "acme"]
    assert (granted.type_name(), granted.amount) == ("CreditsGranted", 25)  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        await rig.bus.handle(GrantCredits(account="acme", amount=0, meta=META))
