"""Routes as data: each API route is one `Route`, and the app, the OpenAPI paths and
the access rules are all derived from the list (sandboxer.http.api.ROUTES).

A new route is one entry there: method, path, the `Api` method that handles it, its
parameters, body and answers, the errors it may answer, and who may call it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal


class Access(StrEnum):
    """Who may call a route when tokens are configured (without them: everyone)."""

    PUBLIC = "public"  # no token at all
    ADMIN = "admin"  # an admin token
    MEMBER = "member"  # any token; the handler keeps a member to its own account
    ACCOUNT = "account"  # a member of the path's {account}
    SANDBOX = "sandbox"  # a member of the account owning the sandbox {id}
    CHECKPOINT = "checkpoint"  # ... owning the sandbox of the checkpoint {cid}
    WEBHOOK = "webhook"  # ... the webhook {wid} is registered for
    EVENTS = "events"  # ... owning the sandbox that ?sandbox= names (required)


@dataclass(frozen=True)
class Param:
    """A path, query or header parameter, with its JSON Schema."""

    name: str
    where: Literal["path", "query", "header"]
    schema: Mapping[str, Any]
    description: str
    required: bool = False

    def openapi(self) -> dict[str, Any]:
        if self.where == "query":
            return {
                "name": self.name,
                "in": "query",
                "required": self.required,
                "schema": dict(self.schema),
                "description": self.description,
            }
        return {
            "name": self.name,
            "in": self.where,
            "required": self.required,
            "description": self.description,
            "schema": dict(self.schema),
        }


def path_param(name: str, pattern: str, description: str) -> Param:
    return Param(name, "path", {"type": "string", "pattern": pattern}, description, True)


def query(name: str, schema: Mapping[str, Any], description: str) -> Param:
    return Param(name, "query", schema, description)


@dataclass(frozen=True)
class Answer:
    """A success answer: its status and body, a msgspec type (a component schema)
    or a plain schema; `links` names the operations its body leads to."""

    status: int
    description: str = "OK"
    body: type | None = None
    schema: Mapping[str, Any] | None = None  # when the body is no msgspec type
    content_type: str = "application/json"
    links: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # A stream of JSON lines (application/x-ndjson), each one of these msgspec types.
    frames: tuple[type, ...] = ()
    # A JSON array of this msgspec type (the body as the answer's whole document).
    items: type | None = None


@dataclass(frozen=True)
class Route:
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
    path: str
    handler: str  # the name of the Api method
    operation_id: str
    summary: str
    access: Access
    answers: tuple[Answer, ...]
    errors: tuple[int, ...] = ()  # the error statuses it may answer (401: see Access)
    params: tuple[Param, ...] = ()
    body: type | None = None  # the request body, a msgspec Struct
    raw_body: str | None = None  # or a body of this content type, streamed as it is

    def __post_init__(self) -> None:
        names = {p.name for p in self.params if p.where == "path"}
        wanted = {part[1:-1] for part in self.path.split("/") if part.startswith("{")}
        assert names == wanted, f"{self.method} {self.path}: path parameters {names}"


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def component_types(routes: Iterable[Route]) -> list[type]:
    """The msgspec types the routes take and answer, in first use."""
    seen: dict[type, None] = {}
    for route in routes:
        if route.body is not None:
            seen.setdefault(route.body)
        for answer in route.answers:
            if answer.body is not None:
                seen.setdefault(answer.body)
            for frame in answer.frames:
                seen.setdefault(frame)
            if answer.items is not None:
                seen.setdefault(answer.items)
    return list(seen)


def openapi_paths(
    routes: Iterable[Route],
    errors: Mapping[int, str],
    error_body: type,
    *,
    auth: bool,
) -> dict[str, Any]:
    """The OpenAPI `paths` of the routes; `errors` describes each error status, every
    one answered as `error_body`. Without `auth` there is no 401 nor 403."""

    def error(status: int) -> dict[str, Any]:
        return {
            "description": errors[status],
            "content": {"application/json": {"schema": ref(error_body.__name__)}},
        }

    paths: dict[str, Any] = {}
    for route in routes:
        responses: dict[str, Any] = {}
        for answer in route.answers:
            out: dict[str, Any] = {"description": answer.description}
            schema = ref(answer.body.__name__) if answer.body is not None else answer.schema
            if answer.frames:
                schema = {"oneOf": [ref(frame.__name__) for frame in answer.frames]}
            if answer.items is not None:
                schema = {"type": "array", "items": ref(answer.items.__name__)}
            if schema is not None:
                out["content"] = {answer.content_type: {"schema": dict(schema)}}
            if answer.links:
                out["links"] = {
                    name: {"operationId": name, **target} for name, target in answer.links.items()
                }
            responses[str(answer.status)] = out
        for status in sorted(s for s in route.errors if auth or s != 403):
            responses[str(status)] = error(status)
        operation: dict[str, Any] = {"summary": route.summary}
        if route.params:
            operation["parameters"] = [p.openapi() for p in route.params]
        if route.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(route.body.__name__)}},
            }
        elif route.raw_body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {route.raw_body: {"schema": {"type": "string", "format": "binary"}}},
            }
        operation["responses"] = responses
        operation["operationId"] = route.operation_id
        if auth:
            if route.access is Access.PUBLIC:
                operation["security"] = []
            else:
                responses["401"] = error(401)
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return paths
