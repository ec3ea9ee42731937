"""The dashboard in a real headless Chromium (Debian's, driven by Playwright) against the
real service: rows appear and move live from the event stream, actions go through the
API, auth is the API's, and the page never asks for anything beyond the server."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from playwright.async_api import (
    ConsoleMessage,
    Dialog,
    Locator,
    Page,
    Request,
    Route,
    async_playwright,
    expect,
)

from events import (
    CommandFinished,
    CommandStarted,
    Event,
    EventMeta,
    ValidationFailed,
    ValidationPassed,
    envelope,
)
from events.subjects import Aggregate
from sandboxer.http.api import openapi_document
from sandboxer.http.dashboard import CSP, STATIC_DIR
from sandboxer.store.event_store import JetStreamEventStore
from tests.conftest import RunningService, StartService
from tests.helpers import create, destroy, event_types, get, wait_state
from tests.infra import IMAGE, Podman, write_repo
from tests.paths import ROOT

CHROMIUM = "/usr/bin/chromium"  # Debian's package (scripts/setup); no Playwright download
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = ROOT / "test-artifacts"
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
WAIT_MS = 20_000  # every expectation's deadline
# Collects Content-Security-Policy violations before any of the page's scripts run.
CSP_PROBE = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`);
});
"""
TOKENS = [
    {"name": "ops", "token": "admin-token-0123456789", "account": "default", "role": "admin"},
    {"name": "acme-ci", "token": "acme-token-0123456789", "account": "acme"},
]
ADMIN = {"Authorization": "Bearer admin-token-0123456789"}
ACME = {"Authorization": "Bearer acme-token-0123456789"}

expect.set_options(timeout=WAIT_MS)


@dataclass
class Browser:
    page: Page
    blocked: list[str] = field(default_factory=list)  # requests that tried to leave loopback
    problems: list[str] = field(default_factory=list)  # page errors, CSP reports
    streams: list[dict[str, str]] = field(default_factory=list)  # headers of each stream call

    async def check_clean(self) -> None:
        violations = await self.page.evaluate("window.__cspViolations")
        assert violations == [], violations
        assert self.problems == []
        assert self.blocked == [], f"the page tried to leave loopback: {self.blocked}"

    async def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        await self.page.screenshot(path=path, full_page=True)
        return path


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """One Chromium per test, every request not to loopback aborted and recorded."""
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = await chromium.new_context(viewport={"width": 1440, "height": 900})
        await context.add_init_script(CSP_PROBE)
        page = await context.new_page()
        seen = Browser(page)

        async def guard(route: Route) -> None:
            if urlsplit(route.request.url).hostname in LOOPBACK:
                await route.continue_()
            else:
                seen.blocked.append(route.request.url)
                await route.abort("internetdisconnected")

        def console(message: ConsoleMessage) -> None:
            if "Content Security Policy" in message.text:
                seen.problems.append(message.text)

        def request(req: Request) -> None:
            if urlsplit(req.url).path == "/v1/events/stream":
                seen.streams.append(req.headers)

        await context.route("**/*", guard)
        page.on("pageerror", lambda exc: seen.problems.append(f"page error: {exc}"))
        page.on("console", console)
        page.on("request", request)
        try:
            yield seen
        finally:
            await chromium.close()


def accept_dialogs(page: Page) -> None:
    """Confirm every `confirm()` (Destroy asks first)."""

    async def accept(dialog: Dialog) -> None:
        await dialog.accept()

    page.on("dialog", accept)


def row(page: Page, sandbox_id: str) -> Locator:
    return page.locator(f'#sandboxes tr[data-id="{sandbox_id}"]')


def state_of(page: Page, sandbox_id: str) -> Locator:
    return row(page, sandbox_id).locator('[data-col="state"]')


async def open_dashboard(browser: Browser, url: str) -> Page:
    page = browser.page
    response = await page.goto(f"{url}/")
    assert response is not None and response.status == 200
    assert response.headers["content-security-policy"] == CSP
    await expect(page.locator("#live")).to_have_attribute("data-status", "live")
    await expect(page.locator("#sandboxes")).to_be_visible()
    return page


async def test_a_sandbox_appears_goes_ready_and_is_destroyed_from_the_page(
    api: RunningService, browser: Browser
) -> None:
    page = await open_dashboard(browser, api.url)
    await page.evaluate("window.__sameDocument = true")

    created = await create(api.http, api.url)  # through the API, not the page
    sandbox_id = created["id"]
    line, state = row(page, sandbox_id), state_of(page, sandbox_id)
    await expect(line).to_be_visible()
    await expect(state).to_have_text("ready")
    await expect(line).to_contain_text("profile.saas-stub")
    await expect(line).to_contain_text("saas-stub")

    accept_dialogs(page)
    await line.get_by_role("button", name="Destroy").click()
    await expect(state).to_have_text("destroyed")
    await expect(line.get_by_role("button", name="Destroy")).to_be_disabled()
    assert await page.evaluate("window.__sameDocument") is True, "no reload happened"

    final = await get(api.http, api.url, sandbox_id)
    assert final["state"] == "destroyed"
    assert "DestroyRequested" in await event_types(api.http, api.url, sandbox_id)
    await browser.screenshot("dashboard-lifecycle.png")
    await browser.check_clean()


