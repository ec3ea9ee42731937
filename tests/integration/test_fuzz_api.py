"""schemathesis against /openapi.json of a real `sandboxer serve` with an admin token.

The schemathesis CLI fuzzes every operation of the document (examples, the coverage
phase's boundary values, positive and negative data, stateful sequences along the
document's links and those schemathesis infers) with a bounded number of examples,
deterministically. Each answer
must be: no 5xx, a status the document lists, a body matching the document's schema
for it, the documented content type; schema-violating requests must be rejected and
requests without the token refused. (The CLI, not the pytest plugin: schemathesis
4.32's lazy pytest loader does not run on pytest 9.2.) The regression tests below pin
what the fuzzer found; see docs/reliability.md ("Fuzzing the API").
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sandboxer.http import dashboard
from sandboxer.http.api import MAX_HEADER_BYTES, PUBLIC_PATHS, openapi_document
from sandboxer.profiles import ProfileCatalog
from tests.conftest import RunningService, StartService
from tests.infra import free_port
from tests.paths import TESTS

ADMIN_TOKEN = "fuzz-admin-token-0123456789"  # noqa: S105 - a test token
TOKENS = [{"name": "fuzz", "token": ADMIN_TOKEN, "account": "default", "role": "admin"}]
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# Per operation and phase: about 35 s on 2 cores.
MAX_EXAMPLES = int(os.environ.get("SANDBOXER_FUZZ_EXAMPLES", "40"))
# The live event stream never ends: it is held to the document by
# test_event_stream_errors_follow_the_document instead.
ENDLESS = "/v1/events/stream"


class ServedApi:
    """`sandboxer serve` as a subprocess (its own embedded NATS), log in a file."""

    def __init__(self, data_dir: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir / "serve.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        environ = {k: v for k, v in os.environ.items() if k != "SANDBOXER_NATS_URL"}
        environ.update(
            SANDBOXER_DATA_DIR=str(data_dir), SANDBOXER_NATS_PORT=str(free_port()), **env
        )
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sandboxer", "serve", "--port", str(self.port)],
                env=environ,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.output()
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as resp:  # noqa: S310
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, f"serve did not answer: {self.output()}"
            time.sleep(0.05)  # polling a port, under a deadline

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServedApi]:
    api = ServedApi(
        tmp_path / "data",
        SANDBOXER_TOKENS=yaml.safe_dump(TOKENS),
        SANDBOXER_NATS_SYNC="default",  # fsync per append buys nothing in a fuzz run
        SANDBOXER_WEBHOOK_MAX_ATTEMPTS="1",  # fuzzed webhooks point at a closed port
        SANDBOXER_WEBHOOK_ALLOW_NETS="127.0.0.1/32",  # ...on loopback (tests.fuzz_hooks)
    )
    try:
        api.wait_healthy()
        yield api
    finally:
        api.stop()


def fuzz_command(url: str, examples: int, workers: int) -> list[str]:
    """The schemathesis CLI run CI makes (docs/reliability.md gives the longer one)."""
    return [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{url}/openapi.json",
        "--header",
        f"Authorization: Bearer {ADMIN_TOKEN}",
        "--checks",
        ",".join(CHECKS),
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(examples),
        "--exclude-path",
        ENDLESS,
        "--workers",
        str(workers),
        "--generation-deterministic",  # the same cases each run; no example database
        "--request-timeout",
        "30",
        "--no-color",
    ]


# Every response check that fits this API. Left out: positive_data_acceptance (a
# schema-valid create can still name inputs its profile does not have: a 400 by
# design), use_after_free and ensure_resource_availability (a destroyed sandbox
# stays readable, in state `destroyed`), object_level_authorization (one token).
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
    "ignored_auth",
]


@pytest.mark.timeout(300)
def test_every_operation_conforms_to_the_document(served: ServedApi, tmp_path: Path) -> None:
    environ = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": str(TESTS / "fuzz_hooks.py"),
    }
    run = subprocess.run(
        # One worker: with two threads, Python 3.11's ast.parse (Hypothesis describes
        # its filters with it) fails now and then with "AST constructor recursion depth
        # mismatch", a Runtime Error of the run that is not the server's.
        fuzz_command(served.url, MAX_EXAMPLES, 1),
        cwd=tmp_path,  # nothing of the run lands in the work tree
        env=environ,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    report = _findings(run.stdout) + run.stderr[-4000:]
    assert run.returncode == 0, f"{report}\n--- server log ---\n{served.output()}"
    counted = re.search(r"Operations:\s+(\d+) selected / (\d+) total", run.stdout)
    assert counted is not None, report
    assert int(counted[2]) - int(counted[1]) == 1, "every operation but the stream is fuzzed"
    assert "unhandled error in" not in served.output(), served.output()


def _findings(output: str) -> str:
    """The run's ERRORS/FAILURES sections and summary, without the source dumps."""
    start = min(
        (i for i in (output.find("= ERRORS ="), output.find("= FAILURES =")) if i >= 0),
        default=max(len(output) - 8000, 0),
    )
    return output[start:][:30000]


