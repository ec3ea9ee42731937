"""The reference validator: `sandboxer validate serve`.

It subscribes (durable, at least once) to every sandbox's `BecameReady`, runs the
profile's health checks and test_command over the sandbox host's SSH connection,
and publishes `ValidationStarted` and then `ValidationPassed` or `ValidationFailed`
on `sandboxer.validation.<sandbox_id>.<Type>`. The result's event id derives from
the ready event, and a result already recorded is not run again: a validator killed
mid-test and restarted yields exactly one final result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
from events.subjects import filter_for, sandbox_filter, type_filter, validation_filter
from extensions import ExtensionRegistry
from extensions.compose_ssh import engine_cmd, parse_hosts, project_name
from extensions.hosts import PoolHost
from extensions.ssh import SSHPool
from extensions.vm_packer import parse_vms
from projections.sandboxes import SandboxView, evolve
from sandboxer.event_store import JetStreamEventStore, append_decided
from sandboxer.profiles import ProfileCatalog, ValidationSpec
from sandboxer.subscriptions import Delivery, subscribe

log = logging.getLogger(__name__)

ACTOR = "system:validator"
READY_SUBJECT = type_filter(BecameReady)
OUTPUT_TAIL = 2000
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
        self.pool = SSHPool()

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
            await self.pool.close()

    async def handle(self, delivery: Delivery) -> None:
        sandbox_id = delivery.event.aggregate_id
        result_id = f"{delivery.key}.result"
        records = await self.store.read_aggregate(validation_filter(sandbox_id))
        if any(r.event.event_id == result_id for r in records):
            return  # answered before a crash or a redelivery: exactly one result
        history = await self.store.read_aggregate(sandbox_filter(sandbox_id))
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
        await append_decided(self.store, filter_for(started_event), lambda: [started_event])
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
        await append_decided(self.store, filter_for(event), lambda: [event])

    def _host(
        self, view: SandboxView, request: SandboxRequested
    ) -> tuple[PoolHost, Mapping[str, Any]]:
        loaded = self.extensions.get(view.extension)
        config = loaded.config_for(request.config)
        pools = {"compose-ssh": parse_hosts, "vm-packer": parse_vms}
        parse = pools.get(view.extension)
        if parse is None or view.host is None:
            raise LookupError(f"extension {view.extension} gives the validator no shell")
        return parse(config)[view.host], config

    async def _validate(
        self,
        view: SandboxView,
        request: SandboxRequested,
        spec: ValidationSpec,
        test_command: str | None,
    ) -> Outcome:
        try:
            host, config = self._host(view, request)
        except (LookupError, KeyError) as exc:
            return Outcome(False, None, str(exc), "")
        directory = view.handle.get("directory") or view.handle.get("workspace")
        for check in spec.health_checks:
            if check.url:
                argv = ["sh", "-c", HOST_GET, "sh", check.url]
            else:
                container = (
                    f"{view.handle.get('project') or project_name(view.id)}_{check.service}_1"
                )
                url = f"http://127.0.0.1:{check.port}{check.path}"
                # Plain `wget -q` (busybox builds differ in the flags they take); the
                # SSH command's timeout bounds it.
                argv = [
                    *engine_cmd(host, config),
                    "exec",
                    container,
                    "wget",
                    "-q",
                    "-O",
                    "/dev/null",
                    url,
                ]
            result = await self.pool.run(host.target, argv, check=False, timeout=60)
            if result.exit_status != 0:
                name = check.url or f"{check.service}:{check.port}{check.path}"
                return Outcome(
                    False,
                    None,
                    f"health check {name} failed (exit {result.exit_status})",
                    result.stderr + result.stdout,
                )
        if not test_command:
            return Outcome(True, 0, "health checks passed", "")
        result = await self.pool.run(
            host.target,
            ["sh", "-c", test_command],
            cwd=directory,
            check=False,
            timeout=spec.timeout_seconds,
        )
        output = result.stdout + result.stderr
        if result.exit_status == 0:
            return Outcome(True, 0, "test_command passed", output)
        return Outcome(
            False, result.exit_status, f"test_command exited {result.exit_status}", output
        )


async def serve_validator(
    settings: Any, stop: asyncio.Event | None = None, ack_wait: float = 30.0
) -> None:
    """Run the validator until SIGINT/SIGTERM (or `stop`)."""
    import signal

    import nats

    from extensions import RuntimeInfo
    from sandboxer.nats_auth import mutable_policy, service_connect_options

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
