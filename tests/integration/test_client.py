"""sandboxer.client against the real service (in-process serve, real nats-server): the
sync Client (run in a thread, since the service shares this test's event loop) and the
AsyncClient. exec, files and logs are tested against the API's contract; they skip,
saying so, while the server does not publish those routes in its OpenAPI document."""

from __future__ import annotations

import asyncio
import hashlib
import io
import queue
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from sandboxer.client import (
    AsyncClient,
    Client,
    CommandFailed,
    CommandTimedOut,
    Conflict,
    ExecResult,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    SandboxFailed,
    Unauthorized,
)
from sandboxer.wire import ExecExit, ExecStarted, ExecStdout, LogLine, SandboxOut
from tests.conftest import RunningService, StartService
from tests.infra import Podman

STUB = "profile.saas-stub"
EXEC = "/v1/sandboxes/{id}/exec"
FILES = "/v1/sandboxes/{id}/files"
LOGS = "/v1/sandboxes/{id}/logs"
TOKENS = [
    {"name": "ops", "token": "admin-token-0123456789", "account": "default", "role": "admin"},
    {"name": "acme-ci", "token": "acme-token-0123456789", "account": "acme"},
]


async def has_route(api: RunningService, path: str) -> bool:
    async with AsyncClient(api.url) as client:
        return path in (await client.openapi())["paths"]


async def need_route(api: RunningService, path: str) -> None:
    if not await has_route(api, path):
        pytest.skip(f"the server does not publish {path} yet (OpenAPI document)")


async def test_sync_create_get_list_with_labels_destroy(api: RunningService) -> None:
    def scenario() -> None:
        with Client(api.url) as client:
            with client.create(STUB, labels={"team": "ci", "run": "1"}, wait=True) as sbx:
                assert isinstance(sbx.info, SandboxOut)
                assert sbx.state == "ready" and sbx.info.labels == {"team": "ci", "run": "1"}
                assert client.get(sbx.id).state == "ready"
                other = client.create(STUB, labels={"team": "web"}, wait=True)
                assert [s.id for s in client.list(label="team=ci")] == [sbx.id]
                assert [s.id for s in client.list(label=["team=ci", "run=1"])] == [sbx.id]
                assert client.list(label=["team=ci", "run=2"]) == []
                ready = {s.id for s in client.list(state="ready")}
                assert {sbx.id, other.id} <= ready
                gone = client.destroy(other.id, wait=True)
                assert gone.state == "destroyed" and gone.terminal
            # leaving the block destroyed it and waited until it was terminal
            assert sbx.info.state == "destroyed"
            assert client.get(sbx.id).state == "destroyed"
            with pytest.raises(Conflict) as exc:
                client.destroy(sbx.id)
            assert exc.value.status == 409 and "already" in exc.value.message

    await asyncio.to_thread(scenario)


async def test_async_create_wait_destroy_and_idempotency(api: RunningService) -> None:
    async with AsyncClient(api.url) as client:
        async with await client.create(
            STUB, labels={"team": "async"}, idempotency_key="key-0123456789", wait=True
        ) as sbx:
            assert sbx.state == "ready"
            again = await client.create(
                STUB, labels={"team": "async"}, idempotency_key="key-0123456789"
            )
            assert again.id == sbx.id, "the same Idempotency-Key answers the same sandbox"
            listed = await client.list(label="team=async")
            assert [s.id for s in listed] == [sbx.id]
            short = await client.create(STUB, ttl_seconds=120, wait=True)
            assert short.info.ttl_seconds == 120 and short.info.account == "default"
            assert (await short.destroy()).state == "destroyed"
        assert (await client.get(sbx.id)).state == "destroyed"
        events = await client.sandbox_events(sbx.id)
        types = [e.event["type"] for e in events]
        assert types[0] == "SandboxRequested" and "TornDown" in types


