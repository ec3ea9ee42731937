"""The event store locked down (issue 16): nobody writes events but the service.

Real `sandboxer serve` processes on their embedded nats-server, real nats-py clients:
anonymous, the read-only reader (reader.json) and the service user (service.json).
A refused operation is checked for what the server says (a permissions violation
naming the subject, or a JetStream error), not only for a missing answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import api

from sandboxer.config import Settings, SettingsError
from sandboxer.store.event_store import STREAM_NAME, JetStreamEventStore, MutableStream
from sandboxer.store.nats_auth import redact
from sandboxer.store.nats_server import STREAM, EmbeddedNats, find_nats_server
from tests.helpers import METERED_LIFECYCLE, create, destroy, event_types, wait_state
from tests.infra import ServeProcess, free_port
from tests.paths import ROOT

DENIED_WAIT = 1.0  # how long a refused request waits for the answer that never comes


def credentials(data_dir: Path, who: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (data_dir / "nats" / "credentials" / f"{who}.json").read_text()
    )
    return data


class Client:
    """A nats-py connection that records the permission violations the server sends."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.nc: NatsClient | None = None

    async def connect(self, creds: dict[str, Any]) -> Client:
        async def on_error(exc: Exception) -> None:
            if "permissions violation" in str(exc).lower():
                self.violations.append(str(exc).lower())

        self.nc = await nats.connect(
            creds["url"],
            user=creds["user"],
            password=creds["password"],
            error_cb=on_error,
            allow_reconnect=False,
        )
        return self

    @property
    def js(self) -> Any:
        assert self.nc is not None
        return self.nc.jetstream(timeout=DENIED_WAIT)

    async def denied(self, subject: str, attempt: Awaitable[Any]) -> None:
        """The attempt gets no answer and the server names `subject` as forbidden."""
        with pytest.raises((nats.errors.TimeoutError, TimeoutError)):
            await attempt
        await self.wait_violation(subject)

    async def wait_violation(self, subject: str, timeout: float = 10.0) -> None:
        wanted = f'"{subject.lower()}"'
        async with asyncio.timeout(timeout):
            while not any(wanted in v for v in self.violations):
                await asyncio.sleep(0.02)  # polling the error callback, under a deadline

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def serve(http: aiohttp.ClientSession, data_dir: Path, **env: str) -> ServeProcess:
    env.setdefault("SANDBOXER_STARTER_CREDITS", "5")  # the balance
    proc = ServeProcess(data_dir, free_port(), **env)
    try:
        await proc.wait_healthy(http)
    except BaseException:
        proc.kill()
        raise
    return proc


async def available(http: aiohttp.ClientSession, url: str, account: str = "default") -> int:
    async with http.get(f"{url}/v1/accounts/{account}") as resp:
        body = await resp.json()
        assert resp.status == 200, body
        return int(body["available"])


