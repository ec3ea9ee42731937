"""A third-party extension, as an outside author would write it: one directory per
sandbox on the service's machine, commands run there as local processes. It knows the
SDK only, and the validator validates it like a shipped adapter."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from extensions import (
    CommandRefused,
    CommandResult,
    Handle,
    OutputFn,
    RuntimeInfo,
    StepContext,
    check_command,
)


class LocalDirs:
    def __init__(self, config: dict[str, Any], runtime: RuntimeInfo) -> None:
        self.runtime = runtime

    def _dir(self, ctx: StepContext) -> Path:
        root = ctx.config.get("root") or self.runtime.data_dir / "acme-local"
        return Path(root) / ctx.sandbox_id

    async def provision(self, ctx: StepContext) -> Handle:
        directory = self._dir(ctx)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "marker").write_text("made by provision\n")
        return {"directory": str(directory)}

    async def wait_ready(self, ctx: StepContext, handle: Handle) -> list[str]:
        return ["directory"]

    async def teardown(self, ctx: StepContext, handle: Handle | None) -> None:
        shutil.rmtree(self._dir(ctx), ignore_errors=True)

    async def run_command(
        self,
        ctx: StepContext,
        handle: Handle,
        argv: Sequence[str],
        *,
        service: str | None = None,
        workdir: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        on_output: OutputFn | None = None,
    ) -> CommandResult:
        variables = check_command(argv, env)
        if service is not None:
            raise CommandRefused("acme-local has no services")
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=self._dir(ctx) / (workdir or ""),
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **variables},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate()
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
        if on_output is not None:  # not streamed: this extension hands it over at the end
            on_output("stdout", stdout)
            on_output("stderr", stderr)
        assert proc.returncode is not None
        return CommandResult(proc.returncode, stdout, stderr, time.monotonic() - started)
