"""11. Warm pools: create → ready from a compose-local pool vs a cold create, and a
burst of creates against a pool smaller than the burst.

podman with podman-compose and the local busybox image (tests/infra.py), no SSH; the
two-service project of tests/data/compose-app. Two bench profiles on compose-local,
the same but for the pool: `profile.bench-pool` (a pool of 5; 2 with --quick) and
`profile.bench-cold` (none). Creates go through the message bus as the API's do
(that is where a create claims a member), timed from the command until the
sandbox's view is `ready`. Ours: a create of the pool's profile once the pool is
full; baseline: a create of the cold profile in the same run, alternating.
The burst: 20 creates at once (4 with --quick) against the full pool; each is
warm (it claimed a member) or cold, and the pool's ready count is sampled until it
is full again (the refill).
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import Figure, Options, Section, Stopwatch, scratch
from bench.compose import COMPOSE_APP
from bench.lifecycle import service_settings
from events import EventMeta
from sandboxer.app.commands import CreateSandbox
from sandboxer.app.lifecycle import TERMINAL
from sandboxer.bootstrap import Service
from tests.infra import Podman

META = EventMeta(actor="bench", correlation_id="bench-pool")
WARM = "profile.bench-pool"
COLD = "profile.bench-cold"


def write_profiles(folder: Path, repo: Path, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, pool in ((WARM, True), (COLD, False)):
        profile: dict[str, Any] = {
            "name": name,
            "extension": "compose-local",
            "ttl_seconds": 3600,
            "inputs": {"repo": {"default": str(repo)}},
        }
        if pool:
            profile["pool"] = {"size": size, "max_age_seconds": 3600}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(profile))


class PoolRig:
    def __init__(self, folder: Path, size: int, burst: int) -> None:
        self.folder = folder
        self.size = size
        self.podman = Podman.prepare(folder / "podman")
        self.repo = folder / "repo"
        shutil.copytree(COMPOSE_APP, self.repo)
        write_profiles(folder / "profiles", self.repo, size)
        self.settings = service_settings(
            str(folder / "data"),
            "always",
            SANDBOXER_RECONCILE="off",
            SANDBOXER_REPO_ROOTS=str(folder.resolve()),
            SANDBOXER_COMPOSE_LOCAL_CMD=self.podman.compose_cmd,
            SANDBOXER_COMPOSE_LOCAL_ENGINE_CMD=self.podman.engine_cmd,
            SANDBOXER_COMPOSE_LOCAL_STOP_TIMEOUT="1",
            SANDBOXER_COMPOSE_LOCAL_CAPACITY=str(size + burst + 4),
            SANDBOXER_PROFILES_PATH=str(folder / "profiles"),
        )
        self.service = Service(self.settings)

    async def start(self) -> None:
        await self.service.start()

    def ready_members(self) -> tuple[int, int]:
        assert self.service.pools is not None
        (status,) = [s for s in self.service.pools.status() if s.profile == WARM]
        return status.ready, status.provisioning

    async def pool_full(self, timeout: float = 300) -> None:
        async with asyncio.timeout(timeout):
            while self.ready_members() != (self.size, 0):  # noqa: ASYNC110 - the read model's
                await asyncio.sleep(0.05)  # polling a condition, under a deadline

    async def until(self, sandbox_id: str, states: set[str], timeout: float = 300) -> None:
        runner = self.service.runner
        assert runner is not None
        async with asyncio.timeout(timeout):
            while True:
                view = runner.projection.get(sandbox_id)
                if view is not None and view.state in states:
                    return
                if view is not None and view.state in TERMINAL:
                    raise RuntimeError(f"{sandbox_id} ended {view.state}: {view.reason}")
                await runner.wait_sandbox(sandbox_id, view.last_seq if view else 0, 10)

    async def create_ready(self, profile: str) -> tuple[float, str, bool]:
        """Seconds from the create command until ready; the id; whether it was warm."""
        bus = self.service.bus
        assert bus is not None and self.service.runner is not None
        watch = Stopwatch()
        done = await bus.handle(CreateSandbox(profile=profile, account="bench", meta=META))
        assert done.sandbox_id is not None
        await self.until(done.sandbox_id, {"ready"})
        seconds = watch.seconds()
        view = self.service.runner.projection.get(done.sandbox_id)
        return seconds, done.sandbox_id, view is not None and view.claimed_at is not None

    async def destroy(self, ids: list[str]) -> None:
        manager = self.service.manager
        assert manager is not None

        async def one(sandbox_id: str) -> None:
            if manager.get(sandbox_id) is not None:
                await manager.destroy(sandbox_id, META)
            await self.until(sandbox_id, {"destroyed", "failed", "rejected"})

        await asyncio.gather(*(one(i) for i in ids))

    async def stop(self) -> None:
        """The keeper first (no refill), then every live sandbox, then the service."""
        try:
            if self.service.pools is not None:
                await self.service.pools.stop()
            if self.service.manager is not None:
                await self.destroy([s.sandbox_id for s in self.service.manager.live()])
        finally:
            await self.service.stop()


async def run(options: Options) -> Section:
    size, burst = (2, 4) if options.quick else (5, 20)
    section = Section(
        "pool",
        "create → ready from a warm compose-local pool vs a cold create; a burst",
        sizes=(
            f"a pool of {size} on compose-local (this machine's podman, podman-compose, "
            f"the two-service busybox project tests/data/compose-app); a burst of {burst} "
            "creates at once against the full pool"
        ),
    )
    section.notes.append(
        "ms, lower is better: from the create command on the message bus (as the API "
        "sends it) until the sandbox's view is `ready`. Warm: the pool's profile with "
        "its default inputs once the pool is full (the create claims a member: a KV "
        "create-if-absent, then SandboxClaimed on the member); cold: the same profile "
        "without a pool, in the same run, alternating."
    )
    with scratch(options, "pool") as folder:
        rig = PoolRig(folder, size, burst)
        await rig.start()
        try:
            await rig.pool_full()
            if not options.quick:  # warm up: podman's caches, the first compose run
                _, cold_id, _ = await rig.create_ready(COLD)
                await rig.destroy([cold_id])
            warm_ms: list[float] = []
            cold_ms: list[float] = []
            for _ in range(options.runs):
                seconds, cold_id, was_warm = await rig.create_ready(COLD)
                assert not was_warm
                cold_ms.append(seconds * 1000)
                await rig.destroy([cold_id])
                await rig.pool_full()
                seconds, warm_id, was_warm = await rig.create_ready(WARM)
                if not was_warm:
                    raise RuntimeError("a create against the full pool was cold")
                warm_ms.append(seconds * 1000)
                await rig.destroy([warm_id])
            section.add(
                Figure(
                    "create → ready from a warm pool (p50 of the runs)",
                    "ms",
                    warm_ms,
                    cold_ms,
                    "a cold create → ready (compose-local)",
                    higher_is_better=False,
                    target_ratio=0.05,
                    target_value=100.0,
                )
            )
            await burst_figures(rig, section, options, size, burst, cold_ms)
        finally:
            await rig.stop()
    return section


async def sample(rig: PoolRig, started: float, samples: list[tuple[float, int, int]]) -> None:
    """The pool's ready and provisioning counts every 0.25 s until cancelled."""
    while True:
        samples.append((time.perf_counter() - started, *rig.ready_members()))
        await asyncio.sleep(0.25)


