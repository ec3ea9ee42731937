"""Webhook hardening (issue 15): the attacks outside testing made, against a real
`sandboxer serve`, as a member over real HTTP.

Only loopback is ever contacted: the hostile targets are refused at registration,
before any connection (addresses and `localhost` need no DNS), and the one receiver
listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from nats.aio.client import Client as NatsClient

from sandboxer.app.webhook_targets import (
    PolicyResolver,
    TargetPolicy,
    TargetRefused,
    address_class,
    literal_address,
)
from sandboxer.config import Settings, SettingsError
from sandboxer.store.nats_server import EmbeddedNats
from tests.helpers import create, wait_state
from tests.infra import ServeProcess, free_port
from tests.integration.test_webhooks import recorded

TOKENS = [
    {"name": "ops", "token": "admin-token-0123456789", "account": "default", "role": "admin"},
    {"name": "acme-ci", "token": "acme-token-0123456789", "account": "acme"},
    {"name": "beta-ci", "token": "beta-token-0123456789", "account": "beta"},
]
ADMIN, ACME, BETA = (f"Bearer {t['token']}" for t in TOKENS)
LOOPBACK = "127.0.0.0/8"


class Receiver:
    """A real HTTP receiver on 127.0.0.1: records every request; answers `status`."""

    def __init__(self, status: int = 204) -> None:
        self.status = status
        self.requests: list[tuple[str, dict[str, Any]]] = []  # (path, body)
        self.changed = asyncio.Event()
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, json.loads(await request.read() or b"{}")))
        self.changed.set()
        return web.Response(status=self.status)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def types(self, path: str) -> list[tuple[str, str]]:
        """(sandbox id, event type) of what arrived on `path`, in order."""
        return [
            (b["event"]["aggregate_id"], b["event"]["type"]) for p, b in self.requests if p == path
        ]

    async def wait(self, done: Callable[[], bool], timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while not done():
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


@pytest.fixture
async def sessions() -> AsyncIterator[dict[str, aiohttp.ClientSession]]:
    made = {name: aiohttp.ClientSession(headers={"Authorization": auth}) for name, auth in
            (("admin", ADMIN), ("acme", ACME), ("beta", BETA))}  # fmt: skip
    yield made
    for session in made.values():
        await session.close()


class Served:
    """`sandboxer serve` on the test's nats-server, with tokens; restartable."""

    def __init__(self, data_dir: Path, nats_url: str) -> None:
        self.data_dir = data_dir
        self.nats_url = nats_url
        self.proc: ServeProcess | None = None

    async def start(self, http: aiohttp.ClientSession, **env: str) -> str:
        self.proc = ServeProcess(
            self.data_dir,
            free_port(),
            SANDBOXER_NATS_URL=self.nats_url,
            SANDBOXER_TOKENS=yaml.safe_dump(TOKENS),
            SANDBOXER_WEBHOOK_BACKOFF="0.05",
            **env,
        )
        await self.proc.wait_healthy(http)
        return self.proc.url

    def stop(self) -> None:
        if self.proc is not None:
            assert self.proc.terminate() == 0, self.proc.output()
            self.proc = None


@pytest.fixture
def served(tmp_path: Path, nats_server: EmbeddedNats) -> Iterator[Served]:
    serve = Served(tmp_path / "serve", nats_server.service_url)
    yield serve
    if serve.proc is not None:
        serve.proc.kill()


async def register(
    http: aiohttp.ClientSession, url: str, account: str, target: str, **extra: Any
) -> tuple[int, dict[str, Any]]:
    body = {"url": target, "event_types": ["SandboxRequested"], **extra}
    async with http.post(f"{url}/v1/accounts/{account}/webhooks", json=body) as resp:
        return resp.status, await resp.json()


async def listed(http: aiohttp.ClientSession, url: str, account: str) -> list[dict[str, Any]]:
    async with http.get(f"{url}/v1/accounts/{account}/webhooks") as resp:
        assert resp.status == 200
        hooks: list[dict[str, Any]] = (await resp.json())["webhooks"]
        return hooks


