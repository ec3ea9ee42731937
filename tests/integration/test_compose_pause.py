"""Pause and resume, and activity, of a compose sandbox through the SDK: real
podman-compose and containers on compose-local (one sandbox for the module), and one
cycle of each mode over a real sshd (compose-ssh)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
import pytest_asyncio

from extensions import (
    ActivityCounting,
    Commanding,
    CommandRefused,
    ExtensionRegistry,
    FileRefused,
    FileTransferring,
    Handle,
    LoadedExtension,
    Pausing,
    RuntimeInfo,
    StepContext,
    Watching,
)
from tests.infra import Podman, SSHHost

pytestmark = [pytest.mark.timeout(300), pytest.mark.asyncio(loop_scope="module")]

DATA = Path(__file__).parent.parent / "data" / "compose-pause"


@dataclass
class Sandbox:
    ext: LoadedExtension
    ctx: StepContext
    handle: Handle
    podman: Podman

    @property
    def adapter(self) -> Pausing:
        return cast(Pausing, self.ext.adapter)

    @property
    def commands(self) -> Commanding:
        return cast(Commanding, self.ext.adapter)

    @property
    def files(self) -> FileTransferring:
        return cast(FileTransferring, self.ext.adapter)

    @property
    def watching(self) -> Watching:
        return cast(Watching, self.ext.adapter)

    @property
    def counting(self) -> ActivityCounting:
        return cast(ActivityCounting, self.ext.adapter)

    @property
    def workspace(self) -> Path:
        return Path(self.handle["directory"])

    def states(self) -> dict[str, str]:
        """Service → the engine's state of its container, as podman itself says."""
        return {
            c["Labels"]["com.docker.compose.service"]: str(c["State"]).lower()
            for c in self.podman.containers(self.handle["project"])
        }

    def volume(self) -> Path:
        """The host folder of the project's named volume `data`."""
        label = f"label=com.docker.compose.project={self.handle['project']}"
        names = self.podman("volume", "ls", "--filter", label, "--format", "{{.Name}}")
        (name,) = names.stdout.split()
        inspect = self.podman("volume", "inspect", name, "--format", "{{.Mountpoint}}")
        return Path(inspect.stdout.strip())

    async def sh(self, script: str, service: str | None = "worker") -> str:
        result = await self.commands.exec(
            self.ctx, self.handle, ["sh", "-c", script], service=service, timeout=60
        )
        assert result.exit_code == 0, (script, result.stderr)
        return result.stdout

    async def read(self, path: str, service: str | None = None) -> bytes:
        stream = await self.files.get_file(
            self.ctx, self.handle, path, service=service, max_bytes=1 << 20
        )
        data = bytearray()
        async for chunk in stream.chunks:
            data += chunk
        return bytes(data)


async def until(
    condition: Callable[[], Awaitable[bool]], what: str, deadline: float = 20.0
) -> None:
    """Waits for `condition`, polling, under a deadline."""
    end = time.monotonic() + deadline
    while not await condition():
        assert time.monotonic() < end, f"not within {deadline}s: {what}"
        await asyncio.sleep(0.2)


