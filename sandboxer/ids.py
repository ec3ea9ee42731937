"""Identifiers: sandbox ids end up in subjects, paths and compose project names."""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid

SANDBOX_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{2,62}$")
ACCOUNT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
IDEMPOTENCY_KEY_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class InvalidId(ValueError):
    def __init__(self, kind: str, value: str, pattern: str) -> None:
        super().__init__(f"invalid {kind} {value[:80]!r}: must match {pattern}")
        self.kind = kind


def new_sandbox_id() -> str:
    return f"sbx-{secrets.token_hex(6)}"


def idempotent_sandbox_id(account: str, key: str) -> str:
    """The same create retried with the same Idempotency-Key names the same sandbox."""
    if not IDEMPOTENCY_KEY_RE.match(key):
        raise InvalidId("Idempotency-Key", key, IDEMPOTENCY_KEY_RE.pattern)
    return f"sbx-{hashlib.sha256(f'{account}/{key}'.encode()).hexdigest()[:12]}"


def new_correlation_id() -> str:
    return uuid.uuid4().hex


def check_sandbox_id(value: str) -> str:
    if not SANDBOX_ID_RE.match(value):
        raise InvalidId("sandbox id", value, SANDBOX_ID_RE.pattern)
    return value


def check_account(value: str) -> str:
    if not ACCOUNT_RE.match(value):
        raise InvalidId("account", value, ACCOUNT_RE.pattern)
    return value
