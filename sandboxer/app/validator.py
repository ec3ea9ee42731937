"""The reference validator: `sandboxer validate serve`.

It subscribes (durable, at least once) to every sandbox's `BecameReady`, runs the
profile's health checks and test_command in the sandbox through its extension's
`exec` capability (the SDK's `Commanding`: it knows no adapter, host or
engine, so a third-party extension is validated like a shipped one), and publishes
`ValidationStarted` and then `ValidationPassed` or `ValidationFailed` on
`sandboxer.validation.<sandbox_id>.<Type>`. The result's event id derives from
the ready event, and a result already recorded is not run again: a validator killed
mid-test and restarted yields exactly one final result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, cast

from nats.aio.client import Client as NatsClient

from events import (
    BecameReady,
    EventMeta,
    SandboxRequested,
    ValidationFailed,
    ValidationPassed,
    ValidationStarted,
    envelope,
)
from events.subjects import Aggregate, type_filter
from extensions import Commanding, CommandResult, ExtensionRegistry, StepContext
from projections.sandboxes import SandboxView, evolve
from sandboxer.app.subscriptions import Delivery, subscribe
from sandboxer.profiles import ProfileCatalog, ValidationSpec
from sandboxer.store.event_store import JetStreamEventStore, append_decided

log = logging.getLogger(__name__)

ACTOR = "system:validator"
READY_SUBJECT = type_filter(BecameReady)
OUTPUT_TAIL = 2000
CAPABILITY = "exec"
HEALTH_CHECK_TIMEOUT = 60.0
# An HTTP GET made on the sandbox host, with whichever client it has.
HOST_GET = (
    'if command -v curl >/dev/null 2>&1; then exec curl -fsS -m 10 -o /dev/null "$1"; '
    'else exec wget -q -T 10 -O /dev/null "$1"; fi'
)


@dataclass(frozen=True)
class Outcome:
    passed: bool
    exit_code: int | None
    reason: str
    output: str


class Validator:
    def __init__(
        self,
        nc: NatsClient,
        store: JetStreamEventStore,
        extensions: ExtensionRegistry,
        profiles: ProfileCatalog,
        *,
        durable: str = "sandboxer-validator",
        ack_wait: float = 30.0,
    ) -> None:
        self.nc = nc
        self.store = store
        self.extensions = extensions
        self.profiles = profiles
        self.durable = durable
        self.ack_wait = ack_wait

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await subscribe(
                self.nc.jetstream(),
                self.durable,
                [READY_SUBJECT],
                self.handle,
                ack_wait=self.ack_wait,
                stop=stop,
            )
        finally:
            await self.extensions.close()  # the adapters' SSH connections

    async def handle(self, delivery: Delivery) -> None:
        sandbox_id = delivery.event.aggregate_id
        result_id = f"{delivery.key}.result"
        records = await self.store.read_aggregate(Aggregate("validation", sandbox_id))
        if any(r.event.event_id == result_id for r in records):
            return  # answered before a crash or a redelivery: exactly one result
        history = await self.store.read_aggregate(Aggregate("sandbox", sandbox_id))
        view: SandboxView | None = None
        request: SandboxRequested | None = None
        for r in history:
            view = evolve(view, r.seq, r.event)
            if isinstance(r.event, SandboxRequested):
                request = r.event
        if view is None or request is None or view.state not in ("ready", "checkpointing"):
            return  # gone already: nothing to validate
        profile = self.profiles.profiles.get(request.profile)
        spec = profile.validation if profile else None
        test_command = request.inputs.get("test_command") or (spec.test_command if spec else None)
        if spec is None and not test_command:
            return  # the profile declares no validation
        spec = spec or ValidationSpec()
        meta = EventMeta(actor=ACTOR, correlation_id=view.correlation_id, causation_id=delivery.key)
        checks = [c.url or f"{c.service}:{c.port}{c.path}" for c in spec.health_checks]
        if test_command:
            checks.append(f"test_command: {test_command}")
        started_event = ValidationStarted(
            **envelope(sandbox_id, meta, f"{delivery.key}.started"),
            ready_event_id=delivery.key,
            checks=checks,
        )
        await append_decided(self.store, Aggregate.of(started_event), lambda: [started_event])
        started = time.monotonic()
        try:
            async with asyncio.timeout(spec.timeout_seconds):
                outcome = await self._validate(view, request, spec, test_command)
        except TimeoutError:
            outcome = Outcome(False, None, f"timed out after {spec.timeout_seconds:g}s", "")
        duration = round(time.monotonic() - started, 3)
        tail = outcome.output[-OUTPUT_TAIL:]
        if outcome.passed:
            event: Any = ValidationPassed(
                **envelope(sandbox_id, meta, result_id),
                ready_event_id=delivery.key,
                exit_code=outcome.exit_code or 0,
                duration_seconds=duration,
                output_tail=tail,
            )
        else:
            event = ValidationFailed(
                **envelope(sandbox_id, meta, result_id),
                ready_event_id=delivery.key,
                exit_code=outcome.exit_code,
                duration_seconds=duration,
                reason=outcome.reason,
                output_tail=tail,
            )
        await append_decided(self.store, Aggregate.of(event), lambda: [event])

    async def _validate(
        self,
        view: SandboxView,
        request: SandboxRequested,
        spec: ValidationSpec,
        test_command: str | None,
    ) -> Outcome:
        try:
            loaded = self.extensions.get(view.extension)
            config = loaded.config_for(request.config)
        except Exception as exc:  # an unknown or broken extension fails this validation
            return Outcome(False, None, f"extension {view.extension}: {exc}", "")
        if not loaded.manifest.has(CAPABILITY):
            return Outcome(
                False,
                None,
                f"extension {view.extension} lacks the {CAPABILITY} capability: "
                "the validator cannot run checks in its sandboxes",
                "",
            )
        adapter = cast(Commanding, loaded.adapter)
        limit = loaded.manifest.hook(CAPABILITY).timeout
        ctx = StepContext(
            sandbox_id=view.id,
            profile=request.profile,
            inputs=request.inputs,
            config=config,
            host=view.host,
        )
        handle = dict(view.handle)

        async def run(argv: list[str], service: str | None, timeout: float) -> CommandResult | str:
            """The result, or why the command could not be run."""
            try:
                return await adapter.exec(
                    ctx, handle, argv, service=service, timeout=min(timeout, limit)
                )
            except TimeoutError:
                return f"timed out after {min(timeout, limit):g}s"
            except Exception as exc:  # the adapter's message goes into the event
                return str(exc) or type(exc).__name__

        for check in spec.health_checks:
            name = check.url or f"{check.service}:{check.port}{check.path}"
            if check.url:  # from the sandbox's host (its workspace)
                argv, service = ["sh", "-c", HOST_GET, "sh", check.url], None
            else:  # from inside the service's container
                # Plain `wget -q` (busybox builds differ in the flags they take); the
                # command's timeout bounds it.
                url = f"http://127.0.0.1:{check.port}{check.path}"
                argv, service = ["wget", "-q", "-O", "/dev/null", url], check.service
            result = await run(argv, service, HEALTH_CHECK_TIMEOUT)
            if isinstance(result, str):
                return Outcome(False, None, f"health check {name}: {result}", "")
            if result.exit_code != 0:
                return Outcome(
                    False,
                    None,
                    f"health check {name} failed (exit {result.exit_code})",
                    result.stderr + result.stdout,
                )
        if not test_command:
            return Outcome(True, 0, "health checks passed", "")
        result = await run(["sh", "-c", test_command], None, spec.timeout_seconds)
        if isinstance(result, str):
            return Outcome(False, None, f"test_command: {result}", "")
        output = result.stdout + result.stderr
        if result.exit_code == 0:
            return Outcome(True, 0, "test_command passed", output)
        return Outcome(False, result.exit_code, f"test_command exited {result.exit_code}", output)


async def serve_validator(
    settings: Any, stop: asyncio.Event | None = None, ack_wait: float = 30.0
) -> None:
    """Run the validator until SIGINT/SIGTERM (or `stop`)."""
    import signal

    import nats

    from extensions import RuntimeInfo
    from sandboxer.store.nats_auth import mutable_policy, service_connect_options

    if settings.nats_url is None and not (settings.data_dir / "nats" / "url").exists():
        raise SystemExit(
            "sandboxer validate: no SANDBOXER_NATS_URL, and no running `sandboxer serve` "
            f"on the data directory {settings.data_dir}"
        )
    # The validator is part of the service: it publishes validation events, so it
    # connects as the service user.
    options = service_connect_options(settings)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    nc = await nats.connect(**options, name="sandboxer-validator", max_reconnect_attempts=-1)
    try:
        store = JetStreamEventStore(nc, replicas=settings.stream_replicas)
        await store.ensure_stream(mutable=mutable_policy(settings))
        extensions = ExtensionRegistry.from_env(
            RuntimeInfo(settings.data_dir, settings.repo_roots), settings.environ
        )
        profiles = ProfileCatalog.from_env(settings.environ)
        validator = Validator(nc, store, extensions, profiles, ack_wait=ack_wait)
        print(f"sandboxer validator subscribed to {READY_SUBJECT}", flush=True)
        await validator.run(stop)
    finally:
        await nc.drain()