async def test_sandbox_page_timeline_checkpoint_restore_and_ledger(
    api: RunningService, browser: Browser
) -> None:
    created = await create(api.http, api.url)
    sandbox_id = created["id"]
    await wait_state(api.http, api.url, sandbox_id, {"ready"})
    page = await open_dashboard(browser, api.url)

    await page.get_by_role("link", name=sandbox_id).click()
    assert page.url.endswith(f"#/sandboxes/{sandbox_id}")
    head = page.locator("section.head")
    await expect(head.locator('[data-col="state"]')).to_have_text("ready")
    # each service with its state, as BecameReady reported it
    instance = page.locator('section.services tr[data-service="instance"]')
    await expect(instance.locator('[data-col="state"]')).to_have_text("running")
    await expect(instance.locator('[data-col="state"]')).to_have_class(re.compile("pill-ok"))
    timeline = page.locator("section", has=page.get_by_role("heading", name="Events"))
    await expect(timeline.locator("tbody tr")).to_have_count(5)  # requested .. BecameReady
    await expect(timeline).to_contain_text("BecameReady")
    ledger = page.locator("section", has=page.get_by_role("heading", name="Ledger"))
    await expect(ledger).to_contain_text("CreditsReserved")

    await head.get_by_role("button", name="Checkpoint").click()
    checkpoints = page.locator("section", has=page.get_by_role("heading", name="Checkpoints"))
    await expect(checkpoints.locator("tbody tr td:nth-child(2)")).to_have_text("created")
    await expect(timeline).to_contain_text("CheckpointCreated")  # live, from the stream
    await checkpoints.get_by_role("button", name="Restore").click()
    await expect(timeline).to_contain_text("Restored")
    await expect(head.locator('[data-col="state"]')).to_have_text("ready")

    await head.get_by_role("button", name="Pause").click()
    await expect(head.locator('[data-col="state"]')).to_have_text("paused")
    await head.get_by_role("button", name="Resume").click()
    await expect(timeline).to_contain_text("Resumed")
    await expect(head.locator('[data-col="state"]')).to_have_text("ready")

    accept_dialogs(page)
    await head.get_by_role("button", name="Destroy").click()
    await expect(head.locator('[data-col="state"]')).to_have_text("destroyed")
    await expect(ledger).to_contain_text("CreditsDebited")
    await expect(ledger).to_contain_text("CreditsReleased")
    await browser.screenshot("dashboard-sandbox.png")
    await browser.check_clean()


async def test_the_stream_resumes_from_last_event_id(api: RunningService, browser: Browser) -> None:
    page = await open_dashboard(browser, api.url)
    first = await create(api.http, api.url)
    await expect(state_of(page, first["id"])).to_have_text("ready")
    ready = await get(api.http, api.url, first["id"])

    # The server ends every open stream (as a restart would); the page reconnects.
    assert api.service.api.end_streams() >= 1
    second = await create(api.http, api.url)
    await expect(state_of(page, second["id"])).to_have_text("ready")

    assert len(browser.streams) >= 2, browser.streams
    resumed = int(browser.streams[-1]["last-event-id"])
    assert resumed >= ready["last_seq"], "the reconnect names the last event it saw"
    await browser.check_clean()


async def test_the_page_needs_nothing_but_the_server(api: RunningService, browser: Browser) -> None:
    """Every request not to the server is aborted and recorded: none may be attempted,
    and the page still renders with its own CSS and scripts."""
    requested: list[str] = []
    browser.page.on("request", lambda req: requested.append(req.url))
    created = await create(api.http, api.url)
    await wait_state(api.http, api.url, created["id"], {"ready"})
    page = await open_dashboard(browser, api.url)
    await expect(state_of(page, created["id"])).to_have_text("ready")
    display = await page.evaluate("getComputedStyle(document.querySelector('.top')).display")
    assert display == "flex", "the stylesheet loaded"
    await page.get_by_role("link", name="Accounts").click()
    await expect(page.locator('tr[data-account="default"]')).to_be_visible()
    await page.goto(f"{api.url}/#/sandboxes/{created['id']}")
    await expect(page.locator("section.head")).to_contain_text(created["id"])

    origin = api.url.rstrip("/")
    assert requested and all(url.startswith(origin) for url in requested), requested
    await browser.check_clean()


def test_every_static_file_ships_in_the_package() -> None:
    """pyproject's package-data must match each file, or a normal install lacks it."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["sandboxer"]
    for path in STATIC_DIR.iterdir():
        relative = path.relative_to(ROOT / "sandboxer").as_posix()  # as package-data names it
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), relative


def test_static_files_name_no_external_url() -> None:
    """No CDN, font or script from elsewhere: the dashboard is the package's files."""
    external = re.compile(r"(?:https?:)?//(?!www\.w3\.org/2000/svg)[a-z0-9.-]+\.[a-z]{2,}", re.I)
    files = sorted(STATIC_DIR.iterdir())
    assert {p.suffix for p in files} >= {".html", ".js", ".css"}
    for path in files:
        found = external.findall(path.read_text())
        assert not found, f"{path.name} names {found}"
        assert "<script>" not in path.read_text() and " style=" not in path.read_text()


