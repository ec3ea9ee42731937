"""7. Memory: peak RSS of `serve` holding N sandboxes, and while streaming a checkpoint.

- Projections: the stream holds N complete saas-stub lifecycles (appended through the
  event store beforehand); `sandboxer serve` starts on it (its own process, embedded
  NATS), replays it into its projections and answers; its peak RSS (VmHWM of the
  Python process; the nats-server child is not counted) is read after start and
  again after one `GET /v1/sandboxes` of all of them. Baseline: the same on an empty
  stream.
- Checkpoint: a compose-ssh sandbox whose repo holds a file of M MB of random bytes
  is checkpointed (workspace tar streamed over ssh into the spool file, then into the
  JetStream Object Store). The service runs in this process; its peak RSS is reset
  (`/proc/self/clear_refs`) before the checkpoint and read when it is created.
  Baseline: the RSS just before.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp

from bench import replay
from bench.common import Figure, Options, Section, alternate, nats_server, scratch
from bench.compose import META, ComposeRig
from tests.infra import ServeProcess, free_port

MIB = 1024 * 1024


def status_kib(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def reset_peak(pid: int | str) -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


async def serve_peaks(data_dir: Path) -> tuple[float, float]:
    """Start serve on `data_dir`; (peak MiB after start, peak MiB after listing)."""
    serve = ServeProcess(
        data_dir, free_port(), SANDBOXER_RECONCILE="off", SANDBOXER_NATS_SYNC="default"
    )
    try:
        async with aiohttp.ClientSession() as http:
            await serve.wait_healthy(http, timeout=300)
            started = status_kib(serve.proc.pid, "VmHWM") / 1024
            async with http.get(f"{serve.url}/v1/sandboxes") as resp:
                assert resp.status == 200
                await resp.read()
            listed = status_kib(serve.proc.pid, "VmHWM") / 1024
    finally:
        serve.terminate()
    return started, listed


async def run(options: Options) -> Section:
    n = options.size(10_000, 50)
    megabytes = options.size(200, 2)
    section = Section(
        "memory",
        "peak RSS of serve with many sandboxes, and while streaming a checkpoint",
        sizes=f"{n:,} sandboxes ({n * 10:,} events); a {megabytes} MB checkpoint",
    )
    section.notes.append(
        "RSS of the Python process only (VmHWM); the embedded nats-server is a separate "
        "process. Ratios are ours / baseline; the difference per sandbox is in the note."
    )
    with scratch(options, "memory") as folder:
        full, empty = folder / "full", folder / "empty"
        async with nats_server(full / "data", "default") as (_server, _nc, store):
            await replay._append_all(store, n * 10, 1)
        empty.mkdir()
        started: dict[str, list[float]] = {"full": [], "empty": []}
        listed: dict[str, list[float]] = {"full": [], "empty": []}

        async def measure(kind: str, data_dir: Path) -> float:
            first, second = await serve_peaks(data_dir)
            started[kind].append(first)
            listed[kind].append(second)
            return first

        async def base(run: int) -> float:
            return await measure("empty", empty / f"data{run}")

        async def ours(_run: int) -> float:
            return await measure("full", full / "data")

        await alternate(options.runs, base, ours)
        for label, values in (
            (f"serve holding {n:,} sandboxes", started),
            ("and after listing them all", listed),
        ):
            figure = Figure(
                label,
                "MiB",
                values["full"],
                values["empty"],
                "serve with none",
                higher_is_better=False,
            )
            per = (figure.ours_median - figure.baseline_median) * MIB / n
            figure.note = f"{per / 1024:.1f} KiB per sandbox"
            section.add(figure)

        rig = ComposeRig(folder / "compose", capacity=2)
        with (rig.repo / "blob.bin").open("wb") as blob:  # never the whole of it in memory
            for _ in range(megabytes):
                blob.write(os.urandom(MIB))
        service = await rig.start()
        try:
            assert service.manager is not None and service.runner is not None
            manager, runner = service.manager, service.runner
            sandbox_id = rig.next_id()
            await rig.create(sandbox_id)
            _, ready = rig.waiting[sandbox_id]
            if await ready != "ready":
                raise RuntimeError(f"{sandbox_id} did not become ready")
            before: list[float] = []

            async def idle(_run: int) -> float:
                reset_peak("self")
                before.append(status_kib("self", "VmHWM") / 1024)
                return before[-1]

            async def checkpoint(_run: int) -> float:
                reset_peak("self")
                checkpoint_id, _ = await manager.checkpoints.request(sandbox_id, META)
                async with asyncio.timeout(600):
                    view = runner.checkpoints.get(checkpoint_id)
                    while view is None or view.status == "requested":
                        after = view.last_seq if view is not None else 0
                        await runner.wait_checkpoint(checkpoint_id, after, 10)
                        view = runner.checkpoints.get(checkpoint_id)
                if view.status != "created":
                    raise RuntimeError(f"checkpoint {checkpoint_id}: {view.status} {view.error}")
                return status_kib("self", "VmHWM") / 1024

            ours_peaks, idle_peaks = await alternate(options.runs, idle, checkpoint)
            section.add(
                Figure(
                    f"peak while checkpointing {megabytes} MB",
                    "MiB",
                    ours_peaks,
                    idle_peaks,
                    "RSS before",
                    higher_is_better=False,
                    note="the service in the benchmark's own process",
                )
            )
            await rig.destroy([sandbox_id])
        finally:
            await rig.stop()
    return section
