"""ext.saas-stub: a metered SaaS stand-in with no external API.

Its "remote" side is a folder of JSON files, one per instance, so a test can see
what the vendor would still be billing for after a crash or a failed provision.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import secrets
import shlex
import shutil
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from extensions.sdk import (
    FILE_CHUNK,
    PAUSE_MODES,
    CommandRefused,
    CommandResult,
    Cost,
    Endpoint,
    ExtensionError,
    FileStream,
    FileTooLarge,
    Handle,
    LogFn,
    OutputBuffer,
    OutputFn,
    Resource,
    RuntimeInfo,
    ServiceStatus,
    StepContext,
    check_command,
    confine_file,
)

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_VAR_RE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


async def _simulate_one(words: list[str], output: OutputBuffer) -> int:
    """One simulated command: true, false, echo [-n] ... [>&2], exit [N], sleep S."""
    stream = "stdout"
    if words[-1:] == [">&2"]:
        words, stream = words[:-1], "stderr"
    name, args = words[0], words[1:]
    if name == "true":
        return 0
    if name == "false":
        return 1
    if name == "echo":
        newline = "\n"
        if args[:1] == ["-n"]:
            args, newline = args[1:], ""
        output.add_text(stream, " ".join(args) + newline)
        return 0
    if name == "exit":
        raise _Exit(int(args[0]) % 256 if args and args[0].isdigit() else 0)
    if name == "sleep" and len(args) == 1:
        try:
            seconds = float(args[0])
        except ValueError:
            seconds = -1.0
        if seconds >= 0:
            await asyncio.sleep(seconds)  # the simulated command's own run time
            return 0
    output.add_text("stderr", f"saas-stub: {name}: command not found\n")
    return 127


async def _simulate(argv: Sequence[str], env: Mapping[str, str], output: OutputBuffer) -> int:
    """argv as one simulated command, or `sh -c SCRIPT`: simulated commands joined by
    `;`, newlines and `&&`, with `$NAME` taken from env."""
    if list(argv[:2]) != ["sh", "-c"] or len(argv) < 3:
        try:
            return await _simulate_one(list(argv), output)
        except _Exit as stop:  # `exit N` given as argv
            return stop.code
    lexer = shlex.shlex(argv[2].replace("\n", ";"), posix=True, punctuation_chars=";&>")
    lexer.whitespace_split = True
    statements: list[tuple[str, list[str]]] = [(";", [])]
    for token in lexer:
        if token in (";", "&&"):
            statements.append((token, []))
        else:
            word = _VAR_RE.sub(lambda m: env.get(m.group(1) or m.group(2), ""), token)
            statements[-1][1].append(word)
    code = 0
    try:
        for joiner, words in statements:
            words = [w for w in words if w]  # `>&` `2` come apart: rejoin below
            if ">&" in words:
                at = words.index(">&")
                words[at : at + 2] = [">&" + "".join(words[at + 1 : at + 2])]
            if not words or (joiner == "&&" and code != 0):
                continue
            code = await _simulate_one(words, output)
    except _Exit as stop:
        return stop.code
    return code


def _remove_extras(folder: Path, sandbox_id: str) -> None:
    """An instance's files and log, beside its record."""
    shutil.rmtree(folder / f"{sandbox_id}.files", ignore_errors=True)
    (folder / f"{sandbox_id}.log").unlink(missing_ok=True)