async def webhook_events(nc: NatsClient, webhook_id: str, type_name: str) -> list[dict[str, Any]]:
    return await recorded(nc, f"sandboxer.webhook.{webhook_id}.{type_name}")


async def wait_events(
    nc: NatsClient, webhook_id: str, type_name: str, count: int, timeout: float = 30
) -> list[dict[str, Any]]:
    async with asyncio.timeout(timeout):
        while len(found := await webhook_events(nc, webhook_id, type_name)) < count:
            await asyncio.sleep(0.05)  # polling the stream, under a deadline
    return found


async def webhook_consumers(nc: NatsClient) -> list[str]:
    infos = await nc.jetstream().consumers_info("SANDBOXER")
    return [i.name for i in infos if i.name.startswith("webhook-")]


async def grant(admin: aiohttp.ClientSession, url: str, account: str) -> None:
    async with admin.post(f"{url}/v1/accounts/{account}/credits", json={"amount": 1000}) as r:
        assert r.status == 201, await r.text()


# ---- the attacks ------------------------------------------------------------------


async def test_hostile_targets_are_refused_before_any_connection(
    served: Served, sessions: dict[str, aiohttp.ClientSession], receiver: Receiver, nc: NatsClient
) -> None:
    acme = sessions["acme"]
    url = await served.start(acme)
    await grant(sessions["admin"], url, "acme")
    made = await create(acme, url)  # history a replay would send
    await wait_state(acme, url, made["id"], {"ready"})
    port = receiver.port
    hostile = {
        f"http://127.0.0.1:{port}/internal-only/admin?x=1": "loopback",
        f"http://localhost:{port}/": "loopback",
        f"http://[::1]:{port}/": "loopback",
        f"http://0.0.0.0:{port}/": "unspecified",
        f"http://2130706433:{port}/": "loopback",
        f"http://0x7f.1:{port}/": "loopback",
        f"http://127.1:{port}/": "loopback",
        "http://169.254.169.254/latest/meta-data/": "link-local",
        f"http://[::ffff:127.0.0.1]:{port}/": "loopback",
        "http://10.0.0.1/": "private",
        "http://192.168.1.1/": "private",
        "http://224.0.0.1/": "multicast",
        f"http://127.0.0.1:{port}/" + "a" * 1500: "loopback",
    }
    for target, why in hostile.items():
        status, body = await register(acme, url, "acme", target)
        assert status == 400, (target, body)
        assert body["error"]["code"] == "invalid_body"
        assert body["error"]["field"] == "url"
        assert why in body["error"]["message"], (target, body)
        assert "a" * 81 not in body["error"]["message"], "the url is not echoed at length"
    assert await listed(acme, url, "acme") == []
    assert await webhook_consumers(nc) == [], "no consumer, so nothing is ever delivered"
    assert receiver.requests == []


async def test_allowed_receiver_gets_new_events_unless_asked_for_the_history(
    served: Served, sessions: dict[str, aiohttp.ClientSession], receiver: Receiver, nc: NatsClient
) -> None:
    acme = sessions["acme"]
    url = await served.start(acme, SANDBOXER_WEBHOOK_ALLOW_NETS=LOOPBACK)
    await grant(sessions["admin"], url, "acme")
    before = await create(acme, url)
    await wait_state(acme, url, before["id"], {"ready"})
    status, new = await register(acme, url, "acme", receiver.url("/new"))
    assert status == 201, new
    assert new["from"] == "new"
    status, full = await register(acme, url, "acme", receiver.url("/all"), **{"from": "beginning"})
    assert status == 201, full
    after = await create(acme, url)
    await receiver.wait(
        lambda: len(receiver.types("/all")) == 2 and len(receiver.types("/new")) == 1
    )
    requested = "SandboxRequested"
    # One at a time, in stream order: had /new replayed, `before` would have come first.
    assert receiver.types("/new") == [(after["id"], requested)]
    assert receiver.types("/all") == [(before["id"], requested), (after["id"], requested)]
    hooks = {h["id"]: h for h in await listed(acme, url, "acme")}
    assert hooks[new["id"]]["from"] == "new" and hooks[full["id"]]["from"] == "beginning"
    # Removing deletes the durable consumer, whose name a reader cannot derive from
    # the webhook id it sees in the stream.
    consumers = await webhook_consumers(nc)
    assert len(consumers) == 2
    assert not any(hook["id"] in name for name in consumers for hook in (new, full))
    for left, hook in enumerate((new, full)):
        async with acme.delete(f"{url}/v1/webhooks/{hook['id']}") as resp:
            assert resp.status == 204
        assert len(await webhook_consumers(nc)) == 1 - left
    assert await webhook_consumers(nc) == []


