"""What every benchmark shares: its options, timing, medians, and bench/RESULTS.md.

Each figure is measured against a baseline in the same run, in alternation (baseline,
ours, baseline, ours, ...), so a noisy neighbour on the machine hits both; the table
shows the medians and their ratio. Results of every benchmark are kept in
bench/results.json, so running one benchmark alone updates its own section of
RESULTS.md and leaves the others as they were measured.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext, api

from events import (
    BecameReady,
    CreditsDebited,
    CreditsHeld,
    CreditsReleased,
    CreditsReserved,
    DestroyRequested,
    Event,
    EventMeta,
    Provisioned,
    RouteChosen,
    SandboxRequested,
    TornDown,
    envelope,
)
from sandboxer.store.event_store import JetStreamEventStore
from sandboxer.store.nats_server import EmbeddedNats, find_nats_server
from tests.infra import free_port

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"
PROFILING_MD = BENCH_DIR / "PROFILING.md"
SYNC_MODES = ("always", "default")
SYNC_LABEL = {"always": "fsync before ack", "default": "server's default sync (2 min)"}


@dataclass
class Options:
    quick: bool = False
    runs: int = 5
    workdir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full


@dataclass
class Figure:
    """One measured quantity: ours and its baseline, `runs` times each."""

    name: str
    unit: str
    ours: list[float]
    baseline: list[float]
    baseline_name: str
    mode: str = ""
    higher_is_better: bool = True
    target_ratio: float | None = None  # ours/baseline at least (or at most) this
    target_value: float | None = None  # ours at least (or at most) this, in `unit`
    note: str = ""

    @property
    def ours_median(self) -> float:
        return statistics.median(self.ours)

    @property
    def baseline_median(self) -> float:
        return statistics.median(self.baseline)

    @property
    def ratio(self) -> float:
        base = self.baseline_median
        return self.ours_median / base if base else float("nan")

    def _ok(self, value: float, bound: float) -> bool:
        return value >= bound if self.higher_is_better else value <= bound

    @property
    def met(self) -> bool | None:
        checks = []
        if self.target_ratio is not None:
            checks.append(self._ok(self.ratio, self.target_ratio))
        if self.target_value is not None:
            checks.append(self._ok(self.ours_median, self.target_value))
        return all(checks) if checks else None

    @property
    def target(self) -> str:
        sign = "≥" if self.higher_is_better else "≤"
        parts = []
        if self.target_ratio is not None:
            parts.append(f"{sign} {self.target_ratio:g}×")
        if self.target_value is not None:
            parts.append(f"{sign} {fmt(self.target_value)} {self.unit}")
        return ", ".join(parts) or "—"


@dataclass
class Section:
    """One benchmark's figures, with the sizes it ran at and what to know about them."""

    benchmark: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    sizes: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    quick: bool = False
    runs: int = 0

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        print(f"  {line_for(figure)}", flush=True)
        return figure


def fmt(value: float) -> str:
    if value != value:  # nan
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def line_for(f: Figure) -> str:
    mode = f" [{f.mode}]" if f.mode else ""
    met = {True: "met", False: "NOT met", None: ""}[f.met]
    return (
        f"{f.name}{mode}: {fmt(f.ours_median)} {f.unit} vs {f.baseline_name} "
        f"{fmt(f.baseline_median)} → {f.ratio:.2f}× (target {f.target}) {met}"
    )


# ---- measuring ------------------------------------------------------------------------


async def alternate(
    runs: int,
    baseline: Callable[[int], Awaitable[float]],
    ours: Callable[[int], Awaitable[float]],
) -> tuple[list[float], list[float]]:
    """Run baseline and ours in alternation, `runs` times each; their results."""
    base_results: list[float] = []
    our_results: list[float] = []
    for run in range(runs):
        base_results.append(await baseline(run))
        our_results.append(await ours(run))
    return our_results, base_results


class Stopwatch:
    def __init__(self) -> None:
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.started


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


async def publish_raw(js: JetStreamContext, batches: list[list[tuple[str, bytes]]]) -> float:
    """The raw baseline: one task per batch publishing its messages in order with
    `js.publish`, all batches at once. Returns events/s."""

    async def one(batch: list[tuple[str, bytes]]) -> None:
        for subject, payload in batch:
            await js.publish(subject, payload)

    watch = Stopwatch()
    await asyncio.gather(*(one(b) for b in batches))
    return rate(sum(map(len, batches)), watch.seconds())


# ---- infrastructure -------------------------------------------------------------------


