"""8. exec and files through the API vs the engine (and rsync) run directly.

`sandboxer serve` runs as its own process (embedded NATS, the shipped settings) with
one ready sandbox of the tests' two-service busybox project (tests/data/compose-app),
created once through the API; every figure then uses the same running `web` container.

- exec, this machine (compose-local): N sequential `POST /v1/sandboxes/{id}/exec`
  of `true` in `web` over one kept-alive HTTP connection, each timed from the request
  to its `exit` frame; the figure is their p50. Baseline: `podman exec <container>
  true` run as a subprocess, same container, same N, its p50.
- exec over SSH (compose-ssh, a real sshd on loopback): the same through a
  `profile.compose-e2e` sandbox. Baseline: `podman exec <container> true` through
  asyncssh's `conn.run` on one connection opened beforehand, same container.
- files (compose-local): a file of M MB of random bytes PUT into `web`
  (`/blob.bin`) and read back with GET, each streamed from and to a local file;
  MB/s. Baseline: rsync of the same file into a directory on this machine, and of that
  copy back out; and, to show what the engine's copy costs alone (no target),
  `podman cp` of the same file into the same container and back. serve's peak RSS
  (VmHWM, reset through `/proc/<pid>/clear_refs` before each transfer) against its
  RSS just before; the target: at most 30 MiB more.
- `true` is busybox's applet, run as `busybox true` on both sides (see TRUE).

Both exec figures are shown a second time against the two engine calls the compose
adapter makes for each exec (`podman ps` of the project, then `podman exec`), no
target: what is left is the service's own cost.

Baseline and ours alternate, `runs` times each; every figure is the median of the
runs' p50s (exec) or rates (files).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import asyncssh

from bench.common import Figure, Options, Section, alternate, scratch
from bench.compose import COMPOSE_APP, ComposeRig, ServiceRig
from bench.compose_local import LocalRig
from bench.memory import reset_peak, status_kib
from tests.helpers import create, destroy, wait_state
from tests.infra import Podman, ServeProcess, free_port

MB = 1_000_000
MIB = 1024 * 1024
CHUNK = 1 << 20
SERVICE = "web"
# `true` as busybox's applet: images built before scripts/busybox-image linked
# /bin/true have none; `true` is a link to busybox where they do, the same program.
TRUE = ["busybox", "true"]
RSS_BUDGET_MIB = 30.0


def container_of(podman: Podman, project: str, service: str = SERVICE) -> str:
    """The running container of `service` in the sandbox's compose project."""
    for item in podman.containers(project):
        labels = item.get("Labels") or {}
        if labels.get("com.docker.compose.service") == service and item.get("State") == "running":
            names = item.get("Names") or []
            return str(names[0] if isinstance(names, list) else names)
    raise RuntimeError(f"no running {service} container in {project}")


def p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


async def timed_calls(n: int, call: Callable[[], Awaitable[None]]) -> float:
    """`n` calls one after another; the p50 of their durations, in ms."""
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return p50_ms(samples)


class Serve:
    """`sandboxer serve` as its own process with one ready sandbox of `profile`."""

    def __init__(self, rig: ServiceRig, profile: str) -> None:
        self.rig = rig
        self.profile = profile
        self.process = ServeProcess(rig.folder / "data", free_port(), **rig.env())
        self.url = self.process.url
        self.sandbox_id = ""
        self.project = ""  # the compose project, as the sandbox's handle records it
        self.container = ""
        # One connection, kept alive: every request of a figure goes over it.
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1, force_close=False),
            timeout=aiohttp.ClientTimeout(total=3600),
        )

    @property
    def pid(self) -> int:
        return self.process.proc.pid

    async def start(self) -> None:
        await self.process.wait_healthy(self.http, timeout=120)
        made = await create(
            self.http, self.url, profile=self.profile, inputs={"repo": str(self.rig.repo)}
        )
        self.sandbox_id = str(made["id"])
        view = await wait_state(self.http, self.url, self.sandbox_id, {"ready"}, timeout=600)
        self.project = str(view["handle"]["project"])
        self.container = container_of(self.rig.podman, self.project)

    async def stop(self) -> None:
        try:
            if self.sandbox_id:  # containers and workspace must not outlive the benchmark
                await destroy(self.http, self.url, self.sandbox_id)
                await wait_state(self.http, self.url, self.sandbox_id, {"destroyed"}, timeout=300)
        finally:
            await self.http.close()
            self.process.terminate()

    async def exec_true(self) -> None:
        """One exec of `true` in `web`, read until its exit frame."""
        url = f"{self.url}/v1/sandboxes/{self.sandbox_id}/exec"
        async with self.http.post(url, json={"argv": TRUE, "service": SERVICE}) as resp:
            if resp.status != 200:
                raise RuntimeError(f"exec: {resp.status} {await resp.text()}")
            async for line in resp.content:
                frame = json.loads(line)
                if frame["type"] == "exit":
                    if frame.get("exit_code") != 0:
                        raise RuntimeError(f"exec ended {frame}")
                    return
        raise RuntimeError("exec answered no exit frame")

    def file_url(self, path: str) -> str:
        return f"{self.url}/v1/sandboxes/{self.sandbox_id}/files?path={path}&service={SERVICE}"

    async def put(self, source: Path, size: int, path: str, digest: str) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            with source.open("rb") as f:
                while block := f.read(CHUNK):
                    yield block

        headers = {"Content-Length": str(size)}
        async with self.http.put(self.file_url(path), data=chunks(), headers=headers) as resp:
            answer = await resp.json()
            if resp.status != 201 or answer.get("sha256") != digest:
                raise RuntimeError(f"PUT {path}: {resp.status} {answer}")

    async def get(self, path: str, target: Path) -> str:
        sha = hashlib.sha256()
        async with self.http.get(self.file_url(path)) as resp:
            if resp.status != 200:
                raise RuntimeError(f"GET {path}: {resp.status} {await resp.text()}")
            with target.open("wb") as f:
                async for block in resp.content.iter_chunked(CHUNK):
                    sha.update(block)
                    f.write(block)
        return sha.hexdigest()