async def test_with_tokens_the_page_asks_for_one_and_a_member_sees_no_admin_actions(
    start_service: StartService, browser: Browser
) -> None:
    svc = await start_service(SANDBOXER_TOKENS=yaml.safe_dump(TOKENS))
    http, url = svc.http, svc.url
    async with http.post(
        f"{url}/v1/sandboxes", json={"profile": "profile.saas-stub"}, headers=ADMIN
    ) as r:
        assert r.status == 202
        others = (await r.json())["id"]  # on account default: not acme's to see
    async with http.post(
        f"{url}/v1/accounts/acme/credits", json={"amount": 50}, headers=ADMIN
    ) as r:
        assert r.status == 201

    page = browser.page
    await page.goto(f"{url}/")
    login = page.locator("#login")
    await expect(login).to_be_visible()
    await page.locator("#login-token").fill("wrong-token-0123456789")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#login-error")).to_have_text("a valid bearer token is required")

    await page.locator("#login-token").fill("acme-token-0123456789")
    await page.get_by_role("button", name="Sign in").click()
    await expect(login).to_be_hidden()
    await expect(page.locator("#who")).to_have_text("acme-ci · member · acme")
    await expect(page.locator("#live")).to_have_attribute("data-status", "live")
    assert await page.evaluate("sessionStorage.getItem('sandboxer.token')") == (
        "acme-token-0123456789"
    )

    async with http.post(
        f"{url}/v1/sandboxes", json={"profile": "profile.saas-stub"}, headers=ACME
    ) as r:
        assert r.status == 202
        mine = (await r.json())["id"]
    await expect(state_of(page, mine)).to_have_text("ready")
    await expect(row(page, others)).to_have_count(0)
    assert all(h.get("authorization") == ACME["Authorization"] for h in browser.streams)

    await page.get_by_role("link", name="Accounts").click()
    await expect(page.locator('tr[data-account="acme"]')).to_be_visible()
    await expect(page.get_by_role("button", name="Grant")).to_have_count(0)
    await expect(page.get_by_role("button", name="Audit ledger")).to_have_count(0)

    await page.goto(f"{url}/#/sandboxes/{others}")
    await expect(page.locator("#error")).to_contain_text(
        "403 forbidden: this token acts for account acme only"
    )

    # An admin signs in in a fresh tab: the admin actions are there and work.
    await page.evaluate("sessionStorage.clear()")
    await page.goto(f"{url}/#/accounts")
    await page.locator("#login-token").fill("admin-token-0123456789")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#who")).to_have_text("ops · admin · default")
    await page.get_by_role("button", name="Audit ledger").click()
    await expect(page.locator(".ok")).to_contain_text("Audit ok")
    available = page.locator('tr[data-account="acme"] [data-col="available"]')
    before = int(await available.inner_text())
    await page.locator("#grant input[name=account]").fill("acme")
    await page.locator("#grant input[name=amount]").fill("7")
    await page.get_by_role("button", name="Grant").click()
    await expect(available).to_have_text(str(before + 7))
    await browser.screenshot("dashboard-accounts.png")
    await browser.check_clean()


async def record_validation(
    store: JetStreamEventStore, sandbox: dict[str, Any], passed: bool
) -> None:
    meta = EventMeta(actor="validator:test", correlation_id="dashboard-test")
    ready = f"ready-{sandbox['id']}"
    result: Event
    if passed:
        result = ValidationPassed(
            **envelope(sandbox["id"], meta), ready_event_id=ready, duration_seconds=1.5
        )
    else:
        result = ValidationFailed(
            **envelope(sandbox["id"], meta),
            ready_event_id=ready,
            duration_seconds=0.4,
            exit_code=2,
            reason="make test: exit 2",
        )
    await store.append([result], await store.version(Aggregate.of(result)))


