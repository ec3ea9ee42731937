"""Payments v0 against a real JetStream: reservations, debits, concurrency, crash, audit."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import msgspec
import nats
import pytest

from events import Aggregate, CreditsDebited, CreditsGranted, CreditsReserved, EventMeta
from projections import snapshot
from sandboxer.app.ledger import LedgerBook
from sandboxer.app.read_model import ProjectionRunner
from sandboxer.store.event_store import JetStreamEventStore
from sandboxer.store.nats_server import EmbeddedNats
from sandboxer.store.read_snapshots import ObjectStoreReadModels
from tests.conftest import RunningService, StartService
from tests.helpers import (
    audit,
    create,
    destroy,
    grant,
    wait_settled,
    wait_state,
)
from tests.infra import ServeProcess, free_port

RATE_SMALL = 0.05


async def ledger_entries(http: aiohttp.ClientSession, url: str, account: str) -> list[dict]:  # type: ignore[type-arg]
    async with http.get(f"{url}/v1/accounts/{account}/ledger", params={"limit": "1000"}) as r:
        return [e["event"] for e in (await r.json())["entries"]]


async def sandbox_events(http: aiohttp.ClientSession, url: str, sid: str) -> list[dict]:  # type: ignore[type-arg]
    async with http.get(f"{url}/v1/sandboxes/{sid}/events") as resp:
        return [e["event"] for e in (await resp.json())["events"]]


def parse(ts: str) -> dt.datetime:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))


async def test_reserve_debit_release_exact(start_service: StartService) -> None:
    svc = await start_service(SANDBOXER_SAAS_STUB_LATENCY_MS="300")
    http, url = svc.http, svc.url
    await grant(http, url, "acme", 100)
    made = await create(http, url, account="acme", ttl_seconds=600)
    await wait_state(http, url, made["id"], {"ready"})
    async with http.get(f"{url}/v1/accounts/acme") as resp:
        held = await resp.json()
    assert (held["reserved"], held["available"]) == (30, 70)
    assert held["open_reservations"] == {made["id"]: 30}
    await destroy(http, url, made["id"])
    await wait_state(http, url, made["id"], {"destroyed"})
    account = await wait_settled(http, url, "acme")

    events = await sandbox_events(http, url, made["id"])
    provisioned = parse(next(e for e in events if e["type"] == "Provisioned")["occurred_at"])
    torn = parse(next(e for e in events if e["type"] == "TornDown")["occurred_at"])
    seconds = (torn - provisioned).total_seconds()
    actual = max(1, math.ceil(RATE_SMALL * seconds - 1e-9))

    entries = await ledger_entries(http, url, "acme")
    assert [e["type"] for e in entries] == [
        "CreditsGranted",
        "CreditsReserved",
        "CreditsDebited",
        "CreditsReleased",
    ]
    reserved, debited, released = entries[1], entries[2], entries[3]
    assert reserved["amount"] == 30
    assert reserved["basis"] == {
        "size": "small",
        "rate": RATE_SMALL,
        "seconds": 600,
        "minimum_charge": 1,
        "basis": "ttl",
    }
    assert debited["amount"] == actual
    assert debited["basis"]["seconds"] == pytest.approx(seconds, abs=0.001)
    assert debited["basis"]["basis"] == "provisioned-to-torn-down"
    assert released["amount"] == 30 - actual
    assert {e["event_id"] for e in entries[1:]} == {
        f"{made['id']}.reserve",
        f"{made['id']}.debit",
        f"{made['id']}.release",
    }
    assert account["granted"] == 100 and account["reserved"] == 0
    assert account["debited"] == actual and account["available"] == 100 - actual
    report = await audit(http, url, "acme")
    assert report["ok"] is True and [d["amount"] for d in report["debits"]] == [actual]


async def test_failed_create_releases_everything(start_service: StartService) -> None:
    svc = await start_service(SANDBOXER_SAAS_STUB_FAIL_HOOK="wait_ready")
    await grant(svc.http, svc.url, "acme", 50)
    made = await create(svc.http, svc.url, account="acme")
    await wait_state(svc.http, svc.url, made["id"], {"failed"})
    account = await wait_settled(svc.http, svc.url, "acme")
    assert (account["debited"], account["released"], account["available"]) == (0, 30, 50)
    entries = await ledger_entries(svc.http, svc.url, "acme")
    assert entries[-1]["reason"] == "create failed"
    assert (await audit(svc.http, svc.url))["ok"] is True


async def test_50_concurrent_creates_against_credits_for_10(api: RunningService) -> None:
    http, url = api.http, api.url
    await grant(http, url, "acme", 300)
    made = await asyncio.gather(*(create(http, url, account="acme") for _ in range(50)))
    finals = await asyncio.gather(
        *(wait_state(http, url, m["id"], {"ready", "rejected"}, timeout=60) for m in made)
    )
    ready = [f for f in finals if f["state"] == "ready"]
    rejected = [f for f in finals if f["state"] == "rejected"]
    assert len(ready) == 10 and len(rejected) == 40
    for r in rejected:
        assert r["reason"] == ("insufficient credits in account acme: required 30, available 0")
    entries = await ledger_entries(http, url, "acme")
    assert sum(e["type"] == "CreditsReserved" for e in entries) == 10
    rejections = [e for e in entries if e["type"] == "CreditsRejected"]
    assert len(rejections) == 40 and all(e["requested"] == 30 for e in rejections)
    # Replaying the account: available never below zero at any event.
    available = 0
    for e in entries:
        available += {
            "CreditsGranted": e.get("amount", 0),
            "CreditsReserved": -e.get("amount", 0),
        }.get(e["type"], 0)
        assert available >= 0
    report = await audit(http, url, "acme")
    assert report["ok"] is True, report["violations"]
    assert report["accounts"]["acme"]["reserved"] == 300


async def test_two_processes_never_overdraw(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    """Two `sandboxer serve` processes on one JetStream reserve from one account."""
    env = {"SANDBOXER_NATS_URL": nats_server.service_url}
    procs = [ServeProcess(tmp_path / f"data{i}", free_port(), **env) for i in range(2)]
    async with aiohttp.ClientSession() as http:
        try:
            for proc in procs:
                await proc.wait_healthy(http)
            first, second = procs
            await grant(http, first.url, "shared", 300)
            urls = [first.url, second.url] * 15
            made = await asyncio.gather(*(create(http, u, account="shared") for u in urls))
            finals = await asyncio.gather(
                *(
                    wait_state(http, u, m["id"], {"ready", "rejected"}, timeout=60)
                    for u, m in zip(urls, made, strict=True)
                )
            )
            assert sum(f["state"] == "ready" for f in finals) == 10
            assert sum(f["state"] == "rejected" for f in finals) == 20
            for url in (first.url, second.url):
                report = await audit(http, url, "shared")
                assert report["ok"] is True, report["violations"]
                assert report["accounts"]["shared"]["reserved"] == 300
                assert report["accounts"]["shared"]["granted"] == 300
            for proc in procs:
                assert proc.terminate() == 0
        finally:
            for proc in procs:
                if proc.proc.poll() is None:
                    proc.kill()


async def test_ledger_book_conflicts_are_redecided(store: JetStreamEventStore) -> None:
    """Two books on one account, the second stale: it re-reads and decides again."""
    meta = EventMeta(actor="test", correlation_id="c")
    # Each book reads its own runner's ledger; two's runner stops before one writes.
    ones, twos = ProjectionRunner(store), ProjectionRunner(store)
    await ones.start()
    await twos.start()
    await twos.stop()
    one, two = LedgerBook(store, ones), LedgerBook(store, twos)
    await one.grant("acct", 40, meta)
    from extensions import Cost

    first = await one.reserve("sbx-aaa", "acct", Cost(30, {}), meta)
    assert first.reserved == 30 and not first.rejected
    # two decides on what its runner showed (nothing), is refused, and its runner
    # following again lets it see the account before it decides again.
    second, _ = await asyncio.gather(
        two.reserve("sbx-bbb", "acct", Cost(30, {}), meta),  # two never saw them
        twos.start(),
    )
    await ones.stop()
    await twos.stop()
    assert second.rejected, "two re-read the account after the conflict and saw 10 left"
    history = [r.event async for r in store.read(1, aggregate=Aggregate("ledger", "acct"))]
    assert [type(e) for e in history][:2] == [CreditsGranted, CreditsReserved]
    assert not any(isinstance(e, CreditsDebited) for e in history)


async def test_racing_reservations_never_overdraw(store: JetStreamEventStore) -> None:
    """150 reservations of 10 against 1,000 credits, from two books (two processes)
    racing on the account: they conflict, re-read and decide again, and exactly 100
    hold."""
    from extensions import Cost

    meta = EventMeta(actor="test", correlation_id="c")
    ones, twos = ProjectionRunner(store), ProjectionRunner(store)
    await ones.start()
    await twos.start()
    one, two = LedgerBook(store, ones), LedgerBook(store, twos)
    await one.grant("grouped", 1000, meta)
    await two.refresh("grouped")
    books = [one, two] * 75
    charges = await asyncio.gather(
        *(
            book.reserve(f"sbx-g{i:03d}", "grouped", Cost(10, {}), meta)
            for i, book in enumerate(books)
        )
    )
    await ones.wait_for(await store.last_seq(), 10)
    await twos.wait_for(await store.last_seq(), 10)
    assert sum(not c.rejected for c in charges) == 100
    assert sum(c.rejected for c in charges) == 50
    for runner in (ones, twos):
        view = runner.ledger.account("grouped")
        assert view.reserved == 1000 and view.available == 0
    history = [r.event async for r in store.read(1, aggregate=Aggregate("ledger", "grouped"))]
    assert sum(isinstance(e, CreditsReserved) for e in history) == 100
    assert len({e.event_id for e in history}) == len(history) == 151  # the grant + 150
    await ones.stop()
    await twos.stop()


async def test_two_settlements_of_one_sandbox_debit_once(
    store: JetStreamEventStore,
) -> None:
    """Two settlements of one sandbox at once: the second decides on the first's debit
    and release (as the runner shows them) and appends nothing."""
    from extensions import Cost

    meta = EventMeta(actor="test", correlation_id="c")
    runner = ProjectionRunner(store)
    await runner.start()
    book = LedgerBook(store, runner)
    await book.grant("once", 100, meta)
    for sid in ("sbx-once-a", "sbx-once-b"):
        await book.reserve(sid, "once", Cost(30, {}), meta)
    settled = await asyncio.gather(
        book.settle("sbx-once-a", Cost(10, {}), meta),
        book.settle("sbx-once-a", Cost(20, {}), meta),
        book.settle("sbx-once-b", None, meta),
    )
    assert settled[0] == settled[1] and settled[0].debited == 10 and settled[0].released == 20
    assert settled[2].released == 30 and settled[2].debited is None
    view = book.account("once")
    assert view.debited == 10 and view.reserved == 0 and view.available == 90
    history = [r.event async for r in store.read(1, aggregate=Aggregate("ledger", "once"))]
    assert sum(isinstance(e, CreditsDebited) for e in history) == 1
    await runner.stop()


async def test_decisions_on_a_stale_view_are_redecided(store: JetStreamEventStore) -> None:
    """Reservations decided on a stale view (its runner stopped before another book
    wrote) are refused by the expected version, re-read and decided again."""
    from extensions import Cost

    meta = EventMeta(actor="test", correlation_id="c")
    ones, twos = ProjectionRunner(store), ProjectionRunner(store)
    await ones.start()
    await twos.start()
    one, two = LedgerBook(store, ones), LedgerBook(store, twos)
    await one.grant("stale", 50, meta)
    await two.refresh("stale")
    await twos.stop()
    await one.reserve("sbx-stale-0", "stale", Cost(30, {}), meta)  # two never sees it
    *charges, _ = await asyncio.gather(
        *(two.reserve(f"sbx-stale-{i}", "stale", Cost(10, {}), meta) for i in range(1, 5)),
        twos.start(),
    )
    assert sum(not c.rejected for c in charges) == 2, "20 were left after the stale reserve"
    view = two.account("stale")
    assert view.reserved == 50 and view.available == 0
    await ones.stop()
    await twos.stop()


async def test_crash_between_teardown_and_debit(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with aiohttp.ClientSession() as http:
        first = ServeProcess(data_dir, free_port(), SANDBOXER_FAILPOINTS="before-settle")
        await first.wait_healthy(http)
        made = await create(http, first.url)
        await wait_state(http, first.url, made["id"], {"ready"})
        # The failpoint SIGKILLs serve right after TornDown, before any debit: with an
        # instant teardown that can come before the answer to the DELETE itself.
        try:
            await destroy(http, first.url, made["id"])
        except aiohttp.ClientConnectionError:
            pass
        assert await asyncio.to_thread(first.proc.wait, 30) == -9

        second = ServeProcess(data_dir, free_port())
        try:
            await second.wait_healthy(http)
            view = await wait_state(http, second.url, made["id"], {"destroyed"})
            assert view["state"] == "destroyed"
            await wait_settled(http, second.url, "default")
            entries = await ledger_entries(http, second.url, "default")
            debits = [e for e in entries if e["type"] == "CreditsDebited"]
            assert len(debits) == 1 and debits[0]["sandbox_id"] == made["id"]
            assert sum(e["type"] == "CreditsReleased" for e in entries) == 1
            report = await audit(http, second.url)
            assert report["ok"] is True, report["violations"]
            assert second.terminate() == 0
        finally:
            if second.proc.poll() is None:
                second.kill()
        # And a third start settles nothing twice.
        third = ServeProcess(data_dir, free_port())
        try:
            await third.wait_healthy(http)
            report = await audit(http, third.url)
            assert report["ok"] is True and len(report["debits"]) == 1
            assert third.terminate() == 0
        finally:
            if third.proc.poll() is None:
                third.kill()


async def test_starter_credits(start_service: StartService, tmp_path: Path) -> None:
    svc = await start_service()
    async with svc.http.get(f"{svc.url}/v1/accounts/default") as resp:
        default = await resp.json()
    assert default["granted"] == 1000 and default["entries"] == 1
    await svc.stop()
    again = await start_service()  # a restart grants nothing more
    async with again.http.get(f"{again.url}/v1/accounts/default") as resp:
        assert (await resp.json())["granted"] == 1000


async def test_starter_credits_off(start_service: StartService) -> None:
    svc = await start_service(SANDBOXER_STARTER_CREDITS="0")
    async with svc.http.get(f"{svc.url}/v1/accounts/default") as resp:
        assert resp.status == 404
    made = await create(svc.http, svc.url)
    final = await wait_state(svc.http, svc.url, made["id"], {"rejected"})
    assert final["reason"] == ("insufficient credits in account default: required 30, available 0")


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandboxer", "--url", url, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_audit_detects_a_tampered_snapshot_balance(
    start_service: StartService, nats_server: EmbeddedNats
) -> None:
    """A snapshot whose bytes changed is refused (digest); one re-signed by someone
    with write access to the bucket is loaded, and the audit's replay from sequence 1
    still finds the balance that differs."""
    svc = await start_service()
    made = await create(svc.http, svc.url)
    await wait_state(svc.http, svc.url, made["id"], {"ready"})
    await destroy(svc.http, svc.url, made["id"])
    await wait_state(svc.http, svc.url, made["id"], {"destroyed"})
    await wait_settled(svc.http, svc.url, "default")
    ok = await asyncio.to_thread(cli, svc.url, "ledger", "audit")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "debit seq" in ok.stdout and ok.stdout.strip().splitlines()[-1].startswith("ok")
    assert svc.service.leases is not None
    worker = svc.service.leases.name
    await svc.stop()  # writes the read-model snapshot

    nc = await nats.connect(**nats_server.connect_options())
    try:
        store = ObjectStoreReadModels(nc.jetstream(), worker)
        data = await store.load()
        assert data is not None
        state = snapshot.decode(data, stream_id=snapshot.header_of(data).stream_id, last_seq=10**9)
        state.accounts = [
            msgspec.structs.replace(a, granted=a.granted + 500) if a.account == "default" else a
            for a in state.accounts
        ]
        await store.save(snapshot.encode(state))  # a hand-altered balance, digest redone
    finally:
        await nc.close()

    tampered = await start_service()
    assert tampered.service.runner is not None
    assert tampered.service.runner.started_from.startswith("snapshot at seq")
    bad = await asyncio.to_thread(cli, tampered.url, "ledger", "audit")
    assert bad.returncode == 1
    assert (
        "VIOLATION: account default: the live projection differs from a fresh replay "
        "(granted: live 1500, replay 1000)"
    ) in bad.stdout


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"amount": 0}', "amount"),
        ('{"amount": -5}', "amount"),
        ('{"amount": "x"}', "amount"),
        ('{"amount": 1.5}', "amount"),
        ('{"amount": 1, "memo": 2}', "memo"),
        ("{", None),
    ],
)
async def test_bad_grants(api: RunningService, body: str, field: str | None) -> None:
    async with api.http.post(f"{api.url}/v1/accounts/acme/credits", data=body) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["field"] == field
    async with api.http.get(f"{api.url}/v1/accounts/acme") as resp:
        assert resp.status == 404, "nothing was recorded"


async def test_cli_ledger_commands(api: RunningService) -> None:
    granted = await asyncio.to_thread(
        cli, api.url, "ledger", "grant", "team-a", "75", "--reason", "pilot"
    )
    assert granted.returncode == 0 and "available 75" in granted.stdout
    balance = await asyncio.to_thread(cli, api.url, "ledger", "balance", "team-a", "--json")
    assert json.loads(balance.stdout)["available"] == 75
    history = await asyncio.to_thread(cli, api.url, "ledger", "history", "team-a", "--json")
    assert [json.loads(x)["event"]["reason"] for x in history.stdout.splitlines()] == ["pilot"]
    missing = await asyncio.to_thread(cli, api.url, "ledger", "balance", "nobody")
    assert missing.returncode == 3


Factory = Callable[..., dict[str, str]]


async def test_burst_routes_by_credits_and_falls_back(
    start_service: StartService,
    compose_env: Factory,
    compose_repo: Path,
) -> None:
    svc = await start_service(**compose_env())
    http, url = svc.http, svc.url
    await grant(http, url, "rich", 100)
    inputs = {"repo": str(compose_repo)}
    saas = await create(http, url, profile="profile.burst-sandbox", account="rich", inputs=inputs)
    poor = await create(http, url, profile="profile.burst-sandbox", account="poor", inputs=inputs)
    s_ready = await wait_state(http, url, saas["id"], {"ready"}, timeout=120)
    p_ready = await wait_state(http, url, poor["id"], {"ready"}, timeout=120)
    assert s_ready["extension"] == "saas-stub"
    assert "credits 100 cover the estimate 30" in s_ready["route_reason"]
    assert p_ready["extension"] == "compose-ssh" and p_ready["host"] == "host0"
    assert "saas-stub: account poor has 0 credits, estimate is 30" in p_ready["route_reason"]
    events = await sandbox_events(http, url, poor["id"])
    route = next(e for e in events if e["type"] == "RouteChosen")
    assert route["metered"] is False and route["extension"] == "compose-ssh"
    for made in (saas, poor):
        await destroy(http, url, made["id"])
        await wait_state(http, url, made["id"], {"destroyed"}, timeout=120)
    await wait_settled(http, url, "rich")
    assert (await audit(http, url))["ok"] is True


async def test_burst_falls_back_when_the_saas_refuses(
    start_service: StartService,
    compose_env: Factory,
    compose_repo: Path,
) -> None:
    svc = await start_service(SANDBOXER_SAAS_STUB_REFUSE="1", **compose_env())
    made = await create(
        svc.http, svc.url, profile="profile.burst-sandbox", inputs={"repo": str(compose_repo)}
    )
    ready = await wait_state(svc.http, svc.url, made["id"], {"ready"}, timeout=120)
    assert ready["extension"] == "compose-ssh"
    assert (
        "saas-stub refused: ExtensionError: saas-stub refuses new sandboxes"
        in (ready["route_reason"])
    )
    await destroy(svc.http, svc.url, made["id"])
    await wait_state(svc.http, svc.url, made["id"], {"destroyed"}, timeout=120)


async def test_saas_stub_profile_rejects_when_the_saas_refuses(
    start_service: StartService,
) -> None:
    svc = await start_service(SANDBOXER_SAAS_STUB_REFUSE="1")
    made = await create(svc.http, svc.url)
    final = await wait_state(svc.http, svc.url, made["id"], {"rejected"})
    assert final["reason"].startswith("saas-stub refused")