async def engine_exec(podman: Podman, container: str) -> None:
    """The engine's own exec, as a subprocess on this machine."""
    proc = await asyncio.create_subprocess_exec(
        "podman",
        "exec",
        container,
        *TRUE,
        env=podman.env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"podman exec: {proc.returncode} {err.decode()[-400:]}")


async def engine_ps(podman: Podman, project: str) -> None:
    """What the adapter asked the engine before each exec: the project's containers."""
    argv = ["podman", "ps", "-a", "--format", "json", "--filter"]
    argv.append(f"label=com.docker.compose.project={project}")
    proc = await asyncio.create_subprocess_exec(
        *argv, env=podman.env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"podman ps: {proc.returncode} {err.decode()[-400:]}")


def exec_figure(
    name: str, ours: list[float], base: list[float], baseline: str, target: float | None = 1.5
) -> Figure:
    return Figure(name, "ms", ours, base, baseline, higher_is_better=False, target_ratio=target)


async def measure_local_exec(
    options: Options, section: Section, serve: Serve, podman: Podman, n: int
) -> None:
    async def base(_run: int) -> float:
        return await timed_calls(n, lambda: engine_exec(podman, serve.container))

    async def ours(_run: int) -> float:
        return await timed_calls(n, serve.exec_true)

    async def both(_run: int) -> float:
        async def two() -> None:
            await engine_ps(podman, serve.project)
            await engine_exec(podman, serve.container)

        return await timed_calls(n, two)

    if not options.quick:  # warm up: podman's caches, the connection, serve's paths
        await timed_calls(5, lambda: engine_exec(podman, serve.container))
        await timed_calls(5, serve.exec_true)
    our_p50, base_p50 = await alternate(options.runs, base, ours)
    section.add(
        exec_figure(
            "exec `true` in a running container, p50 (compose-local)",
            our_p50,
            base_p50,
            "podman exec",
        )
    )
    try:  # no target: an engine hiccup here must not lose the figure above
        again, both_p50 = await alternate(options.runs, both, ours)
    except RuntimeError as exc:
        section.notes.append(f"exec against ps + exec not measured: {exc}")
        return
    section.add(
        exec_figure(
            "the same, against ps + exec (each exec before the adapter kept its container), p50",
            again,
            both_p50,
            "podman ps + podman exec",
            target=None,
        )
    )
    rest_ms = statistics.median(again) - statistics.median(base_p50)
    section.notes.append(
        "where an exec's time goes: one engine command, `podman exec` (the adapter keeps "
        "the container the first `ps` named, and asks `ps` again only when an exec "
        "fails without output), and around it the service records `CommandStarted` and "
        "`CommandFinished` (each appended and acked after fsync) and streams the "
        f"frames: {rest_ms:.0f} ms over the bare `podman exec` at the median. The "
        "`ps + exec` figure is what every exec cost before that cache (the same two "
        "calls the adapter made)."
    )


