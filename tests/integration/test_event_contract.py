"""The published event contract, checked the way an outside validator checks it.

One full run against a real `sandboxer serve` produces every event type of the
catalog: metered lifecycles, a failing provision, a failing teardown, a destroy that
cancels a step, a rejected create, checkpoints and restores (and their failures),
validation results from the reference validator, webhook deliveries (a live and a
dead receiver), and a reconciliation sweep. Then tests/contract/consume.mjs, a Node
consumer that knows nothing of our Python types, reads the stream through a durable
pull consumer with explicit acks, validates every payload with Ajv (draft 2020-12,
strict mode, formats checked) against the served schema, checks every subject token,
and prints a summary this test asserts on.

A new event type without a producer here fails the test (the set of types seen must
be the catalog); a new field without a schema decision fails `event_schema()` itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from events import ALL_EVENTS
from events.schema import event_schema, event_subjects
from tests.helpers import wait_state
from tests.infra import ServeProcess, free_port
from tests.integration.test_checkpoints import wait_checkpoint
from tests.paths import ROOT

pytestmark = pytest.mark.timeout(900)
CONTRACT = ROOT / "tests" / "contract"
UNKNOWN = "sbx-0000deadbeef"  # an instance no sandbox owns: removed
STUCK = "sbx-0000deadbee2"  # another, that cannot be removed (a directory)
CATALOG = {t.type_name() for t in ALL_EVENTS}

# The first event of each chain: the only ones with no causation (docs/events.md).
CHAIN_STARTS = {
    "SandboxRequested",  # a create
    # a DELETE (not a TTL expiry: that follows its SandboxRequested; nor a watched
    # service's exit: that follows its ServiceExited)
    "DestroyRequested",
    "CheckpointRequested",
    "RestoreRequested",
    "CheckpointDeleted",  # by the API (retention after the end: a timer)
    "TtlExtended",  # by the API
    "PauseRequested",  # by the API (not on idle: that follows the sandbox's last event)
    "ResumeRequested",
    "SandboxClaimed",  # a create
    "CreditsGranted",  # by the API, or the starter grant
    "CommandStarted",  # exec, and file transfers, by the API
    "FileUploaded",
    "FileDownloaded",
    "WebhookRegistered",
    "WebhookRemoved",
    "OrphanFound",  # a sweep
}


def nats_access(data_dir: Path) -> dict[str, str]:
    """How an outside reader connects: the reader credentials when the server has
    them, else the embedded server's URL (no authentication)."""
    reader = data_dir / "nats" / "credentials" / "reader.json"
    if reader.exists():
        creds = json.loads(reader.read_text())
        return {k: str(creds[k]) for k in ("url", "user", "password", "stream")}
    return {"url": (data_dir / "nats" / "url").read_text().strip(), "stream": "SANDBOXER"}


