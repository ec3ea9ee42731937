"""5. API: requests/s and p50/p99 latency under wrk, vs a bare aiohttp handler.

`sandboxer serve` runs as its own process (embedded NATS) holding N ready saas-stub
sandboxes, created through the API. wrk (Debian's package) loads
`GET /v1/sandboxes/{id}` and `GET /v1/sandboxes` on loopback. The baseline is a bare
aiohttp server (bench/bare_api.py, its own process) answering the same paths with the
bytes our API answered, so the difference is our handler, middlewares and encoding.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.common import REPO_ROOT, Figure, Options, Section, alternate, scratch
from tests.helpers import create, wait_state
from tests.infra import ServeProcess, free_port

CONNECTIONS = 32
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}
_LATENCY = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float


def wrk(url: str, seconds: int) -> Load:
    binary = shutil.which("wrk")
    if binary is None:
        raise RuntimeError("wrk is not installed: run scripts/setup (Debian package wrk)")
    out = subprocess.run(
        [binary, "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors against {url}:\n{out}")
    rates = _RATE.search(out)
    latencies = {m.group(1): float(m.group(2)) * UNITS[m.group(3)] for m in _LATENCY.finditer(out)}
    if rates is None or set(latencies) != {"50", "99"}:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    return Load(float(rates.group(1)), latencies["50"], latencies["99"])


async def populate(url: str, n: int) -> list[str]:
    async with aiohttp.ClientSession() as http:
        gate = asyncio.Semaphore(64)

        async def one() -> str:
            async with gate:
                made = await create(http, url)
                await wait_state(http, url, made["id"], {"ready"}, timeout=300)
                return str(made["id"])

        return list(await asyncio.gather(*(one() for _ in range(n))))


async def fetch(url: str) -> bytes:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


def start_bare(port: int, folder: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.bare_api",
            "--port",
            str(port),
            "--one",
            str(folder / "one.json"),
            "--list",
            str(folder / "list.json"),
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        text=True,
    )


async def wait_bare(proc: subprocess.Popen[str], url: str) -> None:
    async with asyncio.timeout(30), aiohttp.ClientSession() as http:
        while True:
            assert proc.poll() is None, "the bare server exited"
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)  # polling a port under a deadline


async def run(options: Options) -> Section:
    n = options.size(1000, 10)
    seconds = options.size(3, 1)
    section = Section(
        "api",
        "GET /v1/sandboxes/{id} and GET /v1/sandboxes under wrk vs a bare aiohttp handler",
        sizes=(f"{n} ready sandboxes; wrk -t1 -c{CONNECTIONS} -d{seconds}s per run, on loopback"),
    )
    section.notes.append(
        "ours: `sandboxer serve` (its own process, embedded NATS, no tokens); bare: "
        "bench/bare_api.py returning the bytes ours returned for the same paths. Both "
        "single-process aiohttp; wrk on the other core."
    )
    with scratch(options, "api") as folder:
        port = free_port()
        serve = ServeProcess(
            folder / "data",
            port,
            SANDBOXER_STARTER_CREDITS=str(n * 30 + 1000),
            SANDBOXER_NATS_SYNC="default",
            SANDBOXER_RECONCILE="off",
        )
        bare: subprocess.Popen[str] | None = None
        try:
            async with aiohttp.ClientSession() as http:
                await serve.wait_healthy(http)
            ids = await populate(serve.url, n)
            one_path = f"/v1/sandboxes/{ids[len(ids) // 2]}"
            list_path = "/v1/sandboxes"
            (folder / "one.json").write_bytes(await fetch(serve.url + one_path))
            (folder / "list.json").write_bytes(await fetch(serve.url + list_path))
            bare_port = free_port()
            bare = start_bare(bare_port, folder)
            bare_url = f"http://127.0.0.1:{bare_port}"
            await wait_bare(bare, bare_url + one_path)
            for label, path in (("GET {id}", one_path), (f"GET list ({n})", list_path)):
                await _measure(options, section, label, bare_url + path, serve.url + path, seconds)
        finally:
            if bare is not None:
                bare.terminate()
                bare.wait(10)
            serve.terminate()
    return section


async def _measure(
    options: Options,
    section: Section,
    label: str,
    bare_url: str,
    our_url: str,
    seconds: int,
) -> None:
    loads: dict[str, list[Load]] = {"ours": [], "bare": []}

    async def base(_run: int) -> float:
        load = await asyncio.to_thread(wrk, bare_url, seconds)
        loads["bare"].append(load)
        return load.rps

    async def ours(_run: int) -> float:
        load = await asyncio.to_thread(wrk, our_url, seconds)
        loads["ours"].append(load)
        return load.rps

    ours_rps, bare_rps = await alternate(options.runs, base, ours)
    name = label.replace("{id}", "/v1/sandboxes/{id}").replace("list", "/v1/sandboxes")
    section.add(
        Figure(
            f"{name} requests/s",
            "req/s",
            ours_rps,
            bare_rps,
            "bare aiohttp",
            target_ratio=0.7,
        )
    )
    for quantile in ("p50", "p99"):
        attr = f"{quantile}_ms"
        section.add(
            Figure(
                f"{name} {quantile} latency",
                "ms",
                [getattr(x, attr) for x in loads["ours"]],
                [getattr(x, attr) for x in loads["bare"]],
                "bare aiohttp",
                higher_is_better=False,
            )
        )
