"""GET /metrics of a real service: the series after real sandbox lifecycles on the
saas-stub, parsed as Prometheus parses them, and who may scrape them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningService, StartService
from tests.helpers import create, destroy, wait_state
from tests.infra import free_port
from tests.paths import ROOT

TOKENS = [
    {"name": "ops", "token": "admin-token-0123456789", "account": "default", "role": "admin"},
    {"name": "acme-ci", "token": "acme-token-0123456789", "account": "acme"},
]
ADMIN, ACME = (f"Bearer {t['token']}" for t in TOKENS)

# (series name, frozen labels) -> value, as a scrape sees them
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(svc: RunningService, auth: str | None = None) -> Samples:
    headers = {"Authorization": auth} if auth else {}
    async with svc.http.get(f"{svc.url}/metrics", headers=headers) as resp:
        text = await resp.text()
        assert resp.status == 200, text
        assert resp.headers["Content-Type"].startswith("text/plain"), resp.headers
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every sample of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, got), v in samples.items() if n == name and wanted <= got)


async def scrape_until(
    svc: RunningService, done: str, check: Callable[[Samples], bool], deadline: float = 20.0
) -> Samples:
    """Scrape until `check` holds (a counter that ticks on its own schedule)."""
    end = time.monotonic() + deadline
    while True:
        samples = await scrape(svc)
        if check(samples):
            return samples
        assert time.monotonic() < end, f"not within {deadline}s: {done}"
        await asyncio.sleep(0.1)


def broken_profile(folder: Path) -> Path:
    """profile.saas-broken: the stub's wait_ready always fails."""
    folder.mkdir()
    base = yaml.safe_load((ROOT / "profiles" / "profile.saas-stub.yaml").read_text())
    broken = {**base, "name": "profile.saas-broken", "config": {"fail_hook": "wait_ready"}}
    (folder / "profile.saas-broken.yaml").write_text(yaml.safe_dump(broken))
    return folder


async def test_metrics_after_a_lifecycle(start_service: StartService, tmp_path: Path) -> None:
    svc = await start_service(
        SANDBOXER_LEASE_TTL="1.5",  # a renewal every 0.5 s
        SANDBOXER_PROFILES_PATH=str(broken_profile(tmp_path / "profiles")),
    )
    http, url = svc.http, svc.url
    before = await scrape(svc)
    assert total(before, "sandboxer_sandboxes") == 0
    assert total(before, "sandboxer_step_duration_seconds_count") == 0

    made = await create(http, url)
    await wait_state(http, url, made["id"], {"ready"})
    await destroy(http, url, made["id"])
    done = await wait_state(http, url, made["id"], {"destroyed"})
    extension = done["extension"]
    broken = await create(http, url, profile="profile.saas-broken")
    await wait_state(http, url, broken["id"], {"failed"})

    samples = await scrape_until(
        svc,
        "a lease renewal",
        lambda s: (value(s, "sandboxer_lease_renewals_total") or 0) > 0,
    )
    # Sandboxes by state and extension, read from the projection at the scrape.
    assert value(samples, "sandboxer_sandboxes", state="destroyed", extension=extension) == 1
    assert value(samples, "sandboxer_sandboxes", state="failed", extension=extension) == 1
    assert total(samples, "sandboxer_sandboxes") == 2
    # Each hook the lifecycle ran, timed with its outcome.
    for step in ("estimate_cost", "provision", "wait_ready", "teardown"):
        count = value(samples, "sandboxer_step_duration_seconds_count", step=step, outcome="ok")
        assert count is not None and count >= 1, step
        seconds = value(samples, "sandboxer_step_duration_seconds_sum", step=step, outcome="ok")
        assert seconds is not None and seconds > 0, step
    assert (
        value(samples, "sandboxer_step_duration_seconds_count", step="wait_ready", outcome="failed")
        == 1
    )
    # Appends: the two sandboxes' events (a whole metered life is 7), the ledger's.
    assert total(samples, "sandboxer_events_appended_total", kind="sandbox") >= 7 + 4
    assert total(samples, "sandboxer_events_appended_total", kind="ledger") > 0
    appends = value(samples, "sandboxer_event_append_duration_seconds_count", kind="sandbox")
    assert appends is not None and appends > 0
    # The read model's position: applied up to the sandbox's last event, no lag left.
    lag = value(samples, "sandboxer_projection_lag_events")
    assert lag is not None and lag >= 0
    applied = value(samples, "sandboxer_projection_applied_seq")
    assert applied is not None and applied >= done["last_seq"]
    stream = value(samples, "sandboxer_stream_seq")
    assert stream is not None and stream >= applied
    age = value(samples, "sandboxer_read_model_snapshot_age_seconds")
    assert age is None or age >= 0, "no sample before the first snapshot"
    assert total(samples, "sandboxer_lease_renewal_failures_total") == 0
    build = [labels for (name, labels), _ in samples.items() if name == "sandboxer_build_info"]
    assert len(build) == 1 and dict(build[0])["version"]

    # A sweep: counted, and the orphans per inventoried extension set (none: the
    # stub's instances were torn down).
    async with http.post(f"{url}/v1/reconcile", params={"remove": "0"}) as resp:
        report = await resp.json()
        assert resp.status == 200, report
    swept = await scrape(svc)
    assert value(swept, "sandboxer_reconcile_sweeps_total") == 1
    for name, found in report["checked"].items():
        assert found >= 0
        assert value(swept, "sandboxer_reconcile_orphans", extension=name) == sum(
            1 for o in report["orphans"] if o["extension"] == name
        )


