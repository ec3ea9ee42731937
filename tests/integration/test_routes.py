"""Routes as data: the app, the OpenAPI document and the access rules come from one list."""

from __future__ import annotations

import yaml

from sandboxer.http.api import PUBLIC_PATHS, ROUTES, Api, openapi_document
from sandboxer.http.routes import Access
from tests.conftest import StartService

TOKENS = [
    {"name": "ops", "token": "admin-token-0123456789", "account": "default", "role": "admin"},
    {"name": "acme-ci", "token": "acme-token-0123456789", "account": "acme"},
]
ADMIN, ACME = (f"Bearer {t['token']}" for t in TOKENS)


def test_every_route_has_its_handler_and_one_operation() -> None:
    for route in ROUTES:
        assert callable(getattr(Api, route.handler, None)), route
    ids = [r.operation_id for r in ROUTES]
    assert len(set(ids)) == len(ids)
    doc = openapi_document()
    listed = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert listed == {(r.method, r.path) for r in ROUTES}


def test_public_paths_are_the_public_routes() -> None:
    assert PUBLIC_PATHS == {"/healthz", "/openapi.json"}
    assert {r.path for r in ROUTES if r.access is Access.PUBLIC} == PUBLIC_PATHS


async def test_the_app_serves_the_listed_routes(start_service: StartService) -> None:
    svc = await start_service(SANDBOXER_TOKENS=yaml.safe_dump(TOKENS))
    served = {
        (route.method, route.resource.canonical)
        for route in svc.runner.app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    assert {(r.method, r.path) for r in ROUTES} <= served


async def test_head_follows_the_rule_of_its_get_route(start_service: StartService) -> None:
    svc = await start_service(SANDBOXER_TOKENS=yaml.safe_dump(TOKENS))
    for auth, status in ((ACME, 403), (ADMIN, 200)):
        async with svc.http.head(f"{svc.url}/v1/accounts", headers={"Authorization": auth}) as resp:
            assert resp.status == status
