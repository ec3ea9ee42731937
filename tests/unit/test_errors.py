"""The error tree: each error carries its answer, and crosses workers as itself."""

from __future__ import annotations

import json

import pytest

from sandboxer.app.checkpointing import UnknownCheckpoint
from sandboxer.app.lifecycle import InvalidTransition
from sandboxer.app.manager import IdempotencyMismatch, NotFound
from sandboxer.app.sandbox import NotCapable
from sandboxer.app.webhooks import WebhookError
from sandboxer.errors import SandboxerError
from sandboxer.ids import InvalidId
from sandboxer.profiles import ProfileError
from sandboxer.store.leases import OwnerUnavailable

FORWARDED = [
    NotFound("sbx-0123456789ab"),
    InvalidTransition("sbx-0123456789ab", "destroyed", "CheckpointRequested"),
    NotCapable("the extension saas-stub cannot checkpoint"),
    UnknownCheckpoint("no checkpoint ckpt-0123456789ab of this sandbox"),
]


@pytest.mark.parametrize("error", FORWARDED, ids=lambda e: type(e).__name__)
def test_a_forwarded_error_comes_back_as_itself(error: SandboxerError) -> None:
    answer = json.loads(json.dumps(error.to_wire()))  # as the control channel carries it
    again = SandboxerError.decode(answer)
    assert type(again) is type(error)
    assert str(again) == str(error)
    assert (again.status, again.code, again.field) == (error.status, error.code, error.field)
    if isinstance(error, InvalidTransition):
        assert isinstance(again, InvalidTransition)
        assert (again.sandbox_id, again.state, again.event_type) == (
            error.sandbox_id,
            error.state,
            error.event_type,
        )


def test_answers_of_an_older_worker_still_decode() -> None:
    """The wire names and fields are the ones workers exchanged before the tree."""
    assert isinstance(
        SandboxerError.decode({"error": "not_found", "sandbox_id": "sbx-0123456789ab"}), NotFound
    )
    again = SandboxerError.decode(
        {"error": "invalid_transition", "state": "ready", "event": "X", "sandbox_id": "sbx-1"}
    )
    assert isinstance(again, InvalidTransition) and again.state == "ready"
    assert SandboxerError.decode({"error": "internal", "message": "boom"}) is None
    assert SandboxerError.decode({"seq": 3}) is None


def test_each_error_states_its_answer() -> None:
    cases: list[tuple[SandboxerError, int, str, str | None]] = [
        (NotFound("sbx-1"), 404, "not_found", "id"),
        (InvalidTransition("sbx-1", "ready", "X"), 409, "conflict", "state"),
        (NotCapable("no"), 409, "not_capable", "extension"),
        (UnknownCheckpoint("no"), 409, "conflict", "checkpoint"),
        (OwnerUnavailable("later"), 503, "owner_unavailable", "id"),
        (ProfileError("bad", "inputs.x"), 400, "invalid_request", "inputs.x"),
        (IdempotencyMismatch("sbx-1", "profile", "a", "b"), 422, "idempotency_mismatch", "profile"),
        (WebhookError("bad", "url"), 400, "invalid_body", "url"),
        (WebhookError("full", "account", status=409), 409, "limit_reached", "account"),
    ]
    for error, status, code, field in cases:
        assert (error.status, error.code, error.field) == (status, code, field), error


def test_value_and_lookup_errors_stay_what_they_were() -> None:
    """`except ValueError` / `except LookupError` call sites keep catching them."""
    assert isinstance(ProfileError("x"), ValueError)
    assert isinstance(WebhookError("x", "url"), ValueError)
    assert isinstance(InvalidId("sandbox id", "x", "^sbx-$"), ValueError)
    assert isinstance(NotFound("sbx-1"), LookupError)
    assert isinstance(UnknownCheckpoint("x"), LookupError)
