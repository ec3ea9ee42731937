"""Using a compose sandbox through the SDK: exec, files, logs, on compose-local and
compose-ssh (real sshd, real podman-compose and containers). One project per backend
for the whole module."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
import pytest_asyncio

from extensions import (
    Commanding,
    CommandRefused,
    ExtensionRegistry,
    FileRefused,
    FileStream,
    FileTooLarge,
    FileTransferring,
    Handle,
    LoadedExtension,
    Logging,
    RuntimeInfo,
    StepContext,
)
from tests.infra import Podman, SSHHost, write_repo

pytestmark = [pytest.mark.timeout(300), pytest.mark.asyncio(loop_scope="module")]

COMPOSE = """\
services:
  worker:
    image: localhost/sbx-busybox:latest
    command: ["sleep", "3600"]
    stop_signal: SIGKILL
  talker:
    image: localhost/sbx-busybox:latest
    command: ["sh", "-c", "echo one; echo two >&2; echo three; exec sleep 3600"]
    stop_signal: SIGKILL
  quitter:
    image: localhost/sbx-busybox:latest
    command: ["sleep", "3600"]
    stop_signal: SIGKILL
"""


@dataclass
class Sandbox:
    ext: LoadedExtension
    ctx: StepContext
    handle: Handle
    podman: Podman

    @property
    def commands(self) -> Commanding:
        return cast(Commanding, self.ext.adapter)

    @property
    def files(self) -> FileTransferring:
        return cast(FileTransferring, self.ext.adapter)

    @property
    def logs(self) -> Logging:
        return cast(Logging, self.ext.adapter)

    @property
    def workspace(self) -> Path:
        return Path(self.handle["directory"])

    def container(self, service: str) -> str:
        for item in self.podman.containers(self.handle["project"]):
            if item["Labels"].get("com.docker.compose.service") == service:
                return str(item["Names"][0])
        raise AssertionError(f"no container of {service}")

    def top(self, service: str) -> str:
        return self.podman("top", self.container(service), "args").stdout


async def until(condition: Callable[[], bool], what: str, deadline: float = 10.0) -> None:
    """Waits for `condition`, polling, under a deadline."""
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, f"not within {deadline}s: {what}"
        await asyncio.sleep(0.1)


def host_processes(*words: str) -> list[str]:
    """Command lines of this machine's processes that contain every one of `words`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = [w for w in (entry / "cmdline").read_bytes().decode().split("\0") if w]
        except (OSError, UnicodeDecodeError):
            continue
        if all(w in argv for w in words):
            found.append(" ".join(argv))
    return found