async def test_errors_are_mapped(start_service: StartService) -> None:
    api = await start_service(SANDBOXER_TOKENS=yaml.safe_dump(TOKENS))
    async with AsyncClient(api.url, token=str(TOKENS[0]["token"])) as client:
        with pytest.raises(NotFound) as missing:
            await client.get("sbx-000000000000")
        assert missing.value.status == 404 and missing.value.field == "id"
        with pytest.raises(InvalidRequest) as bad:
            await client.create("profile.nope")
        assert bad.value.status in (400, 422) and bad.value.field == "profile"
        with pytest.raises(InvalidRequest) as bad_label:
            await client.create(STUB, labels={"bad key!": "x"})
        assert (bad_label.value.field or "").startswith("labels")
        me = await client.whoami()
        assert me.auth and me.name == "ops" and me.role == "admin"
    async with AsyncClient(api.url, token="") as anonymous:
        with pytest.raises(Unauthorized) as denied:
            await anonymous.list()
        assert denied.value.status == 401 and denied.value.code == "unauthorized"
        assert (await anonymous.health()).status == "ok"


async def test_wait_raises_sandbox_failed_with_its_reason(start_service: StartService) -> None:
    api = await start_service(SANDBOXER_SAAS_STUB_FAIL_HOOK="provision")
    async with AsyncClient(api.url) as client:
        with pytest.raises(SandboxFailed) as failed:
            await client.create(STUB, wait=True)
        assert failed.value.state == "failed"
        assert "provision failed" in (failed.value.reason or "")
        assert failed.value.sandbox.terminal


async def test_events_paging_then_follow(api: RunningService) -> None:
    async with AsyncClient(api.url) as client:
        sbx = await client.create(STUB, wait=True)
        paged = [e async for e in client.events(sandbox=sbx.id)]
        assert paged and all(e.event["aggregate_id"] == sbx.id for e in paged)
        assert [e.seq for e in paged] == sorted(e.seq for e in paged)
        seen: list[str] = []
        follow = client.events(sandbox=sbx.id, follow=True, after_seq=paged[-1].seq)
        destroying = asyncio.ensure_future(client.destroy(sbx.id))
        async for event in follow:
            seen.append(event.event["type"])
            assert event.seq > paged[-1].seq
            if event.event["type"] == "TornDown":
                break
        await follow.aclose()
        await destroying
        assert "DestroyRequested" in seen and seen[-1] == "TornDown"


async def test_checkpoints_with_the_stub(api: RunningService) -> None:
    def scenario() -> None:
        with Client(api.url) as client, client.create(STUB, wait=True) as sbx:
            ckpt = sbx.checkpoint(wait=True)
            assert ckpt.status == "created" and ckpt.sandbox_id == sbx.id
            assert [c.id for c in sbx.checkpoints()] == [ckpt.id]
            assert client.get_checkpoint(ckpt.id).status == "created"
            restored = sbx.restore(ckpt.id, wait=True)
            assert restored.state == "ready"
            with client.create(from_checkpoint=ckpt.id, wait=True) as clone:
                assert clone.info.profile == STUB
            assert client.delete_checkpoint(ckpt.id).status in ("deleted", "deleting")

    await asyncio.to_thread(scenario)


async def test_ledger_calls(api: RunningService) -> None:
    def scenario() -> None:
        with Client(api.url) as client:
            account = client.grant("acme", 25, "for the client test")
            assert account.granted == 25 and account.available == 25
            assert client.balance("acme").granted == 25
            assert "acme" in {a.account for a in client.accounts()}
            history = list(client.history("acme"))
            assert history[-1].event["type"] == "CreditsGranted"
            assert client.audit()["ok"] is True
            assert {p.name for p in client.profiles()} >= {STUB}

    await asyncio.to_thread(scenario)


# ---- exec, files, logs (the API's contract) ------------------------------------------