async def test_screenshot_of_several_states(
    start_service: StartService, browser: Browser, store: JetStreamEventStore, tmp_path: Path
) -> None:
    """The README's picture (docs/dashboard.png is a copy of this test's artifact)."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    base = yaml.safe_load((ROOT / "profiles" / "profile.saas-stub.yaml").read_text())
    for name, config in [
        ("saas-slow", {"latency_ms": 600_000}),
        ("saas-broken", {"fail_hook": "wait_ready"}),
    ]:
        (profiles / f"profile.{name}.yaml").write_text(
            yaml.safe_dump({**base, "name": f"profile.{name}", "config": config})
        )
    svc = await start_service(SANDBOXER_PROFILES_PATH=str(profiles))
    http, url = svc.http, svc.url
    gone = await create(http, url, inputs={"size": "large"})
    await wait_state(http, url, gone["id"], {"ready"})
    async with http.delete(f"{url}/v1/sandboxes/{gone['id']}") as r:
        assert r.status == 202
    await wait_state(http, url, gone["id"], {"destroyed"})
    broken = await create(http, url, profile="profile.saas-broken")
    rejected = await create(http, url, account="trial")  # no credits
    await wait_state(http, url, broken["id"], {"failed"})
    await wait_state(http, url, rejected["id"], {"rejected"})
    slow = await create(http, url, profile="profile.saas-slow")
    await wait_state(http, url, slow["id"], {"provisioning"})
    ready = []
    for size in ("small", "medium"):
        made = await create(http, url, inputs={"size": size}, labels={"team": "ci", "size": size})
        ready.append(await wait_state(http, url, made["id"], {"ready"}))

    await browser.page.set_viewport_size({"width": 1280, "height": 480})
    page = await open_dashboard(browser, url)
    await expect(page.locator("#sandboxes tbody tr")).to_have_count(6)
    await expect(row(page, slow["id"])).to_contain_text("provision: creating instance")
    # Results as a validator records them: the column follows them live.
    for sandbox, passed in zip(ready, (True, False), strict=True):
        await record_validation(store, sandbox, passed)
        cell = row(page, sandbox["id"]).locator('[data-col="validation"]')
        await expect(cell).to_have_text("passed" if passed else "failed")
    path = await browser.screenshot("dashboard.png")
    assert path.stat().st_size > 10_000
    await browser.check_clean()


async def test_the_page_is_public_and_its_data_is_not(start_service: StartService) -> None:
    """The page and its assets need no token (they hold no data); the API still does,
    and /v1/whoami tells the page what the token may do."""
    svc = await start_service(SANDBOXER_TOKENS=yaml.safe_dump(TOKENS))
    http, url = svc.http, svc.url
    for path, kind in [
        ("/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/style.css", "text/css"),
    ]:
        async with http.get(f"{url}{path}") as resp:
            assert resp.status == 200, path
            assert resp.content_type == kind
            assert resp.headers["Content-Security-Policy"] == CSP
    for path in ["/ui/nothing.js", "/ui/..%2Fdashboard.py", "/ui/%2e%2e%2fapi.py"]:
        async with http.get(f"{url}{path}") as resp:
            assert resp.status == 404, path
            assert (await resp.json())["error"]["status"] == 404
    async with http.get(f"{url}/v1/whoami") as resp:
        assert resp.status == 401
    async with http.get(f"{url}/v1/whoami", headers=ACME) as resp:
        assert await resp.json() == {
            "auth": True,
            "name": "acme-ci",
            "account": "acme",
            "role": "member",
        }


async def test_whoami_without_tokens(api: RunningService) -> None:
    async with api.http.get(f"{api.url}/v1/whoami") as resp:
        identity = await resp.json()
    assert identity == {"auth": False, "name": "anonymous", "account": None, "role": "admin"}


# ---- how a sandbox is used: labels, services, endpoints, commands, logs -----------------


def has_route(method: str, path: str) -> bool:
    """Whether the service's OpenAPI document (generated from its routes) has it."""
    paths: dict[str, Any] = openapi_document(auth=False)["paths"]
    return method.lower() in paths.get(path, {})


needs_exec = pytest.mark.skipif(
    not has_route("POST", "/v1/sandboxes/{id}/exec"), reason="no exec route in the API yet"
)
needs_logs = pytest.mark.skipif(
    not has_route("GET", "/v1/sandboxes/{id}/logs"), reason="no logs route in the API yet"
)


async def open_sandbox(browser: Browser, url: str, sandbox_id: str) -> Page:
    page = await open_dashboard(browser, url)
    await page.get_by_role("link", name=sandbox_id).click()
    await expect(page.locator("section.head [data-col=state]")).to_have_text("ready")
    return page


async def test_labels_show_as_chips_in_the_list_and_on_the_page(
    api: RunningService, browser: Browser
) -> None:
    made = await create(api.http, api.url, labels={"team": "ci", "branch": "main"})
    await wait_state(api.http, api.url, made["id"], {"ready"})
    page = await open_dashboard(browser, api.url)
    chips = row(page, made["id"]).locator('[data-col="labels"] .chip')
    await expect(chips).to_have_text(["branch=main", "team=ci"])
    await page.get_by_role("link", name=made["id"]).click()
    head = page.locator("section.head")
    await expect(head.locator('[data-col="labels"] .chip')).to_have_text(["branch=main", "team=ci"])
    await browser.check_clean()


def watched_profile(folder: Path) -> Path:
    """profile.saas-watched: the saas-stub, its services looked at every 0.1 s."""
    folder.mkdir()
    base = yaml.safe_load((ROOT / "profiles" / "profile.saas-stub.yaml").read_text())
    profile = {
        **base,
        "name": "profile.saas-watched",
        "config": {"watch_interval": 0.1, "on_service_exit": "report"},
    }
    (folder / "profile.saas-watched.yaml").write_text(yaml.safe_dump(profile))
    return folder


