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

from sandboxer.errors import ApiError, InvalidInput

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


# Labels (E2B's metadata, Modal's tags): a few short key=value pairs a caller attaches
# at create and filters lists on (`?label=team=ci`).
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9._:/@+-]{0,126}[A-Za-z0-9])?)?$")
MAX_LABELS = 32
COMMAND_ID_RE = re.compile(r"^cmd-[a-f0-9]{16}$")


def _bad_label(message: str, field: str) -> ApiError:
    return ApiError(400, "invalid_request", message, field)


def check_labels(labels: object) -> dict[str, str]:
    """The labels if each key and value matches whole; else a 400 naming
    `labels.<key>` (or `labels`)."""
    if not isinstance(labels, dict):
        raise _bad_label("labels must be an object of string values", "labels")
    if len(labels) > MAX_LABELS:
        raise _bad_label(f"at most {MAX_LABELS} labels", "labels")
    checked: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or LABEL_KEY_RE.fullmatch(key) is None:
            raise _bad_label(
                f"label key {str(key)[:80]!r} must match {LABEL_KEY_RE.pattern}", "labels"
            )
        if not isinstance(value, str) or LABEL_VALUE_RE.fullmatch(value) is None:
            raise _bad_label(
                f"label {key}: value {str(value)[:80]!r} must match {LABEL_VALUE_RE.pattern}",
                f"labels.{key}",
            )
        checked[key] = value
    return checked


def new_command_id() -> str:
    return f"cmd-{secrets.token_hex(8)}"
