"""compose-ssh readiness as compose means it, watching after ready and published
ports: real sshd, real rsync, real podman-compose and containers (tests/infra.py).

podman 4.3 here runs no healthcheck by itself (no systemd) and podman-compose ignores
`condition: service_healthy`, so these pass only because the adapter runs the checks.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import pytest

from extensions import ExtensionError, ExtensionRegistry, LoadedExtension, RuntimeInfo, StepContext
from extensions.compose_ssh import project_name
from extensions.sdk import Endpoint, Handle, ServiceStatus, Watching
from tests.infra import IMAGE, Podman

pytestmark = pytest.mark.timeout(300)

HEALTH = f"""\
# db turns healthy ~4 s after it starts; web waits for it the compose way.
services:
  db:
    image: {IMAGE}
    command: ["sh", "-c", "sleep 4; mkdir -p /tmp; touch /tmp/ok; sleep 1000"]
    stop_signal: SIGKILL
    healthcheck:
      test: ["CMD-SHELL", "test -f /tmp/ok || {{ echo not yet; exit 1; }}"]
      interval: 1s
      timeout: 5s
      retries: 30
  web:
    image: {IMAGE}
    command: ["httpd", "-f", "-p", "8080", "-h", "/srv"]
    volumes: ["./site:/srv:ro"]
    stop_signal: SIGKILL
    depends_on:
      db: {{condition: service_healthy}}
  debug:
    image: {IMAGE}
    command: ["sleep", "1000"]
    stop_signal: SIGKILL
    profiles: [debug]
"""

PROFILES = f"""\
services:
  web:
    image: {IMAGE}
    command: ["sleep", "1000"]
    stop_signal: SIGKILL
  debug:
    image: {IMAGE}
    command: ["sleep", "1000"]
    profiles: [debug]
"""

EXITS_LATER = f"""\
services:
  web:
    image: {IMAGE}
    command: ["sleep", "1000"]
    stop_signal: SIGKILL
  job:
    image: {IMAGE}
    command: ["sh", "-c", "sleep 6; exit 1"]
    stop_signal: SIGKILL
"""

NEVER_HEALTHY = f"""\
services:
  web:
    image: {IMAGE}
    command: ["sleep", "1000"]
    stop_signal: SIGKILL
  sick:
    image: {IMAGE}
    command: ["sleep", "1000"]
    stop_signal: SIGKILL
    healthcheck:
      test: ["CMD-SHELL", "echo still broken on try; exit 1"]
      interval: 1s
      retries: 2
"""

PORTS = f"""\
services:
  web:
    image: {IMAGE}
    command: ["httpd", "-f", "-p", "8080", "-h", "/srv"]
    volumes: ["./site:/srv:ro"]
    stop_signal: SIGKILL
    ports: ["8080"]