def tell(svc: RunningService, sandbox_id: str, **told: Any) -> None:
    """What the stub's vendor says of the instance from now on (written atomically)."""
    record = svc.data_dir / "saas-stub" / f"{sandbox_id}.json"
    changed = {**json.loads(record.read_text()), "services": {"instance": told}}
    scratch = record.with_suffix(".tmp")
    scratch.write_text(json.dumps(changed))
    scratch.replace(record)


async def test_services_table_follows_exit_unhealthy_and_recovery(
    start_service: StartService, browser: Browser, tmp_path: Path
) -> None:
    svc = await start_service(SANDBOXER_PROFILES_PATH=str(watched_profile(tmp_path / "p")))
    made = await create(svc.http, svc.url, profile="profile.saas-watched")
    sid = made["id"]
    await wait_state(svc.http, svc.url, sid, {"ready"})
    page = await open_sandbox(browser, svc.url, sid)
    instance = page.locator('section.services tr[data-service="instance"]')
    state, health = instance.locator('[data-col="state"]'), instance.locator('[data-col="health"]')
    await expect(state).to_have_text("running")
    await expect(state).to_have_class(re.compile("pill-ok"))
    timeline = page.locator("section", has=page.get_by_role("heading", name="Events"))

    tell(svc, sid, state="exited", exit_code=3)  # ServiceExited, live from the stream
    await expect(timeline).to_contain_text("ServiceExited")
    await expect(state).to_have_text("exited")
    await expect(state).to_have_class(re.compile("pill-bad"))
    await expect(instance.locator('[data-col="exit"]')).to_have_text("3")

    tell(svc, sid, state="running", health="healthy")  # ServiceRecovered
    await expect(timeline).to_contain_text("ServiceRecovered")
    await expect(state).to_have_text("running")
    await expect(health).to_have_text("healthy")
    await expect(health).to_have_class(re.compile("pill-ok"))

    tell(svc, sid, state="running", health="unhealthy", output="check failed")
    await expect(timeline).to_contain_text("ServiceUnhealthy")
    await expect(health).to_have_text("unhealthy")
    await expect(health).to_have_class(re.compile("pill-bad"))
    await expect(state).to_have_class(re.compile("pill-bad"))
    await browser.check_clean()


# web publishes 8080 (an ephemeral host port); talker writes a line to stdout and one to
# stderr every 0.3 s, for the logs panel.
USED_REPO = {
    "compose.yml": (
        "services:\n"
        "  web:\n"
        f"    image: {IMAGE}\n"
        '    command: ["httpd", "-f", "-p", "8080", "-h", "/srv"]\n'
        "    stop_signal: SIGKILL\n"
        '    volumes: ["./site:/srv:ro"]\n'
        '    ports: ["8080"]\n'
        "  talker:\n"
        f"    image: {IMAGE}\n"
        "    command:\n"
        '      ["sh", "-c", "i=0; while :; do echo tick $$i; echo warn $$i >&2;'
        ' i=$$((i+1)); sleep 0.3; done"]\n'
        "    stop_signal: SIGKILL\n"
    ),
    "site/index.html": "<h1>used</h1>\n",
}


async def compose_sandbox(
    start_service: StartService, podman: Podman, tmp_path: Path
) -> tuple[RunningService, dict[str, Any]]:
    repo = write_repo(tmp_path / "repo", USED_REPO)
    svc = await start_service(
        SANDBOXER_COMPOSE_LOCAL_CMD=podman.compose_cmd,
        SANDBOXER_COMPOSE_LOCAL_ENGINE_CMD=podman.engine_cmd,
        SANDBOXER_COMPOSE_LOCAL_STOP_TIMEOUT="1",
        SANDBOXER_REPO_ROOTS=str(tmp_path),
    )
    made = await create(
        svc.http, svc.url, profile="profile.compose-local", inputs={"repo": str(repo)}
    )
    ready = await wait_state(svc.http, svc.url, made["id"], {"ready"}, timeout=180)
    return svc, ready


async def end_compose(svc: RunningService, sandbox_id: str) -> None:
    await destroy(svc.http, svc.url, sandbox_id)
    await wait_state(svc.http, svc.url, sandbox_id, {"destroyed"}, timeout=120)


@pytest.mark.timeout(300)
async def test_compose_services_and_endpoint_links(
    start_service: StartService, podman: Podman, browser: Browser, tmp_path: Path
) -> None:
    svc, ready = await compose_sandbox(start_service, podman, tmp_path)
    sid = ready["id"]
    try:
        (port,) = ready["endpoints"]
        page = await open_sandbox(browser, svc.url, sid)
        services = page.locator("section.services")
        for name in ("talker", "web"):
            state = services.locator(f'tr[data-service="{name}"] [data-col="state"]')
            await expect(state).to_have_text("running")
        endpoint = services.locator('li[data-endpoint="web:8080"]')
        href = f"http://{port['host']}:{port['host_port']}"
        await expect(endpoint).to_have_text(f"web:8080 → {href}")
        link = endpoint.get_by_role("link")
        await expect(link).to_have_attribute("href", href)
        await expect(link).to_have_attribute("target", "_blank")
        await expect(link).to_have_attribute("rel", re.compile(r"\bnoopener\b"))
        await browser.screenshot("dashboard-services.png")
        await browser.check_clean()
    finally:
        await end_compose(svc, sid)