async def test_the_document_lists_every_route_and_error(start_service: StartService) -> None:
    """Each route the app serves is in the document, each error answer has the error
    schema, each protected operation lists 401, each path parameter has its format."""
    svc = await start_service(SANDBOXER_TOKENS=yaml.safe_dump(TOKENS))
    async with svc.http.get(f"{svc.url}/openapi.json") as resp:
        doc = await resp.json()
    served_routes = {
        (route.method.lower(), route.resource.canonical)
        for route in svc.runner.app.router.routes()
        if route.method != "HEAD"
        and route.resource is not None
        and route.resource.canonical not in dashboard.ROUTES  # the page, not the API
    }
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert served_routes == documented
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            if path not in PUBLIC_PATHS:
                assert "401" in op["responses"], (method, path)
            for code, answer in op["responses"].items():
                if code.startswith(("4", "5")):
                    schema_ref = answer["content"]["application/json"]["schema"]
                    assert schema_ref == {"$ref": "#/components/schemas/ErrorBody"}
            for param in op.get("parameters", []):
                if param["in"] == "path":
                    assert "pattern" in param["schema"], (path, param["name"])


def test_without_tokens_the_document_has_no_auth() -> None:
    doc = openapi_document(auth=False, profiles=ProfileCatalog.discover())
    assert "security" not in doc and "securitySchemes" not in doc["components"]
    assert all(
        "401" not in op["responses"] and "403" not in op["responses"]
        for ops in doc["paths"].values()
        for op in ops.values()
    )
    profile = doc["components"]["schemas"]["CreateBody"]["properties"]["profile"]
    assert "profile.saas-stub" in profile["enum"]


# ---- what the fuzzer found, pinned ------------------------------------------------------