def rss() -> int:
    """This process's resident set, bytes (VmRSS of /proc/self/status)."""
    text = Path("/proc/self/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    assert match
    return int(match.group(1)) * 1024


@pytest_asyncio.fixture(
    scope="module", loop_scope="module", params=["compose-local", "compose-ssh"]
)
async def sandbox(
    request: pytest.FixtureRequest,
    podman: Podman,
    ssh_hosts: list[SSHHost],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Sandbox]:
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    repo = write_repo(folder / "repo", {"compose.yaml": COMPOSE, "site/index.html": "hi\n"})
    if name == "compose-local":
        environ = {
            "SANDBOXER_COMPOSE_LOCAL_CMD": podman.compose_cmd,
            "SANDBOXER_COMPOSE_LOCAL_ENGINE_CMD": podman.engine_cmd,
            "SANDBOXER_COMPOSE_LOCAL_STOP_TIMEOUT": "1",
        }
        host = "local"
    else:
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
    sandbox_id = f"sbx-exec-{'l' if name == 'compose-local' else 's'}{os.getpid() % 10000}"
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
        await ext.adapter.teardown(ctx, handle)
        await registry.close()


# ---- exec ---------------------------------------------------------------------------


async def test_exit_codes_and_streams_kept_apart_in_order(sandbox: Sandbox) -> None:
    run = sandbox.commands.exec
    ctx, handle = sandbox.ctx, sandbox.handle
    assert (await run(ctx, handle, ["sh", "-c", "exit 7"], service="worker")).exit_code == 7
    assert (await run(ctx, handle, ["sh", "-c", "exit 3"])).exit_code == 3
    missing = await run(ctx, handle, ["no-such-program"], service="worker")
    assert missing.exit_code != 0
    script = 'i=0; while [ $i -lt 2000 ]; do echo "o$i"; echo "e$i" >&2; i=$((i+1)); done'
    for service in ("worker", None):
        result = await run(ctx, handle, ["sh", "-c", script], service=service)
        assert result.exit_code == 0
        assert result.stdout == "".join(f"o{i}\n" for i in range(2000))
        assert result.stderr == "".join(f"e{i}\n" for i in range(2000))
        assert result.stdout_bytes == len(result.stdout.encode())
        assert result.stderr_sha256 == hashlib.sha256(result.stderr.encode()).hexdigest()


async def test_arguments_run_literally(sandbox: Sandbox) -> None:
    hostile = ["a'b", 'c"d', "x; touch /pwned", "$(id)", "`id`", "l1\nl2", "*", "&& false"]
    for service in ("worker", None):
        result = await sandbox.commands.exec(
            sandbox.ctx, sandbox.handle, ["echo", *hostile], service=service
        )
        assert (result.exit_code, result.stdout) == (0, " ".join(hostile) + "\n")
    check = await sandbox.commands.exec(
        sandbox.ctx, sandbox.handle, ["ls", "/pwned"], service="worker"
    )
    assert check.exit_code != 0


async def test_fifty_megabytes_stream_through_without_being_held(sandbox: Sandbox) -> None:
    size = 50 * 1024 * 1024
    digest = hashlib.sha256()
    count = 0
    peak = 0
    before = rss()

    async def consume(stream: str, data: bytes) -> None:
        nonlocal count, peak
        if stream != "stdout":
            return  # dd's record counts
        digest.update(data)
        count += len(data)
        peak = max(peak, rss())

    result = await sandbox.commands.exec(
        sandbox.ctx,
        sandbox.handle,
        ["busybox", "dd", "if=/dev/urandom", "bs=65536", f"count={size // 65536}"],
        service="worker",
        timeout=120,
        on_output=consume,
    )
    assert result.exit_code == 0, result.stderr
    assert count == size == result.stdout_bytes
    assert result.stdout_sha256 == digest.hexdigest()
    assert result.truncated
    assert peak - before < 40 * 1024 * 1024, f"RSS grew by {(peak - before) >> 20} MiB"


async def test_timeout_stops_the_command_in_the_container(sandbox: Sandbox) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await sandbox.commands.exec(
            sandbox.ctx, sandbox.handle, ["sleep", "301"], service="worker", timeout=1.5
        )
    assert time.monotonic() - started < 10
    await until(lambda: "sleep 301" not in sandbox.top("worker"), "sleep 301 stopped", 5)


async def test_cancel_stops_the_command_in_the_container_and_on_the_host(
    sandbox: Sandbox,
) -> None:
    for service, argv in (("worker", ["sleep", "302"]), (None, ["sleep", "303"])):
        task = asyncio.ensure_future(
            sandbox.commands.exec(sandbox.ctx, sandbox.handle, argv, service=service, timeout=120)
        )
        if service is not None:
            await until(lambda: "sleep 302" in sandbox.top("worker"), "sleep 302 runs")
        else:
            await until(lambda: bool(host_processes("sleep", "303")), "sleep 303 runs")
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 6
        if service is not None:
            await until(lambda: "sleep 302" not in sandbox.top("worker"), "302 stopped", 5)
        else:
            await until(lambda: not host_processes("sleep", "303"), "303 stopped", 5)


# ---- files --------------------------------------------------------------------------


async def read_all(stream: FileStream) -> bytes:
    data = bytearray()
    try:
        async for chunk in stream.chunks:
            data += chunk
    finally:
        await stream.aclose()
    return bytes(data)


async def test_files_round_trip_in_a_container_and_the_workspace(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    content = os.urandom(4 * 1024 * 1024 + 3)
    source = tmp_path / "upload.bin"
    source.write_bytes(content)
    files, ctx, handle = sandbox.files, sandbox.ctx, sandbox.handle
    for service in ("worker", None):
        name = "/tmp/up/ünï cöde ✓/data.bin"
        await files.put_file(ctx, handle, name, source, service=service)
        stream = await files.get_file(ctx, handle, name, service=service, max_bytes=len(content))
        assert stream.size == len(content)
        assert hashlib.sha256(await read_all(stream)).digest() == hashlib.sha256(content).digest()
        with pytest.raises(FileTooLarge):
            await files.get_file(ctx, handle, name, service=service, max_bytes=1000)
        for bad in ("../etc/passwd", "/tmp/../../etc/passwd", "a\x00b"):
            with pytest.raises(FileRefused):
                await files.get_file(ctx, handle, bad, service=service, max_bytes=1000)
            with pytest.raises(FileRefused):
                await files.put_file(ctx, handle, bad, source, service=service)
        with pytest.raises(FileRefused):
            await files.get_file(ctx, handle, "/tmp/up", service=service, max_bytes=1000)
        with pytest.raises(FileRefused):
            await files.get_file(ctx, handle, "/no/such", service=service, max_bytes=1000)
    # the workspace one is really in the workspace
    assert (sandbox.workspace / "tmp/up/ünï cöde ✓/data.bin").read_bytes() == content


async def test_a_workspace_link_out_is_refused(sandbox: Sandbox, tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours\n")
    os.symlink(outside, sandbox.workspace / "out-link")
    os.symlink(tmp_path, sandbox.workspace / "out-dir")
    files, ctx, handle = sandbox.files, sandbox.ctx, sandbox.handle
    with pytest.raises(FileRefused):
        await files.get_file(ctx, handle, "out-link", max_bytes=1000)
    with pytest.raises(FileRefused):
        await files.get_file(ctx, handle, "out-dir/secret.txt", max_bytes=1000)
    source = tmp_path / "new.txt"
    source.write_text("new\n")
    with pytest.raises(FileRefused):
        await files.put_file(ctx, handle, "out-dir/planted.txt", source)
    assert not (tmp_path / "planted.txt").exists()
    await files.put_file(ctx, handle, "out-link", source)  # replaces the link itself
    assert outside.read_text() == "not yours\n"
    assert (sandbox.workspace / "out-link").read_text() == "new\n"


async def test_a_container_link_resolves_inside_the_container(sandbox: Sandbox) -> None:
    ctx, handle = sandbox.ctx, sandbox.handle
    made = await sandbox.commands.exec(
        ctx,
        handle,
        ["sh", "-c", "mkdir -p /tmp && busybox ln -sf /../../etc/hostname /tmp/hn"],
        service="worker",
    )
    assert made.exit_code == 0, made.stderr
    inside = await sandbox.commands.exec(ctx, handle, ["cat", "/etc/hostname"], service="worker")
    stream = await sandbox.files.get_file(ctx, handle, "/tmp/hn", service="worker", max_bytes=4096)
    got = (await read_all(stream)).decode()
    assert got == inside.stdout
    assert got != Path("/etc/hostname").read_text()


# ---- logs ---------------------------------------------------------------------------


async def test_logs_of_one_service_all_services_and_tail(sandbox: Sandbox) -> None:
    pieces: list[tuple[str, str, bytes]] = []

    async def collect(service: str, stream: str, data: bytes) -> None:
        pieces.append((service, stream, data))

    def text(service: str) -> str:
        return b"".join(d for s, _, d in pieces if s == service).decode()

    ctx, handle = sandbox.ctx, sandbox.handle
    await sandbox.logs.logs(ctx, handle, service="talker", on_output=collect)
    said = text("talker")
    assert "one\n" in said and "two\n" in said and "three\n" in said
    assert any(stream == "stderr" and b"two" in data for _, stream, data in pieces)
    pieces.clear()
    await sandbox.logs.logs(ctx, handle, tail=1, on_output=collect)
    assert {s for s, _, _ in pieces} <= {"worker", "talker", "quitter"}
    assert "one" not in text("talker") and text("talker").strip() in ("two", "three")
    pieces.clear()
    await sandbox.logs.logs(ctx, handle, since=time.time() + 3600, on_output=collect)
    assert text("talker") == ""
    with pytest.raises(CommandRefused, match="talker"):
        await sandbox.logs.logs(ctx, handle, service="nope", on_output=collect)


async def test_following_logs_cancels_and_returns_when_the_container_stops(
    sandbox: Sandbox,
) -> None:
    seen: list[bytes] = []

    async def collect(service: str, stream: str, data: bytes) -> None:
        seen.append(data)

    ctx, handle = sandbox.ctx, sandbox.handle
    talker = sandbox.container("talker")
    task = asyncio.ensure_future(
        sandbox.logs.logs(ctx, handle, service="talker", follow=True, on_output=collect)
    )
    await until(lambda: b"three" in b"".join(seen), "the followed log arrives")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: not host_processes("logs", "--follow", talker), "logs -f stopped", 5)

    quitter = sandbox.container("quitter")
    follow = asyncio.ensure_future(
        sandbox.logs.logs(ctx, handle, service="quitter", follow=True, on_output=collect)
    )
    await until(lambda: bool(host_processes("logs", "--follow", quitter)), "following")
    assert sandbox.podman("kill", quitter).returncode == 0
    async with asyncio.timeout(20):
        await follow  # returns once the followed container stopped


async def test_a_container_that_stopped_since_the_last_exec_is_refused(sandbox: Sandbox) -> None:
    """Execs reuse the container the first one found (no `ps` each time); one that
    stopped meanwhile is still refused as having no running container."""
    run = sandbox.commands.exec
    ctx, handle = sandbox.ctx, sandbox.handle
    assert (await run(ctx, handle, ["echo", "x"], service="worker")).exit_code == 0
    container = sandbox.container("worker")
    sandbox.podman("stop", "-t", "0", container)
    try:
        with pytest.raises(CommandRefused, match="no running container"):
            await run(ctx, handle, ["echo", "x"], service="worker")
    finally:
        sandbox.podman("start", container)
    assert (await run(ctx, handle, ["echo", "back"], service="worker")).stdout == "back\n"