@contextmanager
def scratch(options: Options, name: str) -> Iterator[Path]:
    """A fresh folder for one benchmark, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix=f"sbx-bench-{name}-", dir=options.workdir))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@asynccontextmanager
async def nats_server(
    folder: Path, sync: str, *, atomic: bool = False
) -> AsyncIterator[tuple[EmbeddedNats, NatsClient, JetStreamEventStore]]:
    """A real nats-server (embedded, like `serve` starts it) with the event stream."""
    server = EmbeddedNats(folder, sync_interval=sync, port=free_port())
    server.start()
    try:
        nc = await nats.connect(
            **server.connect_options(), max_reconnect_attempts=0, pending_size=64 << 20
        )
        try:
            store = JetStreamEventStore(nc)
            await store.ensure_stream()
            if atomic:
                info = await store.js.stream_info(store.stream)
                info.config.allow_atomic = True
                await store.js.update_stream(info.config)
            yield server, nc, store
        finally:
            await nc.close()
    finally:
        server.stop()


def machine_facts() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nats_version = subprocess.run(
            [find_nats_server(), "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except (OSError, RuntimeError):
        nats_version = "unknown"
    return {
        "cores": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nats-server": nats_version,
    }


# ---- results --------------------------------------------------------------------------


def results_json(results_md: Path) -> Path:
    return results_md.with_suffix(".json")


def load_sections(results_md: Path) -> dict[str, dict[str, Any]]:
    path = results_json(results_md)
    if not path.exists():
        return {}
    data: dict[str, dict[str, Any]] = json.loads(path.read_text())
    return data


def section_from(data: dict[str, Any]) -> Section:
    figures = [Figure(**f) for f in data.pop("figures")]
    return Section(figures=figures, **data)


def save_sections(results_md: Path, sections: list[Section], order: list[str]) -> None:
    """Merge these sections into the stored results and render RESULTS.md again."""
    stored = load_sections(results_md)
    for section in sections:
        stored[section.benchmark] = asdict(section)
    results_md.parent.mkdir(parents=True, exist_ok=True)
    results_json(results_md).write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
    ordered = [section_from(dict(stored[name])) for name in order if name in stored]
    results_md.write_text(render(ordered))


def render(sections: list[Section]) -> str:
    facts = machine_facts()
    out = [
        "# Benchmarks",
        "",
        "Written by `python -m bench` (see the README's *Benchmarks*); do not edit by hand.",
        "Every figure is the median of its runs, next to a baseline measured in the same",
        "run (baseline and ours alternate); the ratio is ours / baseline. Targets are what",
        "we aim for on a 2-core machine; *NOT met* says honestly where we stand.",
        "",
        f"Machine: {facts['cores']} cores ({facts['cpu']}), Linux {facts['kernel']}, "
        f"Python {facts['python']}, {facts['nats-server']}.",
        "",
        "| benchmark | figure | mode | ours | baseline | ratio | target | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for section in sections:
        for f in section.figures:
            met = {True: "yes", False: "**NOT met**", None: "—"}[f.met]
            out.append(
                f"| {section.benchmark} | {f.name} | {f.mode or '—'} | "
                f"{fmt(f.ours_median)} {f.unit} | {f.baseline_name}: "
                f"{fmt(f.baseline_median)} {f.unit} | {f.ratio:.2f}× | {f.target} | {met} |"
            )
    for section in sections:
        out += ["", f"## {section.benchmark}: {section.title}", ""]
        when = "quick run (tiny sizes: a smoke test, not a measurement); " if section.quick else ""
        out.append(
            f"{when}{section.runs} runs each; sizes: {section.sizes}; took {section.seconds:.0f} s."
        )
        out.append("")
        out.append("| figure | mode | ours, each run | baseline, each run | ratio |")
        out.append("|---|---|---|---|---|")
        for f in section.figures:
            ours = ", ".join(fmt(v) for v in f.ours)
            base = ", ".join(fmt(v) for v in f.baseline)
            note = f" ({f.note})" if f.note else ""
            out.append(
                f"| {f.name}{note} | {f.mode or '—'} | {ours} {f.unit} | "
                f"{f.baseline_name}: {base} | {f.ratio:.2f}× |"
            )
        if section.notes:
            out.append("")
            out += [f"- {n}" for n in section.notes]
    if PROFILING_MD.exists():
        out += ["", PROFILING_MD.read_text().rstrip()]
    out.append("")
    return "\n".join(out)


def now_utc() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def python() -> str:
    return sys.executable


# ---- events ---------------------------------------------------------------------------


def lifecycle_events(index: int, meta: EventMeta, account: str = "default") -> list[Event]:
    """The ten events of one metered saas-stub lifecycle, as the service records them:
    seven on the sandbox, three on its account's ledger."""
    sid = f"sbx-{index:012x}"
    return [
        SandboxRequested(
            **envelope(sid, meta),
            profile="profile.saas-stub",
            extension="saas-stub",
            inputs={"size": "small"},
            account=account,
            ttl_seconds=600,
        ),
        RouteChosen(
            **envelope(sid, meta),
            extension="saas-stub",
            reason="profile.saas-stub names extension saas-stub",
            metered=True,
        ),
        CreditsReserved(
            **envelope(account, meta, f"{sid}.reserve"),
            sandbox_id=sid,
            amount=30,
            basis={"size": "small", "rate": 0.05, "seconds": 600, "basis": "ttl"},
        ),
        CreditsHeld(**envelope(sid, meta), account=account, amount=30),
        Provisioned(
            **envelope(sid, meta), handle={"instance": sid, "endpoint": f"saas-stub://{sid}"}
        ),
        BecameReady(**envelope(sid, meta), services=["instance"]),
        DestroyRequested(**envelope(sid, meta), reason="user"),
        TornDown(**envelope(sid, meta)),
        CreditsDebited(
            **envelope(account, meta, f"{sid}.debit"),
            sandbox_id=sid,
            amount=1,
            basis={"size": "small", "rate": 0.05, "seconds": 1.2, "basis": "metered"},
        ),
        CreditsReleased(
            **envelope(account, meta, f"{sid}.release"),
            sandbox_id=sid,
            amount=29,
            reason="remainder of the reservation",
        ),
    ]


RAW_STREAM = "BENCHRAW"


async def raw_stream(nc: NatsClient) -> str:
    """A second stream on the same server for raw baselines (`raw.>`), so that raw
    messages never reach the service's own followers. Returns its subject prefix."""
    js = nc.jetstream()
    config = api.StreamConfig(
        name=RAW_STREAM, subjects=["raw.>"], storage=api.StorageType.FILE, num_replicas=1
    )
    try:
        await js.stream_info(RAW_STREAM)
    except nats.js.errors.NotFoundError:
        await js.add_stream(config)
    return "raw"