async def test_exec_argv_shell_streaming_and_outcomes(api: RunningService) -> None:
    await need_route(api, EXEC)

    def scenario() -> None:
        with Client(api.url) as client:
            scenario_in(client)

    def scenario_in(client: Client) -> None:
        with client.create(STUB, wait=True) as sbx:
            chunks: list[str] = []
            r = sbx.exec(["echo", "hello", "world"], on_stdout=chunks.append)
            assert isinstance(r, ExecResult)
            assert r.outcome == "exited" and r.exit_code == 0 and r.ok
            assert r.stdout == "hello world\n" and "".join(chunks) == r.stdout
            assert r.stdout_bytes == len(r.stdout_raw)
            assert r.stdout_sha256 == hashlib.sha256(r.stdout_raw).hexdigest()
            assert r.command_id.startswith("cmd-")
            assert sbx.exec(["false"]).exit_code == 1
            assert sbx.exec(["exit", "3"]).exit_code == 3
            assert sbx.exec("exit 4").exit_code == 4, "a str is a shell script"
            timed = sbx.exec(["sleep", "5"], timeout_seconds=0.5)
            assert timed.outcome == "timeout" and timed.exit_code is None
            with pytest.raises(CommandTimedOut):
                timed.check()
            with pytest.raises(CommandFailed) as failed:
                sbx.exec("exit 4").check()
            assert failed.value.result.exit_code == 4
            frames = list(sbx.exec_stream(["echo", "framed"]))
            assert isinstance(frames[0], ExecStarted) and isinstance(frames[-1], ExecExit)
            assert any(isinstance(f, ExecStdout) and "framed" in f.data for f in frames)
            with pytest.raises(InvalidRequest) as bad:
                client.request("POST", f"/v1/sandboxes/{sbx.id}/exec", json={"argv": []})
            assert bad.value.field == "argv"
            assert client.get(sbx.id).commands_run >= 5
        with pytest.raises(Conflict):
            sbx.exec(["true"])  # destroyed: not ready

    await asyncio.to_thread(scenario)


async def test_async_exec(api: RunningService) -> None:
    await need_route(api, EXEC)
    async with AsyncClient(api.url) as client:
        async with await client.create(STUB, wait=True) as sbx:
            r = await sbx.exec(["echo", "async"])
            assert r.stdout == "async\n"
            frames = [f async for f in sbx.exec_stream(["false"])]
            assert isinstance(frames[-1], ExecExit) and frames[-1].exit_code == 1


async def test_files_up_and_down(api: RunningService, tmp_path: Path) -> None:
    await need_route(api, FILES)

    def scenario() -> None:
        with Client(api.url) as client, client.create(STUB, wait=True) as sbx:
            out = sbx.put_file("/data/a.txt", b"abc\n")
            assert out.size == 4 and out.sha256 == hashlib.sha256(b"abc\n").hexdigest()
            assert sbx.get_file("/data/a.txt") == b"abc\n"
            big = tmp_path / "big.bin"
            big.write_bytes(bytes(range(256)) * 4096)  # 1 MiB, streamed from the file
            assert sbx.put_file("/data/big.bin", big).size == big.stat().st_size
            assert sbx.put_file("/data/c.bin", io.BytesIO(b"\x00\xff")).size == 2
            dest = tmp_path / "back.bin"
            assert sbx.download("/data/big.bin", dest) == big.stat().st_size
            assert dest.read_bytes() == big.read_bytes()
            with pytest.raises(NotFound):
                sbx.get_file("/data/missing")

    await asyncio.to_thread(scenario)


async def test_logs_of_the_stub(api: RunningService) -> None:
    """The stub's log: a line per command it ran, of its one service `instance`."""
    await need_route(api, LOGS)
    async with AsyncClient(api.url) as client:
        async with await client.create(STUB, wait=True) as sbx:
            await sbx.exec(["echo", "one"])
            await sbx.exec("exit 2")
            lines = [line async for line in sbx.logs()]
            assert [line.service for line in lines] == ["instance", "instance"]
            assert "exit 2" in lines[-1].line
            assert len([line async for line in sbx.logs(tail=1)]) == 1
            followed = [line async for line in sbx.logs(follow=True)]  # ends: nothing runs
            assert len(followed) == 2
            # A line break inside an argument stays in its command's one line.
            await sbx.exec(["echo", "a\nb\rc\x1cd"])
            since = [line async for line in sbx.logs(since=0)]
            assert len(since) == 3
            assert "a\\nb\\rc\x1cd" in since[-1].line