async def _status(
    api: RunningService, method: str, path: str, **kwargs: Any
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with api.http.request(method, f"{api.url}{path}", **kwargs) as resp:
        body = await resp.json(content_type=None) if resp.content_length != 0 else {}
        return resp.status, body, dict(resp.headers)


async def test_invalid_utf8_in_a_json_string_is_a_400(api: RunningService) -> None:
    status, body, _ = await _status(
        api,
        "POST",
        "/v1/sandboxes",
        data=b'{"profile": "profile.saas-stub", "inputs": {"size": "\xff"}}',
    )
    assert status == 400 and body["error"]["code"] == "malformed_json", body


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ({"Size": "small"}, "inputs"),
        ({"../x": "small"}, "inputs"),
        ({"size": "small\x00"}, "inputs.size"),
        ({"size": "sm\x1ball"}, "inputs.size"),
        ({"size": "small\r"}, "inputs.size"),
        ({"size": "x" * 4097}, "inputs.size"),
        ({"size": ["small"]}, "inputs.size"),
    ],
)
async def test_input_names_and_values_are_checked(
    api: RunningService, inputs: dict[str, Any], field: str
) -> None:
    status, body, _ = await _status(
        api, "POST", "/v1/sandboxes", json={"profile": "profile.saas-stub", "inputs": inputs}
    )
    assert status == 400, body
    assert body["error"]["field"] == field
    assert len(body["error"]["message"]) < 300, "errors never echo a whole hostile value"


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "field"),
    [
        ("GET", "/v1/sandboxes?live=maybe", {}, "live"),
        ("GET", "/v1/sandboxes?account=..%2Fetc", {}, "account"),
        ("GET", f"/v1/events?after_seq={2**63}", {}, "after_seq"),
        ("GET", "/v1/events/stream?after_seq=99999999999999999999999", {}, "after_seq"),
        ("GET", "/v1/events/stream?type=Nope", {}, "type"),
        ("GET", "/v1/events/stream?sandbox=a.b", {}, "sandbox"),
        ("POST", "/v1/accounts/acme/credits", {"json": {"amount": 0}}, "amount"),
        ("POST", "/v1/accounts/acme/credits", {"json": {"amount": 10**13}}, "amount"),
        ("POST", "/v1/accounts/acme/credits", {"json": {"amount": 1, "reason": "\x07"}}, "reason"),
        (
            "POST",
            "/v1/accounts/acme/webhooks",
            {"json": {"url": "http://[", "event_types": ["TornDown"]}},
            "url",
        ),
        (
            "POST",
            "/v1/accounts/acme/webhooks",
            {"json": {"url": "http://a:99999/", "event_types": ["TornDown"]}},
            "url",
        ),
        (
            "POST",
            "/v1/accounts/acme/webhooks",
            {"json": {"url": "http://a/\x01", "event_types": ["TornDown"]}},
            "url",
        ),
        (
            "POST",
            "/v1/accounts/acme/webhooks",
            {"json": {"url": "http://a/", "event_types": []}},
            "event_types",
        ),
        (
            "POST",
            "/v1/sandboxes",
            {"json": {"profile": "profile.saas-stub", "from_checkpoint": "x"}},
            "from_checkpoint",
        ),
        ("POST", "/v1/sandboxes", {"json": {"profile": "p" * 5000}}, "profile"),
        ("DELETE", "/v1/webhooks/x", {}, "wid"),
        ("GET", "/v1/checkpoints/..%2F..", {}, "cid"),
    ],
)
async def test_bad_input_names_its_field(
    api: RunningService, method: str, path: str, kwargs: dict[str, Any], field: str
) -> None:
    status, body, _ = await _status(api, method, path, **kwargs)
    assert 400 <= status < 500, body
    assert body["error"]["field"] == field, body
    assert len(body["error"]["message"]) < 300


async def test_405_says_which_methods_are_allowed(api: RunningService) -> None:
    status, body, headers = await _status(api, "PUT", "/v1/sandboxes")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    assert set(headers["Allow"].split(",")) >= {"GET", "POST"}


async def test_oversized_headers_are_refused_before_routing(api: RunningService) -> None:
    async with api.http.get(
        f"{api.url}/healthz", headers={"X-Big": "x" * (MAX_HEADER_BYTES + 10)}
    ) as resp:
        assert resp.status == 431
        assert (await resp.json())["error"]["code"] == "header_too_large"
    async with api.http.get(f"{api.url}/healthz") as resp:
        assert resp.status == 200, "the server is still there"


async def test_event_stream_errors_follow_the_document(start_service: StartService) -> None:
    """The stream is not fuzzed (it never ends); its refusals are held to the document."""
    svc = await start_service(SANDBOXER_TOKENS=yaml.safe_dump(TOKENS))
    async with svc.http.get(f"{svc.url}/openapi.json") as resp:
        doc = await resp.json()
    documented = set(doc["paths"][ENDLESS]["get"]["responses"])
    for headers in (
        {**AUTH, "Last-Event-ID": "-1"},
        {**AUTH, "Last-Event-ID": "1" * 30},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {},
    ):
        async with svc.http.get(f"{svc.url}{ENDLESS}", headers=headers) as resp:
            assert str(resp.status) in documented, (headers, resp.status)
            assert resp.status in (400, 401)
            assert set(await resp.json()) == {"error"}