class SaasStub:
    def __init__(self, config: dict[str, Any], runtime: RuntimeInfo) -> None:
        self.runtime = runtime
        self.base_config = config
        self._random = random.Random()
        self.looks: dict[str, int] = {}  # services() calls per sandbox (for drills, tests)

    def state_dir(self, config: dict[str, Any] | Any) -> Path:
        raw = str(config.get("state_dir") or "")
        folder = Path(raw) if raw else self.runtime.data_dir / "saas-stub"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _instance_path(self, ctx: StepContext) -> Path:
        if not _ID_RE.fullmatch(ctx.sandbox_id):
            raise ExtensionError(f"invalid sandbox id {ctx.sandbox_id!r}")
        return self.state_dir(ctx.config) / f"{ctx.sandbox_id}.json"

    async def _latency(self, ctx: StepContext) -> None:
        delay = float(ctx.config.get("latency_ms", 0)) / 1000.0
        if delay > 0:
            await asyncio.sleep(delay)

    def _maybe_fail(self, ctx: StepContext, hook: str) -> None:
        if ctx.config.get("fail_hook") == hook:
            raise ExtensionError(f"saas-stub: {hook} failed (fail_hook={hook})")
        rate = float(ctx.config.get("failure_rate", 0.0))
        if hook != "teardown" and rate > 0 and self._random.random() < rate:
            raise ExtensionError(f"saas-stub: {hook} failed (simulated, failure_rate={rate})")

    async def provision(self, ctx: StepContext) -> Handle:
        path = self._instance_path(ctx)
        ctx.progress("creating instance")
        await self._latency(ctx)
        # Written before the simulated fault: a half-made instance for teardown to find.
        record = {"id": ctx.sandbox_id, "size": ctx.inputs.get("size", "small")}
        path.write_text(json.dumps(record))
        self._maybe_fail(ctx, "provision")
        return {"instance": ctx.sandbox_id, "endpoint": f"saas-stub://{ctx.sandbox_id}"}

    async def wait_ready(self, ctx: StepContext, handle: Handle) -> list[str]:
        await self._latency(ctx)
        if not self._instance_path(ctx).exists():
            raise ExtensionError(f"saas-stub: instance {ctx.sandbox_id} does not exist")
        self._maybe_fail(ctx, "wait_ready")
        return ["instance"]

    async def teardown(self, ctx: StepContext, handle: Handle | None) -> None:
        path = self._instance_path(ctx)
        await self._latency(ctx)
        self._maybe_fail(ctx, "teardown")
        path.unlink(missing_ok=True)
        _remove_extras(path.parent, ctx.sandbox_id)

    # ---- the vendor's record ---------------------------------------------------------

    def _record(self, ctx: StepContext) -> dict[str, Any]:
        path = self._instance_path(ctx)
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            raise ExtensionError(f"saas-stub: instance {ctx.sandbox_id} does not exist") from None
        except (OSError, ValueError) as exc:
            raise ExtensionError(f"saas-stub: instance {ctx.sandbox_id}: {exc}") from None
        if not isinstance(record, dict):
            raise ExtensionError(f"saas-stub: instance {ctx.sandbox_id}: not a record")
        return record

    def _save(self, ctx: StepContext, record: dict[str, Any]) -> None:
        """The record replaced whole (a reader never sees half of it)."""
        path = self._instance_path(ctx)
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            temporary.write_text(json.dumps(record))
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)

    def _count(self, ctx: StepContext, commands: int = 0, moved: int = 0) -> None:
        """The simulated work the instance did: `activity`'s counters."""
        record = self._record(ctx)
        raw = record.get("activity")
        work: dict[str, Any] = raw if isinstance(raw, dict) else {}
        record["activity"] = {
            "commands": int(work.get("commands", 0)) + commands,
            "bytes": int(work.get("bytes", 0)) + moved,
        }
        self._save(ctx, record)

    # ---- pause and resume ------------------------------------------------------------

    async def pause(self, ctx: StepContext, handle: Handle, mode: str) -> None:
        """The vendor's record says `paused: <mode>`; again is the same."""
        if mode not in PAUSE_MODES:
            raise ExtensionError(f"saas-stub: pause mode {mode!r} is not one of {PAUSE_MODES}")
        await self._latency(ctx)
        if ctx.config.get("fail_hook") == "pause":  # not failure_rate: it plays provisioning
            raise ExtensionError("saas-stub: pause failed (fail_hook=pause)")
        record = self._record(ctx)
        if record.get("paused") != mode:
            record["paused"] = mode
            self._save(ctx, record)

    async def resume(self, ctx: StepContext, handle: Handle, mode: str) -> None:
        """The record runs again (no `paused`); a running instance stays as it is."""
        if mode not in PAUSE_MODES:
            raise ExtensionError(f"saas-stub: pause mode {mode!r} is not one of {PAUSE_MODES}")
        await self._latency(ctx)
        if ctx.config.get("fail_hook") == "resume":  # not failure_rate: it plays provisioning
            raise ExtensionError("saas-stub: resume failed (fail_hook=resume)")
        record = self._record(ctx)
        if "paused" in record:
            del record["paused"]
            self._save(ctx, record)

    async def activity(self, ctx: StepContext, handle: Handle) -> dict[str, int]:
        """`instance.commands` (commands run) and `instance.bytes` (output of the
        commands and file bytes moved in or out): they move only when it is used."""
        raw = self._record(ctx).get("activity")
        work: dict[str, Any] = raw if isinstance(raw, dict) else {}
        return {
            "instance.commands": int(work.get("commands", 0)),
            "instance.bytes": int(work.get("bytes", 0)),
        }

    async def exec(
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
        """A small simulated command set (true, false, echo, exit N, sleep S, and
        `sh -c` scripts of them), so the path runs with no infrastructure. Anything
        else exits 127. Each command run is a line of the instance's log."""
        variables = check_command(argv, env)
        if service not in (None, "instance"):
            raise CommandRefused(f"saas-stub: an instance has no services ({service[:64]!r})")
        if self._record(ctx).get("paused"):
            raise CommandRefused(f"saas-stub: instance {ctx.sandbox_id} is paused")
        output = OutputBuffer()
        started = time.monotonic()
        async with asyncio.timeout(timeout):
            await self._latency(ctx)
            code = await _simulate(argv, variables, output)
        result = output.result(code, time.monotonic() - started)
        if on_output is not None:  # simulated output is made at once: handed over whole
            for stream in ("stdout", "stderr"):
                text = getattr(result, stream)
                if text:
                    await on_output(stream, text.encode())
        # One command, one line: a newline in an argument is written escaped, so every
        # line of the log starts with its time (`logs --since` reads it).
        command = shlex.join(argv)[:500].replace("\r", "\\r").replace("\n", "\\n")
        line = f"{time.time():.3f} exit {code}: {command}\n"
        with self._log_path(ctx).open("a", encoding="utf-8") as log:
            log.write(line)
        self._count(ctx, commands=1, moved=result.stdout_bytes + result.stderr_bytes)
        return result

    # ---- files -----------------------------------------------------------------------

    def _files_root(self, ctx: StepContext) -> Path:
        """The instance's own folder in state_dir: its files' root."""
        self._instance_path(ctx)  # checks the id
        root = self.state_dir(ctx.config) / f"{ctx.sandbox_id}.files"
        root.mkdir(exist_ok=True)
        return root

    def _log_path(self, ctx: StepContext) -> Path:
        self._instance_path(ctx)
        return self.state_dir(ctx.config) / f"{ctx.sandbox_id}.log"

    def _no_service(self, service: str | None) -> None:
        if service not in (None, "instance"):
            raise CommandRefused(f"saas-stub: an instance has no services ({service[:64]!r})")

    async def put_file(
        self,
        ctx: StepContext,
        handle: Handle,
        path: str,
        source: Path,
        *,
        service: str | None = None,
    ) -> None:
        self._no_service(service)
        target = confine_file(self._files_root(ctx), path, for_write=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        confine_file(self._files_root(ctx), path, for_write=True)  # no link made meanwhile
        temporary = target.parent / f".sandboxer-put.{secrets.token_hex(4)}"
        try:
            with source.open("rb") as src, temporary.open("wb") as out:
                while chunk := src.read(FILE_CHUNK):
                    out.write(chunk)
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
        if self._instance_path(ctx).exists():
            self._count(ctx, moved=target.stat().st_size)

    async def get_file(
        self,
        ctx: StepContext,
        handle: Handle,
        path: str,
        *,
        service: str | None = None,
        max_bytes: int,
    ) -> FileStream:
        self._no_service(service)
        found = confine_file(self._files_root(ctx), path)
        handle_ = found.open("rb")
        size = os.fstat(handle_.fileno()).st_size
        if size > max_bytes:
            handle_.close()
            raise FileTooLarge(f"{path}: {size} bytes, more than {max_bytes}")
        if self._instance_path(ctx).exists():
            self._count(ctx, moved=size)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                left = size
                while left > 0 and (chunk := handle_.read(min(left, FILE_CHUNK))):
                    left -= len(chunk)
                    yield chunk
            finally:
                handle_.close()

        async def close() -> None:
            handle_.close()

        return FileStream(size, chunks(), close)

    # ---- logs ------------------------------------------------------------------------

    async def logs(
        self,
        ctx: StepContext,
        handle: Handle,
        *,
        service: str | None = None,
        follow: bool = False,
        tail: int | None = None,
        since: float | None = None,
        on_output: LogFn,
    ) -> None:
        """The simulated instance's log: a line per command it ran (service
        `instance`); nothing runs on its own, so following ends at once."""
        if service not in (None, "instance"):
            raise CommandRefused(f"saas-stub: no service {service[:64]!r} (services: instance)")
        path = self._log_path(ctx)
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        # Lines end at "\n" only: other line breaks may stand inside a command.
        lines = [f"{line}\n" for line in text.split("\n") if line]
        if since is not None:
            lines = [line for line in lines if _logged_at(line) >= since]
        if tail is not None:
            lines = lines[-tail:] if tail > 0 else []
        for line in lines:
            await on_output("instance", "stdout", line.encode())

    # ---- watching --------------------------------------------------------------------

    async def services(self, ctx: StepContext, handle: Handle) -> list[ServiceStatus]:
        """The instance as one service, `instance`, running unless the vendor's record
        says otherwise: a `services` object in it, `{"instance": {"state": "exited",
        "exit_code": 3}}` or `{"instance": {"health": "unhealthy", "output": "..."}}`
        (how a test or a drill plays a vendor-side failure)."""
        path = self._instance_path(ctx)
        self.looks[ctx.sandbox_id] = self.looks.get(ctx.sandbox_id, 0) + 1
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ExtensionError(f"saas-stub: instance {ctx.sandbox_id}: {exc}") from None
        told = (record.get("services") or {}).get("instance") or {}
        if record.get("paused"):  # held by `pause`: no vendor-side failure to report
            told = {**told, "state": "paused", "exit_code": None}
        code = told.get("exit_code")
        return [
            ServiceStatus(
                service="instance",
                state=str(told.get("state", "running")),
                health=str(told.get("health", "none")),
                exit_code=int(code) if isinstance(code, int) else None,
                output=str(told.get("output", ""))[-1000:],
            )
        ]

    async def endpoints(self, ctx: StepContext, handle: Handle) -> list[Endpoint]:
        """A SaaS instance publishes no ports (its endpoint is in the handle)."""
        return []

    def _rate(self, ctx: StepContext) -> tuple[str, float]:
        size = ctx.inputs.get("size", "small")
        rates = ctx.config.get("rates") or {}
        if size not in rates:
            raise ExtensionError(
                f"saas-stub: no rate for size {size!r} (rates: {', '.join(sorted(rates))})"
            )
        return size, float(rates[size])

    async def estimate_cost(self, ctx: StepContext, ttl_seconds: int) -> Cost:
        if ctx.config.get("refuse"):
            raise ExtensionError("saas-stub refuses new sandboxes (refuse=true)")
        size, rate = self._rate(ctx)
        minimum = int(ctx.config.get("minimum_charge", 0))
        amount = max(minimum, math.ceil(rate * ttl_seconds - 1e-9))
        return Cost(
            amount,
            {
                "size": size,
                "rate": rate,
                "seconds": ttl_seconds,
                "minimum_charge": minimum,
                "basis": "ttl",
            },
        )

    async def meter_actual(self, ctx: StepContext, seconds: float) -> Cost:
        size, rate = self._rate(ctx)
        minimum = int(ctx.config.get("minimum_charge", 0))
        amount = max(minimum, math.ceil(rate * seconds - 1e-9))
        return Cost(
            amount,
            {
                "size": size,
                "rate": rate,
                "seconds": round(seconds, 3),
                "minimum_charge": minimum,
                "basis": "provisioned-to-torn-down",
            },
        )

    async def snapshot(self, ctx: StepContext, handle: Handle, target: Path) -> dict[str, str]:
        """The vendor's per-sandbox state: its instance record."""
        await self._latency(ctx)
        source = self._instance_path(ctx)
        if not source.exists():
            raise ExtensionError(f"saas-stub: instance {ctx.sandbox_id} does not exist")
        target.write_bytes(source.read_bytes())
        return {"kind": "saas-stub-instance", "source_sandbox": ctx.sandbox_id}

    async def restore(
        self, ctx: StepContext, handle: Handle | None, source: Path, metadata: dict[str, str]
    ) -> Handle:
        await self._latency(ctx)
        record = json.loads(source.read_bytes())
        if not isinstance(record, dict):
            raise ExtensionError("saas-stub: not an instance record")
        record["id"] = ctx.sandbox_id
        self._instance_path(ctx).write_text(json.dumps(record))
        return handle or {"instance": ctx.sandbox_id, "endpoint": f"saas-stub://{ctx.sandbox_id}"}

    def instances(self, config: dict[str, Any] | None = None) -> list[str]:
        """What the vendor still runs for us: the conformance suite's leftovers check."""
        folder = self.state_dir(config or self.base_config)
        return sorted(p.stem for p in folder.glob("*.json"))

    # ---- reconciliation --------------------------------------------------------------

    async def inventory(self, config: Mapping[str, Any]) -> list[Resource]:
        folder = self.state_dir(config)
        return [
            Resource(sandbox_id=path.stem, host="saas-stub", kind="instance", detail=path.name)
            for path in sorted(folder.glob("*.json"))
            if _ID_RE.fullmatch(path.stem)
        ]

    async def remove_orphan(self, config: Mapping[str, Any], resource: Resource) -> None:
        if not _ID_RE.fullmatch(resource.sandbox_id):
            raise ExtensionError(f"invalid sandbox id {resource.sandbox_id!r}")
        (self.state_dir(config) / f"{resource.sandbox_id}.json").unlink(missing_ok=True)
        _remove_extras(self.state_dir(config), resource.sandbox_id)


def _logged_at(line: str) -> float:
    """The time a log line starts with; a line without one (a log an older version
    wrote with a raw line break in a command) counts as the oldest."""
    try:
        return float(line.split(" ", 1)[0])
    except ValueError:
        return -math.inf