def node_consumer(data_dir: Path, until_seq: int, *extra: str) -> dict[str, Any]:
    if not (CONTRACT / "node_modules" / "ajv").is_dir():
        pytest.fail("tests/contract has no node_modules: run scripts/setup (npm ci)")
    access = nats_access(data_dir)
    argv = ["node", str(CONTRACT / "consume.mjs")]
    for key in ("url", "user", "password", "stream"):
        if key in access:
            # `--key=value`: a random password may begin with "-"
            argv.append(f"--{key}={access[key]}")
    argv += [
        "--schema",
        str(ROOT / "docs" / "events.schema.json"),
        "--subjects",
        str(ROOT / "docs" / "events.subjects.json"),
        "--until-seq",
        str(until_seq),
        *extra,
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr + out.stdout
    summary: dict[str, Any] = json.loads(out.stdout)
    return summary


class Validator:
    """The reference validator (`sandboxer validate serve`) on the serve's NATS."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sandboxer", "validate", "serve"],
            env={k: v for k, v in {**os.environ, **env}.items() if k != "SANDBOXER_NATS_URL"},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # printed once subscribed
        assert "subscribed" in line, line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


class Receiver:
    def __init__(self) -> None:
        self.received = 0

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.received += 1
        return web.Response(status=204)


@pytest.fixture
def profiles(tmp_path: Path) -> Path:
    folder = tmp_path / "profiles"
    folder.mkdir()
    base = yaml.safe_load((ROOT / "profiles" / "profile.saas-stub.yaml").read_text())
    validation = {
        "health_checks": [{"service": "web", "port": 8080, "path": "/index.html"}],
        "test_command": "test -f site/index.html",
    }
    for name, extra in [
        ("saas-broken-provision", {"config": {"fail_hook": "provision"}}),
        ("saas-broken-teardown", {"config": {"fail_hook": "teardown"}}),
        ("saas-slow", {"config": {"latency_ms": 3000}}),
        ("saas-validated", {"validation": validation}),  # no shell there: fails
        ("saas-watched", {"config": {"watch_interval": 0.2, "on_service_exit": "fail"}}),
        ("saas-nap", {"idle_timeout_seconds": 4, "on_idle": "pause"}),
        ("saas-bad-pause", {"config": {"fail_hook": "pause"}}),
        ("saas-bad-resume", {"config": {"fail_hook": "resume"}}),
    ]:
        (folder / f"profile.{name}.yaml").write_text(
            yaml.safe_dump({**base, "name": f"profile.{name}", **extra})
        )
    # A warm pool on a non-metered stub (the saas-stub adapter, its manifest without
    # metering: extensions/ext.*.yaml written beside the profiles).
    (folder / "ext.plain-stub.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "plain-stub",
                "version": "0.0.1",
                "entry_point": "extensions.saas_stub:SaasStub",
                "capabilities": ["provision", "wait_ready", "teardown"],
                "config": {"state_dir": {"type": "str", "default": str(tmp_path / "plain")}},
            }
        )
    )
    (folder / "profile.warm.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "profile.warm",
                "extension": "plain-stub",
                "ttl_seconds": 600,
                "pool": {"size": 1, "max_age_seconds": 3600},
            }
        )
    )
    (folder / "profile.compose-validated.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "profile.compose-validated",
                "extension": "compose-ssh",
                "ttl_seconds": 600,
                "inputs": {"repo": {"required": True}},
                "validation": validation,
            }
        )
    )
    return folder


@pytest.fixture
def serve_env(
    compose_env: Callable[..., dict[str, str]], profiles: Path, tmp_path: Path
) -> dict[str, str]:
    return {
        **compose_env(),
        "SANDBOXER_PROFILES_PATH": str(profiles),
        "SANDBOXER_EXTENSIONS_PATH": str(profiles),
        "SANDBOXER_SAAS_STUB_STATE_DIR": str(tmp_path / "vendor"),
        "SANDBOXER_WEBHOOK_ALLOW_NETS": "127.0.0.0/8",
        "SANDBOXER_WEBHOOK_BACKOFF": "0.1",
        "SANDBOXER_WEBHOOK_MAX_ATTEMPTS": "2",
        "SANDBOXER_WEBHOOK_DISABLE_AFTER": "1",
        "SANDBOXER_DATA_DIR": str(tmp_path / "data"),
    }


@pytest.fixture
def serve(serve_env: dict[str, str], tmp_path: Path) -> Iterator[ServeProcess]:
    env = {k: v for k, v in serve_env.items() if k != "SANDBOXER_DATA_DIR"}
    proc = ServeProcess(tmp_path / "data", free_port(), **env)
    yield proc
    proc.terminate()


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    status: int,
    request_id: str | None = None,
    **kwargs: Any,
) -> Any:
    headers = {"X-Request-Id": request_id} if request_id else {}
    async with http.request(method, url, headers=headers, **kwargs) as resp:
        body = await resp.json() if resp.status != 204 else None
        assert resp.status == status, body
        return body


async def all_events(http: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        page = await call(http, "GET", f"{url}/v1/events", 200, params={"after_seq": str(len(out))})
        out += page["events"]
        if not page["events"] or len(out) >= page["last_seq"]:
            return out


async def wait_for_types(
    http: aiohttp.ClientSession, url: str, wanted: set[str], timeout: float = 120
) -> None:
    """Long-poll the stream until every type in `wanted` has been recorded."""
    seen: set[str] = set()
    after = 0
    async with asyncio.timeout(timeout):
        while not wanted <= seen:
            page = await call(
                http,
                "GET",
                f"{url}/v1/events",
                200,
                params={"after_seq": str(after), "wait": "10", "limit": "5000"},
            )
            for e in page["events"]:
                seen.add(e["event"]["type"])
                after = e["seq"]


async def test_every_event_of_a_full_run_meets_the_published_contract(
    serve: ServeProcess, serve_env: dict[str, str], compose_repo: Path, tmp_path: Path
) -> None:
    vendor = tmp_path / "vendor"
    async with aiohttp.ClientSession() as http:
        await serve.wait_healthy(http)
        url = serve.url
        validator = Validator(serve_env)
        receiver = Receiver()
        app = web.Application()
        app.router.add_post("/hook", receiver.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            await produce_everything(http, url, vendor, port, compose_repo)
        finally:
            validator.stop()
            await runner.cleanup()
        assert receiver.received > 0
        events = await all_events(http, url)
        last_seq = events[-1]["seq"]

        # The served documents are the checked-in ones, and a strict validator's input.
        served = await call(http, "GET", f"{url}/v1/events/schema", 200)
        subjects = await call(http, "GET", f"{url}/v1/events/subjects", 200)
    assert served == json.loads((ROOT / "docs" / "events.schema.json").read_text())
    assert subjects == json.loads((ROOT / "docs" / "events.subjects.json").read_text())
    assert served == json.loads(json.dumps(event_schema()))
    assert subjects == json.loads(json.dumps(event_subjects()))

    summary = node_consumer(serve.data_dir, last_seq, "--nak-first")

    # Every type of the catalog was produced and seen, and nothing else.
    assert set(summary["types"]) == CATALOG, {
        "missing": sorted(CATALOG - set(summary["types"])),
        "unknown": sorted(set(summary["types"]) - CATALOG),
    }
    assert summary["payload_failures"] == [], summary["payload_failures"][:5]
    assert summary["subject_failures"] == [], summary["subject_failures"][:5]
    assert summary["duplicate_event_ids"] == []
    assert summary["acked"] == last_seq
    # At least once: the refused message came again and counted once.
    assert summary["redeliveries"] >= 1 and summary["deliveries"] > last_seq
    assert summary["deadletters"] >= 1, "the dead receiver's delivery was dead-lettered"
    assert summary["events"] + summary["deadletters"] == last_seq
    versions = {t.type_name(): t.VERSION for t in ALL_EVENTS}
    assert {v.split("@")[0]: int(v.split("@")[1]) for v in summary["versions"]} == versions

    check_causation_and_correlation(events)


async def produce_everything(
    http: aiohttp.ClientSession, url: str, vendor: Path, port: int, repo: Path
) -> None:
    api = f"{url}/v1"
    # Webhooks: a live receiver, and a dead one (disabled after its first final failure).
    live = await call(
        http,
        "POST",
        f"{api}/accounts/default/webhooks",
        201,
        json={"url": f"http://127.0.0.1:{port}/hook", "event_types": ["BecameReady"]},
    )
    dead = await call(
        http,
        "POST",
        f"{api}/accounts/default/webhooks",
        201,
        json={"url": f"http://127.0.0.1:{free_port()}/", "event_types": ["SandboxRequested"]},
    )
    await call(http, "POST", f"{api}/accounts/acme/credits", 201, "req-grant", json={"amount": 5})

    async def made(request_id: str | None = None, **body: Any) -> str:
        body.setdefault("profile", "profile.saas-stub")
        answer = await call(http, "POST", f"{api}/sandboxes", 202, request_id, json=body)
        return str(answer["id"])

    a = await made("req-create-a")
    broken = await made(profile="profile.saas-broken-provision")
    stuck = await made(profile="profile.saas-broken-teardown")
    slow = await made(profile="profile.saas-slow")
    rejected = await made(account="trial")  # no credits
    checked = await made(profile="profile.saas-validated")
    compose = await made(profile="profile.compose-validated", inputs={"repo": str(repo)})
    expiring = await made("req-create-ttl", ttl_seconds=2)  # the TTL reaper destroys it
    watched = await made(profile="profile.saas-watched")
    nap = await made(profile="profile.saas-nap")  # paused when idle
    bad_pause = await made(profile="profile.saas-bad-pause")
    bad_resume = await made(profile="profile.saas-bad-resume")

    await wait_state(http, url, slow, {"provisioning"})
    await call(http, "DELETE", f"{api}/sandboxes/{slow}", 202)  # cancels the provision
    await wait_state(http, url, a, {"ready"})
    ckpt = await call(http, "POST", f"{api}/sandboxes/{a}/checkpoints", 202, "req-ckpt-a")
    await wait_checkpoint(http, url, ckpt, "created")
    await call(
        http, "POST", f"{api}/sandboxes/{a}/restore", 202, "req-restore-a",
        json={"checkpoint": ckpt["id"]},
    )  # fmt: skip
    await wait_state(http, url, a, {"ready"})
    # Using it: a command (started, finished) and a file in and out.
    async with http.post(f"{api}/sandboxes/{a}/exec", json={"argv": ["echo", "contract"]}) as resp:
        assert resp.status == 200, await resp.text()
        frames = [json.loads(line) async for line in resp.content if line.strip()]
        assert frames[-1]["exit_code"] == 0, frames
    files = f"{api}/sandboxes/{a}/files"
    async with http.put(files, params={"path": "/note.txt"}, data=b"kept") as resp:
        assert resp.status == 201, await resp.text()
    async with http.get(files, params={"path": "/note.txt"}) as resp:
        assert resp.status == 200 and await resp.read() == b"kept"
    # A lifetime: extended, kept alive, paused when idle, resumed; a pause and a resume
    # the vendor fails; a warm pool member claimed.
    await wait_state(http, url, nap, {"ready"})
    await call(http, "PATCH", f"{api}/sandboxes/{nap}", 200, json={"ttl_seconds": 900})
    await call(http, "POST", f"{api}/sandboxes/{nap}/keepalive", 200)
    await wait_state(http, url, nap, {"paused"}, timeout=60)
    await call(http, "POST", f"{api}/sandboxes/{nap}/resume", 202)
    await wait_state(http, url, bad_pause, {"ready"})
    await call(http, "POST", f"{api}/sandboxes/{bad_pause}/pause", 202)
    await wait_state(http, url, bad_resume, {"ready"})
    await call(http, "POST", f"{api}/sandboxes/{bad_resume}/pause", 202)
    await wait_state(http, url, bad_resume, {"paused"})
    await call(http, "POST", f"{api}/sandboxes/{bad_resume}/resume", 202)
    await wait_for_types(http, url, {"Resumed", "PauseFailed", "ResumeFailed"})
    async with asyncio.timeout(60):
        while not (await call(http, "GET", f"{api}/pools", 200))[0]["ready"]:
            await asyncio.sleep(0.2)  # polling a condition, under a deadline
    claimed = await made(profile="profile.warm")
    await wait_for_types(http, url, {"SandboxClaimed"})

    # The vendor's instance record turns into a directory: the restore cannot write it.
    instance = vendor / f"{a}.json"
    instance.unlink()
    instance.mkdir()
    await call(http, "POST", f"{api}/sandboxes/{a}/restore", 202, json={"checkpoint": ckpt["id"]})
    await wait_restore_failed(http, url, a)
    instance.rmdir()  # and now there is none to snapshot
    failed = await call(http, "POST", f"{api}/sandboxes/{a}/checkpoints", 202)
    await wait_checkpoint(http, url, failed, "failed")
    await call(http, "DELETE", f"{api}/checkpoints/{ckpt['id']}", 200)

    # The vendor's side of a watched sandbox: unhealthy, back, then gone (it fails).
    await wait_state(http, url, watched, {"ready"})
    for told, seen in [
        ({"health": "unhealthy", "output": "probe refused"}, "ServiceUnhealthy"),
        ({"health": "healthy"}, "ServiceRecovered"),
        ({"state": "exited", "exit_code": 3}, "ServiceExited"),
    ]:
        record = vendor / f"{watched}.json"
        changed = {**json.loads(record.read_text()), "services": {"instance": told}}
        (vendor / "next.tmp").write_text(json.dumps(changed))
        (vendor / "next.tmp").replace(record)
        await wait_for_types(http, url, {seen})

    await wait_state(http, url, stuck, {"ready"})
    await call(http, "DELETE", f"{api}/sandboxes/{stuck}", 202)
    for sandbox in (checked, compose):
        await wait_state(http, url, sandbox, {"ready"}, timeout=300)
    await wait_for_types(http, url, {"ValidationPassed", "ValidationFailed"})
    for sandbox in (checked, compose, nap, bad_pause, bad_resume, claimed):
        await call(http, "DELETE", f"{api}/sandboxes/{sandbox}", 202)
    await call(http, "DELETE", f"{api}/sandboxes/{a}", 202, "req-delete-a")
    for sandbox, state in [
        (a, "destroyed"),
        (broken, "failed"),
        (stuck, "failed"),
        (slow, "destroyed"),
        (rejected, "rejected"),
        (checked, "destroyed"),
        (compose, "destroyed"),
        (expiring, "destroyed"),
        (watched, "failed"),
        (nap, "destroyed"),
        (bad_pause, "destroyed"),
        (bad_resume, "destroyed"),
        (claimed, "destroyed"),
    ]:
        await wait_state(http, url, sandbox, {state}, timeout=120)

    # Reconciliation: one orphan removed, one that cannot be.
    (vendor / f"{UNKNOWN}.json").write_text("{}")
    (vendor / f"{STUCK}.json").mkdir()
    report = await call(http, "POST", f"{api}/reconcile", 200, params={"remove": "true"})
    assert {o["sandbox_id"] for o in report["orphans"]} >= {UNKNOWN, STUCK}

    await wait_for_types(http, url, CATALOG - {"WebhookRemoved"})
    for hook in (live, dead):
        await call(http, "DELETE", f"{api}/webhooks/{hook['id']}", 204)
    await wait_for_types(http, url, {"WebhookRemoved"})
    # Settlements of every metered sandbox are in (they follow the ends).
    account = await call(http, "GET", f"{api}/accounts/default", 200)
    async with asyncio.timeout(60):
        while account["reserved"] != 0:
            account = await call(
                http,
                "GET",
                f"{api}/accounts/default",
                200,
                params={"wait": "10", "after_seq": str(account["last_seq"])},
            )


async def wait_restore_failed(http: aiohttp.ClientSession, url: str, sandbox: str) -> None:
    async with asyncio.timeout(120):
        while True:
            got = await call(http, "GET", f"{url}/v1/sandboxes/{sandbox}/events", 200)
            if got["events"][-1]["event"]["type"] == "RestoreFailed":
                return
            await call(
                http,
                "GET",
                f"{url}/v1/sandboxes/{sandbox}",
                200,
                params={"wait": "5", "after_seq": str(got["events"][-1]["seq"])},
            )


def check_causation_and_correlation(recorded: list[dict[str, Any]]) -> None:
    events = [r["event"] for r in recorded if not r["subject"].startswith("sandboxer.deadletter.")]
    by_id = {e["event_id"]: e for e in events}
    for e in events:
        cause = e["causation_id"]
        if e["type"] == "TtlExtended" and e["credits_added"]:
            # a metered sandbox's extension follows from its reservation's top-up
            assert cause == f"{e['aggregate_id']}.extend-{e['ttl_seconds']}", e
        elif e["type"] in CHAIN_STARTS and e.get("reason") not in (
            "ttl",
            "service_exited",
            "idle",
        ):
            assert cause is None, e
        else:
            assert cause is not None, f"{e['type']} {e['event_id']}: no causation"
            assert cause in by_id, f"{e['type']}: causation {cause} is no recorded event"

    def of(sandbox: str, type_name: str) -> list[dict[str, Any]]:
        return [
            e
            for e in events
            if e["type"] == type_name and sandbox in (e["aggregate_id"], e.get("sandbox_id"))
        ]

    for destroy in [e for e in events if e.get("reason") == "service_exited"]:
        assert by_id[destroy["causation_id"]]["type"] == "ServiceExited", destroy

    requested = next(e for e in events if e["correlation_id"] == "req-create-a")
    a = requested["aggregate_id"]
    (destroy,) = of(a, "DestroyRequested")
    (torn,) = of(a, "TornDown")
    assert destroy["correlation_id"] == torn["correlation_id"] == "req-delete-a"
    assert torn["causation_id"] == destroy["event_id"]
    for ledger in ("CreditsDebited", "CreditsReleased"):
        (settled,) = of(a, ledger)
        assert settled["causation_id"] == torn["event_id"], settled
        assert settled["correlation_id"] == "req-delete-a", settled
    (debit,) = of(a, "CreditsDebited")
    assert debit["basis"]["capped_at_reservation"] is False
    assert {"size", "rate", "seconds", "minimum_charge"} <= set(debit["basis"])
    (ckpt_req, failed_req) = of(a, "CheckpointRequested")
    (created,) = of(a, "CheckpointCreated")
    assert created["correlation_id"] == ckpt_req["correlation_id"] == "req-ckpt-a"
    assert created["causation_id"] == ckpt_req["event_id"]
    (restore_req, _) = of(a, "RestoreRequested")
    (restored,) = of(a, "Restored")
    assert restored["correlation_id"] == restore_req["correlation_id"] == "req-restore-a"
    assert restored["causation_id"] == restore_req["event_id"]
    (ckpt_failed,) = of(a, "CheckpointFailed")
    assert ckpt_failed["causation_id"] == failed_req["event_id"]
    # The create's own chain keeps the create's id.
    for type_name in ("RouteChosen", "CreditsHeld", "Provisioned", "BecameReady"):
        (step,) = of(a, type_name)
        assert step["correlation_id"] == "req-create-a", step
    (reserved,) = of(a, "CreditsReserved")
    (held,) = of(a, "CreditsHeld")
    assert held["causation_id"] == reserved["event_id"] == f"{a}.reserve"
    # A TTL expiry follows from the create that set the TTL, in its correlation.
    ttl_create = next(e for e in events if e["correlation_id"] == "req-create-ttl")
    (expired,) = of(ttl_create["aggregate_id"], "DestroyRequested")
    assert expired["reason"] == "ttl" and expired["actor"] == "system:ttl-reaper"
    assert expired["causation_id"] == ttl_create["event_id"]
    assert expired["correlation_id"] == "req-create-ttl"
    (grant,) = [e for e in events if e["correlation_id"] == "req-grant"]
    assert grant["type"] == "CreditsGranted" and grant["causation_id"] is None
    removed = [e for e in events if e["type"] in ("OrphanRemoved", "OrphanRemovalFailed")]
    for e in removed:
        found = by_id[e["causation_id"]]
        assert found["type"] == "OrphanFound" and found["sandbox_id"] == e["sandbox_id"]


def test_the_docs_example_consumer_is_valid_javascript(tmp_path: Path) -> None:
    """docs/events.md's Node example parses (the consumer it is trimmed from runs above)."""
    text = (ROOT / "docs" / "events.md").read_text()
    section = text.split("## Reading the stream from another language", 1)[1]
    snippet = section.split("```js\n", 1)[1].split("```", 1)[0]
    assert "AckPolicy.Explicit" in snippet and "event_id" in snippet
    script = tmp_path / "example.mjs"
    script.write_text(snippet)
    out = subprocess.run(["node", "--check", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
