"""schemathesis hooks for fuzzing the API: keep every request's effects on this machine.

Used by tests/integration/test_fuzz_api.py and by the longer CLI run (docs/reliability.md):

    SCHEMATHESIS_HOOKS=tests.fuzz_hooks schemathesis run ...

- A webhook URL the server would accept gets its host replaced by 127.0.0.1:9 (nothing
  listens there): the server delivers to every registered webhook, and generated URLs
  name arbitrary hosts. Without this, fuzzing would make the server resolve and
  connect to them.
- exec's `timeout_seconds` is cut to 1 s and logs are not followed: a generated
  `sleep 80000` or a follow would hold the run as long as it asks to.
- A valid long-poll `wait` is cut to 0.2 s: waiting is correct behaviour, but a run
  that waits up to 60 s per request cannot be bounded.
"""

from __future__ import annotations

import re
from typing import Any

import schemathesis
from schemathesis import Case
from schemathesis.hooks import HookContext

from sandboxer.http.api import MAX_URL, MAX_WAIT_SECONDS, URL_PATTERN

LOOPBACK_SINK = "http://127.0.0.1:9"  # the discard port: connection refused at once
FUZZ_WAIT = 0.2
_URL_RE = re.compile(URL_PATTERN)
_AUTHORITY_RE = re.compile(r"^https?://[^/?#]*")


def loopback_url(url: str) -> str:
    """The same path and query on the loopback sink."""
    return LOOPBACK_SINK + _AUTHORITY_RE.sub("", url, count=1)


@schemathesis.hook
def before_call(ctx: HookContext, case: Case, **kwargs: Any) -> None:
    operation = case.operation
    if (
        operation.method.upper() == "POST"
        and operation.path == "/v1/accounts/{account}/webhooks"
        and isinstance(case.body, dict)
    ):
        url = case.body.get("url")
        if isinstance(url, str) and len(url) <= MAX_URL and _URL_RE.search(url):
            case.body["url"] = loopback_url(url)
    if operation.path == "/v1/sandboxes/{id}/exec" and isinstance(case.body, dict):
        timeout = case.body.get("timeout_seconds")
        if isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout > 1:
            case.body["timeout_seconds"] = 1  # a generated `sleep` must not hold the run
    if isinstance(case.query, dict) and operation.path == "/v1/sandboxes/{id}/logs":
        if case.query.get("follow") in ("1", "true"):
            case.query["follow"] = "0"  # following is endless by design
    if isinstance(case.query, dict):
        wait = case.query.get("wait")
        if (
            isinstance(wait, int | float)
            and not isinstance(wait, bool)
            and FUZZ_WAIT < wait <= MAX_WAIT_SECONDS
        ):
            case.query["wait"] = FUZZ_WAIT