async def test_closing_the_exec_stream_stops_the_command(api: RunningService) -> None:
    await need_route(api, EXEC)
    async with AsyncClient(api.url) as client:
        async with await client.create(STUB, wait=True) as sbx:
            frames = sbx.exec_stream(["sleep", "30"])
            first = await anext(frames)
            assert isinstance(first, ExecStarted)
            await frames.aclose()  # the client goes away mid-command
            info = await client.get(sbx.id)
            while not info.commands or info.commands[-1].finished_at is None:
                info = await client.get(sbx.id, wait=10, after_seq=info.last_seq)
            summary = info.commands[-1]
            assert summary.command_id == first.command_id
            assert summary.outcome == "disconnected"
            assert (summary.duration_seconds or 0) < 30


async def test_async_files_logs_and_the_size_limit(
    start_service: StartService, tmp_path: Path
) -> None:
    api = await start_service(SANDBOXER_MAX_FILE_BYTES="1000")
    await need_route(api, FILES)
    async with AsyncClient(api.url) as client:
        async with await client.create(STUB, wait=True) as sbx:
            out = await sbx.put_file("/x/a.txt", b"async\n")
            assert out.size == 6 and out.path.endswith("a.txt")
            assert await sbx.get_file("/x/a.txt") == b"async\n"
            local = tmp_path / "small.bin"
            local.write_bytes(b"s" * 900)
            assert (await sbx.put_file("/x/small.bin", local)).size == 900
            assert await sbx.download("/x/small.bin", tmp_path / "back") == 900
            with pytest.raises(PayloadTooLarge) as big:
                await sbx.put_file("/x/big.bin", b"b" * 5000)
            assert big.value.status == 413
            info = await client.get(sbx.id)
            assert info.files_uploaded == 2 and info.files_downloaded == 2


async def test_text_callbacks_keep_characters_split_across_chunks(api: RunningService) -> None:
    await need_route(api, EXEC)
    async with AsyncClient(api.url) as client:
        async with await client.create(STUB, wait=True) as sbx:
            seen: list[str] = []
            r = await sbx.exec(["echo", "h\u00e9llo w\u00f6rld \u2713"], on_stdout=seen.append)
            assert "".join(seen) == r.stdout == "h\u00e9llo w\u00f6rld \u2713\n"
            raw: list[bytes] = []
            await sbx.exec(["echo", "bytes"], on_stdout=raw.append, text=False)
            assert b"".join(raw) == b"bytes\n"