async def last_seq(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(f"{url}/healthz") as resp:
        return int((await resp.json())["last_seq"])


async def test_the_forged_grant_is_refused(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """The issue's measurement as a test: anonymous is refused at connect, the reader at
    publish, and the balance stays where it was."""
    proc = await serve(http, tmp_path / "data")
    reader = Client()
    try:
        before, seq = await available(http, proc.url), await last_seq(http, proc.url)
        assert before == 5
        url = credentials(tmp_path / "data", "reader")["url"]
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0)

        await reader.connect(credentials(tmp_path / "data", "reader"))
        subject = "sandboxer.ledger.default.CreditsGranted"
        # The documented envelope, taken from the real starter grant: only the amount
        # and the id differ.
        starter = await reader.js.get_last_msg(STREAM, subject, direct=True)
        forged = json.loads(starter.data)
        forged.update(amount=1_000_000, event_id="forged-0000000000000000000000")
        payload = json.dumps(forged).encode()
        await reader.denied(subject, reader.js.publish(subject, payload, stream=STREAM))
        assert reader.nc is not None
        await reader.nc.publish(subject, payload)  # plain NATS, no ack asked for
        await reader.nc.flush()
        await reader.wait_violation(subject)

        assert await available(http, proc.url) == before
        assert await last_seq(http, proc.url) == seq
        info = await reader.js.stream_info(STREAM)
        assert info.state.last_seq == seq
        assert info.config.deny_delete and info.config.deny_purge
    finally:
        await reader.close()
        assert proc.terminate() == 0, proc.output()


async def test_credential_files_are_private(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    proc = await serve(http, tmp_path / "data")
    try:
        folder = tmp_path / "data" / "nats" / "credentials"
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        for name in ("service.json", "reader.json"):
            assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
        config = tmp_path / "data" / "nats" / "nats-server.conf"
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        service, reader = (
            credentials(tmp_path / "data", "service"),
            credentials(tmp_path / "data", "reader"),
        )
        assert service["user"] == "sandboxer" and reader["user"] == "sandboxer-reader"
        assert service["stream"] == reader["stream"] == STREAM_NAME == STREAM
        assert service["password"] != reader["password"]
        assert len(service["password"]) >= 40  # token_urlsafe(32)
        for password in (service["password"], reader["password"]):
            assert password not in proc.output(), "a password reached the log"
            assert password not in service["url"]
    finally:
        assert proc.terminate() == 0, proc.output()


async def test_reader_reads_everything_and_changes_nothing(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    proc = await serve(http, data_dir, SANDBOXER_STARTER_CREDITS="1000")
    reader, service = Client(), Client()
    try:
        made = await create(http, proc.url)
        await wait_state(http, proc.url, made["id"], {"ready"})
        await destroy(http, proc.url, made["id"])
        await wait_state(http, proc.url, made["id"], {"destroyed"})
        assert await event_types(http, proc.url, made["id"]) == METERED_LIFECYCLE
        total = await last_seq(http, proc.url)

        await service.connect(credentials(data_dir, "service"))
        for durable in ("sandboxer-validator", "webhook-someone"):  # the service's own
            await service.js.add_consumer(
                STREAM, api.ConsumerConfig(durable_name=durable, ack_policy="explicit")
            )

        await reader.connect(credentials(data_dir, "reader"))
        js = reader.js
        info = await js.stream_info(STREAM)
        assert info.state.last_seq == total

        # A durable pull consumer of its own: every event, acknowledged one by one.
        psub = await js.pull_subscribe("sandboxer.>", durable="auditor", stream=STREAM)
        seen: list[str] = []
        async with asyncio.timeout(30):
            while len(seen) < total:
                for msg in await psub.fetch(total - len(seen), timeout=5):
                    seen.append(msg.subject)
                    await msg.ack_sync()
        assert len(seen) == total
        assert [s.rsplit(".", 1)[1] for s in seen if made["id"] in s] == METERED_LIFECYCLE
        consumer = await js.consumer_info(STREAM, "auditor")
        assert consumer.num_pending == 0 and consumer.num_ack_pending == 0

        # An ordered consumer (push, flow control) and direct gets work too.
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def on_msg(msg: Any) -> None:
            queue.put_nowait(msg)

        ordered = await js.subscribe("sandboxer.>", stream=STREAM, ordered_consumer=True, cb=on_msg)
        async with asyncio.timeout(30):
            for _ in range(total):
                await queue.get()
        await ordered.unsubscribe()
        assert (await js.get_msg(STREAM, 1, direct=True)).seq == 1
        assert (await js.get_msg(STREAM, total)).seq == total

        # Nothing it may change (each attempt waits DENIED_WAIT for the answer).
        forged = json.dumps({"type": "CreditsGranted", "amount": 1}).encode()
        await reader.denied(
            "sandboxer.ledger.default.CreditsGranted",
            js.publish("sandboxer.ledger.default.CreditsGranted", forged, stream=STREAM),
        )
        await reader.denied(f"$JS.API.STREAM.PURGE.{STREAM}", js.purge_stream(STREAM))
        await reader.denied(f"$JS.API.STREAM.MSG.DELETE.{STREAM}", js.delete_msg(STREAM, 1))
        await reader.denied(f"$JS.API.STREAM.DELETE.{STREAM}", js.delete_stream(STREAM))
        await reader.denied(f"$JS.API.STREAM.UPDATE.{STREAM}", js.update_stream(info.config))
        await reader.denied(
            "$JS.API.STREAM.INFO.KV_sandboxer-leases", js.key_value("sandboxer-leases")
        )
        await reader.denied(
            "$JS.API.STREAM.CREATE.KV_mine", js.create_key_value(api.KeyValueConfig(bucket="mine"))
        )
        for durable in ("sandboxer-validator", "webhook-someone"):
            await reader.denied(
                f"$JS.API.CONSUMER.DELETE.{STREAM}.{durable}", js.delete_consumer(STREAM, durable)
            )
        # The validator's durable is the service's: no pulling its messages, no edits.
        await reader.denied(
            f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.sandboxer-validator",
            _fetch_one(js, "sandboxer-validator"),
        )
        await reader.denied(
            f"$JS.API.CONSUMER.DURABLE.CREATE.{STREAM}.sandboxer-validator",
            js.add_consumer(
                STREAM,
                api.ConsumerConfig(
                    durable_name="sandboxer-validator",
                    ack_policy="explicit",
                    filter_subject="sandboxer.nothing.>",
                ),
            ),
        )
        validator = await service.js.consumer_info(STREAM, "sandboxer-validator")
        assert validator.config.filter_subject in (None, "")
        assert validator.num_pending == total

        # Even the service user may not purge, delete messages or drop the stream.
        sjs = service.js
        await service.denied(f"$JS.API.STREAM.PURGE.{STREAM}", sjs.purge_stream(STREAM))
        await service.denied(f"$JS.API.STREAM.MSG.DELETE.{STREAM}", sjs.delete_msg(STREAM, 1))
        await service.denied(f"$JS.API.STREAM.DELETE.{STREAM}", sjs.delete_stream(STREAM))
        assert (await sjs.stream_info(STREAM)).state.messages == total
    finally:
        await reader.close()
        await service.close()
        assert proc.terminate() == 0, proc.output()


async def _fetch_one(js: Any, durable: str) -> Any:
    psub = await js.pull_subscribe_bind(durable, stream=STREAM)
    return await psub.fetch(1, timeout=DENIED_WAIT)


def nats_info(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXER_")}
    environ.update(SANDBOXER_DATA_DIR=str(data_dir), **env)
    return subprocess.run(
        [sys.executable, "-m", "sandboxer", "nats-info", *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


async def test_restart_keeps_port_and_credentials(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    missing = nats_info(data_dir)
    assert missing.returncode == 1
    assert "no embedded NATS server configured" in missing.stderr, missing.stderr

    port = free_port()
    first = await serve(http, data_dir, SANDBOXER_NATS_PORT=str(port))
    folder = data_dir / "nats" / "credentials"
    files = {name: (folder / name).read_bytes() for name in ("service.json", "reader.json")}
    reader_creds = credentials(data_dir, "reader")
    assert reader_creds["url"] == f"nats://127.0.0.1:{port}"

    shown = nats_info(data_dir)
    assert shown.returncode == 0, shown.stderr
    assert f"nats://127.0.0.1:{port}" in shown.stdout and STREAM in shown.stdout
    assert str(folder / "reader.json") in shown.stdout
    assert "running" in shown.stdout and "not running" not in shown.stdout
    as_json = json.loads(nats_info(data_dir, "--json").stdout)
    assert as_json == {
        "embedded": True,
        "url": f"nats://127.0.0.1:{port}",
        "stream": STREAM,
        "reader_credentials": str(folder / "reader.json"),
        "service_credentials": str(folder / "service.json"),
        "running": True,
    }
    for password in (reader_creds["password"], credentials(data_dir, "service")["password"]):
        assert password not in shown.stdout and password not in json.dumps(as_json)

    assert first.terminate() == 0, first.output()
    assert json.loads(nats_info(data_dir, "--json").stdout)["running"] is False

    second = await serve(http, data_dir, SANDBOXER_NATS_PORT=str(port))
    reader = Client()
    try:
        assert {n: (folder / n).read_bytes() for n in files} == files, "credentials changed"
        await reader.connect(json.loads(files["reader.json"]))  # the file read before
        assert (await reader.js.stream_info(STREAM)).state.last_seq == await last_seq(
            http, second.url
        )
    finally:
        await reader.close()
        assert second.terminate() == 0, second.output()

    # Another port: the same passwords, the files' URL follows the setting.
    other = free_port()
    third = await serve(http, data_dir, SANDBOXER_NATS_PORT=str(other))
    try:
        moved = credentials(data_dir, "reader")
        assert moved["url"] == f"nats://127.0.0.1:{other}"
        assert moved["password"] == reader_creds["password"]
    finally:
        assert third.terminate() == 0, third.output()


def test_a_taken_port_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        environ = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXER_")}
        environ.update(SANDBOXER_DATA_DIR=str(tmp_path / "data"), SANDBOXER_NATS_PORT=str(port))
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "sandboxer", "serve", "--port", str(free_port())],
            env=environ,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            check=False,
        )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sandboxer: serve:"), result.stderr
    assert str(port) in last and "SANDBOXER_NATS_PORT" in last and "in use" in last
    assert time.monotonic() - started < 30


def test_port_and_credential_settings() -> None:
    assert Settings.from_env({}).nats_port == 4223
    assert Settings.from_env({"SANDBOXER_NATS_PORT": "4300"}).nats_port == 4300
    for bad in ("0", "65536", "nats", "-1"):
        with pytest.raises(SettingsError, match="SANDBOXER_NATS_PORT"):
            Settings.from_env({"SANDBOXER_NATS_PORT": bad})
    with pytest.raises(SettingsError, match="SANDBOXER_ALLOW_MUTABLE_STREAM"):
        Settings.from_env({"SANDBOXER_ALLOW_MUTABLE_STREAM": "yes"})
    with pytest.raises(SettingsError, match="together"):
        Settings.from_env({"SANDBOXER_NATS_URL": "nats://h:1", "SANDBOXER_NATS_USER": "u"})
    with pytest.raises(SettingsError, match="names no user"):
        Settings.from_env(
            {
                "SANDBOXER_NATS_URL": "nats://a:b@h:1",
                "SANDBOXER_NATS_USER": "u",
                "SANDBOXER_NATS_PASSWORD": "p",
            }
        )
    settings = Settings.from_env(
        {
            "SANDBOXER_NATS_URL": "nats://h:1",
            "SANDBOXER_NATS_USER": "svc",
            "SANDBOXER_NATS_PASSWORD": "s3cret-pw",
        }
    )
    assert settings.nats_user == "svc" and "s3cret-pw" not in repr(settings)
    assert "s3cret" not in repr(Settings.from_env({"SANDBOXER_NATS_URL": "nats://u:s3cret@h:1"}))
    assert redact("nats://u:pw@n1:4222,nats://n2:4222") == "nats://n1:4222,nats://n2:4222"


class PlainNats:
    """An operator's nats-server: without auth (JetStream on), or with a config file."""

    def __init__(self, folder: Path, port: int | None = None, config: Path | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        argv = ["-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(folder)]
        self.proc = subprocess.Popen(
            [find_nats_server(), *(["-c", str(config)] if config else argv)],
            stdout=subprocess.DEVNULL,
            stderr=(folder / "server.log").open("ab"),
        )
        deadline = time.monotonic() + 15
        while True:
            assert self.proc.poll() is None, (folder / "server.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(5) == b"INFO ":
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "nats-server did not answer"
            time.sleep(0.02)  # polling a port, under a deadline

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def plain_nats(tmp_path: Path) -> Iterator[PlainNats]:
    server = PlainNats(tmp_path / "external")
    yield server
    server.stop()


async def test_external_stream_must_be_append_only(
    http: aiohttp.ClientSession, tmp_path: Path, plain_nats: PlainNats
) -> None:
    nc = await nats.connect(plain_nats.url)
    try:
        js = nc.jetstream()
        await js.add_stream(api.StreamConfig(name=STREAM, subjects=["sandboxer.>"]))
        environ = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXER_")}
        environ.update(SANDBOXER_DATA_DIR=str(tmp_path / "data"), SANDBOXER_NATS_URL=plain_nats.url)
        refused = subprocess.run(
            [sys.executable, "-m", "sandboxer", "serve", "--port", str(free_port())],
            env=environ,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            check=False,
        )
        assert refused.returncode != 0
        assert "Traceback" not in refused.stderr, refused.stderr
        last = refused.stderr.strip().splitlines()[-1]
        assert STREAM in last and "deny_delete" in last and "deny_purge" in last, last
        assert "SANDBOXER_ALLOW_MUTABLE_STREAM" in last
        validator = subprocess.run(
            [sys.executable, "-m", "sandboxer", "validate", "serve"],
            env=environ,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            check=False,
        )
        assert validator.returncode != 0 and "Traceback" not in validator.stderr
        assert "SANDBOXER_ALLOW_MUTABLE_STREAM" in validator.stderr.strip().splitlines()[-1]
        config = (await js.stream_info(STREAM)).config
        assert not config.deny_delete and not config.deny_purge, "an operator's stream: untouched"

        allowed = await serve(
            http,
            tmp_path / "data",
            SANDBOXER_NATS_URL=plain_nats.url,
            SANDBOXER_ALLOW_MUTABLE_STREAM="1",
        )
        assert allowed.terminate() == 0
        assert "allows deleting or purging" in allowed.output()
    finally:
        await nc.close()


async def test_a_fresh_external_stream_is_append_only(
    http: aiohttp.ClientSession, tmp_path: Path, plain_nats: PlainNats
) -> None:
    proc = await serve(http, tmp_path / "data", SANDBOXER_NATS_URL=plain_nats.url)
    nc = await nats.connect(plain_nats.url)
    try:
        assert not (tmp_path / "data" / "nats" / "credentials").exists(), "no embedded server"
        js = nc.jetstream()
        config = (await js.stream_info(STREAM)).config
        assert config.deny_delete and config.deny_purge
        # The flags hold on their own, without any permission in the way.
        with pytest.raises(nats.js.errors.APIError) as purge:
            await js.purge_stream(STREAM)
        assert purge.value.err_code == 10110
        with pytest.raises(nats.js.errors.APIError) as delete:
            await js.delete_msg(STREAM, 1)
        assert delete.value.err_code == 10057
        shown = nats_info(
            tmp_path / "data",
            "--json",
            SANDBOXER_NATS_URL=f"nats://u:pw@127.0.0.1:{plain_nats.port}",
        )
        info = json.loads(shown.stdout)
        assert info["embedded"] is False and info["url"] == plain_nats.url
        assert "pw" not in shown.stdout
    finally:
        await nc.close()
        assert proc.terminate() == 0, proc.output()


def documented_config(folder: Path, port: int, service_pw: str, reader_pw: str) -> Path:
    """docs/nats.md's nats-server.conf, with this test's port, store and passwords."""
    text = (ROOT / "docs" / "nats.md").read_text()
    block = text.split("<!-- nats-server.conf: begin -->")[1].split(
        "<!-- nats-server.conf: end -->"
    )[0]
    config = block.strip().removeprefix("```").removesuffix("```")
    for old, new in (
        ("listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{port}"),
        ("/var/lib/nats/jetstream", str(folder / "jetstream")),
        ("CHANGE-ME-service", service_pw),
        ("CHANGE-ME-reader", reader_pw),
    ):
        assert old in config, old
        config = config.replace(old, new)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "nats-server.conf"
    path.write_text(config)
    return path


async def test_the_documented_server_config_locks_the_store(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    port = free_port()
    service_pw, reader_pw = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    config = documented_config(tmp_path / "operator", port, service_pw, reader_pw)
    server = PlainNats(tmp_path / "operator", port, config)
    reader, service = Client(), Client()
    try:
        url = f"nats://127.0.0.1:{port}"
        proc = await serve(
            http,
            tmp_path / "data",
            SANDBOXER_NATS_URL=url,
            SANDBOXER_NATS_USER="sandboxer",
            SANDBOXER_NATS_PASSWORD=service_pw,
        )
        try:
            assert service_pw not in proc.output()
            made = await create(http, proc.url, profile="profile.saas-stub")
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0)
            await reader.connect({"url": url, "user": "sandboxer-reader", "password": reader_pw})
            info = await reader.js.stream_info(STREAM)
            assert info.config.deny_delete and info.config.deny_purge
            psub = await reader.js.pull_subscribe(
                f"sandboxer.sandbox.{made['id']}.>", durable="ops-audit", stream=STREAM
            )
            first = (await psub.fetch(1, timeout=5))[0]
            assert first.subject.endswith(".SandboxRequested")
            await first.ack_sync()
            subject = "sandboxer.ledger.default.CreditsGranted"
            await reader.denied(subject, reader.js.publish(subject, b"{}", stream=STREAM))
            await reader.denied(f"$JS.API.STREAM.PURGE.{STREAM}", reader.js.purge_stream(STREAM))
            await service.connect({"url": url, "user": "sandboxer", "password": service_pw})
            await service.denied(
                f"$JS.API.STREAM.DELETE.{STREAM}", service.js.delete_stream(STREAM)
            )
        finally:
            assert proc.terminate() == 0, proc.output()
    finally:
        await reader.close()
        await service.close()
        server.stop()


async def test_ensure_stream_locks_refuses_or_allows_a_mutable_stream(tmp_path: Path) -> None:
    """An embedded stream made before the deny flags gets them ("lock"); an operator's
    is refused ("refuse") or left alone with a warning ("allow")."""
    with EmbeddedNats(tmp_path, port=free_port()) as server:
        nc = await nats.connect(**server.connect_options())
        try:
            js = nc.jetstream()
            await js.add_stream(api.StreamConfig(name=STREAM, subjects=["sandboxer.>"]))
            store = JetStreamEventStore(nc)
            with pytest.raises(MutableStream, match=r"SANDBOXER .*deny_delete is false"):
                await store.ensure_stream(mutable="refuse")
            await store.ensure_stream(mutable="allow")
            config = (await js.stream_info(STREAM)).config
            assert not config.deny_delete and not config.deny_purge
            await store.ensure_stream(mutable="lock")
            config = (await js.stream_info(STREAM)).config
            assert config.deny_delete and config.deny_purge
            await store.ensure_stream(mutable="refuse")  # locked now: nothing to refuse
        finally:
            await nc.close()