async def test_endpoint_links_bracket_ipv6_and_udp_is_text(
    api: RunningService, browser: Browser
) -> None:
    """The link builder (usage.js) on its own, in the page's own module."""
    page = await open_dashboard(browser, api.url)
    made = await page.evaluate(
        """async () => {
          const { endpointUrl, endpointList } = await import("/ui/usage.js");
          const list = endpointList({ endpoints: [
            { service: "dns", container_port: 53, protocol: "udp", host: "::1", host_port: 5353 },
            { service: "web", container_port: 80, protocol: "tcp", host: "::1", host_port: 8080 },
            { service: "odd", container_port: 80, protocol: "tcp", host: "a/b@c", host_port: 1 },
          ] });
          return {
            v6: endpointUrl({ host: "::1", host_port: 80 }),
            v4: endpointUrl({ host: "127.0.0.2", host_port: 443 }),
            badPort: endpointUrl({ host: "127.0.0.2", host_port: 70000 }),
            items: [...list.querySelectorAll("li")].map((li) => li.textContent),
            links: [...list.querySelectorAll("a")].map((a) => a.getAttribute("href")),
          };
        }"""
    )
    assert made == {
        "v6": "http://[::1]:80",
        "v4": "http://127.0.0.2:443",
        "badPort": None,
        "items": [
            "dns:53 → [::1]:5353/udp",
            "web:80 → http://[::1]:8080",
            "odd:80 → a/b@c:1/tcp",
        ],
        "links": ["http://[::1]:8080"],
    }
    await browser.check_clean()


async def record_command(
    store: JetStreamEventStore,
    sandbox_id: str,
    command_id: str,
    *,
    argv: list[str] | None = None,
    shell: str | None = None,
    exit_code: int | None = None,
    outcome: str | None = None,
) -> None:
    """CommandStarted, or (with an outcome) CommandFinished, as the exec route records
    them, appended at the sandbox's current version."""
    meta = EventMeta(actor="token:ci", correlation_id="dashboard-test")
    event: Event
    if outcome is None:
        event = CommandStarted(
            **envelope(sandbox_id, meta),
            command_id=command_id,
            argv=argv or [],
            shell=shell,
            timeout_seconds=60.0,
        )
    else:
        event = CommandFinished(
            **envelope(sandbox_id, meta),
            command_id=command_id,
            outcome=outcome,
            exit_code=exit_code,
            duration_seconds=1.25,
            stdout_bytes=3,
            stdout_sha256="0" * 64,
            stderr_bytes=0,
            stderr_sha256="0" * 64,
        )
    await store.append([event], await store.version(Aggregate.of(event)))


async def test_recent_commands_follow_the_stream(
    api: RunningService, browser: Browser, store: JetStreamEventStore
) -> None:
    made = await create(api.http, api.url)
    sid = made["id"]
    await wait_state(api.http, api.url, sid, {"ready"})
    page = await open_sandbox(browser, api.url, sid)
    commands = page.locator("section.commands")
    await expect(commands.locator("tbody")).to_contain_text("no commands run")

    await record_command(store, sid, "cmd-1", argv=["make", "test"])
    first = commands.locator('tr[data-command="cmd-1"]')
    await expect(first.locator('[data-col="command"]')).to_have_text("make test")
    await expect(first.locator('[data-col="exit"]')).to_have_text("running…")
    await expect(first).to_contain_text("token:ci")
    await record_command(store, sid, "cmd-1", outcome="exited", exit_code=0)
    await expect(first.locator('[data-col="exit"]')).to_have_text("0")
    await expect(first.locator('[data-col="exit"]')).to_have_class(re.compile("pill-ok"))
    await expect(first).to_contain_text("1.25 s")

    script = "for i in 1 2 3; do echo step $i; done; " + "x" * 200
    await record_command(store, sid, "cmd-2", shell=script)
    await record_command(store, sid, "cmd-2", outcome="exited", exit_code=3)
    await record_command(store, sid, "cmd-3", argv=["sleep", "99"])
    await record_command(store, sid, "cmd-3", outcome="timeout")
    second = commands.locator('tr[data-command="cmd-2"]')
    await expect(second.locator('[data-col="exit"]')).to_have_text("3")
    await expect(second.locator('[data-col="exit"]')).to_have_class(re.compile("pill-bad"))
    await expect(second.locator('[data-col="command"]')).to_have_attribute("title", script)
    shown = await second.locator('[data-col="command"]').inner_text()
    assert shown.endswith("…") and len(shown) == 80 and script.startswith(shown[:-1])
    third = commands.locator('tr[data-command="cmd-3"]')
    await expect(third.locator('[data-col="exit"]')).to_have_text("timeout")
    # newest first, and the count of every command run
    await expect(commands.locator("tbody tr")).to_have_count(3)
    assert await commands.locator("tbody tr").evaluate_all(
        "rows => rows.map((r) => r.dataset.command)"
    ) == ["cmd-3", "cmd-2", "cmd-1"]
    await expect(commands.locator('[data-col="commands-run"]')).to_have_text("(3 run)")
    await browser.check_clean()


