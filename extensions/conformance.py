"""A conformance suite every extension runs; third-party authors import it too.

Subclass `ExtensionConformance` in a pytest module and provide three fixtures:

    class TestMyExtension(ExtensionConformance):
        @pytest.fixture
        def extension(self, tmp_path) -> LoadedExtension: ...     # a built adapter
        @pytest.fixture
        def make_context(self, ...) -> Callable[[str, dict], StepContext]: ...
        @pytest.fixture
        def leftovers(self, ...) -> Callable[[str], Awaitable[list[str]]]: ...
            # what still exists for a sandbox id on the backend (empty when clean)

Optionally override `failing_config` (config that makes provision fail half-way) and
`inputs` (inputs a sandbox of this extension needs).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, ClassVar, cast

import pytest

from extensions.registry import LoadedExtension
from extensions.sdk import (
    FILE_CHUNK,
    HEALTH,
    OPTIONAL_HOOKS,
    PAUSE_MODES,
    REQUIRED_HOOKS,
    ActivityCounting,
    Commanding,
    CommandRefused,
    Extension,
    ExtensionError,
    FileMissing,
    FileRefused,
    FileStream,
    FileTooLarge,
    FileTransferring,
    Handle,
    Logging,
    Pausing,
    Reconciling,
    StepContext,
    Watching,
)

MakeContext = Callable[[str, dict[str, Any]], StepContext]
Leftovers = Callable[[str], Awaitable[list[str]]]


def _new_id() -> str:
    return f"conf-{secrets.token_hex(5)}"


class ExtensionConformance:
    """Behaviour every adapter owes the manager. Not collected on its own (no Test prefix)."""

    failing_config: ClassVar[dict[str, Any] | None] = None
    timeout: ClassVar[float] = 120.0

    async def _run(self, awaitable: Awaitable[Any]) -> Any:
        async with asyncio.timeout(self.timeout):
            return await awaitable

    async def test_provision_ready_teardown(
        self, extension: LoadedExtension, make_context: MakeContext, leftovers: Leftovers
    ) -> None:
        sandbox_id = _new_id()
        ctx = make_context(sandbox_id, {})
        handle = await self._run(extension.adapter.provision(ctx))
        assert isinstance(handle, dict)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in handle.items())
        services = await self._run(extension.adapter.wait_ready(ctx, handle))
        assert isinstance(services, list) and services, "wait_ready names what is running"
        assert await leftovers(sandbox_id), "a provisioned sandbox exists on the backend"
        await self._run(extension.adapter.teardown(ctx, handle))
        assert await leftovers(sandbox_id) == []

    async def test_teardown_twice(
        self, extension: LoadedExtension, make_context: MakeContext, leftovers: Leftovers
    ) -> None:
        sandbox_id = _new_id()
        ctx = make_context(sandbox_id, {})
        handle = await self._run(extension.adapter.provision(ctx))
        await self._run(extension.adapter.teardown(ctx, handle))
        await self._run(extension.adapter.teardown(ctx, handle))
        assert await leftovers(sandbox_id) == []

    async def test_teardown_without_handle(
        self, extension: LoadedExtension, make_context: MakeContext, leftovers: Leftovers
    ) -> None:
        """A crash can lose the handle: teardown must work from the sandbox id alone."""
        sandbox_id = _new_id()
        ctx = make_context(sandbox_id, {})
        await self._run(extension.adapter.provision(ctx))
        await self._run(extension.adapter.teardown(ctx, None))
        assert await leftovers(sandbox_id) == []

    async def test_teardown_of_never_provisioned(
        self, extension: LoadedExtension, make_context: MakeContext, leftovers: Leftovers
    ) -> None:
        sandbox_id = _new_id()
        await self._run(extension.adapter.teardown(make_context(sandbox_id, {}), None))
        assert await leftovers(sandbox_id) == []

    async def test_teardown_after_failed_provision(
        self, extension: LoadedExtension, make_context: MakeContext, leftovers: Leftovers
    ) -> None:
        if self.failing_config is None:
            pytest.skip("this extension's suite gives no failing_config")
        sandbox_id = _new_id()
        ctx = make_context(sandbox_id, dict(self.failing_config))
        with pytest.raises(Exception):  # noqa: B017 - any failure is a failure here
            await self._run(extension.adapter.provision(ctx))
        await self._run(extension.adapter.teardown(ctx, None))
        assert await leftovers(sandbox_id) == []

    async def test_isolated_sandboxes(
        self, extension: LoadedExtension, make_context: MakeContext, leftovers: Leftovers
    ) -> None:
        first, second = _new_id(), _new_id()
        ctx1, ctx2 = make_context(first, {}), make_context(second, {})
        h1, h2 = await self._run(
            asyncio.gather(extension.adapter.provision(ctx1), extension.adapter.provision(ctx2))
        )
        await self._run(extension.adapter.teardown(ctx1, h1))
        assert await leftovers(first) == []
        assert await leftovers(second), "tearing one down leaves the other alone"
        await self._run(extension.adapter.teardown(ctx2, h2))
        assert await leftovers(second) == []

    async def test_inventory_finds_and_removes_what_it_made(
        self, extension: LoadedExtension, make_context: MakeContext, leftovers: Leftovers
    ) -> None:
        """With `inventory`: a provisioned sandbox is listed under its id, and removing
        every listed resource of that id leaves nothing behind (an orphan's cleanup)."""
        if not extension.manifest.has("inventory"):
            pytest.skip("no inventory capability")
        adapter = cast(Reconciling, extension.adapter)
        sandbox_id = _new_id()
        ctx = make_context(sandbox_id, {})
        await self._run(extension.adapter.provision(ctx))
        found = await self._run(adapter.inventory(ctx.config))
        mine = [r for r in found if r.sandbox_id == sandbox_id]
        assert mine, "inventory lists what provision made"
        for resource in mine:
            await self._run(adapter.remove_orphan(ctx.config, resource))
            await self._run(adapter.remove_orphan(ctx.config, resource))  # idempotent
        assert await leftovers(sandbox_id) == []
        after = await self._run(adapter.inventory(ctx.config))
        assert [r for r in after if r.sandbox_id == sandbox_id] == []

    @asynccontextmanager
    async def _ready(
        self,
        extension: LoadedExtension,
        make_context: MakeContext,
        leftovers: Leftovers,
        capability: str = "exec",
    ) -> AsyncIterator[tuple[Any, StepContext, Handle]]:
        """A provisioned, ready sandbox of an extension with `capability`; torn down
        after."""
        if not extension.manifest.has(capability):
            pytest.skip(f"no {capability} capability")
        sandbox_id = _new_id()
        ctx = make_context(sandbox_id, {})
        handle = await self._run(extension.adapter.provision(ctx))
        try:
            await self._run(extension.adapter.wait_ready(ctx, handle))
            yield extension.adapter, ctx, handle
        finally:
            await self._run(extension.adapter.teardown(ctx, handle))
        assert await leftovers(sandbox_id) == []

    async def test_exec_results_streams_env_and_quoting(
        self, extension: LoadedExtension, make_context: MakeContext, leftovers: Leftovers
    ) -> None:
        """With `exec`: exit codes, each stream kept apart and streamed as it arrives
        (counted and digested), env given as values (never as shell text), arguments
        passed as-is. Only the commands every backend runs: echo, true, false, exit,
        sleep, sh -c."""
        async with self._ready(extension, make_context, leftovers) as (raw, ctx, handle):
            adapter = cast(Commanding, raw)
            said = await self._run(adapter.exec(ctx, handle, ["echo", "hello", "world"]))
            assert (said.exit_code, said.stdout, said.stderr) == (0, "hello world\n", "")
            assert said.duration >= 0 and not said.truncated
            assert said.stdout_bytes == 12 and said.stderr_bytes == 0
            assert said.stdout_sha256 == hashlib.sha256(b"hello world\n").hexdigest()
            assert said.stderr_sha256 == hashlib.sha256(b"").hexdigest()
            assert (await self._run(adapter.exec(ctx, handle, ["true"]))).exit_code == 0
            assert (await self._run(adapter.exec(ctx, handle, ["false"]))).exit_code != 0

            pieces: list[tuple[str, bytes]] = []

            async def collect(stream: str, data: bytes) -> None:
                pieces.append((stream, data))

            mixed = await self._run(
                adapter.exec(
                    ctx,
                    handle,
                    ["sh", "-c", "echo out; echo err >&2; exit 3"],
                    on_output=collect,
                )
            )
            assert (mixed.exit_code, mixed.stdout, mixed.stderr) == (3, "out\n", "err\n")
            assert b"".join(d for s, d in pieces if s == "stdout") == b"out\n"
            assert b"".join(d for s, d in pieces if s == "stderr") == b"err\n"

            hostile = "a b; $(touch pwned) `id` 'q' \"dq\""
            from_env = await self._run(
                adapter.exec(
                    ctx, handle, ["sh", "-c", 'echo "$GREETING"'], env={"GREETING": hostile}
                )
            )
            assert (from_env.exit_code, from_env.stdout) == (0, hostile + "\n")
            literal = await self._run(adapter.exec(ctx, handle, ["echo", hostile, "$HOME"]))
            assert literal.stdout == f"{hostile} $HOME\n"

    async def test_exec_refusals_and_timeout(
        self, extension: LoadedExtension, make_context: MakeContext, leftovers: Leftovers
    ) -> None:
        """A service the sandbox does not have, a bad env name, an empty argv: refused
        with an ExtensionError, not run. A command past its timeout: TimeoutError, soon."""
        async with self._ready(extension, make_context, leftovers) as (raw, ctx, handle):
            adapter = cast(Commanding, raw)
            with pytest.raises(ExtensionError):
                await self._run(adapter.exec(ctx, handle, ["true"], service="no-such-service"))
            with pytest.raises(CommandRefused):
                await self._run(adapter.exec(ctx, handle, ["true"], env={"A B": "x"}))
            with pytest.raises(CommandRefused):
                await self._run(adapter.exec(ctx, handle, []))
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await self._run(adapter.exec(ctx, handle, ["sleep", "30"], timeout=1.0))
            assert time.monotonic() - started < 15
            # the sandbox still answers afterwards
            after = await self._run(adapter.exec(ctx, handle, ["echo", "still here"]))
            assert after.stdout == "still here\n"

    async def test_exec_cancelled_returns_soon_and_the_sandbox_answers(
        self, extension: LoadedExtension, make_context: MakeContext, leftovers: Leftovers
    ) -> None:
        """Cancelling the awaiting task of a long command re-raises CancelledError
        within ~5 s, and the command is stopped where it runs: what it would have done
        later never happens."""
        async with self._ready(extension, make_context, leftovers) as (raw, ctx, handle):
            adapter = cast(Commanding, raw)
            late = ["sh", "-c", "sleep 1.5; touch cancelled-but-ran"]
            task = asyncio.ensure_future(adapter.exec(ctx, handle, late, timeout=120))
            await asyncio.sleep(0.5)  # let it start; cancelling earlier must work too
            started = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await self._run(task)
            assert time.monotonic() - started < 8
            # a negative check: wait past the time the command would have acted
            await self._run(adapter.exec(ctx, handle, ["sleep", "2"]))
            ran = await self._run(adapter.exec(ctx, handle, ["ls", "cancelled-but-ran"]))
            assert ran.exit_code != 0, "the cancelled command went on running"
            after = await self._run(adapter.exec(ctx, handle, ["echo", "still here"]))
            assert after.stdout == "still here\n"

    async def test_exec_slow_consumer_loses_nothing(
        self, extension: LoadedExtension, make_context: MakeContext, leftovers: Leftovers
    ) -> None:
        """Backpressure: an `on_output` that takes its time sees every byte of each
        stream, in order, and the counts and digests agree with what it saw."""
        async with self._ready(extension, make_context, leftovers) as (raw, ctx, handle):
            adapter = cast(Commanding, raw)
            seen: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}

            async def slow(stream: str, data: bytes) -> None:
                await asyncio.sleep(0.01)
                seen[stream] += data

            script = "; ".join(f"echo line{i}; echo e{i} >&2" for i in range(300))
            result = await self._run(
                adapter.exec(ctx, handle, ["sh", "-c", script], on_output=slow)
            )
            assert result.exit_code == 0
            for stream in ("stdout", "stderr"):
                data = bytes(seen[stream])
                assert getattr(result, f"{stream}_bytes") == len(data)
                assert getattr(result, f"{stream}_sha256") == hashlib.sha256(data).hexdigest()
                assert getattr(result, stream) == data.decode()
            assert seen["stdout"].decode() == "".join(f"line{i}\n" for i in range(300))
            assert seen["stderr"].decode() == "".join(f"e{i}\n" for i in range(300))

    async def _read_all(self, stream: FileStream) -> bytes:
        data = bytearray()
        try:
            async for chunk in stream.chunks:
                assert len(chunk) <= FILE_CHUNK
                data += chunk
        finally:
            await stream.aclose()
        return bytes(data)

    async def test_files_round_trip_and_refusals(
        self,
        extension: LoadedExtension,
        make_context: MakeContext,
        leftovers: Leftovers,
        tmp_path: Any,
    ) -> None:
        """With `put_file` + `get_file` (the workspace as the root): a round trip keeps
        every byte (sha256), missing parents are made, a unicode name works; '..', a
        NUL, a directory, a missing file are `FileRefused`; a file over `max_bytes`
        is `FileTooLarge`."""
        if extension.manifest.has("put_file"):
            assert extension.manifest.has("get_file"), "put_file and get_file go together"
        async with self._ready(extension, make_context, leftovers, "put_file") as (
            raw,
            ctx,
            handle,
        ):
            adapter = cast(FileTransferring, raw)
            content = secrets.token_bytes(3 * 1024 * 1024 + 17)
            source = tmp_path / "upload.bin"
            source.write_bytes(content)
            await self._run(adapter.put_file(ctx, handle, "/deep/er/data.bin", source))
            stream = await self._run(
                adapter.get_file(ctx, handle, "deep/er/data.bin", max_bytes=len(content))
            )
            assert stream.size == len(content)
            got = await self._run(self._read_all(stream))
            assert hashlib.sha256(got).hexdigest() == hashlib.sha256(content).hexdigest()

            small = tmp_path / "small.txt"
            small.write_bytes("grüße\n".encode())
            await self._run(adapter.put_file(ctx, handle, "dir/straße ünïcode.txt", small))
            back = await self._run(
                adapter.get_file(ctx, handle, "/dir/straße ünïcode.txt", max_bytes=100)
            )
            assert await self._run(self._read_all(back)) == "grüße\n".encode()
            await self._run(adapter.put_file(ctx, handle, "dir/straße ünïcode.txt", source))
            replaced = await self._run(
                adapter.get_file(ctx, handle, "dir/straße ünïcode.txt", max_bytes=len(content))
            )
            assert replaced.size == len(content)
            await self._run(replaced.aclose())  # stopped early: fine

            for bad in ("../x", "a/../../x", "a\x00b", ""):
                with pytest.raises(FileRefused):
                    await self._run(adapter.put_file(ctx, handle, bad, small))
                with pytest.raises(FileRefused):
                    await self._run(adapter.get_file(ctx, handle, bad, max_bytes=100))
            with pytest.raises(FileRefused):
                await self._run(adapter.get_file(ctx, handle, "dir", max_bytes=100))
            with pytest.raises(FileRefused):
                await self._run(adapter.put_file(ctx, handle, "dir", small))
            with pytest.raises(FileMissing):
                await self._run(adapter.get_file(ctx, handle, "no/such/file", max_bytes=100))
            with pytest.raises(FileTooLarge):
                await self._run(adapter.get_file(ctx, handle, "deep/er/data.bin", max_bytes=10))

    async def test_logs_answer_and_refuse_unknown_services(
        self, extension: LoadedExtension, make_context: MakeContext, leftovers: Leftovers
    ) -> None:
        """With `logs`: every service's log is passed on and the call returns (not
        following); an unknown service is refused with CommandRefused."""
        async with self._ready(extension, make_context, leftovers, "logs") as (
            raw,
            ctx,
            handle,
        ):
            adapter = cast(Logging, raw)
            pieces: list[tuple[str, str, bytes]] = []

            async def collect(service: str, stream: str, data: bytes) -> None:
                assert stream in ("stdout", "stderr")
                pieces.append((service, stream, data))

            await self._run(adapter.logs(ctx, handle, on_output=collect))
            await self._run(adapter.logs(ctx, handle, tail=1, on_output=collect))
            with pytest.raises(CommandRefused):
                await self._run(adapter.logs(ctx, handle, service="no-such", on_output=collect))

    async def test_services_and_endpoints_of_a_ready_sandbox(
        self, extension: LoadedExtension, make_context: MakeContext, leftovers: Leftovers
    ) -> None:
        """With `services` + `endpoints`: every service wait_ready named is reported,
        running, with a health from the vocabulary, and asking again answers the same;
        every published port is a real port with the address a client uses."""
        if not extension.manifest.has("services"):
            pytest.skip("no services capability")
        assert extension.manifest.has("endpoints"), "services and endpoints go together"
        adapter = cast(Watching, extension.adapter)
        sandbox_id = _new_id()
        ctx = make_context(sandbox_id, {})
        handle = await self._run(extension.adapter.provision(ctx))
        try:
            named = await self._run(extension.adapter.wait_ready(ctx, handle))
            for _ in range(2):
                statuses = await self._run(adapter.services(ctx, handle))
                assert sorted(s.service for s in statuses) == sorted(named)
                for status in statuses:
                    assert status.state == "running", status
                    assert status.health in HEALTH and status.health != "unhealthy", status
                    assert status.exit_code is None, status
            for port in await self._run(adapter.endpoints(ctx, handle)):
                assert port.service in named, port
                assert 0 < port.container_port < 65536 and 0 < port.host_port < 65536, port
                assert port.protocol in ("tcp", "udp", "sctp") and port.host, port
        finally:
            await self._run(extension.adapter.teardown(ctx, handle))
        assert await leftovers(sandbox_id) == []

    async def test_pause_resume_round_trip_keeps_files(
        self,
        extension: LoadedExtension,
        make_context: MakeContext,
        leftovers: Leftovers,
        tmp_path: Any,
    ) -> None:
        """With `pause` + `resume`, in each mode: pausing twice and resuming twice
        succeed (idempotent), no service is reported exited while paused, the services
        run again after, and a file written before (with `put_file`) is still there."""
        if extension.manifest.has("pause"):
            assert extension.manifest.has("resume"), "pause and resume go together"
        async with self._ready(extension, make_context, leftovers, "pause") as (
            raw,
            ctx,
            handle,
        ):
            adapter = cast(Pausing, raw)
            files = cast(FileTransferring, raw) if extension.manifest.has("put_file") else None
            watching = cast(Watching, raw) if extension.manifest.has("services") else None
            content = secrets.token_bytes(4096)
            if files is not None:
                source = tmp_path / "kept.bin"
                source.write_bytes(content)
                await self._run(files.put_file(ctx, handle, "kept/before-pause.bin", source))
            for mode in PAUSE_MODES:
                await self._run(adapter.pause(ctx, handle, mode))
                await self._run(adapter.pause(ctx, handle, mode))
                if watching is not None:
                    for status in await self._run(watching.services(ctx, handle)):
                        assert status.state not in ("exited", "dead"), (mode, status)
                await self._run(adapter.resume(ctx, handle, mode))
                await self._run(adapter.resume(ctx, handle, mode))
                if watching is not None:
                    for status in await self._run(watching.services(ctx, handle)):
                        assert status.state == "running", (mode, status)
                if files is not None:
                    stream = await self._run(
                        files.get_file(ctx, handle, "kept/before-pause.bin", max_bytes=8192)
                    )
                    assert await self._run(self._read_all(stream)) == content, mode

    async def test_activity_answers_counters(
        self, extension: LoadedExtension, make_context: MakeContext, leftovers: Leftovers
    ) -> None:
        """With `activity`: named integer counters, none negative; asked twice of an
        untouched sandbox, no counter went down."""
        async with self._ready(extension, make_context, leftovers, "activity") as (
            raw,
            ctx,
            handle,
        ):
            adapter = cast(ActivityCounting, raw)
            first = await self._run(adapter.activity(ctx, handle))
            second = await self._run(adapter.activity(ctx, handle))
            for sample in (first, second):
                assert isinstance(sample, dict)
                for name, value in sample.items():
                    assert isinstance(name, str) and name, sample
                    assert isinstance(value, int) and value >= 0, sample
            for name in set(first) & set(second):
                assert second[name] >= first[name], (name, first, second)

    def test_capabilities_honoured(self, extension: LoadedExtension) -> None:
        adapter = extension.adapter
        assert isinstance(adapter, Extension)
        for hook in REQUIRED_HOOKS:
            assert extension.manifest.has(hook)
            assert asyncio.iscoroutinefunction(getattr(adapter, hook))
        for hook in OPTIONAL_HOOKS:
            if extension.manifest.has(hook):
                method = getattr(adapter, hook)
                assert callable(method), hook
                if hook != "place":  # placement is a pure choice: synchronous
                    assert asyncio.iscoroutinefunction(method), hook
        for hook in extension.manifest.hooks:
            assert extension.manifest.has(hook), f"hook policy for undeclared {hook}"