"""


def discover(tmp_path: Path, environ: dict[str, str]) -> ExtensionRegistry:
    return ExtensionRegistry.discover(
        RuntimeInfo(tmp_path, (tmp_path.resolve(),)), entry_points=False, environ=environ
    )


@pytest.fixture
def extension(tmp_path: Path, compose_env: Callable[..., dict[str, str]]) -> LoadedExtension:
    return discover(tmp_path, compose_env()).get("compose-ssh")


class Sandboxes:
    """Provisions sandboxes of compose files written into the test's repo; tears
    each down at the end (and checks nothing is left)."""

    def __init__(self, extension: LoadedExtension, repo: Path, podman: Podman) -> None:
        self.extension = extension
        self.repo = repo
        self.podman = podman
        self.made: list[tuple[StepContext, Handle | None]] = []
        self.progress: dict[str, list[str]] = {}

    def context(self, sandbox_id: str, compose: str, **config: Any) -> StepContext:
        name = f"{sandbox_id}.yml"
        (self.repo / name).write_text(compose)
        seen = self.progress.setdefault(sandbox_id, [])
        return StepContext(
            sandbox_id=sandbox_id,
            profile="profile.compose-e2e",
            inputs={"repo": str(self.repo)},
            config=self.extension.config_for({"compose_file": name, **config}),
            host="host0",
            progress=seen.append,
        )

    async def provision(self, ctx: StepContext) -> Handle:
        self.made.append((ctx, None))
        handle = await self.extension.adapter.provision(ctx)
        self.made[-1] = (ctx, handle)
        return handle

    @property
    def watching(self) -> Watching:
        return cast(Watching, self.extension.adapter)

    async def close(self) -> None:
        for ctx, handle in self.made:
            await self.extension.adapter.teardown(ctx, handle)
            assert self.podman.containers(project_name(ctx.sandbox_id)) == []
            monitors = getattr(self.extension.adapter, "_monitors", {})
            assert ctx.sandbox_id not in monitors, "the monitor is dropped at teardown"


@pytest.fixture
async def sandboxes(
    extension: LoadedExtension, compose_repo: Path, podman: Podman
) -> AsyncIterator[Sandboxes]:
    made = Sandboxes(extension, compose_repo, podman)
    try:
        yield made
    finally:
        await made.close()


def by_service(statuses: list[ServiceStatus]) -> dict[str, ServiceStatus]:
    return {s.service: s for s in statuses}


async def test_ready_waits_for_the_healthcheck_and_skips_profiles(
    sandboxes: Sandboxes,
    podman: Podman,
    tmp_path: Path,
    compose_env: Callable[..., dict[str, str]],
) -> None:
    ctx = sandboxes.context("sbx-health", HEALTH)
    handle = await sandboxes.provision(ctx)
    project = project_name(ctx.sandbox_id)
    started = time.monotonic()
    async with asyncio.timeout(120):
        ready = await sandboxes.extension.adapter.wait_ready(ctx, handle)
    waited = time.monotonic() - started
    # The file the check looks for exists by now: it was not called ready before.
    probe = podman("exec", f"{project}_db_1", "sh", "-c", "test -f /tmp/ok")
    assert probe.returncode == 0, "ready before db's healthcheck could pass"
    assert ready == ["db", "web"], "the debug profile is not activated: not waited for"
    assert waited > 2.0, f"ready after {waited:.1f}s: db sleeps 4 s before it is healthy"
    assert "waiting for db (health: starting)" in sandboxes.progress[ctx.sandbox_id]
    statuses = by_service(await sandboxes.watching.services(ctx, handle))
    assert sorted(statuses) == ["db", "web"]
    assert statuses["db"] == ServiceStatus("db", "running", "healthy", None, "")
    assert statuses["web"] == ServiceStatus("web", "running", "none")
    # podman itself never moved it off "starting": the adapter ran the checks
    engine_view = podman("inspect", "--format", "{{.State.Health.Status}}", f"{project}_db_1")
    assert engine_view.stdout.strip() == "healthy"
    # After a restart of the service (a new adapter, no monitor in memory): rebuilt
    # from the handle, it runs the check at once and finds db healthy again.
    restarted = discover(tmp_path, compose_env())
    try:
        fresh = cast(Watching, restarted.get("compose-ssh").adapter)
        assert by_service(await fresh.services(ctx, handle))["db"].health == "healthy"
    finally:
        await restarted.close()


async def test_a_service_of_an_inactive_profile_is_not_waited_for(sandboxes: Sandboxes) -> None:
    ctx = sandboxes.context("sbx-profiles", PROFILES)
    handle = await sandboxes.provision(ctx)
    started = time.monotonic()
    async with asyncio.timeout(60):
        assert await sandboxes.extension.adapter.wait_ready(ctx, handle) == ["web"]
    assert time.monotonic() - started < 30


async def test_a_service_that_exits_after_ready_is_reported(sandboxes: Sandboxes) -> None:
    ctx = sandboxes.context("sbx-exits-later", EXITS_LATER)
    handle = await sandboxes.provision(ctx)
    async with asyncio.timeout(60):
        assert await sandboxes.extension.adapter.wait_ready(ctx, handle) == ["job", "web"]
    assert by_service(await sandboxes.watching.services(ctx, handle))["job"].state == "running"
    async with asyncio.timeout(60):
        while True:
            statuses = by_service(await sandboxes.watching.services(ctx, handle))
            job = statuses["job"]
            if job.state != "running":
                break
            await asyncio.sleep(0.5)  # polling a condition, under a deadline
    # (all "missing": something outside removed the project, e.g. a reconcile sweep
    # of another test run on this machine's shared podman)
    assert (job.state, job.exit_code) == ("exited", 1), statuses
    web = by_service(await sandboxes.watching.services(ctx, handle))["web"]
    assert (web.state, web.exit_code) == ("running", None)


async def test_a_healthcheck_that_never_passes_fails_naming_it(sandboxes: Sandboxes) -> None:
    ctx = sandboxes.context("sbx-sick", NEVER_HEALTHY, ready_timeout=6)
    handle = await sandboxes.provision(ctx)
    started = time.monotonic()
    with pytest.raises(ExtensionError) as caught:
        async with asyncio.timeout(60):
            await sandboxes.extension.adapter.wait_ready(ctx, handle)
    assert time.monotonic() - started < 30, "the ready_timeout, not the hook's 300 s"
    message = str(caught.value)
    assert message.startswith("services not ready after 6s: "), message
    assert "sick: state running, health unhealthy" in message
    assert "still broken on try" in message, "the last healthcheck output"
    assert "web" not in message.split(": ", 1)[1], "web was ready"
    statuses = by_service(await sandboxes.watching.services(ctx, handle))
    assert statuses["sick"].health == "unhealthy"
    assert statuses["sick"].output.strip() == "still broken on try"


async def test_a_random_published_port_is_an_endpoint_that_answers(
    sandboxes: Sandboxes, compose_repo: Path
) -> None:
    ctx = sandboxes.context("sbx-ports", PORTS)
    handle = await sandboxes.provision(ctx)
    async with asyncio.timeout(60):
        await sandboxes.extension.adapter.wait_ready(ctx, handle)
    endpoints = await sandboxes.watching.endpoints(ctx, handle)
    assert len(endpoints) == 1, endpoints
    endpoint = endpoints[0]
    assert endpoint == Endpoint("web", 8080, "tcp", handle["address"], endpoint.host_port)
    assert endpoint.host == "127.0.0.1"  # the test host's address
    assert endpoint.host_port not in (0, 8080)  # the engine's pick, not the container's
    url = f"http://{endpoint.host}:{endpoint.host_port}/index.html"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
    assert body.decode() == (compose_repo / "site" / "index.html").read_text()