async def test_metrics_need_an_admin_token(start_service: StartService) -> None:
    svc = await start_service(SANDBOXER_TOKENS=yaml.safe_dump(TOKENS))
    for auth, status in ((None, 401), ("Bearer wrong-token-0123456789", 401), (ACME, 403)):
        headers = {"Authorization": auth} if auth else {}
        async with svc.http.get(f"{svc.url}/metrics", headers=headers) as resp:
            body = await resp.json()
            assert resp.status == status, body
            assert body["error"]["code"] in ("unauthorized", "forbidden")
    samples = await scrape(svc, ADMIN)
    assert value(samples, "sandboxer_projection_lag_events") is not None
    assert total(samples, "sandboxer_events_appended_total") > 0, "the starter grant's events"


async def test_webhook_deliveries_by_outcome(start_service: StartService) -> None:
    """A receiver down for its first request (failed, then ok), and one that never
    answers (failed, then final: the last of two attempts)."""
    svc = await start_service(
        SANDBOXER_WEBHOOK_BACKOFF="0.1",
        SANDBOXER_WEBHOOK_MAX_ATTEMPTS="2",
        SANDBOXER_WEBHOOK_ALLOW_NETS="127.0.0.0/8",
    )
    requests = 0

    async def handle(request: web.Request) -> web.Response:
        nonlocal requests
        requests += 1
        return web.Response(status=503 if requests == 1 else 204)

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        for target, types in (
            (f"http://127.0.0.1:{port}/hook", ["SandboxRequested", "BecameReady"]),
            (f"http://127.0.0.1:{free_port()}/closed", ["SandboxRequested"]),
        ):
            async with svc.http.post(
                f"{svc.url}/v1/accounts/default/webhooks",
                json={"url": target, "event_types": types},
            ) as resp:
                assert resp.status == 201, await resp.text()
        made = await create(svc.http, svc.url)
        await wait_state(svc.http, svc.url, made["id"], {"ready"})

        def delivered(s: Samples) -> bool:
            return (
                value(s, "sandboxer_webhook_deliveries_total", outcome="ok") == 2
                and value(s, "sandboxer_webhook_deliveries_total", outcome="final") == 1
            )

        samples = await scrape_until(svc, "two deliveries ok and one final", delivered)
        assert value(samples, "sandboxer_webhook_deliveries_total", outcome="failed") == 2
    finally:
        await runner.cleanup()
