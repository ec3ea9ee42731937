"""ext.saas-stub's pause/resume and activity: the instance record says paused, exec is
refused meanwhile, files are kept, and the activity counters move only with use."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import cast

import pytest

from extensions import (
    CommandRefused,
    ExtensionError,
    ExtensionRegistry,
    LoadedExtension,
    RuntimeInfo,
    StepContext,
)
from extensions.sdk import ActivityCounting, Commanding, FileTransferring, Pausing, Watching


@pytest.fixture
def stub(tmp_path: Path) -> LoadedExtension:
    registry = ExtensionRegistry.discover(RuntimeInfo(tmp_path), entry_points=False)
    return registry.get("saas-stub")


def context(stub: LoadedExtension, **overrides: object) -> StepContext:
    return StepContext(
        sandbox_id=f"pause-{secrets.token_hex(4)}",
        profile="profile.saas-stub",
        inputs={"size": "small"},
        config=stub.config_for(dict(overrides)),
    )


def record(stub: LoadedExtension, ctx: StepContext) -> dict[str, object]:
    folder = Path(stub.adapter.state_dir(ctx.config))  # type: ignore[attr-defined]
    data = json.loads((folder / f"{ctx.sandbox_id}.json").read_text())
    assert isinstance(data, dict)
    return data


def test_the_manifest_declares_pause_resume_and_activity(stub: LoadedExtension) -> None:
    for capability in ("pause", "resume", "activity"):
        assert stub.manifest.has(capability)
    assert stub.manifest.hook("pause").retries == 1  # idempotent: a retry is safe
    assert stub.manifest.hook("resume").retries == 1


@pytest.mark.parametrize("mode", ["pause", "stop"])
async def test_pause_resume_marks_the_record_and_refuses_exec(
    stub: LoadedExtension, mode: str, tmp_path: Path
) -> None:
    ctx = context(stub)
    adapter = stub.adapter
    handle = await adapter.provision(ctx)
    await adapter.wait_ready(ctx, handle)
    source = tmp_path / "kept.txt"
    source.write_text("kept\n")
    files = cast(FileTransferring, adapter)
    await files.put_file(ctx, handle, "kept.txt", source)

    paused = cast(Pausing, adapter)
    await paused.pause(ctx, handle, mode)
    await paused.pause(ctx, handle, mode)  # again: the same
    assert record(stub, ctx)["paused"] == mode
    run = cast(Commanding, adapter)
    with pytest.raises(CommandRefused, match="paused"):
        await run.exec(ctx, handle, ["echo", "hi"])
    watching = cast(Watching, adapter)
    (status,) = await watching.services(ctx, handle)
    assert (status.state, status.exit_code) == ("paused", None)

    await paused.resume(ctx, handle, mode)
    await paused.resume(ctx, handle, mode)  # a running instance: nothing to do
    assert "paused" not in record(stub, ctx)
    assert (await run.exec(ctx, handle, ["echo", "hi"])).stdout == "hi\n"
    (status,) = await watching.services(ctx, handle)
    assert status.state == "running"
    stream = await files.get_file(ctx, handle, "kept.txt", max_bytes=100)
    assert b"".join([c async for c in stream.chunks]) == b"kept\n"
    await adapter.teardown(ctx, handle)


async def test_pause_of_a_missing_instance_and_a_bad_mode_fail(stub: LoadedExtension) -> None:
    ctx = context(stub)
    paused = cast(Pausing, stub.adapter)
    with pytest.raises(ExtensionError, match="does not exist"):
        await paused.pause(ctx, {}, "pause")
    handle = await stub.adapter.provision(ctx)
    with pytest.raises(ExtensionError, match="mode"):
        await paused.pause(ctx, handle, "freeze")
    with pytest.raises(ExtensionError, match="mode"):
        await paused.resume(ctx, handle, "thaw")
    await stub.adapter.teardown(ctx, handle)


async def test_fail_hook_pause_fails_it(stub: LoadedExtension) -> None:
    ctx = context(stub, fail_hook="pause")
    handle = await stub.adapter.provision(ctx)
    paused = cast(Pausing, stub.adapter)
    with pytest.raises(ExtensionError, match="fail_hook=pause"):
        await paused.pause(ctx, handle, "pause")
    assert "paused" not in record(stub, ctx)
    await paused.resume(ctx, handle, "pause")
    await stub.adapter.teardown(ctx, handle)


async def test_activity_counts_commands_and_bytes_and_nothing_else(
    stub: LoadedExtension, tmp_path: Path
) -> None:
    ctx = context(stub)
    adapter = stub.adapter
    handle = await adapter.provision(ctx)
    counting = cast(ActivityCounting, adapter)
    start = await counting.activity(ctx, handle)
    assert start == {"instance.commands": 0, "instance.bytes": 0}
    # looking at it is not use
    watching = cast(Watching, adapter)
    await watching.services(ctx, handle)
    paused = cast(Pausing, adapter)
    await paused.pause(ctx, handle, "pause")
    await paused.resume(ctx, handle, "pause")
    assert await counting.activity(ctx, handle) == start

    run = cast(Commanding, adapter)
    await run.exec(ctx, handle, ["echo", "hello"])
    after_exec = await counting.activity(ctx, handle)
    assert after_exec == {"instance.commands": 1, "instance.bytes": len("hello\n")}

    source = tmp_path / "data.bin"
    source.write_bytes(b"x" * 1000)
    files = cast(FileTransferring, adapter)
    await files.put_file(ctx, handle, "data.bin", source)
    stream = await files.get_file(ctx, handle, "data.bin", max_bytes=5000)
    await stream.aclose()
    moved = await counting.activity(ctx, handle)
    assert moved == {"instance.commands": 1, "instance.bytes": 6 + 2000}
    await adapter.teardown(ctx, handle)