async def test_an_account_has_at_most_ten_webhooks(
    served: Served, sessions: dict[str, aiohttp.ClientSession], receiver: Receiver
) -> None:
    acme = sessions["acme"]
    url = await served.start(acme, SANDBOXER_WEBHOOK_ALLOW_NETS=LOOPBACK)
    made = []
    for i in range(10):
        status, body = await register(acme, url, "acme", receiver.url(f"/h{i}"))
        assert status == 201, body
        made.append(body["id"])
    status, body = await register(acme, url, "acme", receiver.url("/h10"))
    assert status == 409, body
    assert body["error"]["field"] == "account"
    assert "SANDBOXER_WEBHOOK_MAX_PER_ACCOUNT" in body["error"]["message"]
    assert len(await listed(acme, url, "acme")) == 10
    status, body = await register(sessions["beta"], url, "beta", receiver.url("/beta"))
    assert status == 201, "the limit is per account"
    async with acme.delete(f"{url}/v1/webhooks/{made[0]}") as resp:
        assert resp.status == 204
    status, body = await register(acme, url, "acme", receiver.url("/h10"))
    assert status == 201, body


async def test_a_failing_receiver_is_bounded_then_disabled_for_good(
    served: Served, sessions: dict[str, aiohttp.ClientSession], nc: NatsClient
) -> None:
    failing = await Receiver(status=500).start()
    healthy = await Receiver().start()
    acme = sessions["acme"]
    env = {
        "SANDBOXER_WEBHOOK_ALLOW_NETS": LOOPBACK,
        "SANDBOXER_WEBHOOK_MAX_ATTEMPTS": "2",
        "SANDBOXER_WEBHOOK_DISABLE_AFTER": "3",
    }
    try:
        url = await served.start(acme, **env)
        await grant(sessions["admin"], url, "acme")
        for _ in range(6):  # a history of six events to replay
            await create(acme, url)
        status, hook = await register(acme, url, "acme", failing.url(), **{"from": "beginning"})
        assert status == 201, hook
        disabled = await wait_events(nc, hook["id"], "WebhookDisabled", 1)
        assert disabled[0]["failures"] == 3 and "HTTP 500" in disabled[0]["reason"]
        attempts = await webhook_events(nc, hook["id"], "WebhookDeliveryAttempted")
        # One event per delivery outcome, not per retry; three deliveries, then no more.
        assert [(a["attempt"], a["ok"], a["final"]) for a in attempts] == [(2, False, True)] * 3
        assert len(failing.requests) == 6, "2 attempts x 3 deliveries, then disabled"
        [shown] = await listed(acme, url, "acme")
        assert shown["disabled"] is True and "3 deliveries" in shown["disabled_reason"]

        # Still disabled after a restart: a new event reaches a healthy webhook only.
        served.stop()
        url = await served.start(acme, **env)
        [shown] = await listed(acme, url, "acme")
        assert shown["disabled"] is True
        status, other = await register(acme, url, "acme", healthy.url())
        assert status == 201, other
        later = await create(acme, url)
        await healthy.wait(lambda: (later["id"], "SandboxRequested") in healthy.types("/hook"))
        assert len(failing.requests) == 6, "the disabled webhook sent nothing more"
        assert len(await webhook_events(nc, hook["id"], "WebhookDeliveryAttempted")) == 3

        before = await webhook_consumers(nc)
        async with acme.delete(f"{url}/v1/webhooks/{hook['id']}") as resp:
            assert resp.status == 204
        assert len(await webhook_consumers(nc)) == len(before) - 1
    finally:
        await failing.stop()
        await healthy.stop()


