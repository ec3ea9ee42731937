"""Fixtures: a real nats-server per test, the real service in-process on a free port."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
from aiohttp import web
from nats.aio.client import Client as NatsClient

from sandboxer.bootstrap import Service
from sandboxer.config import Settings
from sandboxer.http.server import ApiRunner
from sandboxer.store.event_store import JetStreamEventStore
from sandboxer.store.nats_server import EmbeddedNats
from tests.infra import Podman, SSHHost, free_port


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "nats-data", sync_interval="always", port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[NatsClient]:
    client = await nats.connect(**nats_server.connect_options())
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def store(nc: NatsClient) -> JetStreamEventStore:
    store = JetStreamEventStore(nc)
    await store.ensure_stream()
    return store


@dataclass
class RunningService:
    service: Service
    url: str
    http: aiohttp.ClientSession
    data_dir: Path
    runner: web.AppRunner
    stopped: bool = False

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.runner.cleanup()
            await self.service.stop()


StartService = Callable[..., Awaitable[RunningService]]


@pytest.fixture
async def start_service(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[StartService]:
    """Start the real service in this process against the test's nats-server.

    Keyword arguments become environment variables for the service (extension
    config overrides such as SANDBOXER_SAAS_STUB_LATENCY_MS).
    """
    started: list[RunningService] = []
    http = aiohttp.ClientSession()

    async def start(**env: str) -> RunningService:
        data_dir = tmp_path / "data"
        environ = {
            **os.environ,
            "SANDBOXER_NATS_URL": nats_server.service_url,
            "SANDBOXER_DATA_DIR": str(data_dir),
            **env,
        }
        settings = Settings.from_env(environ, port=free_port())
        service = Service(settings)
        await service.start()
        runner = ApiRunner(service.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, settings.host, settings.port).start()
        running = RunningService(
            service, f"http://{settings.host}:{settings.port}", http, data_dir, runner
        )
        started.append(running)
        return running

    try:
        yield start
    finally:
        for running in reversed(started):
            await running.stop()
        await http.close()


@pytest.fixture
async def api(start_service: StartService) -> RunningService:
    return await start_service()


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    return Podman.prepare(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="session")
def ssh_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[SSHHost]]:
    """Two real sshd hosts on loopback, shared by the session (each test its own root)."""
    hosts = [SSHHost(tmp_path_factory.mktemp(f"sshd{i}")).start() for i in range(2)]
    yield hosts
    for host in hosts:
        host.stop()


@pytest.fixture
def compose_env(
    podman: Podman, ssh_hosts: list[SSHHost], tmp_path: Path
) -> Callable[..., dict[str, str]]:
    """Service environment for compose-ssh on the test hosts; remote roots under tmp."""

    def env(capacities: tuple[int, ...] = (4,), **host_extra: Any) -> dict[str, str]:
        hosts = [
            ssh_hosts[i].host_config(
                f"host{i}",
                tmp_path / f"remote{i}",
                podman.compose_cmd,
                capacity=capacity,
                **host_extra,
            )
            for i, capacity in enumerate(capacities)
        ]
        return {
            "SANDBOXER_COMPOSE_HOSTS": json.dumps(hosts),
            "SANDBOXER_COMPOSE_CMD": podman.compose_cmd,
            "SANDBOXER_COMPOSE_ENGINE_CMD": podman.engine_cmd,
            "SANDBOXER_COMPOSE_STOP_TIMEOUT": "1",
            "SANDBOXER_REPO_ROOTS": str(tmp_path),  # the test's repos live there
        }

    return env


@pytest.fixture
def compose_repo(tmp_path: Path) -> Path:
    """A copy of the two-service test project, with a file .gitignore excludes."""
    repo = tmp_path / "repo"
    shutil.copytree(Path(__file__).parent / "data" / "compose-app", repo)
    (repo / "ignored.log").write_text("must not be rsynced\n")
    return repo
