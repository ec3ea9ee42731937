"""Bearer tokens: no token, a wrong token, another account's token, an admin token."""

from __future__ import annotations

import subprocess
import sys

import yaml

from tests.conftest import StartService
from tests.helpers import wait_state

TOKENS = [
    {"name": "ops", "token": "admin-token-0123456789", "account": "default", "role": "admin"},
    {"name": "acme-ci", "token": "acme-token-0123456789", "account": "acme"},
    {"name": "beta-ci", "token": "beta-token-0123456789", "account": "beta"},
]
ADMIN, ACME, BETA = (f"Bearer {t['token']}" for t in TOKENS)


async def test_auth_matrix(start_service: StartService) -> None:
    svc = await start_service(SANDBOXER_TOKENS=yaml.safe_dump(TOKENS))
    http, url = svc.http, svc.url

    async def call(method: str, path: str, auth: str | None, **kw: object) -> int:
        headers = {"Authorization": auth} if auth else {}
        async with http.request(method, f"{url}{path}", headers=headers, **kw) as resp:  # type: ignore[arg-type]
            if resp.status in (401, 403):
                body = await resp.json()
                assert body["error"]["code"] in ("unauthorized", "forbidden")
                assert "token-0123456789" not in str(body), "tokens are never echoed"
            return resp.status

    assert await call("GET", "/healthz", None) == 200
    assert await call("GET", "/openapi.json", None) == 200
    assert await call("GET", "/v1/sandboxes", None) == 401
    assert await call("GET", "/v1/sandboxes", "Bearer wrong-token-0123456789") == 401
    assert await call("GET", "/v1/sandboxes", "Basic abc") == 401

    assert await call("POST", "/v1/accounts/acme/credits", ACME, json={"amount": 100}) == 403
    assert await call("POST", "/v1/accounts/acme/credits", ADMIN, json={"amount": 100}) == 201
    assert await call("GET", "/v1/accounts/acme", ACME) == 200
    assert await call("GET", "/v1/accounts/acme", BETA) == 403
    assert await call("GET", "/v1/accounts", ACME) == 403
    assert await call("POST", "/v1/ledger/audit", ACME) == 403
    assert await call("POST", "/v1/ledger/audit", ADMIN) == 200
    assert await call("POST", "/v1/replay", BETA) == 403

    async with http.post(
        f"{url}/v1/sandboxes",
        json={"profile": "profile.saas-stub"},
        headers={"Authorization": ACME},
    ) as resp:
        made = await resp.json()
        assert resp.status == 202
    assert made["account"] == "acme", "a member's sandbox is on its own account"
    sid = made["id"]
    assert (
        await call(
            "POST", "/v1/sandboxes", ACME, json={"profile": "profile.saas-stub", "account": "beta"}
        )
        == 403
    )
    for method, path in [
        ("GET", f"/v1/sandboxes/{sid}"),
        ("GET", f"/v1/sandboxes/{sid}/events"),
        ("DELETE", f"/v1/sandboxes/{sid}"),
        ("POST", f"/v1/sandboxes/{sid}/checkpoints"),
        ("GET", f"/v1/events?sandbox={sid}"),
    ]:
        assert await call(method, path, BETA) == 403, path
        assert await call(method, path, None) == 401, path
    async with http.get(f"{url}/v1/sandboxes", headers={"Authorization": BETA}) as resp:
        assert (await resp.json())["count"] == 0, "members list their own account only"
    async with http.get(f"{url}/v1/sandboxes", headers={"Authorization": ADMIN}) as resp:
        assert (await resp.json())["count"] == 1
    await wait_state_auth(svc, sid)
    async with http.get(
        f"{url}/v1/sandboxes/{sid}/events", headers={"Authorization": ACME}
    ) as resp:
        events = (await resp.json())["events"]
    assert events[0]["event"]["actor"] == "api:acme-ci", "the actor is the token's name"
    assert await call("DELETE", f"/v1/sandboxes/{sid}", ACME) == 202


async def wait_state_auth(svc, sid: str) -> None:  # type: ignore[no-untyped-def]
    svc.http.headers["Authorization"] = ACME
    try:
        await wait_state(svc.http, svc.url, sid, {"ready"})
    finally:
        del svc.http.headers["Authorization"]


def test_serve_refuses_a_public_address_without_tokens(tmp_path: object) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sandboxer", "serve", "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"SANDBOXER_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode != 0
    assert "refusing to listen on 0.0.0.0 without tokens" in out.stderr