LOG_LINES = [
    {"service": "web", "stream": "stdout", "line": "GET / 200"},
    {"service": "web", "stream": "stderr", "line": "<b>not markup</b>"},
    {"service": "db", "stream": "stdout", "line": "ready to accept connections"},
]


async def test_logs_panel_reads_ndjson_with_the_token_and_says_when_there_are_none(
    api: RunningService, browser: Browser
) -> None:
    """The panel against the logs contract (the answer played by the browser, so this
    runs whatever the server has): lines as text, stderr marked, the service as a prefix
    for "all", the query and the bearer token; 409 not_capable says there are no logs."""
    made = await create(api.http, api.url)
    sid = made["id"]
    await wait_state(api.http, api.url, sid, {"ready"})
    asked: list[Request] = []
    capable = True

    async def logs(route: Route) -> None:
        asked.append(route.request)
        if capable:
            body = "".join(json.dumps(line) + "\n" for line in LOG_LINES)
            await route.fulfill(status=200, content_type="application/x-ndjson", body=body)
        else:
            error = {"status": 409, "code": "not_capable", "message": "no logs"}
            await route.fulfill(status=409, json={"error": error})

    page = browser.page
    await page.route(re.compile(rf"/v1/sandboxes/{sid}/logs\?"), logs)
    page = await open_sandbox(browser, api.url, sid)
    pre = page.locator("pre.logs")
    await expect(pre.locator(".log-line")).to_have_text(
        ["web | GET / 200", "web | <b>not markup</b>", "db | ready to accept connections"]
    )
    await expect(pre.locator(".log-stderr")).to_have_count(1)
    await expect(pre.locator("b")).to_have_count(0)  # text, never markup
    query = urlsplit(asked[0].url).query
    assert sorted(query.split("&")) == ["follow=1", "tail=200"]  # "all": no service
    assert asked[0].headers.get("accept") == "application/x-ndjson"

    await page.get_by_label("service").select_option("instance")
    await expect(pre.locator(".log-line").first).to_have_text("GET / 200")  # no prefix
    assert "service=instance" in urlsplit(asked[-1].url).query

    capable = False
    await page.get_by_label("Follow").uncheck()
    await page.get_by_label("Follow").check()
    await expect(page.locator('[data-col="log-note"]')).to_have_text(
        "this sandbox's extension has no logs"
    )
    await expect(pre).to_be_hidden()
    await expect(page.locator("#error")).to_be_hidden()
    await browser.check_clean()


async def test_logs_panel_sends_the_token(start_service: StartService, browser: Browser) -> None:
    svc = await start_service(SANDBOXER_TOKENS=yaml.safe_dump(TOKENS))
    async with svc.http.post(
        f"{svc.url}/v1/sandboxes", json={"profile": "profile.saas-stub"}, headers=ADMIN
    ) as r:
        assert r.status == 202
        sid = (await r.json())["id"]
    await wait_state_as(svc, sid)
    asked: list[Request] = []

    async def logs(route: Route) -> None:
        asked.append(route.request)
        await route.fulfill(status=200, content_type="application/x-ndjson", body="")

    page = browser.page
    await page.route(re.compile(rf"/v1/sandboxes/{sid}/logs\?"), logs)
    await page.goto(f"{svc.url}/#/sandboxes/{sid}")
    await page.locator("#login-token").fill("admin-token-0123456789")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator('[data-col="log-status"]')).to_have_text("ended")
    assert asked and asked[0].headers.get("authorization") == ADMIN["Authorization"]
    await browser.check_clean()


async def wait_state_as(svc: RunningService, sandbox_id: str) -> None:
    """Until the sandbox is ready, asked with the admin token."""
    seq = 0
    while True:
        async with svc.http.get(
            f"{svc.url}/v1/sandboxes/{sandbox_id}",
            params={"wait": "10", "after_seq": str(seq)},
            headers=ADMIN,
        ) as r:
            view = await r.json()
        if view["state"] == "ready":
            return
        assert not view["terminal"], view
        seq = view["last_seq"]