async def burst_figures(
    rig: PoolRig, section: Section, options: Options, size: int, burst: int, cold_ms: list[float]
) -> None:
    """The burst's warm creates against its cold ones (`cold_ms`, the single cold
    creates, if the pool refilled in time for every create of the bursts)."""
    rounds = 1 if options.quick else min(options.runs, 3)
    warm_all: list[float] = []
    cold_all: list[float] = []
    for round_no in range(1, rounds + 1):
        await rig.pool_full()
        started = time.perf_counter()
        samples: list[tuple[float, int, int]] = []
        sampler = asyncio.create_task(sample(rig, started, samples))
        made = await asyncio.gather(*(rig.create_ready(WARM) for _ in range(burst)))
        await rig.pool_full()
        refilled = time.perf_counter() - started
        sampler.cancel()
        warm = [s * 1000 for s, _, w in made if w]
        cold = [s * 1000 for s, _, w in made if not w]
        warm_all += warm
        cold_all += cold
        samples.append((refilled, *rig.ready_members()))  # the first full sample
        shown = [*samples[:-1][:: max(1, len(samples) // 12)], samples[-1]]
        timeline = ", ".join(f"{t:.1f}s {r}/{p}" for t, r, p in shown)
        section.notes.append(
            f"burst {round_no}: {len(warm)} of {burst} creates warm (claimed a member), "
            f"{len(cold)} cold; warm p50 {statistics.median(warm):.0f} ms"
            + (f", cold p50 {statistics.median(cold):.0f} ms" if cold else "")
            + f"; the pool was full again {refilled:.1f} s after the burst began. "
            f"Pool ready/provisioning over time: {timeline}."
        )
        await rig.destroy([i for _, i, _ in made])
    section.add(
        Figure(
            f"burst of {burst} against a pool of {size}: the warm creates → ready",
            "ms",
            warm_all,
            cold_all or cold_ms,
            f"the cold creates of the same bursts (the {burst - size} beyond the pool)"
            if cold_all
            else "the single cold creates above (no create of the bursts was cold)",
            higher_is_better=False,
            note=f"{len(warm_all)} warm, {len(cold_all)} cold over {rounds} burst(s)",
        )
    )
