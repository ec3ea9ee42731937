"""Every 4xx path over real HTTP: the status, a JSON error, and the field it names."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import RunningService
from tests.helpers import create, wait_state


async def post_raw(api: RunningService, body: bytes | str) -> tuple[int, dict[str, Any]]:
    async with api.http.post(
        f"{api.url}/v1/sandboxes", data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ("", "invalid_body", None),
        ("{", "malformed_json", None),
        ("not json", "malformed_json", None),
        ("[]", "invalid_body", None),
        ('{"inputs": {}}', "invalid_body", "profile"),
        ('{"profile": 5}', "invalid_body", "profile"),
        ('{"profile": "profile.saas-stub", "ttl_seconds": "ten"}', "invalid_body", "ttl_seconds"),
        ('{"profile": "profile.saas-stub", "inputs": {"size": 3}}', "invalid_body", "inputs.size"),
        ('{"profile": "profile.saas-stub", "inputs": []}', "invalid_body", "inputs"),
        ('{"profile": "profile.saas-stub", "colour": "red"}', "invalid_body", "colour"),
        ('{"profile": "profile.nope"}', "invalid_request", "profile"),
        (
            '{"profile": "profile.saas-stub", "inputs": {"size": "huge"}}',
            "invalid_request",
            "inputs.size",
        ),
        (
            '{"profile": "profile.saas-stub", "inputs": {"colour": "red"}}',
            "invalid_request",
            "inputs.colour",
        ),
        ('{"profile": "profile.saas-stub", "ttl_seconds": 0}', "invalid_body", "ttl_seconds"),
        (
            '{"profile": "profile.saas-stub", "ttl_seconds": 99999999}',
            "invalid_request",
            "ttl_seconds",
        ),
        ('{"profile": "profile.saas-stub", "account": "../etc"}', "invalid_body", "account"),
    ],
)
async def test_bad_create_bodies(
    api: RunningService, body: str, code: str, field: str | None
) -> None:
    status, data = await post_raw(api, body)
    assert status == 400, data
    error = data["error"]
    assert error["status"] == 400 and error["code"] == code and error["message"]
    assert error["field"] == field
    async with api.http.get(f"{api.url}/v1/sandboxes") as resp:
        assert (await resp.json())["count"] == 0, "a rejected request records nothing"


async def test_body_too_large(api: RunningService) -> None:
    status, data = await post_raw(api, '{"profile": "' + "x" * 70_000 + '"}')
    assert status == 413 and data["error"]["code"] == "body_too_large"


async def test_unknown_ids_and_routes(api: RunningService) -> None:
    for method, path in [
        ("GET", "/v1/sandboxes/sbx-000000000000"),
        ("DELETE", "/v1/sandboxes/sbx-000000000000"),
        ("GET", "/v1/sandboxes/sbx-000000000000/events"),
        ("GET", "/v1/sandboxes/..%2F..%2Fetc"),
        ("GET", "/v1/nothing-here"),
    ]:
        async with api.http.request(method, f"{api.url}{path}") as resp:
            assert resp.status == 404, (method, path)
            assert (await resp.json())["error"]["status"] == 404


async def test_wrong_method(api: RunningService) -> None:
    async with api.http.put(f"{api.url}/v1/sandboxes") as resp:
        assert resp.status == 405
        assert (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_bad_query_parameters(api: RunningService) -> None:
    made = await create(api.http, api.url)
    for path, field in [
        (f"/v1/sandboxes/{made['id']}?wait=abc", "wait"),
        (f"/v1/sandboxes/{made['id']}?wait=9999", "wait"),
        (f"/v1/sandboxes/{made['id']}?after_seq=-1", "after_seq"),
        ("/v1/sandboxes?state=sleeping", "state"),
        ("/v1/events?limit=x", "limit"),
        ("/v1/events?sandbox=a.b", "sandbox"),
    ]:
        async with api.http.get(f"{api.url}{path}") as resp:
            data = await resp.json()
            assert resp.status == 400, path
            assert data["error"]["field"] == field, path
    async with api.http.post(
        f"{api.url}/v1/sandboxes",
        json={"profile": "profile.saas-stub"},
        headers={"X-Request-Id": "bad id with spaces"},
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["field"] == "X-Request-Id"


async def test_conflict_on_terminal_sandbox(api: RunningService) -> None:
    made = await create(api.http, api.url)
    await wait_state(api.http, api.url, made["id"], {"ready"})
    async with api.http.delete(f"{api.url}/v1/sandboxes/{made['id']}") as resp:
        assert resp.status == 202
    await wait_state(api.http, api.url, made["id"], {"destroyed"})
    async with api.http.delete(f"{api.url}/v1/sandboxes/{made['id']}") as resp:
        assert resp.status == 409
        assert (await resp.json())["error"]["field"] == "state"