@needs_exec
async def test_an_exec_through_the_api_shows_in_recent_commands(
    api: RunningService, browser: Browser
) -> None:
    made = await create(api.http, api.url)
    sid = made["id"]
    await wait_state(api.http, api.url, sid, {"ready"})
    page = await open_sandbox(browser, api.url, sid)
    async with api.http.post(
        f"{api.url}/v1/sandboxes/{sid}/exec", json={"argv": ["echo", "hi"]}
    ) as resp:
        assert resp.status == 200, await resp.text()
        frames = [json.loads(line) for line in (await resp.text()).splitlines() if line]
    (done,) = [f for f in frames if f["type"] == "exit"]
    assert (done["outcome"], done["exit_code"]) == ("exited", 0)
    line = page.locator(f'section.commands tr[data-command="{done["command_id"]}"]')
    await expect(line.locator('[data-col="command"]')).to_have_text("echo hi")
    await expect(line.locator('[data-col="exit"]')).to_have_text("0")
    await expect(line.locator('[data-col="exit"]')).to_have_class(re.compile("pill-ok"))
    await expect(page.locator('section.commands [data-col="commands-run"]')).to_have_text("(1 run)")
    await browser.check_clean()


@needs_logs
@pytest.mark.timeout(300)
async def test_logs_panel_follows_a_compose_service(
    start_service: StartService, podman: Podman, browser: Browser, tmp_path: Path
) -> None:
    svc, ready = await compose_sandbox(start_service, podman, tmp_path)
    sid = ready["id"]
    try:
        page = await open_sandbox(browser, svc.url, sid)
        pre = page.locator("pre.logs")
        status = page.locator('[data-col="log-status"]')
        await expect(status).to_have_text("following")
        await expect(pre).to_contain_text("talker | tick")
        await page.get_by_label("service").select_option("talker")
        await expect(pre.locator(".log-stdout").first).to_contain_text("tick")
        await expect(pre.locator(".log-stderr").first).to_contain_text("warn")
        # following: lines written after the page asked keep coming
        count = await pre.locator(".log-line").count()
        await expect(pre.locator(".log-line").nth(count + 3)).to_be_attached()
        await expect(pre).not_to_contain_text("talker | ")  # one service: no prefix
        await page.get_by_label("Follow").uncheck()
        await expect(status).to_have_text("stopped")
        await browser.check_clean()
    finally:
        await end_compose(svc, sid)


async def test_logs_panel_keeps_2000_lines_and_aborts_when_unfollowed_or_left(
    api: RunningService, browser: Browser
) -> None:
    made = await create(api.http, api.url)
    sid = made["id"]
    await wait_state(api.http, api.url, sid, {"ready"})
    held: list[Route] = []

    async def logs(route: Route) -> None:
        if "service=instance" in route.request.url:
            lines = (
                {"service": "instance", "stream": "stdout", "line": f"n{i}"} for i in range(2100)
            )
            body = "".join(json.dumps(line) + "\n" for line in lines)
            await route.fulfill(status=200, content_type="application/x-ndjson", body=body)
        else:
            held.append(route)  # never answered: the page is still waiting when it aborts

    page = browser.page
    await page.route(re.compile(rf"/v1/sandboxes/{sid}/logs\?"), logs)
    page = await open_sandbox(browser, api.url, sid)
    status = page.locator('[data-col="log-status"]')
    await expect(status).to_have_text("connecting")
    async with page.expect_event("requestfailed") as unfollowed:
        await page.get_by_label("Follow").uncheck()
    assert "/logs?" in (await unfollowed.value).url
    await expect(status).to_have_text("stopped")

    await page.get_by_label("service").select_option("instance")
    pre = page.locator("pre.logs")
    await expect(pre.locator(".log-line").last).to_have_text("n2099")
    await expect(pre.locator(".log-line")).to_have_count(2000)
    await expect(pre.locator(".log-line").first).to_have_text("n100")
    at_bottom = "p => p.scrollTop + p.clientHeight >= p.scrollHeight - 4"
    assert await pre.evaluate(at_bottom), "it follows the end"

    await page.get_by_label("service").select_option("")  # "all" again: held open
    await expect(status).to_have_text("connecting")
    async with page.expect_event("requestfailed") as left:
        await page.get_by_role("link", name="← Sandboxes").click()
    assert "/logs?" in (await left.value).url
    await expect(page.locator("#sandboxes")).to_be_visible()
    await browser.check_clean()


async def test_the_pools_panel_follows_a_claim_and_the_refill(
    start_service: StartService, browser: Browser, tmp_path: Path
) -> None:
    from tests.integration.test_pools import PROFILE, pool_is, write_pool

    svc = await start_service(**write_pool(tmp_path, size=2))
    page = await open_dashboard(browser, svc.url)
    panel = page.locator("#pools")
    pool = panel.locator(f'tr[data-pool="{PROFILE}"]')
    await expect(pool.locator('[data-col="size"]')).to_have_text("2")
    await expect(pool.locator('[data-col="ready"]')).to_have_text("2")
    await expect(pool.locator('[data-col="claimed"]')).to_have_text("0")
    await pool_is(svc, ready=2)
    made = await create(svc.http, svc.url, profile=PROFILE, account="acme")
    assert made["state"] == "ready"
    await expect(pool.locator('[data-col="claimed"]')).to_have_text("1")
    await expect(pool.locator('[data-col="ready"]')).to_have_text("2")
    await expect(panel).to_be_visible()
    await browser.check_clean()
