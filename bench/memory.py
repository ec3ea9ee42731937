"""7. Memory: peak RSS of `serve` holding N sandboxes, and while streaming a checkpoint.

- Projections: the stream holds N complete saas-stub lifecycles (appended through the
  event store beforehand); `sandboxer serve` starts on it (its own process, embedded
  NATS), replays it into its projections and answers; its peak RSS (VmHWM of the
  Python process; the nats-server child is not counted) is read after start and
  again after one `GET /v1/sandboxes` of all of them. Baseline: the same on an empty
  stream.
- Checkpoint: `sandboxer serve` (its own process) with one compose-ssh sandbox whose
  repo holds a file of M MB of random bytes; the sandbox is checkpointed through the
  API (workspace tar streamed over ssh into the spool file, then into the JetStream
  Object Store). serve's peak RSS is reset (`/proc/<pid>/clear_refs`) before each
  checkpoint and read when it is created. Baseline: its RSS just before.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp

from bench import replay
from bench.common import Figure, Options, Section, alternate, nats_server, scratch
from bench.compose import ComposeRig
from tests.helpers import create, destroy, wait_state
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


async def checkpoint_peaks(
    serve: ServeProcess, repo: Path, runs: int
) -> tuple[list[float], list[float]]:
    """A compose-ssh sandbox on `repo`, checkpointed `runs` times through the API; for
    each: serve's RSS just before, and its peak RSS until the checkpoint is created."""
    async with aiohttp.ClientSession() as http:
        await serve.wait_healthy(http, timeout=120)
        made = await create(
            http, serve.url, profile="profile.compose-e2e", inputs={"repo": str(repo)}
        )
        await wait_state(http, serve.url, made["id"], {"ready"}, timeout=600)
        pid = serve.proc.pid
        before: list[float] = []

        async def idle(_run: int) -> float:
            reset_peak(pid)
            before.append(status_kib(pid, "VmHWM") / 1024)
            return before[-1]

        async def checkpoint(_run: int) -> float:
            reset_peak(pid)
            url = f"{serve.url}/v1/sandboxes/{made['id']}/checkpoints"
            async with http.post(url) as resp:
                answer = await resp.json()
                assert resp.status == 202, answer
            seq = 0
            async with asyncio.timeout(600):
                while answer["status"] == "requested":
                    poll = f"{serve.url}/v1/checkpoints/{answer['id']}"
                    params = {"wait": "10", "after_seq": str(seq)}
                    async with http.get(poll, params=params) as resp:
                        answer = await resp.json()
                    seq = answer["last_seq"]
            if answer["status"] != "created":
                raise RuntimeError(f"checkpoint {answer['id']}: {answer}")
            return status_kib(pid, "VmHWM") / 1024

        try:
            return await alternate(runs, idle, checkpoint)
        finally:  # containers and workspace must not outlive the benchmark
            await destroy(http, serve.url, made["id"])
            await wait_state(http, serve.url, made["id"], {"destroyed"}, timeout=300)


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
        rig.host.start()
        serve = ServeProcess(folder / "compose" / "data", free_port(), **rig.env())
        try:
            ours_peaks, idle_peaks = await checkpoint_peaks(serve, rig.repo, options.runs)
        finally:
            serve.terminate()
            rig.host.stop()
        section.add(
            Figure(
                f"serve's peak while checkpointing {megabytes} MB",
                "MiB",
                ours_peaks,
                idle_peaks,
                "serve's RSS before",
                higher_is_better=False,
            )
        )
    return section
