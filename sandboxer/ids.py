r"""Identifiers: sandbox ids end up in subjects, paths and compose project names.

Every pattern here is matched whole (`fullmatch`): with `match` or `search`, Python's
`$` also matches before a final newline, so `acme\n` would pass as an account and
reach a NATS subject. The `^...$` strings stay because the OpenAPI document publishes
them as JSON Schema patterns (ECMA regex has no `\Z`; there `$` is the end of input).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid

from sandboxer.errors import InvalidInput

SANDBOX_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{2,62}$")
ACCOUNT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
IDEMPOTENCY_KEY_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class InvalidId(InvalidInput, ValueError):
    def __init__(self, kind: str, value: str, pattern: str) -> None:
        super().__init__(f"invalid {kind} {value[:80]!r}: must match {pattern}")
        self.kind = kind


def check(kind: str, pattern: re.Pattern[str], value: str) -> str:
    """`value` if the whole of it matches `pattern`, else InvalidId naming `kind`."""
    if pattern.fullmatch(value) is None:
        raise InvalidId(kind, value, pattern.pattern)
    return value


def new_sandbox_id() -> str:
    return f"sbx-{secrets.token_hex(6)}"


def idempotent_sandbox_id(account: str, key: str) -> str:
    """The same create retried with the same Idempotency-Key names the same sandbox."""
    check("Idempotency-Key", IDEMPOTENCY_KEY_RE, key)
    return f"sbx-{hashlib.sha256(f'{account}/{key}'.encode()).hexdigest()[:12]}"


def new_correlation_id() -> str:
    return uuid.uuid4().hex


def check_sandbox_id(value: str) -> str:
    return check("sandbox id", SANDBOX_ID_RE, value)


def check_account(value: str) -> str:
    return check("account", ACCOUNT_RE, value)
