"""10. Start-up against the length of the history: time to /healthz, time until an old
sandbox answers, and RSS, each as a ratio to the empty start in the same run.

A data directory per history size holds N events of complete saas-stub lifecycles
(ten events each, seven on the sandbox and three on its account's ledger), published
straight to the stream (core publishes on one connection, in order: far faster than
appends, and the history is only data here). Each message carries three headers of
the sizes an append's headers have, so the reader pays for headers as it does on a
real stream.

Each start is `sandboxer serve` in its own process on that data directory (embedded
NATS, as a user runs it). The first start after the history was written has no
snapshot: it replays from sequence 1; so do `runs - 1` more, each after the archive
was deleted (an archive behind the snapshot means a full replay; once on 10,000,000
events). Then `runs` starts each load the snapshot the previous clean stop wrote.
"Before" is the same harness run on the code before snapshots (`BEFORE`, a git
worktree of that commit), which replays the whole stream at every start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.common import (
    BENCH_DIR,
    REPO_ROOT,
    Figure,
    Options,
    Section,
    Stopwatch,
    lifecycle_events,
    nats_server,
    scratch,
)
from events import EventMeta
from events.codec import default_codec
from events.subjects import subject_for
from sandboxer.store.event_store import (
    DUPLICATE_WINDOW_SECONDS,
    STREAM_NAME,
    JetStreamEventStore,
)
from sandboxer.store.nats_server import EmbeddedNats
from tests.infra import free_port

BEFORE = "e7c830d"  # the last commit before read-model snapshots
META = EventMeta(actor="bench", correlation_id="bench-startup")
ACCOUNTS = 1000
CHART = BENCH_DIR / "startup.png"


@dataclass
class Start:
    healthz: float  # seconds from exec to the first 200 of /healthz
    old_sandbox: float  # seconds from exec until GET of the first sandbox answers
    rss_mib: float  # VmRSS of the serve process then (the nats-server child apart)


@dataclass
class Measured:
    events: int
    firsts: list[Start] = field(default_factory=list)  # after: full replays (no usable snapshot)
    after: list[Start] = field(default_factory=list)
    before: list[Start] = field(default_factory=list)
    nats_alone: list[float] = field(default_factory=list)  # nats-server's own start
    nats_fresh: float = 0.0  # its start right after the history was written
    replay_lines: list[str] = field(default_factory=list)  # serve's "caught up" lines


def history(total: int) -> Iterator[tuple[str, bytes, dict[str, str]]]:
    """(subject, body, headers) of `total` events of whole lifecycles."""
    codec = default_codec()
    for index in range(total // 10):
        account = f"acct{index % ACCOUNTS}"
        for event in lifecycle_events(index, META, account):
            subject = subject_for(event)
            headers = {
                "Sandboxer-Event-Id": event.event_id,
                "Sandboxer-Expected": "1234567",
                "Sandboxer-Scope": subject.rsplit(".", 1)[0] + ".>",
            }
            yield subject, codec.encode(event), headers


async def populate(folder: Path, total: int) -> None:
    async with nats_server(folder, "default") as (_server, nc, store):
        sent = 0
        for subject, body, headers in history(total):
            await nc.publish(subject, body, headers=headers)
            sent += 1
            if sent % 50_000 == 0:
                await nc.flush(timeout=60)
                # keep the server's inbound buffer small: let the stream follow
                await stored_at_least(store, sent - 200_000)
        await nc.flush(timeout=60)
        await stored_at_least(store, total)
        if (stored := await store.last_seq()) != total:
            raise RuntimeError(f"the stream holds {stored} events, not {total}")


async def stored_at_least(store: JetStreamEventStore, count: int) -> None:
    async with asyncio.timeout(600):
        while await store.last_seq() < count:  # noqa: ASYNC110 - the server's state
            await asyncio.sleep(0.05)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


async def start_once(folder: Path, code: Path, old_id: str | None, timeout: float) -> Start:
    """One `serve` on `folder` with the code in `code`; stopped cleanly afterwards."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXER_")}
    env.update(
        SANDBOXER_DATA_DIR=str(folder),
        SANDBOXER_NATS_PORT=str(free_port()),
        SANDBOXER_NATS_SYNC="default",
        SANDBOXER_RECONCILE="off",
        PYTHONPATH=str(code),
    )
    log = (folder / "serve.log").open("ab")
    watch = Stopwatch()
    proc = subprocess.Popen(  # noqa: ASYNC220 - the exec is what is timed
        [sys.executable, "-m", "sandboxer", "serve", "--port", str(port)],
        cwd=code,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(timeout):
            healthz = await _first_ok(http, f"{url}/healthz", proc)
            old = healthz
            if old_id is not None:
                old = await _first_ok(http, f"{url}/v1/sandboxes/{old_id}", proc)
            healthz_at, old_at = healthz - watch.started, old - watch.started
            return Start(healthz_at, old_at, rss_mib(proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def _first_ok(http: aiohttp.ClientSession, url: str, proc: subprocess.Popen[bytes]) -> float:
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited ({proc.returncode}) before {url} answered")
        with contextlib.suppress(aiohttp.ClientConnectionError, asyncio.TimeoutError):
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                if resp.status == 200:
                    return time.perf_counter()
        await asyncio.sleep(0.02)  # polling a condition, under the caller's deadline


@contextlib.contextmanager
def before_code(options: Options) -> Iterator[Path | None]:
    """A worktree of BEFORE, or None when git cannot make one here."""
    folder = options.workdir / f"sbx-bench-before-{BEFORE}"
    shutil.rmtree(folder, ignore_errors=True)
    made = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", str(folder), BEFORE],
        capture_output=True,
        check=False,
    )
    if made.returncode != 0:
        print(f"  no 'before' runs: git worktree add failed: {made.stderr.decode()}", flush=True)
    try:
        yield folder if made.returncode == 0 else None
    finally:
        subprocess.run(
            ["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(folder)],
            capture_output=True,
            check=False,
        )


def nats_start(folder: Path) -> float:
    """Seconds until the embedded nats-server answers on this data (it recovers the
    stream's state from disk first): the part of a start that is not ours."""
    server = EmbeddedNats(folder, sync_interval="default", port=free_port())
    watch = Stopwatch()
    server.start()
    seconds = watch.seconds()
    server.stop()
    return seconds


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if not ordered:
        return float("nan")
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


async def measure(
    folder: Path,
    total: int,
    runs: int,
    before: Path | None,
    before_runs: int,
    replays: int,
    settle: bool = True,
) -> Measured:
    """`settle`: time the starts only once the history has left the duplicate window
    (False for a smoke run: minutes of waiting for nothing)."""
    await asyncio.to_thread(shutil.rmtree, folder, ignore_errors=True)
    await asyncio.to_thread(folder.mkdir, parents=True)
    print(f"  writing {total:,} events ...", flush=True)
    await populate(folder, total)
    written = time.monotonic()
    old_id = "sbx-000000000000" if total else None
    timeout = 3600.0
    measured = Measured(total)
    measured.nats_fresh = await asyncio.to_thread(nats_start, folder)
    if before is not None and before_runs:
        for _ in range(before_runs):
            measured.before.append(await start_once(folder, before, old_id, timeout))
        print(f"  before: {measured.before}", flush=True)
    # A history is mostly older than the stream's duplicate window: a restarted server
    # re-reads only the messages written within it (all of them, just after writing).
    wait = DUPLICATE_WINDOW_SECONDS + 5 - (time.monotonic() - written)
    if settle and total and wait > 0:
        print(f"  waiting {wait:.0f} s: the history leaves the duplicate window", flush=True)
        await asyncio.sleep(wait)
    for _ in range(runs):
        measured.nats_alone.append(await asyncio.to_thread(nats_start, folder))
    print(f"  nats-server alone: {measured.nats_alone}", flush=True)
    for replay in range(replays):
        if replay:  # an archive behind the snapshot: the next start replays from seq 1
            for name in ("archive.sqlite3", "archive.sqlite3-wal", "archive.sqlite3-shm"):
                (folder / "cache" / name).unlink(missing_ok=True)
        measured.firsts.append(await start_once(folder, REPO_ROOT, old_id, timeout))
        caught_up = [
            line.split(": ", 1)[-1]
            for line in (folder / "serve.log").read_text(errors="replace").splitlines()
            if "events folded in" in line
        ]
        measured.replay_lines.append(caught_up[-1] if caught_up else "")
        print(f"  full replay: {measured.firsts[-1]} {measured.replay_lines[-1]}", flush=True)
    for _ in range(runs):
        measured.after.append(await start_once(folder, REPO_ROOT, old_id, timeout))
    print(f"  after: {measured.after}", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    return measured


def chart(results: list[Measured], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, after, style in (
        ("before (replay from seq 1)", False, "o--"),
        ("after (snapshot + tail)", True, "s-"),
    ):
        points = [
            (max(m.events, 1), m.after if after else m.before)
            for m in results
            if (m.after if after else m.before)
        ]
        if not points:
            continue
        xs = [x for x, _ in points]
        left.plot(xs, [median([s.healthz for s in runs]) for _, runs in points], style, label=label)
        right.plot(
            xs, [median([s.rss_mib for s in runs]) for _, runs in points], style, label=label
        )
    firsts = [(max(m.events, 1), m.firsts) for m in results if m.firsts]
    left.plot(
        [x for x, _ in firsts],
        [median([f.healthz for f in runs]) for _, runs in firsts],
        "^:",
        label="after, full replay (no usable snapshot)",
    )
    for axis, title, unit in (
        (left, "time to /healthz", "seconds"),
        (right, "serve's RSS after start", "MiB"),
    ):
        axis.set_xscale("log")
        axis.set_xlabel("events in the stream (log scale; 0 drawn at 1)")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle("sandboxer serve: start-up against the length of the history")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def run(options: Options) -> Section:
    sizes = [0, 100_000, 1_000_000] if not options.quick else [0, 2_000, 20_000]
    huge = [] if options.quick else [10_000_000]
    section = Section(
        "startup",
        "start-up time and memory against the length of the history",
        sizes=", ".join(f"{n:,}" for n in sizes + huge) + " events",
    )
    results: list[Measured] = []
    with scratch(options, "startup") as work, before_code(options) as before:
        for total in sizes:
            before_runs = min(options.runs, 3) if total <= 1_000_000 else 0
            results.append(
                await measure(
                    work / f"h{total}",
                    total,
                    options.runs,
                    before,
                    before_runs,
                    options.runs,
                    settle=not options.quick,
                )
            )
        for total in huge:  # once, reported; the code before is not run on it (hours)
            results.append(await measure(work / f"h{total}", total, 1, None, 0, 1))
    empty = results[0]
    for m in results[1:]:
        label = f"{m.events:,} events"
        section.add(
            Figure(
                f"time to /healthz, {label}",
                "s",
                [s.healthz for s in m.after],
                [s.healthz for s in empty.after],
                "empty start",
                higher_is_better=False,
                target_ratio=1.5 if m.events == 1_000_000 else None,
            )
        )
        section.add(
            Figure(
                f"time until an old sandbox answers, {label}",
                "s",
                [s.old_sandbox for s in m.after],
                [s.healthz for s in empty.after],
                "empty start (/healthz)",
                higher_is_better=False,
            )
        )
        section.add(
            Figure(
                f"RSS after start, {label}",
                "MiB",
                [s.rss_mib for s in m.after],
                [s.rss_mib for s in empty.after],
                "empty start",
                higher_is_better=False,
                target_ratio=1.25 if m.events == 1_000_000 else None,
            )
        )
        if m.nats_alone:
            section.notes.append(
                f"{label}: nats-server alone answered after {median(m.nats_alone):.2f} s "
                f"(empty: {median(empty.nats_alone):.2f} s); right after the history was "
                f"written, while all of it was in the duplicate window: {m.nats_fresh:.2f} s"
            )
        if m.firsts:
            empty_start = median([s.healthz for s in empty.after])
            rates = [m.events / max(f.healthz - empty_start, 1e-3) for f in m.firsts]
            section.add(
                Figure(
                    f"start with a full replay (no usable snapshot): replay rate, {label}",
                    "events/s",
                    rates,
                    rates,
                    "itself (no baseline: the rate alone has a target)",
                    target_value=100_000 if m.events >= 1_000_000 else None,
                    note="time to /healthz "
                    + ", ".join(f"{f.healthz:.1f}" for f in m.firsts)
                    + " s",
                )
            )
            for line in m.replay_lines:
                section.notes.append(f"{label}, a full replay: serve logged '{line}'")
        if m.before:
            section.add(
                Figure(
                    f"before: time to /healthz, {label}",
                    "s",
                    [s.healthz for s in m.before],
                    [s.healthz for s in empty.before] or [float("nan")],
                    "empty start, before",
                    higher_is_better=False,
                )
            )
            section.add(
                Figure(
                    f"before: RSS after start, {label}",
                    "MiB",
                    [s.rss_mib for s in m.before],
                    [s.rss_mib for s in empty.before] or [float("nan")],
                    "empty start, before",
                    higher_is_better=False,
                )
            )
    target = CHART if not options.quick else options.workdir / "startup.png"
    chart(results, target)
    section.notes.append(
        f"![start-up time and RSS against history size, before and after]({CHART.name}) "
        "(drawn by bench/startup.py with matplotlib)"
    )
    section.notes.append(
        "time to /healthz and RSS (VmRSS of the serve process, the nats-server child "
        "apart) are measured from the exec of `sandboxer serve`; each start is stopped "
        "with SIGTERM, and a clean stop writes the snapshot the next start loads. The "
        f"history is published straight to the {STREAM_NAME} stream before the starts."
    )
    section.notes.append(
        "nats-server alone: the embedded server started and stopped on the data, timed "
        "until it answers: it recovers the stream's state from disk first (its index of "
        "every subject), and re-reads the messages written within the stream's "
        f"duplicate window ({DUPLICATE_WINDOW_SECONDS:g} s) to rebuild its memory of "
        "message ids. A real history is mostly older than that window, so the timed "
        "starts begin once the history written here has left it (the 'before' runs go "
        "first, meanwhile); nats-server's start just after the writing is reported "
        "beside. serve spawns the server before it imports the rest of the service, so "
        "the recovery overlaps the imports. The replay rate of a start with a full "
        "replay is the events over its time to /healthz less the empty start's; serve's "
        "own log line (the fold alone) is quoted beside."
    )
    section.notes.append(
        f"before = commit {BEFORE} (the whole stream replayed at every start, every row "
        "in memory), run from a git worktree on the same data; at most 3 runs, not on "
        "10,000,000 events."
    )
    return section
