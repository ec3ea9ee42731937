"""Watching a ready sandbox's services: what the backend reports at ready and after a
restore (each service's state and health, the published ports), and, while the
sandbox is ready, a poll every `watch_interval` seconds that records a service that
exits (`ServiceExited`), turns unhealthy (`ServiceUnhealthy`) or comes back
(`ServiceRecovered`). With `on_service_exit: fail` in the sandbox's config, an exited
service ends the sandbox (`DestroyRequested`, reason `service_exited`: it ends `failed`).

Only extensions declaring the `services` and `endpoints` capabilities are watched;
what they answer is data from the backend, recorded only when it changes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

from events import (
    EventMeta,
    PublishedPort,
    ServiceExited,
    ServiceRecovered,
    ServiceState,
    ServiceUnhealthy,
)
from extensions import (
    Endpoint,
    ExtensionRegistry,
    Handle,
    LoadedExtension,
    ServiceStatus,
    StepContext,
    Watching,
)
from extensions.manifest import ConfigError
from sandboxer.app.lifecycle import InvalidTransition, State
from sandboxer.app.sandbox import Build, Sandbox, SandboxHost, still_driven
from sandboxer.store.event_store import ConcurrencyConflict

log = logging.getLogger(__name__)

ACTOR_WATCH = "system:service-watch"
WATCH_INTERVAL = 5.0
# Engine states of a service that no longer runs (podman and docker spell them so).
STOPPED = frozenset({"exited", "dead", "stopped", "removing", "missing"})
ON_SERVICE_EXIT = ("report", "fail")

Destroy = Callable[[str, EventMeta, str], Awaitable[int]]


def check_watch_config(config: Mapping[str, Any]) -> None:
    """A profile's watch settings, checked at create (ConfigError names the key)."""
    policy = config.get("on_service_exit", "report")
    if policy not in ON_SERVICE_EXIT:
        raise ConfigError(
            f"on_service_exit must be one of {', '.join(ON_SERVICE_EXIT)}, got {str(policy)[:40]!r}"
        )
    interval = config.get("watch_interval", WATCH_INTERVAL)
    if not isinstance(interval, (int, float)) or isinstance(interval, bool) or interval <= 0:
        raise ConfigError(f"watch_interval must be a positive number, got {str(interval)[:40]!r}")


def watches(loaded: LoadedExtension) -> bool:
    return loaded.manifest.has("services") and loaded.manifest.has("endpoints")


def service_state(status: ServiceStatus) -> ServiceState:
    return ServiceState(
        service=status.service,
        state=status.state,
        health=status.health,
        exit_code=status.exit_code,
    )


def published_port(endpoint: Endpoint) -> PublishedPort:
    return PublishedPort(
        service=endpoint.service,
        container_port=endpoint.container_port,
        protocol=endpoint.protocol,
        host=endpoint.host,
        host_port=endpoint.host_port,
    )


async def report(
    loaded: LoadedExtension, ctx: StepContext, handle: Handle
) -> tuple[list[ServiceState], list[PublishedPort]]:
    """The services and published ports as the backend has them now (none reported
    by an extension that does not watch)."""
    if not watches(loaded):
        return [], []
    adapter = cast(Watching, loaded.adapter)
    statuses = await adapter.services(ctx, handle)
    endpoints = await adapter.endpoints(ctx, handle)
    return (
        sorted((service_state(s) for s in statuses), key=lambda s: s.service),
        sorted(
            (published_port(e) for e in endpoints),
            key=lambda p: (p.service, p.container_port, p.protocol),
        ),
    )


class ServiceWatch:
    def __init__(
        self,
        host: SandboxHost,
        extensions: ExtensionRegistry,
        context: Callable[[Sandbox], StepContext],
        destroy: Destroy,
    ) -> None:
        self.host = host
        self.extensions = extensions
        self.context = context  # the step context of the sandbox (steps.Steps.context)
        self.destroy = destroy

    def ensure(self, sbx: Sandbox) -> None:
        """Watch a ready sandbox (once) if its extension reports its services."""
        if self.host.closing or sbx.view is None:
            return
        if not watches(self.extensions.get(sbx.view.extension)):
            return
        if sbx.watcher is None or sbx.watcher.done():
            sbx.watcher = asyncio.create_task(self._watch(sbx), name=f"watch-{sbx.sandbox_id}")

    def _watching(self, sbx: Sandbox) -> bool:
        return still_driven(self.host, sbx)

    async def _watch(self, sbx: Sandbox) -> None:
        assert sbx.view is not None
        loaded = self.extensions.get(sbx.view.extension)
        adapter = cast(Watching, loaded.adapter)
        ctx = self.context(sbx)
        interval = max(float(ctx.config.get("watch_interval", WATCH_INTERVAL)), 0.2)
        fail = ctx.config.get("on_service_exit", "report") == "fail"
        timeout = loaded.manifest.hook("services").timeout
        while self._watching(sbx):
            await asyncio.sleep(interval)  # polling the backend between looks
            if sbx.state != State.READY or not self._watching(sbx) or sbx.view is None:
                continue
            handle = dict(sbx.view.handle)
            try:
                async with asyncio.timeout(timeout):
                    statuses = await adapter.services(ctx, handle)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s: services: %s: %s", sbx.sandbox_id, type(exc).__name__, exc)
                continue
            try:
                exited = await self._record_changes(sbx, statuses)
                if exited and fail and self._watching(sbx):
                    await self.destroy(sbx.sandbox_id, sbx.meta(ACTOR_WATCH), "service_exited")
                    return
            except (InvalidTransition, ConcurrencyConflict):
                continue  # the sandbox moved on meanwhile (a checkpoint, a destroy)

    async def _record_changes(self, sbx: Sandbox, statuses: list[ServiceStatus]) -> bool:
        """Record what changed since the last report; whether a service is stopped."""
        assert sbx.view is not None
        known = {s.service: s for s in sbx.view.service_states}
        for status in sorted(statuses, key=lambda s: s.service):
            build = change(known.get(status.service), status)
            if build is not None:
                await self.host.record(sbx, build, sbx.meta(ACTOR_WATCH))
        return any(status.state in STOPPED for status in statuses)


def change(before: ServiceState | None, now: ServiceStatus) -> Build | None:
    """The event that records how a service differs from its last report, if any."""
    name = now.service
    if now.state in STOPPED:
        if before is not None and before.state in STOPPED:
            return None
        code = now.exit_code
        return lambda e: ServiceExited(**e, service=name, exit_code=code)
    if now.health == "unhealthy":
        if before is not None and before.health == "unhealthy":
            return None
        output = now.output[-1000:]
        return lambda e: ServiceUnhealthy(**e, service=name, output=output)
    if before is None or not (before.state in STOPPED or before.health == "unhealthy"):
        return None
    if now.state != "running" or now.health == "starting":
        return None
    state, health = now.state, now.health
    return lambda e: ServiceRecovered(**e, service=name, state=state, health=health)