async def test_each_delivery_checks_the_target_again(
    served: Served, sessions: dict[str, aiohttp.ClientSession], receiver: Receiver, nc: NatsClient
) -> None:
    acme = sessions["acme"]
    url = await served.start(acme, SANDBOXER_WEBHOOK_ALLOW_NETS=LOOPBACK)
    await grant(sessions["admin"], url, "acme")
    status, hook = await register(acme, url, "acme", receiver.url())
    assert status == 201, hook
    # The operator withdraws the allowance: what was fine at registration is not now.
    served.stop()
    url = await served.start(acme, SANDBOXER_WEBHOOK_MAX_ATTEMPTS="2")
    await create(acme, url)
    [outcome] = await wait_events(nc, hook["id"], "WebhookDeliveryAttempted", 1)
    assert outcome["final"] and not outcome["ok"] and outcome["status"] is None
    assert "target refused" in outcome["error"] and "loopback" in outcome["error"]
    assert receiver.requests == [], "no request was sent"


# ---- the policy on its own --------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("2130706433", "loopback"),
        ("0x7f.1", "loopback"),
        ("127.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("64:ff9b::a00:1", "private"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("fd00::1", "private"),
        ("100.64.0.1", "not globally routable"),
        ("239.1.1.1", "multicast"),
        ("240.0.0.1", ""),  # reserved; Python 3.11 files it under private
        ("8.8.8.8", None),
        ("2606:4700::1", None),
    ],
)
def test_address_classes(host: str, why: str | None) -> None:
    ip = literal_address(host)
    assert ip is not None
    found = address_class(ip)
    assert (found is None) if why is None else (found is not None and why in found), found


async def test_the_allow_list_and_its_errors() -> None:
    policy = TargetPolicy([ipaddress.ip_network("127.0.0.0/8")])
    await policy.check_url("http://127.0.0.1:9/")
    await policy.check_url("http://[::ffff:127.0.0.1]:9/")
    with pytest.raises(TargetRefused, match=r"127\.0\.0\.1"):
        await policy.check_url("http://2130706433:9/")  # allowed, but written obscurely
    with pytest.raises(TargetRefused, match="private"):
        await policy.check_url("http://10.0.0.1/")
    with pytest.raises(SettingsError, match="SANDBOXER_WEBHOOK_ALLOW_NETS"):
        Settings.from_env({"SANDBOXER_WEBHOOK_ALLOW_NETS": "127.0.0.0/8,10.0.0.0/33"})
    with pytest.raises(SettingsError, match="SANDBOXER_WEBHOOK_MAX_PER_ACCOUNT"):
        Settings.from_env({"SANDBOXER_WEBHOOK_MAX_PER_ACCOUNT": "0"})


async def test_the_http_client_connects_only_where_the_policy_allows(receiver: Receiver) -> None:
    """The resolver is the last word: even a request that skipped the check cannot
    reach a refused address by name."""
    connector = aiohttp.TCPConnector(resolver=PolicyResolver(TargetPolicy()), use_dns_cache=False)
    async with aiohttp.ClientSession(connector=connector) as http:
        with pytest.raises(aiohttp.ClientConnectorError, match="loopback"):
            await http.post(f"http://localhost:{receiver.port}/hook", data=b"{}")
    assert receiver.requests == []
    allowed = TargetPolicy([ipaddress.ip_network("127.0.0.0/8")])
    connector = aiohttp.TCPConnector(resolver=PolicyResolver(allowed), use_dns_cache=False)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.post(f"http://localhost:{receiver.port}/hook", data=b"{}") as resp:
            assert resp.status == 204
    assert len(receiver.requests) == 1