@pytest.mark.timeout(300)
async def test_compose_local_exec_files_and_logs(
    start_service: StartService, podman: Podman, compose_repo: Path, tmp_path: Path
) -> None:
    """Real containers: exec in a named service (argv and shell), files in a service,
    and the services' logs, through the async client."""
    api = await start_service(
        SANDBOXER_COMPOSE_LOCAL_CMD=podman.compose_cmd,
        SANDBOXER_COMPOSE_LOCAL_ENGINE_CMD=podman.engine_cmd,
        SANDBOXER_COMPOSE_LOCAL_STOP_TIMEOUT="1",
        SANDBOXER_REPO_ROOTS=str(tmp_path),
    )
    await need_route(api, EXEC)
    async with AsyncClient(api.url) as client:
        async with await client.create(
            "profile.compose-local", inputs={"repo": str(compose_repo)}, wait=True
        ) as sbx:
            assert set(sbx.info.services) == {"web", "worker"}
            r = await sbx.exec(["echo", "from", "worker"], service="worker")
            assert (r.exit_code, r.stdout) == (0, "from worker\n")
            shell = await sbx.exec(
                "echo $GREETING >&2; exit 3", service="worker", env={"GREETING": "hi"}
            )
            assert (shell.exit_code, shell.stderr) == (3, "hi\n")
            await sbx.put_file("/tmp/note.txt", b"note\n", service="worker")
            assert await sbx.get_file("/tmp/note.txt", service="worker") == b"note\n"
            cat = await sbx.exec(["cat", "/tmp/note.txt"], service="worker")
            assert cat.stdout == "note\n"
            # a line in the worker's own log: written to its PID 1's stdout
            await sbx.exec("echo logged-line > /proc/1/fd/1", service="worker")
            lines = [line async for line in sbx.logs(tail=50)]
            assert all(line.service in ("web", "worker") for line in lines)
            assert any(ln.service == "worker" and "logged-line" in ln.line for ln in lines)
            only = [line async for line in sbx.logs(service="worker", tail=5)]
            assert only and {line.service for line in only} == {"worker"}
            # followed: a line written meanwhile arrives on it (`since` covers a line
            # written before the stream is open, so the order does not matter)
            follow = sbx.logs(service="worker", follow=True, since=time.time() - 60)

            async def until_seen() -> LogLine:
                async for line in follow:
                    if "followed-line" in line.line:
                        return line
                raise AssertionError("the followed log ended first")

            seen = asyncio.ensure_future(until_seen())
            await sbx.exec("echo followed-line > /proc/1/fd/1", service="worker")
            assert (await asyncio.wait_for(seen, 60)).service == "worker"
            await follow.aclose()
            # the CLI on the same client: exec passes the streams through, logs prefixes
            # each line with its service when there are several
            run = await cli_run(
                api.url,
                "exec",
                sbx.id,
                "--service",
                "worker",
                "--shell",
                "echo out; echo err >&2; exit 5",
            )
            assert run == (5, "out\n", "err\n")
            code, out, _ = await cli_run(api.url, "logs", sbx.id, "--tail", "20")
            assert code == 0 and "worker | logged-line" in out


def test_the_event_stream_resumes_across_a_server_restart(tmp_path: Path) -> None:
    """A followed stream whose server goes away reconnects with Last-Event-ID to the
    server that comes back on the same address: nothing missed, nothing twice."""
    from tests.integration.test_cli import Server

    first = Server(tmp_path)
    second: Server | None = None
    try:
        with Client(first.url) as client:
            sid = client.create(STUB, wait=True).id
            follow = client.events(sandbox=sid, follow=True)
            seen = [next(follow) for _ in range(len(client.sandbox_events(sid)))]
            got: queue.Queue[object] = queue.Queue()

            def reader() -> None:
                try:
                    for event in follow:
                        got.put(event)
                        if event.event["type"] == "TornDown":
                            return
                except Exception as exc:
                    got.put(exc)

            thread = threading.Thread(target=reader, daemon=True)
            thread.start()
            # An event on the live stream: the reader is connected (a stream the server
            # had not registered yet when SIGTERM came could hold its shutdown).
            client.create_checkpoint(sid, wait=True)
            live = got.get(timeout=60)
            assert not isinstance(live, Exception), live
            assert first.stop() == 0
            second = Server(tmp_path, port=first.port)
            with Client(second.url) as other:
                other.destroy(sid)
            later = [live]
            while not later or later[-1].event["type"] != "TornDown":
                item = got.get(timeout=60)
                assert not isinstance(item, Exception), item
                later.append(item)
            thread.join(10)
        seqs = [e.seq for e in seen + later]
        assert seqs == sorted(set(seqs)), "every event once, in order"
        assert "DestroyRequested" in [e.event["type"] for e in later]
    finally:
        for server in (first, second):
            if server is not None and server.proc.poll() is None:
                server.stop()


async def cli_run(url: str, *args: str) -> tuple[int, str, str]:
    """`sandboxer --url URL ARGS...` as a subprocess (the service runs in this loop)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sandboxer",
        "--url",
        url,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
