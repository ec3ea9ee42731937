"""Hostile input against a real `sandboxer serve` over HTTP (issue 15).

Each case reproduces what outside testing found: ids with a trailing newline, NUL, `.`,
`*` or `>` (Python's `$` matches before a final newline, and NATS reads `.`, `*`, `>`
as structure), JSON nested 1,000 deep, an integral float where the schema says
integer, a header over the parser's limit that came back with its token, and a tokens
file that silently let a later entry win. Requests go through http.client so that paths
reach the server byte for byte, without a client normalising them.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sandboxer.http.api import MAX_HEADER_BYTES, MAX_HEADERS, MAX_JSON_DEPTH
from tests.infra import ServeProcess, free_port
from tests.paths import ROOT

ADMIN_TOKEN = "hostile-admin-token-0123456789"  # noqa: S105 - test tokens
MEMBER_TOKEN = "hostile-acme-token-0123456789"  # noqa: S105
TOKENS = [
    {"name": "ops", "token": ADMIN_TOKEN, "account": "default", "role": "admin"},
    {"name": "acme-ci", "token": MEMBER_TOKEN, "account": "acme"},
]
FAKE_SECRET = "Zq7-not-a-real-token-but-secret-9Xw"  # noqa: S105 - must never come back


class Served:
    """One real `serve` (its own embedded NATS) for the module, spoken to over HTTP."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.process = ServeProcess(
            data_dir,
            self.port,
            SANDBOXER_TOKENS=yaml.safe_dump(TOKENS),
            SANDBOXER_NATS_SYNC="default",
        )

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.proc.poll() is None, self.process.output()
            try:
                if self.call("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, self.process.output()
            time.sleep(0.05)  # polling a port, under a deadline

    def call(
        self, method: str, path: str, token: str | None = ADMIN_TOKEN, body: Any = None
    ) -> tuple[int, dict[str, Any]]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            data: bytes | None = None
            if body is not None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            raw = response.read()
            assert response.getheader("Content-Type", "").startswith("application/json"), raw
            return response.status, json.loads(raw) if raw else {}
        finally:
            connection.close()

    def raw(self, request: bytes) -> bytes:
        """Bytes in, bytes out: for requests http.client refuses to send."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=15) as sock:
            sock.sendall(request)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    def last_seq(self) -> int:
        status, body = self.call("GET", "/healthz", None)
        assert status == 200
        return int(body["last_seq"])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    api = Served(tmp_path_factory.mktemp("hostile") / "data")
    try:
        api.wait_healthy()
        yield api
    finally:
        api.process.terminate()


def assert_nothing_recorded(api: Served, before: int) -> None:
    """A grant now must be the very next event: nothing was appended in between."""
    status, account = api.call("POST", "/v1/accounts/probe/credits", body={"amount": 1})
    assert status == 201, account
    assert account["last_seq"] == before + 1, "a refused request recorded an event"


# ---- ids in paths ------------------------------------------------------------------------

# Each bad id: a valid-looking one with something after it, or the bare metacharacter.
SUFFIXES = ["%0A", "%00", ".", ".x", "*", "%3E", "%0D%0A", "%20"]
BARE = ["*", "%3E", "%00"]
BASES = {
    "id": "sbx-abcdef012345",
    "cid": "ckpt-abcdef012345",
    "account": "acme",
    "wid": "wh-abcdef012345",
}
ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/v1/sandboxes/{id}", None),
    ("DELETE", "/v1/sandboxes/{id}", None),
    ("GET", "/v1/sandboxes/{id}/events", None),
    ("POST", "/v1/sandboxes/{id}/checkpoints", None),
    ("GET", "/v1/sandboxes/{id}/checkpoints", None),
    ("POST", "/v1/sandboxes/{id}/restore", {"checkpoint": "ckpt-abcdef012345"}),
    ("GET", "/v1/checkpoints/{cid}", None),
    ("DELETE", "/v1/checkpoints/{cid}", None),
    ("GET", "/v1/accounts/{account}", None),
    ("POST", "/v1/accounts/{account}/credits", {"amount": 5}),
    ("GET", "/v1/accounts/{account}/ledger", None),
    (
        "POST",
        "/v1/accounts/{account}/webhooks",
        {"url": "http://127.0.0.1:9/h", "event_types": ["BecameReady"]},
    ),
    ("GET", "/v1/accounts/{account}/webhooks", None),
    ("DELETE", "/v1/webhooks/{wid}", None),
]


def _bad_ids(base: str) -> list[str]:
    return [base + suffix for suffix in SUFFIXES] + BARE


@pytest.mark.parametrize("role", ["admin", "member"])
@pytest.mark.parametrize(("method", "template", "body"), ROUTES, ids=lambda v: str(v))
def test_a_malformed_path_id_is_a_404(
    served: Served, role: str, method: str, template: str, body: Any
) -> None:
    """`acme%0A` reached a ledger subject (500, BadSubjectError); now every id in a path
    is matched whole and a malformed one is a 404 naming the parameter, for admins and
    members alike (members get 403 only where the route is admin-only)."""
    param = re.search(r"\{(\w+)\}", template)
    assert param is not None
    name = param.group(1)
    token = ADMIN_TOKEN if role == "admin" else MEMBER_TOKEN
    before = served.last_seq()
    for bad in _bad_ids(BASES[name]):
        path = template.replace("{" + name + "}", bad)
        status, answer = served.call(method, path, token, body)
        if role == "member" and template.endswith("/credits"):
            assert status == 403, (path, answer)
            continue
        assert status == 404, (path, status, answer)
        assert answer["error"]["code"] == "not_found", answer
        assert answer["error"]["field"] == name, answer
    assert_nothing_recorded(served, before)


@pytest.mark.parametrize(("method", "template", "body"), ROUTES, ids=lambda v: str(v))
def test_a_dot_segment_as_an_id_is_a_json_4xx(
    served: Served, method: str, template: str, body: Any
) -> None:
    """`.` and `..` as a whole segment: the server may route them elsewhere (the path is
    normalised), but the answer is a JSON 4xx, never a 500, and records nothing."""
    param = re.search(r"\{(\w+)\}", template)
    assert param is not None
    before = served.last_seq()
    for bad in (".", "%2E", "..", "%2E%2E"):
        path = template.replace(param.group(0), bad)
        status, answer = served.call(method, path, ADMIN_TOKEN, body)
        assert 400 <= status < 500, (path, status, answer)
        assert set(answer) == {"error"}, answer
    assert_nothing_recorded(served, before)


# ---- ids and names in queries ------------------------------------------------------------

QUERIES = [
    ("GET", "/v1/sandboxes", "account", "acme"),
    ("GET", "/v1/sandboxes", "state", "ready"),
    ("GET", "/v1/events", "sandbox", "sbx-abcdef012345"),
    ("GET", "/v1/events/stream", "sandbox", "sbx-abcdef012345"),
    ("GET", "/v1/events/stream", "account", "acme"),
    ("GET", "/v1/events/stream", "type", "BecameReady"),
    ("POST", "/v1/ledger/audit", "account", "acme"),
]


@pytest.mark.parametrize("role", ["admin", "member"])
@pytest.mark.parametrize(("method", "path", "name", "base"), QUERIES, ids=lambda v: str(v))
def test_a_malformed_query_filter_is_a_400(
    served: Served, role: str, method: str, path: str, name: str, base: str
) -> None:
    """`?sandbox=sbx-abcdef%0A` was a 500 and the stream's `?account=>` an empty 200
    stream: every filter is checked whole, 400 naming it (members too; they stay pinned
    to their own account when the filter is valid)."""
    token = ADMIN_TOKEN if role == "admin" else MEMBER_TOKEN
    before = served.last_seq()
    for bad in [*_bad_ids(base), "%3E", "*"]:
        status, answer = served.call(method, f"{path}?{name}={bad}", token)
        if role == "member" and path == "/v1/ledger/audit":
            assert status == 403, answer  # admin-only, before any filter
            continue
        assert status == 400, (path, name, bad, status, answer)
        assert answer["error"]["code"] == "invalid_query", answer
        assert answer["error"]["field"] == name, answer
    assert_nothing_recorded(served, before)


# ---- ids and names in bodies -------------------------------------------------------------

BODY_CASES = [
    ("/v1/sandboxes", {"profile": "profile.saas-stub", "account": "acme\n"}, "account"),
    ("/v1/sandboxes", {"profile": "profile.saas-stub\n"}, "profile"),
    ("/v1/sandboxes", {"from_checkpoint": "ckpt-abcdef012345\n"}, "from_checkpoint"),
    ("/v1/sandboxes", {"profile": "profile.saas-stub", "inputs": {"size\n": "s"}}, "inputs"),
    (
        "/v1/accounts/acme/webhooks",
        {"url": "http://example.com/h\n", "event_types": ["BecameReady"]},
        "url",
    ),
]


@pytest.mark.parametrize(("path", "body", "field"), BODY_CASES, ids=lambda v: str(v)[:40])
def test_a_body_id_with_a_trailing_newline_is_a_400(
    served: Served, path: str, body: dict[str, Any], field: str
) -> None:
    """A create for account `"acme\\n"` sat in `reserving` until its TTL: msgspec checks
    patterns with `re.search`. Every patterned body field is now matched whole."""
    before = served.last_seq()
    status, answer = served.call("POST", path, body=body)
    assert status == 400, answer
    assert answer["error"]["code"] == "invalid_body", answer
    assert answer["error"]["field"] == field, answer
    assert_nothing_recorded(served, before)


# ---- nesting -----------------------------------------------------------------------------


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 700, 1000, 20000])
@pytest.mark.parametrize(
    ("path", "template", "field"),
    [
        (
            "/v1/sandboxes",
            '{"profile": "profile.saas-stub", "inputs": {"size": %s}}',
            "inputs.size",
        ),
        ("/v1/sandboxes", '{"profile": "profile.saas-stub", "ttl_seconds": %s}', "ttl_seconds"),
        ("/v1/sandboxes", "%s", None),
        ("/v1/accounts/acme/credits", '{"amount": %s}', "amount"),
        ("/v1/accounts/acme/webhooks", '{"url": "http://x/", "event_types": %s}', "event_types"),
    ],
    ids=["inputs", "ttl", "whole-body", "grant", "webhook"],
)
def test_deep_json_is_a_400_naming_the_field(
    served: Served, depth: int, path: str, template: str, field: str | None
) -> None:
    """1,000 levels crashed create with RecursionError (500); 700 gave a 400. Any body
    nested deeper than MAX_JSON_DEPTH is now a 400 naming where."""
    body = (template % _nested(depth)).encode()
    if len(body) > 64 * 1024:
        pytest.skip("over the body limit: a 413 (tested elsewhere)")
    status, answer = served.call("POST", path, body=body)
    assert status == 400, answer
    assert answer["error"]["code"] == "invalid_body", answer
    assert answer["error"]["field"] == field, answer
    assert "nested deeper" in answer["error"]["message"]


def test_brackets_inside_strings_do_not_count_as_nesting(served: Served) -> None:
    status, answer = served.call(
        "POST", "/v1/accounts/brackets/credits", body={"amount": 1, "reason": "[{" * 100}
    )
    assert status == 201, answer


# ---- integers ----------------------------------------------------------------------------


def test_an_integral_float_is_an_integer(served: Served) -> None:
    """The schema says `integer`, and JSON Schema counts 1882.0 as one: the server
    agrees now. 1882.5 is still refused, naming the field."""
    status, answer = served.call("POST", "/v1/accounts/floats/credits", body={"amount": 1882.0})
    assert status == 201, answer
    assert answer["granted"] == 1882
    status, answer = served.call("POST", "/v1/accounts/floats/credits", body={"amount": 1882.5})
    assert status == 400 and answer["error"]["field"] == "amount", answer
    status, answer = served.call("POST", "/v1/accounts/floats/credits", body=b'{"amount": 1e300}')
    assert status == 400 and answer["error"]["field"] == "amount", answer
    status, answer = served.call(
        "POST", "/v1/sandboxes", body={"profile": "profile.saas-stub", "ttl_seconds": 1.5}
    )
    assert status == 400 and answer["error"]["field"] == "ttl_seconds", answer
    status, answer = served.call(
        "POST", "/v1/sandboxes", body={"profile": "profile.saas-stub", "ttl_seconds": 60.0}
    )
    assert status == 202, answer
    assert answer["ttl_seconds"] == 60
    status, answer = served.call("POST", "/v1/accounts/floats/credits", body={"amount": "5"})
    assert status == 400, "a string is still not an integer"


# ---- headers -----------------------------------------------------------------------------


def _answer(raw: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


@pytest.mark.parametrize(
    "request_bytes",
    [
        # the token first in a header over the limit: aiohttp quoted its first 100 bytes
        f"GET /v1/sandboxes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {FAKE_SECRET}"
        f"{'x' * (MAX_HEADER_BYTES + 10)}\r\n\r\n",
        f"GET /v1/sandboxes HTTP/1.1\r\nHost: x\r\nX-{FAKE_SECRET}{'x' * MAX_HEADER_BYTES}"
        ": 1\r\n\r\n",
        # a request line over the limit
        f"GET /v1/sandboxes/{FAKE_SECRET}{'x' * MAX_HEADER_BYTES} HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["header-value", "header-name", "request-line"],
)
def test_an_oversized_header_is_json_and_echoes_nothing(served: Served, request_bytes: str) -> None:
    raw = served.raw(request_bytes.encode())
    assert FAKE_SECRET.encode() not in raw, raw[:300]
    status, headers, body = _answer(raw)
    assert status == 431
    assert headers["Content-Type"].startswith("application/json")
    assert body["error"]["code"] == "header_too_large"
    assert body["error"]["status"] == 431
    assert FAKE_SECRET not in served.process.output(), "nor is it logged"
    assert served.call("GET", "/healthz", None)[0] == 200, "the server is still there"


def test_too_many_headers_is_json(served: Served) -> None:
    extra = "".join(f"X-H{i}: {FAKE_SECRET}\r\n" for i in range(MAX_HEADERS + 1))
    raw = served.raw(f"GET /healthz HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
    assert FAKE_SECRET.encode() not in raw
    status, _, body = _answer(raw)
    assert status == 431 and body["error"]["code"] == "header_too_large"


def test_a_malformed_header_is_json_and_echoes_nothing(served: Served) -> None:
    raw = served.raw(f"GET /healthz HTTP/1.1\r\nHost: x\r\nBearer {FAKE_SECRET}\r\n\r\n".encode())
    assert FAKE_SECRET.encode() not in raw, raw[:300]
    status, _, body = _answer(raw)
    assert status == 400 and body["error"]["code"] == "bad_request"


# ---- the tokens file ---------------------------------------------------------------------


def _serve_with(tmp_path: Path, entries: list[dict[str, str]]) -> subprocess.CompletedProcess[str]:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump(entries))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXER_")}
    environ.update(
        SANDBOXER_DATA_DIR=str(tmp_path / "data"),
        SANDBOXER_TOKENS_FILE=str(tokens),
        SANDBOXER_NATS_PORT=str(free_port()),
    )
    return subprocess.run(
        [sys.executable, "-m", "sandboxer", "serve", "--port", str(free_port())],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


ADMIN_ENTRY = {
    "name": "ops",
    "token": "same-token-0123456789abc",
    "account": "default",
    "role": "admin",
}


@pytest.mark.parametrize(
    ("entries", "named"),
    [
        (
            [ADMIN_ENTRY, {"name": "ci", "token": ADMIN_ENTRY["token"], "account": "acme"}],
            ["'ops'", "'ci'", "same token"],
        ),
        (
            [ADMIN_ENTRY, {"name": "ops", "token": "other-token-0123456789", "account": "acme"}],
            ["'ops'", "named"],
        ),
        ([{"name": "short", "token": "tooshort", "account": "acme"}], ["'short'", "16"]),
    ],
    ids=["duplicate-token", "duplicate-name", "short-token"],
)
def test_serve_refuses_a_bad_tokens_file_in_one_line(
    tmp_path: Path, entries: list[dict[str, str]], named: list[str]
) -> None:
    """A duplicate token let the later entry win silently (an admin became a member);
    a short token ended serve with a traceback. Both: one line, exit 2, no token."""
    done = _serve_with(tmp_path, entries)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    for word in named:
        assert word in lines[0], lines[0]
    for entry in entries:
        assert entry["token"] not in output


# ---- the code itself ---------------------------------------------------------------------


def test_no_id_pattern_is_matched_by_prefix() -> None:
    """`re.match` with a `$` pattern lets a trailing newline through: ids are checked
    with fullmatch (sandboxer.ids.check) everywhere."""
    offenders = []
    for folder in ("sandboxer", "events", "extensions", "projections"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"_RE\.match\(|_OK\.match\(", line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert not offenders, offenders
