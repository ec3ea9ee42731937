"""Event versions and the published schema, without a server: old records decode
through their upcasters and validate against their version's definition; current
events validate against the current one; the schema refuses what it should."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any, ClassVar

import jsonschema_rs
import msgspec
import pytest

from events import (
    ALL_EVENTS,
    CreditsDebited,
    Event,
    EventMeta,
    SandboxRequested,
    WebhookRegistered,
    decode_event,
    encode_event,
    envelope,
)
from events.codec import EventCodec
from events.ledger import LedgerEvent
from events.schema import (
    CHECKPOINT_ID,
    EVENT_ID,
    EVENT_IDS,
    SchemaGap,
    event_schema,
    event_subjects,
)
from events.subjects import STREAM_NAME, SUBJECT_TOKENS
from extensions.manifest import NAME_RE
from extensions.sdk import ENV_NAME_RE
from sandboxer import ids
from sandboxer.http.api import CHECKPOINT_ID_RE, WEBHOOK_ID_RE
from sandboxer.profiles import INPUT_NAME_RE, PROFILE_NAME_RE
from sandboxer.store.event_store import STREAM_NAME as STORE_STREAM

SCHEMA = event_schema()
VALIDATOR = jsonschema_rs.Draft202012Validator(SCHEMA, validate_formats=True)
META = EventMeta(actor="api:anonymous", correlation_id="req-1")
ENVELOPE = {
    "occurred_at": "2026-11-28T10:00:00.123456Z",
    "actor": "system:manager",
    "correlation_id": "3f2a9c1d0e4b4a0b9c8d7e6f5a4b3c2d",
    "causation_id": None,
}


def errors(payload: dict[str, Any], definition: str | None = None) -> list[str]:
    if definition is None:
        return [e.message for e in VALIDATOR.iter_errors(payload)]
    one = {**SCHEMA, "oneOf": [{"$ref": f"#/$defs/{definition}"}]}
    validator = jsonschema_rs.Draft202012Validator(one, validate_formats=True)
    return [e.message for e in validator.iter_errors(payload)]


def as_json(event: Any) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(encode_event(event))
    return out


def test_webhook_registered_v1_without_start_seq_decodes_as_the_whole_history() -> None:
    v1 = {
        "type": "WebhookRegistered",
        "event_id": "0123456789abcdef0123456789abcdef",
        "aggregate_id": "wh-0123456789ab",
        **ENVELOPE,
        "schema_version": 1,
        "account": "default",
        "url": "https://ci.example/hook",
        "event_types": ["BecameReady"],
    }
    event = decode_event(json.dumps(v1).encode())
    assert isinstance(event, WebhookRegistered)
    assert (event.start_seq, event.schema_version) == (0, 2)
    assert errors(v1) == [] and errors(v1, "WebhookRegisteredV1") == []
    assert errors(v1, "WebhookRegistered"), "version 2 always has start_seq"
    # A version-1 record written after start_seq existed keeps its value.
    later = decode_event(json.dumps({**v1, "start_seq": 17}).encode())
    assert isinstance(later, WebhookRegistered) and later.start_seq == 17
    assert errors(as_json(later)) == []


def test_sandbox_requested_v1_before_routing_decodes() -> None:
    v1 = {
        "type": "SandboxRequested",
        "event_id": "0123456789abcdef0123456789abcdef",
        "aggregate_id": "sbx-0123456789ab",
        **ENVELOPE,
        "actor": "api:anonymous",
        "schema_version": 1,
        "profile": "profile.saas-stub",
        "extension": "saas-stub",
        "inputs": {"size": "small"},
        "secret_inputs": [],
        "account": "default",
        "ttl_seconds": 600,
        "config": {},
    }
    event = decode_event(json.dumps(v1).encode())
    assert isinstance(event, SandboxRequested)
    assert (event.route, event.checkpoint_policy, event.from_checkpoint) == ([], None, None)
    assert event.labels == {}
    assert event.schema_version == 4
    assert errors(v1) == []
    assert errors(as_json(event)) == []


def test_sandbox_requested_v2_decodes_without_labels() -> None:
    v2 = {
        "type": "SandboxRequested",
        "event_id": "0123456789abcdef0123456789abcdef",
        "aggregate_id": "sbx-0123456789ab",
        **ENVELOPE,
        "actor": "api:anonymous",
        "schema_version": 2,
        "profile": "profile.saas-stub",
        "extension": "saas-stub",
        "inputs": {},
        "secret_inputs": [],
        "account": "default",
        "ttl_seconds": 600,
        "config": {},
        "route": [],
        "checkpoint_policy": None,
        "from_checkpoint": None,
    }
    event = decode_event(json.dumps(v2).encode())
    assert isinstance(event, SandboxRequested) and event.labels == {}
    assert event.schema_version == 4
    assert errors(v2) == []
    assert errors({**v2, "schema_version": 3}) != []  # version 3 must write its labels
    assert errors(as_json(event)) == []


def test_credits_debited_v1_basis_gains_capped_false() -> None:
    v1 = {
        "type": "CreditsDebited",
        "event_id": "sbx-0123456789ab.debit",
        "aggregate_id": "acme",
        **ENVELOPE,
        "causation_id": "0123456789abcdef0123456789abcdef",
        "schema_version": 1,
        "sandbox_id": "sbx-0123456789ab",
        "amount": 9,
        "basis": {"size": "small", "rate": 0.05, "seconds": 161.5, "minimum_charge": 1},
    }
    event = decode_event(json.dumps(v1).encode())
    assert isinstance(event, CreditsDebited)
    assert event.basis["capped_at_reservation"] is False
    capped = {**v1, "basis": {**v1["basis"], "capped_at_reservation": True}}
    again = decode_event(json.dumps(capped).encode())
    assert isinstance(again, CreditsDebited) and again.basis["capped_at_reservation"] is True
    assert errors(v1) == [] and errors(as_json(event)) == []
    assert errors({**as_json(event), "basis": {"size": "small"}}), "v2 records the cap"


def test_the_schema_refuses_what_a_validator_should_catch() -> None:
    good = as_json(
        CreditsDebited(
            **envelope(
                "acme",
                EventMeta(actor="system:manager", correlation_id="r1", causation_id="a" * 32),
                "sbx-0123456789ab.debit",
            ),
            sandbox_id="sbx-0123456789ab",
            amount=3,
            basis={"capped_at_reservation": False},
        )
    )
    assert errors(good) == []
    bad: list[dict[str, Any]] = [
        {**good, "password": "hunter2"},  # no unknown fields
        {k: v for k, v in good.items() if k != "causation_id"},  # every field required
        {k: v for k, v in good.items() if k != "schema_version"},
        {**good, "schema_version": 7},
        {**good, "occurred_at": "yesterday"},
        {**good, "occurred_at": "2026-11-28T10:00:00+02:00"},  # UTC, with Z
        {**good, "aggregate_id": "Acme.x"},  # the subject-token rule
        {**good, "sandbox_id": "sbx-0123456789ab\n"},
        {**good, "event_id": "0123456789abcdef0123456789abcdef"},  # a debit's id is derived
        {**good, "amount": -1},
        {**good, "actor": "manager"},
    ]
    for payload in bad:
        assert errors(payload), payload
    destroy = {
        "type": "DestroyRequested",
        "event_id": "a" * 32,
        "aggregate_id": "sbx-0123456789ab",
        **ENVELOPE,
        "schema_version": 1,
        "reason": "user",
    }
    assert errors(destroy) == []
    assert errors({**destroy, "reason": "because"}), "reason is a closed vocabulary"


def test_every_definition_is_closed_and_complete() -> None:
    assert not [k for k in json.dumps(SCHEMA).split('"') if k.startswith("x-")]
    for name, definition in SCHEMA["$defs"].items():
        assert definition["additionalProperties"] is False, name
        if re.search(r"V[0-9]+$", name):  # an older version: some fields came later
            assert set(definition["required"]) <= set(definition["properties"]), name
        else:
            assert sorted(definition["required"]) == sorted(definition["properties"]), name
    refs = {ref["$ref"].rsplit("/", 1)[1] for ref in SCHEMA["oneOf"]}
    assert {t.type_name() for t in ALL_EVENTS} <= refs
    for t in ALL_EVENTS:
        props = SCHEMA["$defs"][t.type_name()]["properties"]
        assert props["schema_version"] == {"const": t.VERSION}
        assert props["occurred_at"]["format"] == "date-time"
        assert props["aggregate_id"]["pattern"] == SUBJECT_TOKENS[t.KIND][1]


def test_a_new_field_without_a_decision_is_refused() -> None:
    class CreditsFrozen(LedgerEvent, frozen=True, kw_only=True):
        VERSION: ClassVar[int] = 1
        sandbox_id: str
        why_frozen: str

    with pytest.raises(SchemaGap, match=r"CreditsFrozen\.why_frozen"):
        event_schema((*ALL_EVENTS, CreditsFrozen))


def test_the_patterns_are_the_rules_where_the_ids_are_made() -> None:
    assert SUBJECT_TOKENS["sandbox"][1] == ids.SANDBOX_ID_RE.pattern
    assert SUBJECT_TOKENS["validation"][1] == ids.SANDBOX_ID_RE.pattern
    assert SUBJECT_TOKENS["ledger"][1] == ids.ACCOUNT_RE.pattern
    assert SUBJECT_TOKENS["webhook"][1] == WEBHOOK_ID_RE.pattern
    assert SUBJECT_TOKENS["reconcile"][1] == NAME_RE.pattern
    assert CHECKPOINT_ID == CHECKPOINT_ID_RE.pattern
    assert STREAM_NAME == STORE_STREAM
    props = SCHEMA["$defs"]["SandboxRequested"]["properties"]
    assert props["profile"]["pattern"] == PROFILE_NAME_RE.pattern
    assert props["inputs"]["propertyNames"]["pattern"] == INPUT_NAME_RE.pattern
    assert props["labels"]["propertyNames"]["pattern"] == ids.LABEL_KEY_RE.pattern
    assert props["labels"]["additionalProperties"]["pattern"] == ids.LABEL_VALUE_RE.pattern
    started = SCHEMA["$defs"]["CommandStarted"]["properties"]
    assert started["command_id"]["pattern"] == ids.COMMAND_ID_RE.pattern
    assert re.fullmatch(ids.COMMAND_ID_RE, ids.new_command_id())
    assert started["env_names"]["items"]["pattern"] == ENV_NAME_RE.pattern
    # Every id format the code makes matches its type's pattern (and the generic one).
    sandbox = ids.idempotent_sandbox_id("acme", "k-1")
    made = {
        "SandboxRequested": [ids.new_correlation_id(), f"{sandbox}.requested"],
        "CreditsDebited": [f"{sandbox}.debit"],
        "CreditsGranted": ["default.starter-grant"],
        "CheckpointDeleted": ["ckpt-0123456789ab.deleted"],
        "WebhookDeliveryAttempted": [f"wh-0123456789ab.{sandbox}.release.3"],
        "WebhookDisabled": ["wh-0123456789ab.disabled"],
        "ValidationPassed": [f"{ids.new_correlation_id()}.result"],
    }
    for type_name, values in made.items():
        for value in values:
            assert re.search(EVENT_IDS[type_name], value), (type_name, value)
            assert re.search(EVENT_ID, value), value


def test_subject_map() -> None:
    subjects = event_subjects()
    assert subjects["stream"] == "SANDBOXER"
    kinds = subjects["kinds"]
    assert kinds["webhook"]["subject"] == "sandboxer.webhook.<webhook_id>.<EventType>"
    assert kinds["reconcile"]["subject"] == "sandboxer.reconcile.<extension>.<EventType>"
    assert kinds["ledger"]["subject"] == "sandboxer.ledger.<account>.<EventType>"
    assert subjects["types"]["ValidationPassed"]["subject"] == (
        "sandboxer.validation.<sandbox_id>.ValidationPassed"
    )
    assert set(subjects["types"]) == {t.type_name() for t in ALL_EVENTS}


def test_current_encodings_are_complete() -> None:
    """The encoder writes every field (defaults too): `required` can list them all."""
    event = WebhookRegistered(
        **envelope("wh-0123456789ab", META),
        account="default",
        url="https://x.example/",
        event_types=[],
    )
    raw = as_json(event)
    assert set(raw) == set(SCHEMA["$defs"]["WebhookRegistered"]["properties"])
    assert raw["start_seq"] == 0 and raw["causation_id"] is None
    assert errors(raw) == []
    assert msgspec.json.decode(encode_event(event))["schema_version"] == 2
    assert dt.datetime.fromisoformat(raw["occurred_at"]).tzinfo is not None


def test_every_type_defaults_schema_version_to_its_version() -> None:
    """`Type(**envelope(...), ...)` writes the type's current version."""
    for event_type in ALL_EVENTS:
        (field,) = [f for f in msgspec.structs.fields(event_type) if f.name == "schema_version"]
        assert field.default == event_type.VERSION, event_type.__name__