async def measure_ssh_exec(options: Options, section: Section, folder: Path, n: int) -> None:
    rig = ComposeRig(folder, capacity=1)
    try:
        rig.host.start()
    except (AssertionError, OSError, subprocess.SubprocessError) as exc:
        section.notes.append(f"exec over SSH skipped: sshd could not be started here ({exc}).")
        return
    serve = Serve(rig, "profile.compose-e2e")
    try:
        await serve.start()
        config = rig.host.host_config("h1", rig.remote, rig.podman.compose_cmd)
        command = shlex.join([*shlex.split(rig.podman.engine_cmd), "exec", serve.container, *TRUE])
        async with asyncssh.connect(
            config["host"],
            port=config["port"],
            username=config["user"],
            client_keys=[config["identity_file"]],
            known_hosts=config["known_hosts"],
        ) as conn:

            async def ssh_run(line: str) -> None:
                done = await conn.run(line, check=False)
                if done.exit_status != 0:
                    raise RuntimeError(f"over SSH: {line}: {done.exit_status} {done.stderr!r}")

            async def ssh_exec() -> None:
                await ssh_run(command)

            async def base(_run: int) -> float:
                return await timed_calls(n, ssh_exec)

            async def ours(_run: int) -> float:
                return await timed_calls(n, serve.exec_true)

            ps = shlex.join(
                [
                    *shlex.split(rig.podman.engine_cmd),
                    *["ps", "-a", "--format", "json", "--filter"],
                    f"label=com.docker.compose.project={serve.project}",
                ]
            )

            async def both(_run: int) -> float:
                async def two() -> None:
                    await ssh_run(ps)
                    await ssh_exec()

                return await timed_calls(n, two)

            if not options.quick:
                await timed_calls(5, ssh_exec)
                await timed_calls(5, serve.exec_true)
            our_p50, base_p50 = await alternate(options.runs, base, ours)
            section.add(
                exec_figure(
                    "exec `true` in a running container over SSH, p50 (compose-ssh)",
                    our_p50,
                    base_p50,
                    "podman exec on an open asyncssh connection",
                )
            )
            try:  # no target: an engine hiccup here must not lose the figures above
                again, both_p50 = await alternate(options.runs, both, ours)
            except RuntimeError as exc:
                section.notes.append(f"exec over SSH against ps + exec not measured: {exc}")
                return
            section.add(
                exec_figure(
                    "the same over SSH, against ps + exec (each exec before the kept "
                    "container), p50",
                    again,
                    both_p50,
                    "podman ps + podman exec on the open connection",
                    target=None,
                )
            )
        ps_ms = statistics.median(both_p50) - statistics.median(base_p50)
        section.notes.append(
            f"over SSH a `podman ps` before each exec would be a second round trip "
            f"({ps_ms:.0f} ms at the median here, against "
            f"{statistics.median(base_p50):.0f} ms for one `ssh … podman exec` on the "
            "open connection): the adapter's kept container saves it."
        )
    finally:
        await serve.stop()
        rig.host.stop()


def rsync(source: Path, target: Path) -> float:
    """rsync of one file on this machine; seconds."""
    rsync_bin = shutil.which("rsync")
    if rsync_bin is None:
        raise RuntimeError("rsync is not installed: run scripts/setup")
    started = time.perf_counter()
    subprocess.run([rsync_bin, "-a", str(source), str(target)], check=True, timeout=600)
    return time.perf_counter() - started


def podman_cp(podman: Podman, source: Path | str, target: Path | str) -> float:
    """`podman cp` of one file between this machine and a container; seconds."""
    started = time.perf_counter()
    podman_run = ["podman", "cp", str(source), str(target)]
    subprocess.run(podman_run, env=podman.env, check=True, timeout=600, capture_output=True)
    return time.perf_counter() - started


