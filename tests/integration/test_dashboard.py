"""The dashboard in a real headless Chromium (Debian's, driven by Playwright) against the
real service: rows appear and move live from the event stream, actions go through the
API, auth is the API's, and the page never asks for anything beyond the server."""

from __future__ import annotations

import fnmatch
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

from events import Event, EventMeta, ValidationFailed, ValidationPassed, envelope
from events.subjects import Aggregate
from sandboxer.http.dashboard import CSP, STATIC_DIR
from sandboxer.store.event_store import JetStreamEventStore
from tests.conftest import RunningService, StartService
from tests.helpers import create, event_types, get, wait_state
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
    await expect(head.locator('[data-col="services"]')).to_have_text("instance running")
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
    await api.service.api._close_streams(api.runner.app)
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
        made = await create(http, url, inputs={"size": size})
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