def test_a_type_whose_version_default_lags_is_refused() -> None:
    class Lagging(Event, frozen=True, kw_only=True):
        VERSION: ClassVar[int] = 3

    with pytest.raises(TypeError, match="schema_version: int = 3"):
        EventCodec([Lagging])


@pytest.mark.parametrize("type_name", ["BecameReady", "Restored"])
def test_v1_ready_and_restored_decode_with_nothing_reported(type_name: str) -> None:
    v1: dict[str, Any] = {
        "type": type_name,
        "event_id": "0123456789abcdef0123456789abcdef",
        "aggregate_id": "sbx-0123456789ab",
        **ENVELOPE,
        "schema_version": 1,
    }
    if type_name == "BecameReady":
        v1["services"] = ["web", "db"]
    else:
        v1["checkpoint_id"] = "ckpt-0123456789ab"
    event = decode_event(json.dumps(v1).encode())
    assert event.schema_version == 2
    assert event.service_states == [] and event.endpoints == []
    assert errors(v1) == [] and errors(v1, f"{type_name}V1") == []
    assert errors(v1, type_name), "version 2 always reports them"
    assert errors(as_json(event)) == []


def test_sandbox_requested_v3_decodes_as_an_ordinary_create() -> None:
    """Version 4 adds the warm pool and the use policy; a version-3 record had
    neither: an ordinary create without an idle timeout."""
    v3 = {
        "type": "SandboxRequested",
        "event_id": "0123456789abcdef0123456789abcdef",
        "aggregate_id": "sbx-0123456789ab",
        **ENVELOPE,
        "actor": "api:anonymous",
        "schema_version": 3,
        "profile": "profile.saas-stub",
        "extension": "saas-stub",
        "inputs": {},
        "secret_inputs": [],
        "account": "default",
        "ttl_seconds": 600,
        "config": {},
        "route": [],
        "checkpoint_policy": None,
        "from_checkpoint": None,
        "labels": {"team": "a"},
    }
    event = decode_event(json.dumps(v3).encode())
    assert isinstance(event, SandboxRequested)
    assert event.pool is None and event.use_policy is None and event.labels == {"team": "a"}
    assert event.schema_version == 4
    assert errors(v3) == []
    assert errors({**v3, "schema_version": 4}) != []  # version 4 writes pool and use_policy
    assert errors(as_json(event)) == []
