"""Fixtures: a real nats-server per test, the real service in-process on a free port."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import nats
import pytest
from aiohttp import web
from nats.aio.client import Client as NatsClient

from sandboxer.config import Settings
from sandboxer.event_store import JetStreamEventStore
from sandboxer.nats_server import EmbeddedNats
from sandboxer.service import Service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "nats-data", sync_interval="always")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[NatsClient]:
    client = await nats.connect(nats_server.url)
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
            "SANDBOXER_NATS_URL": nats_server.url,
            "SANDBOXER_DATA_DIR": str(data_dir),
            **env,
        }
        settings = Settings.from_env(environ, port=free_port())
        service = Service(settings)
        await service.start()
        runner = web.AppRunner(service.app(), access_log=None)
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