async def measure_files(
    options: Options, section: Section, serve: Serve, folder: Path, megabytes: int
) -> None:
    blob = folder / "blob.bin"
    sha = hashlib.sha256()
    with blob.open("wb") as f:
        for _ in range(megabytes):
            block = os.urandom(MB)
            sha.update(block)
            f.write(block)
    digest = sha.hexdigest()
    size = megabytes * MB
    into, back = folder / "rsync-in", folder / "rsync-out"
    fetched = folder / "fetched.bin"
    path = "/blob.bin"  # in the container, written over at each run
    rates: dict[str, list[float]] = {
        "rsync in": [],
        "rsync out": [],
        "cp in": [],
        "cp out": [],
        "in": [],
        "out": [],
    }
    rss: dict[str, list[float]] = {"before in": [], "in": [], "before out": [], "out": []}

    def rsync_both() -> None:
        for folder_ in (into, back):
            shutil.rmtree(folder_, ignore_errors=True)
            folder_.mkdir()
        rates["rsync in"].append(size / MB / rsync(blob, into / "blob.bin"))
        rates["rsync out"].append(size / MB / rsync(into / "blob.bin", back / "blob.bin"))
        # what the engine's own copy takes, same file, same container (no target)
        copied = back / "copied.bin"
        rates["cp in"].append(
            size / MB / podman_cp(serve.rig.podman, blob, f"{serve.container}:{path}")
        )
        rates["cp out"].append(
            size / MB / podman_cp(serve.rig.podman, f"{serve.container}:{path}", copied)
        )
        copied.unlink()

    async def base(_run: int) -> float:
        await asyncio.to_thread(rsync_both)
        return rates["rsync in"][-1]

    async def ours(_run: int) -> float:
        reset_peak(serve.pid)
        rss["before in"].append(status_kib(serve.pid, "VmRSS") / 1024)
        started = time.perf_counter()
        await serve.put(blob, size, path, digest)
        rates["in"].append(size / MB / (time.perf_counter() - started))
        rss["in"].append(status_kib(serve.pid, "VmHWM") / 1024)
        reset_peak(serve.pid)
        rss["before out"].append(status_kib(serve.pid, "VmRSS") / 1024)
        started = time.perf_counter()
        got = await serve.get(path, fetched)
        rates["out"].append(size / MB / (time.perf_counter() - started))
        rss["out"].append(status_kib(serve.pid, "VmHWM") / 1024)
        fetched.unlink()
        if got != digest:
            raise RuntimeError(f"GET {path}: sha256 {got}, PUT {digest}")
        return rates["in"][-1]

    await alternate(options.runs, base, ours)
    for direction, label in (("in", "PUT into"), ("out", "GET out of")):
        section.add(
            Figure(
                f"{megabytes} MB file {label} the container",
                "MB/s",
                rates[direction],
                rates[f"rsync {direction}"],
                "rsync on this machine",
                target_ratio=0.8,
            )
        )
    for direction, label in (("in", "PUT into"), ("out", "GET out of")):
        section.add(
            Figure(
                f"{megabytes} MB file {label} the container, against `podman cp`",
                "MB/s",
                rates[direction],
                rates[f"cp {direction}"],
                "podman cp",
            )
        )
    for direction, label in (("in", "PUT"), ("out", "GET")):
        figure = Figure(
            f"serve's peak RSS during the {label}",
            "MiB",
            rss[direction],
            rss[f"before {direction}"],
            "serve's RSS before",
            higher_is_better=False,
        )
        figure.target_value = figure.baseline_median + RSS_BUDGET_MIB
        grown = [p - b for p, b in zip(rss[direction], rss[f"before {direction}"], strict=True)]
        figure.note = f"+{statistics.median(grown):.1f} MiB; budget +{RSS_BUDGET_MIB:g} MiB"
        section.add(figure)
    cp = {
        d: statistics.median(rates[f"cp {d}"]) / statistics.median(rates[f"rsync {d}"])
        for d in ("in", "out")
    }
    section.notes.append(
        "where a file's time goes: PUT receives the whole body into a spool file under "
        "the data dir (hashing it), and only then does `podman cp - <container>:/` read "
        "it as a one-file tar: the two run one after the other, so PUT takes about the "
        "receive plus the engine's copy. That is on purpose: a broken upload never "
        "leaves half a file in the container, and the digest recorded is of the bytes "
        "received. GET waits for `podman cp <container>:<path> -` to start before its "
        "first byte, then passes the tar's member on as it reads. The engine's own copy "
        f"of the same file reaches {cp['in']:.2f}× rsync in and {cp['out']:.2f}× out "
        "(the `podman cp` figures): rsync of a local file is a page-cache copy, so "
        "≥ 0.8× rsync is out of reach through the engine's copy here whatever the "
        "server does; against `podman cp` the spool-then-copy of PUT is ours."
    )


async def run(options: Options) -> Section:
    n = options.size(50, 5)
    megabytes = options.size(100, 2)
    section = Section(
        "exec",
        "exec and files through the API vs podman exec, ssh + podman exec and rsync",
        sizes=(
            f"{n} sequential execs of `true` per run (the figure is their p50); a "
            f"{megabytes} MB file of random bytes; the two-service busybox project of "
            "tests/data/compose-app, one sandbox, its `web` container"
        ),
    )
    section.notes.append(
        "exec, ms, lower is better: ours from `POST .../exec` until its `exit` frame over "
        "one kept-alive connection to `serve` (its own process, shipped settings: NATS "
        "fsync before each ack), the baseline the engine's own call, same container. "
        "Files, MB/s (10^6 bytes), higher is better: ours from the request until the "
        "answer (PUT: 201 with the digest; GET: the last byte written to a local file)."
    )
    with scratch(options, "exec") as folder:
        rig = LocalRig(folder / "local", COMPOSE_APP, 2, "")
        serve = Serve(rig, "profile.compose-local")
        try:
            await serve.start()
            await measure_local_exec(options, section, serve, rig.podman, n)
            await measure_files(options, section, serve, folder, megabytes)
        finally:
            await serve.stop()
        await measure_ssh_exec(options, section, folder / "ssh", n)
    return section