async def http_get(port: int, path: str = "/") -> str:
    """One HTTP/1.0 GET on 127.0.0.1:<port>: the response's body ('' if none came)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = raw.decode(errors="replace").partition("\r\n\r\n")
    assert head.startswith("HTTP/1.") and " 200 " in head.split("\r\n")[0], head[:200]
    return body


@asynccontextmanager
async def open_sandbox(
    name: str, folder: Path, podman: Podman, ssh_hosts: list[SSHHost] | None = None
) -> AsyncIterator[Sandbox]:
    """A ready sandbox of tests/data/compose-pause on `name`; torn down after (whatever
    state it was left in), and nothing of it left behind."""
    repo = folder / "repo"
    shutil.copytree(DATA, repo)
    if name == "compose-local":
        environ = {
            "SANDBOXER_COMPOSE_LOCAL_CMD": podman.compose_cmd,
            "SANDBOXER_COMPOSE_LOCAL_ENGINE_CMD": podman.engine_cmd,
            "SANDBOXER_COMPOSE_LOCAL_STOP_TIMEOUT": "1",
        }
        host = "local"
    else:
        assert ssh_hosts
        hosts = [ssh_hosts[0].host_config("host0", folder / "remote", podman.compose_cmd)]
        environ = {
            "SANDBOXER_COMPOSE_HOSTS": json.dumps(hosts),
            "SANDBOXER_COMPOSE_CMD": podman.compose_cmd,
            "SANDBOXER_COMPOSE_ENGINE_CMD": podman.engine_cmd,
            "SANDBOXER_COMPOSE_STOP_TIMEOUT": "1",
        }
        host = "host0"
    registry = ExtensionRegistry.discover(
        RuntimeInfo(folder / "data", (folder.resolve(),)), entry_points=False, environ=environ
    )
    ext = registry.get(name)
    sandbox_id = f"sbx-pause-{'l' if name == 'compose-local' else 's'}{os.getpid() % 10000}"
    ctx = StepContext(
        sandbox_id=sandbox_id,
        profile=f"profile.{name}",
        inputs={"repo": str(repo)},
        config=ext.config_for({}),
        host=host,
    )
    handle = await ext.adapter.provision(ctx)
    try:
        await ext.adapter.wait_ready(ctx, handle)
        yield Sandbox(ext, ctx, handle, podman)
    finally:
        try:
            await ext.adapter.teardown(ctx, handle)
        finally:
            await registry.close()
    assert podman.leftovers(handle["project"]) == []


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sandbox(
    podman: Podman, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Sandbox]:
    async with open_sandbox("compose-local", tmp_path_factory.mktemp("pause"), podman) as box:
        yield box


@pytest_asyncio.fixture(loop_scope="module", autouse=True)
async def running_after(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """After each test of the shared sandbox, it runs again whatever the test left
    (a failure halfway must not fail the tests after it): a stop-mode resume unpauses
    and starts every container."""
    yield
    if "sandbox" in request.fixturenames:
        box: Sandbox = request.getfixturevalue("sandbox")
        await box.adapter.resume(box.ctx, box.handle, "stop")


async def endpoint_port(box: Sandbox) -> int:
    (web,) = [
        e
        for e in await box.watching.endpoints(box.ctx, box.handle)
        if (e.service, e.container_port) == ("web", 8080)
    ]
    return web.host_port


# ---- what survives ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["pause", "stop"])
async def test_files_survive_three_cycles(sandbox: Sandbox, mode: str, tmp_path: Path) -> None:
    """A file in a container's own filesystem, one in the named volume and one in the
    workspace are all there after each of three pause/resume cycles; while paused the
    engine holds every container (paused, or exited for a stop), `services` reports
    them paused (no ServiceExited for the core) and `activity` has nothing to count."""
    ctx, handle = sandbox.ctx, sandbox.handle
    marker = f"kept through {mode} {os.getpid()}\n"
    source = tmp_path / "marker.txt"
    source.write_text(marker)
    await sandbox.files.put_file(ctx, handle, f"/var/tmp/fs-{mode}.txt", source, service="worker")
    await sandbox.sh(f"echo -n '{marker}' > /data/vol-{mode}.txt")
    await sandbox.files.put_file(ctx, handle, f"kept/ws-{mode}.txt", source)
    held = "paused" if mode == "pause" else "exited"
    for cycle in range(3):
        await sandbox.adapter.pause(ctx, handle, mode)
        assert sandbox.states() == {"web": held, "worker": held}, cycle
        statuses = await sandbox.watching.services(ctx, handle)
        assert {(s.service, s.state, s.exit_code) for s in statuses} == {
            ("web", "paused", None),
            ("worker", "paused", None),
        }
        assert await sandbox.counting.activity(ctx, handle) == {}
        await sandbox.adapter.resume(ctx, handle, mode)
        assert sandbox.states() == {"web": "running", "worker": "running"}, cycle
        assert (await sandbox.read(f"/var/tmp/fs-{mode}.txt", "worker")).decode() == marker
        assert await sandbox.sh(f"cat /data/vol-{mode}.txt") == marker
        assert (await sandbox.read(f"kept/ws-{mode}.txt")).decode() == marker
        assert (sandbox.workspace / "kept" / f"ws-{mode}.txt").read_text() == marker
    statuses = await sandbox.watching.services(ctx, handle)
    assert {(s.service, s.state, s.health) for s in statuses} == {
        ("web", "running", "healthy"),
        ("worker", "running", "none"),
    }


async def test_pause_freezes_the_processes_and_refuses_what_would_hang(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """Mode pause: a counter loop in the worker stops advancing (read from the host,
    through the named volume's folder: the container itself cannot be asked), exec
    and copies into a frozen container are refused at once, the workspace still
    answers; after resume the loop goes on."""
    ctx, handle = sandbox.ctx, sandbox.handle
    counter = sandbox.volume() / "counter"
    done = sandbox.volume() / "ticker.done"
    await sandbox.sh(
        "rm -f /data/stop /data/ticker.done /data/counter; "
        "(i=0; while [ ! -e /data/stop ]; do i=$((i+1)); echo $i > /data/counter.new; "
        "busybox mv /data/counter.new /data/counter; sleep 0.1; done; touch /data/ticker.done)"
        " </dev/null >/dev/null 2>&1 &"
    )

    def count() -> int:
        text = counter.read_text().strip() if counter.exists() else ""
        return int(text) if text else 0

    async def advances(than: int) -> bool:
        return count() > than

    try:
        await until(lambda: advances(2), "the counter loop runs")
        await sandbox.adapter.pause(ctx, handle, "pause")
        try:
            frozen = count()
            source = tmp_path / "x.txt"
            source.write_text("x")
            started = time.monotonic()
            with pytest.raises(CommandRefused, match="paused"):
                await sandbox.commands.exec(ctx, handle, ["true"], service="worker")
            with pytest.raises(FileRefused, match="paused"):
                await sandbox.files.put_file(ctx, handle, "/tmp/x.txt", source, service="worker")
            with pytest.raises(FileRefused, match="paused"):
                await sandbox.read("/etc/hostname", "worker")
            assert time.monotonic() - started < 2, "refused at once, not after a hang"
            assert await sandbox.sh("echo workspace", service=None) == "workspace\n"
            # A negative check needs a window: ten of the loop's ticks.
            await asyncio.sleep(1.0)
            assert count() == frozen, "a paused container's loop went on"
            assert sandbox.states()["worker"] == "paused"
        finally:
            await sandbox.adapter.resume(ctx, handle, "pause")
        await until(lambda: advances(frozen + 2), "the loop goes on after resume")
    finally:  # the loop ends (the tests after this one measure an idle sandbox)
        (sandbox.volume() / "stop").touch()

    async def ended() -> bool:
        return done.exists()

    await until(ended, "the counter loop ends")


async def test_twice_is_fine_and_a_crash_halfway_is_finished(sandbox: Sandbox) -> None:
    """Pausing a paused sandbox and resuming a running one succeed; a pause or resume
    that stopped after one container (the engine did part of it) is completed by
    calling it again."""
    ctx, handle = sandbox.ctx, sandbox.handle
    project = handle["project"]
    names = {
        c["Labels"]["com.docker.compose.service"]: str(c["Names"][0])
        for c in sandbox.podman.containers(project)
    }
    for mode, held in (("pause", "paused"), ("stop", "exited")):
        await sandbox.adapter.pause(ctx, handle, mode)
        await sandbox.adapter.pause(ctx, handle, mode)
        assert set(sandbox.states().values()) == {held}
        await sandbox.adapter.resume(ctx, handle, mode)
        await sandbox.adapter.resume(ctx, handle, mode)
        assert set(sandbox.states().values()) == {"running"}
    # crashed halfway: the engine paused or stopped one container of two
    assert sandbox.podman("pause", names["web"]).returncode == 0
    await sandbox.adapter.pause(ctx, handle, "pause")
    assert set(sandbox.states().values()) == {"paused"}
    assert sandbox.podman("unpause", names["worker"]).returncode == 0
    await sandbox.adapter.resume(ctx, handle, "pause")
    assert set(sandbox.states().values()) == {"running"}
    assert sandbox.podman("stop", "-t", "1", names["worker"]).returncode == 0
    await sandbox.adapter.pause(ctx, handle, "stop")
    assert set(sandbox.states().values()) == {"exited"}
    assert sandbox.podman("start", names["web"]).returncode == 0
    await sandbox.adapter.resume(ctx, handle, "stop")
    assert set(sandbox.states().values()) == {"running"}
    assert await http_get(await endpoint_port(sandbox)) == "paused and resumed\n"


@pytest.mark.parametrize("mode", ["pause", "stop"])
async def test_endpoints_answer_after_resume(sandbox: Sandbox, mode: str) -> None:
    """After a resume `endpoints` names the host port the engine publishes now (a
    stopped container may come back on another) and the service answers on it."""
    ctx, handle = sandbox.ctx, sandbox.handle
    await sandbox.adapter.pause(ctx, handle, mode)
    await sandbox.adapter.resume(ctx, handle, mode)
    port = await endpoint_port(sandbox)
    (web,) = [
        c
        for c in sandbox.podman.containers(handle["project"])
        if c["Labels"]["com.docker.compose.service"] == "web"
    ]
    published = sandbox.podman("port", str(web["Names"][0]), "8080/tcp").stdout
    assert published.strip().rsplit(":", 1)[-1] == str(port)
    assert await http_get(port) == "paused and resumed\n"


# ---- activity --------------------------------------------------------------------------


async def test_activity_moves_with_use_and_not_when_idle(sandbox: Sandbox, tmp_path: Path) -> None:
    """Each container's CPU time and network bytes: they grow while a command busy-
    loops or moves data, and stay while the sandbox sits idle."""
    ctx, handle = sandbox.ctx, sandbox.handle
    activity = sandbox.counting.activity
    first = await activity(ctx, handle)
    # web has a healthcheck: its checks spend CPU whether or not anyone uses it, so
    # only its network counts.
    assert set(first) == {"web.net", "worker.cpu", "worker.net"}
    assert all(isinstance(v, int) and v >= 0 for v in first.values())

    # Idle: an idle httpd and `sleep` use no CPU at all, so the CPU counters stay
    # exactly. The network is never quite silent, as podman counts it (the veth's
    # bytes): in the first seconds after a container (re)starts its kernel sends
    # ~1.5 KB of IPv6 address checks, multicast reports and router solicitations,
    # then a 70-140 byte solicitation (and its multicast copies) at doubling
    # intervals (4 s, 8 s, 16 s, ...: measured here with podman 4.3). The counters
    # count KiB (activity_net_unit), so once the start-up chatter is over a later
    # solicitation moves one by at most one unit. The previous tests restarted the
    # containers: wait for the chatter to end (no net counter moved for 3 s).
    last: dict[str, int] = {}
    changed = time.monotonic()

    async def quiet() -> bool:
        nonlocal last, changed
        sample = await activity(ctx, handle)
        nets = {k: v for k, v in sample.items() if k.endswith(".net")}
        if nets != last:
            last, changed = nets, time.monotonic()
        return time.monotonic() - changed >= 3.0

    await until(quiet, "the containers' start-up network chatter ends", deadline=60)
    first = await activity(ctx, handle)
    await asyncio.sleep(2.0)  # the idle window itself (a negative check)
    idle = await activity(ctx, handle)
    assert idle["worker.cpu"] == first["worker.cpu"], (first, idle)
    for name in ("web.net", "worker.net"):
        assert 0 <= idle[name] - first[name] <= 1, (name, first, idle)

    # Busy: a shell loop in the worker.
    await sandbox.sh("i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done")
    busy = await activity(ctx, handle)
    assert busy["worker.cpu"] > idle["worker.cpu"], (idle, busy)

    # Traffic: the worker fetches 2 MiB from web (the file is in the workspace,
    # which web serves).
    size = 2 * 1024 * 1024
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(size))
    await sandbox.files.put_file(ctx, handle, "site/big.bin", big)
    fetched = await sandbox.sh("wget -q -O - http://web:8080/big.bin | busybox wc -c")
    assert int(fetched.strip()) == size
    moved = await activity(ctx, handle)
    for name in ("web.net", "worker.net"):
        assert moved[name] - busy[name] >= size // 1024, (name, busy, moved)


# ---- over SSH --------------------------------------------------------------------------


async def test_one_cycle_of_each_mode_over_ssh(
    podman: Podman, ssh_hosts: list[SSHHost], tmp_path: Path
) -> None:
    """compose-ssh, a real sshd on loopback: each mode once; the named volume's and
    the workspace's files survive, the services run again and web answers; a paused
    sandbox is torn down completely."""
    async with open_sandbox("compose-ssh", tmp_path, podman, ssh_hosts) as box:
        ctx, handle = box.ctx, box.handle
        await box.sh("echo -n kept > /data/kept.txt")
        await box.sh("echo -n kept > kept.txt", service=None)
        for mode, held in (("pause", "paused"), ("stop", "exited")):
            await box.adapter.pause(ctx, handle, mode)
            assert set(box.states().values()) == {held}
            await box.adapter.resume(ctx, handle, mode)
            assert set(box.states().values()) == {"running"}
            assert await box.sh("cat /data/kept.txt") == "kept"
            assert await box.sh("cat kept.txt", service=None) == "kept"
            assert await http_get(await endpoint_port(box)) == "paused and resumed\n"
            counters = await box.counting.activity(ctx, handle)
            assert {"web.net", "worker.cpu"} <= set(counters)  # web: a healthcheck
        # left paused: the teardown of open_sandbox removes it all (and checks)
        await box.adapter.pause(ctx, handle, "pause")
        assert set(box.states().values()) == {"paused"}
