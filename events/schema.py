"""The published contract: the JSON Schema of every event type and the subject map.

The schema is generated from the msgspec types and then tightened with what the types
cannot say: every field is required (the encoder writes every field), no field
beyond the type's own (`additionalProperties: false`), `occurred_at` is a date-time,
ids and digests have patterns, closed vocabularies are enums, and `schema_version`
is the type's version. Older versions a stream may still hold are published too
(`<Type>V<n>`), so a validator replaying from sequence 1 can check every record.

Every field of every type needs a decision in `FIELD_RULES` (a pattern, an enum, a
bound, or `FREE`): `event_schema()` refuses a field without one, so a new field
cannot reach the published contract unconsidered.

Decoding stays tolerant (no patterns or unknown-field checks on decode): what the
schema refuses is a publisher's mistake to be caught by a validator, and never a
recorded event the service would stop replaying.

The subject map (`event_subjects()`) is published beside the schema, not inside it:
a strict validator refuses unknown keywords.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import msgspec

from events.base import Event
from events.subjects import (
    DEAD_LETTER_PREFIX,
    STREAM_NAME,
    STREAM_SUBJECTS,
    SUBJECT_PART_PATTERN,
    SUBJECT_TOKENS,
    prefix_for,
)

# ---- the patterns (ECMA and Python alike; `^...$` anchored) ---------------------------

SANDBOX_ID = SUBJECT_TOKENS["sandbox"][1]
ACCOUNT = SUBJECT_TOKENS["ledger"][1]
WEBHOOK_ID = SUBJECT_TOKENS["webhook"][1]
EXTENSION = SUBJECT_TOKENS["reconcile"][1]
CHECKPOINT_ID = r"^ckpt-[a-f0-9]{12}$"
PROFILE = r"^profile\.[a-z0-9][a-z0-9-]{0,62}$"
INPUT_NAME = r"^[a-z][a-z0-9_]{0,62}$"
DIGEST = r"^sha256:[a-f0-9]{64}$"
STORE_KEY = r"^[^/.][^/]{0,199}$"
SWEEP_ID = r"^sweep-[a-f0-9]{12}$"
# RFC 3339 in UTC, as the encoder writes it (`format: date-time` says the rest).
UTC_TIME = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?Z$"
# `api:<token name>`, `user:<name>`, `system:<part>` (docs/events.md lists them).
ACTOR = r"^[a-z][a-z-]*:\S.*$"
# An X-Request-Id (`[A-Za-z0-9._:-]{1,64}`), a random hex id, `sweep-...`,
# `retention-<sandbox>`, `starter-grant`.
CORRELATION_ID = r"^[A-Za-z0-9._:-]{1,128}$"

_HEX32 = "[a-f0-9]{32}"
_PART = "[a-z0-9][a-z0-9_-]*"
_ANY_ID = f"{_PART}(\\.{_PART})*"
_SBX = SANDBOX_ID[1:-1]
_ACCT = ACCOUNT[1:-1]
_WH = WEBHOOK_ID[1:-1]
_CKPT = CHECKPOINT_ID[1:-1]

# Any event id ever written: a random hex id, or a deterministic one made of
# lower-case dot-separated parts (`<sandbox>.debit`, `<webhook>.<event id>.<n>`).
EVENT_ID = f"^{_ANY_ID}$"
RANDOM_EVENT_ID = f"^{_HEX32}$"
# Deterministic ids, per type (every format the code has produced):
COMMAND_ID = r"^cmd-[a-f0-9]{16}$"
EVENT_IDS: dict[str, str] = {
    "SandboxRequested": f"^({_HEX32}|{_SBX}\\.requested)$",  # an Idempotency-Key
    # `.extend-<ttl>`: the top-up of a TTL extension to that many seconds
    # `.claim-reserve`: the claimer's reservation of a warm pool member
    "CreditsReserved": f"^{_SBX}\\.(reserve|claim-reserve|extend-[1-9][0-9]*)$",
    "SandboxClaimed": f"^{_SBX}\\.claimed$",  # one claim per pool member
    "CreditsRejected": f"^{_SBX}\\.(reserve|claim-reserve)$",
    # `.pool-debit`, `.pool-release`: a claim closing the pool's charge of its member
    "CreditsDebited": f"^{_SBX}\\.(pool-)?debit$",
    "CreditsReleased": f"^{_SBX}\\.(pool-)?release$",
    "CreditsGranted": f"^({_HEX32}|{_ACCT}\\.starter-grant)$",
    "CheckpointDeleted": f"^({_HEX32}|{_CKPT}\\.deleted)$",  # .deleted: a finished one
    "WebhookDeliveryAttempted": f"^{_WH}\\.{_ANY_ID}\\.[1-9][0-9]*$",
    "WebhookDisabled": f"^{_WH}\\.disabled$",
    # A command's two events name it: the end follows its start.
    "CommandStarted": f"^{COMMAND_ID[1:-1]}\\.started$",
    "CommandFinished": f"^{COMMAND_ID[1:-1]}\\.finished$",
    # Validators publish these; the reference one derives them from the ready event.
    "ValidationStarted": EVENT_ID,
    "ValidationPassed": f"^{_ANY_ID}\\.result$",
    "ValidationFailed": f"^{_ANY_ID}\\.result$",
}

# ---- closed vocabularies ----------------------------------------------------------------

DESTROY_REASONS = [
    "user",
    "ttl",
    "service_exited",
    "idle",
    "pool_recycle",
    "pool_drain",
    "pool_evict",
]
ACTIVITY_KINDS = ["exec", "files", "logs", "keepalive", "backend"]
HEALTH = ["healthy", "unhealthy", "starting", "none"]
# Steps a StepFailed names (route failures are SandboxRejected; teardown has its own).
FAILED_STEPS = ["reserve", "provision", "wait_ready"]
# Steps a destroy can cancel (the manager's step labels of the live states).
CANCELLED_STEPS = [
    "route",
    "reserve",
    "provision",
    "wait_ready",
    "checkpoint",
    "restore",
    "pause",
    "resume",
]
REJECT_CODES = ["no_capacity", "no_route", "insufficient_credits", "rejected"]
RELEASE_REASONS = ["remainder of the reservation", "create failed", "claim failed"]
ORPHAN_WHY = ["finished", "unknown"]
ORPHAN_ACTIONS = ["report", "remove"]
# exec and files (sandboxer/ids.py and extensions/sdk.py check the same patterns)
COMMAND_OUTCOMES = ["exited", "timeout", "disconnected", "destroyed", "paused", "error"]
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
SHA256 = r"^[a-f0-9]{64}$"
LABEL_KEY = r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$"
LABEL_VALUE = r"^([A-Za-z0-9]([A-Za-z0-9._:/@+-]{0,126}[A-Za-z0-9])?)?$"
ADMISSION_RULES = ["always", "credits_cover_estimate"]

FREE: dict[str, Any] = {}  # decided: free text (or any value of the declared type)
Rule = dict[str, Any]


def _enum(values: list[str]) -> Rule:
    return {"enum": list(values)}


def _pattern(pattern: str) -> Rule:
    return {"pattern": pattern}


def _at_least(n: int) -> Rule:
    return {"minimum": n}


# (type or struct name, field) first, then ("*", field).
FIELD_RULES: dict[tuple[str, str], Rule] = {
    # envelope (event_id, aggregate_id, schema_version: per type and kind, below)
    ("*", "occurred_at"): {"format": "date-time", "pattern": UTC_TIME},
    ("*", "actor"): _pattern(ACTOR),
    ("*", "correlation_id"): _pattern(CORRELATION_ID),
    ("*", "causation_id"): _pattern(EVENT_ID),
    # ids
    ("*", "sandbox_id"): _pattern(SANDBOX_ID),
    ("*", "account"): _pattern(ACCOUNT),
    ("*", "checkpoint_id"): _pattern(CHECKPOINT_ID),
    ("*", "digest"): _pattern(DIGEST),
    ("*", "store_key"): _pattern(STORE_KEY),
    ("*", "ready_event_id"): _pattern(EVENT_ID),
    ("*", "delivered_event_id"): _pattern(EVENT_ID),
    ("*", "profile"): _pattern(PROFILE),
    ("*", "extension"): _pattern(EXTENSION),
    ("*", "sweep_id"): _pattern(SWEEP_ID),
    # vocabularies
    ("DestroyRequested", "reason"): _enum(DESTROY_REASONS),
    ("StepFailed", "step"): _enum(FAILED_STEPS),
    ("StepCancelled", "step"): _enum(CANCELLED_STEPS),
    ("StepCancelled", "reason"): _enum(["destroy requested"]),
    ("SandboxRejected", "code"): _enum(REJECT_CODES),
    ("CreditsReleased", "reason"): _enum(RELEASE_REASONS),
    ("WebhookRemoved", "reason"): _enum(["removed"]),
    ("CheckpointDeleted", "reason"): _pattern(r"^(retention: .+|deleted by .+)$"),
    ("OrphanFound", "why"): _enum(ORPHAN_WHY),
    ("OrphanFound", "action"): _enum(ORPHAN_ACTIONS),
    ("RouteCandidate", "when"): _enum(ADMISSION_RULES),
    ("*", "health"): _enum(HEALTH),
    ("PublishedPort", "protocol"): _enum(["tcp", "udp", "sctp"]),
    ("*", "container_port"): {"minimum": 1, "maximum": 65535},
    ("*", "host_port"): {"minimum": 1, "maximum": 65535},
    ("*", "service"): FREE,  # a compose service name, the project's own
    ("*", "state"): FREE,  # the engine's word for a service (running, exited, ...)
    ("*", "service_states"): FREE,  # ServiceState items
    ("*", "endpoints"): FREE,  # PublishedPort items
    ("ServiceUnhealthy", "output"): FREE,
    ("*", "kind"): _pattern(r"^[a-z][a-z0-9_]*$"),  # workspace, compose_project, instance
    # free text, decided
    ("RouteChosen", "reason"): FREE,
    ("SandboxRejected", "reason"): FREE,
    ("CreditsGranted", "reason"): FREE,
    ("ValidationFailed", "reason"): FREE,
    ("WebhookDisabled", "reason"): FREE,
    ("*", "error"): FREE,
    ("*", "detail"): FREE,
    ("*", "output_tail"): FREE,
    ("*", "host"): FREE,  # a host's configured name, or the extension's own word
    ("*", "config"): FREE,  # the extension's config overrides
    ("*", "handle"): FREE,  # string map, the extension's own keys
    ("*", "metadata"): FREE,  # string map, the extension's own keys
    ("*", "services"): FREE,
    ("*", "checks"): FREE,
    ("*", "ok"): FREE,
    ("*", "final"): FREE,
    ("*", "metered"): FREE,
    ("*", "on_ready"): FREE,
    ("*", "exit_code"): FREE,
    ("*", "available"): FREE,  # what the account had: 0 or more when recorded
    ("*", "route"): FREE,  # RouteCandidate items
    ("*", "checkpoint_policy"): FREE,
    ("SandboxRequested", "pool"): _pattern(PROFILE),
    ("*", "use_policy"): FREE,  # UsePolicy
    ("*", "idle_timeout_seconds"): _at_least(1),
    ("*", "on_idle"): _enum(["destroy", "pause"]),
    ("*", "pause_mode"): _enum(["pause", "stop"]),
    ("Paused", "mode"): _enum(["pause", "stop"]),
    ("PauseRequested", "reason"): _enum(["user", "idle"]),
    ("ResumeRequested", "reason"): _enum(["user"]),
    ("*", "expires_at"): {"format": "date-time", "pattern": UTC_TIME},
    ("*", "last_at"): {"format": "date-time", "pattern": UTC_TIME},
    ("ActivitySeen", "kinds"): {"items": {"enum": ACTIVITY_KINDS}},
    ("*", "credits_added"): _at_least(0),
    ("*", "credits_held"): _at_least(0),
    ("SandboxClaimed", "claim_id"): _pattern(RANDOM_EVENT_ID),
    ("SandboxClaimed", "idempotency_id"): _pattern(SANDBOX_ID),
    ("*", "from_checkpoint"): FREE,
    ("WebhookRegistered", "url"): {"format": "uri", "pattern": "^https?://"},
    ("*", "inputs"): {"propertyNames": {"pattern": INPUT_NAME}},
    ("*", "secret_inputs"): {"items": {"pattern": INPUT_NAME}},
    # numbers
    ("*", "amount"): _at_least(0),
    ("CreditsGranted", "amount"): _at_least(1),
    ("*", "requested"): _at_least(0),
    ("*", "ttl_seconds"): _at_least(1),
    ("*", "attempt"): _at_least(1),
    ("*", "size"): _at_least(0),
    ("*", "delivered_seq"): _at_least(1),
    ("*", "start_seq"): _at_least(0),
    ("*", "failures"): _at_least(1),
    ("*", "status"): {"minimum": 100, "maximum": 599},
    ("*", "duration_seconds"): _at_least(0),
    ("*", "keep_last"): _at_least(0),
    ("*", "keep_days_after_destroy"): _at_least(0),
    # the ledger's key of a debit's basis; the rest are the extension's
    ("CreditsDebited", "basis"): {
        "properties": {"capped_at_reservation": {"type": "boolean"}},
        "required": ["capped_at_reservation"],
    },
    ("CreditsReserved", "basis"): FREE,  # the extension's account of its estimate
    # exec and files
    ("*", "command_id"): _pattern(COMMAND_ID),
    ("CommandStarted", "argv"): FREE,  # as the caller gave it, secret values as ***
    ("CommandStarted", "shell"): FREE,
    ("CommandStarted", "workdir"): FREE,
    ("CommandStarted", "env_names"): {"items": {"pattern": ENV_NAME}},
    ("CommandStarted", "timeout_seconds"): {"exclusiveMinimum": 0},
    ("CommandFinished", "outcome"): _enum(COMMAND_OUTCOMES),
    ("*", "stdout_bytes"): _at_least(0),
    ("*", "stderr_bytes"): _at_least(0),
    ("*", "stdout_sha256"): _pattern(SHA256),
    ("*", "stderr_sha256"): _pattern(SHA256),
    ("*", "sha256"): _pattern(SHA256),
    ("*", "path"): FREE,  # inside the container, or the workspace
    ("*", "labels"): {
        "propertyNames": {"pattern": LABEL_KEY},
        "additionalProperties": {"type": "string", "pattern": LABEL_VALUE},
    },
}

ENVELOPE = ("type", "event_id", "aggregate_id", "schema_version")


class SchemaGap(ValueError):
    """A field of the catalog without a decision in FIELD_RULES."""


def _rule(owner: str, field: str, rules: dict[tuple[str, str], Rule]) -> Rule:
    for key in ((owner, field), ("*", field)):
        if key in rules:
            return rules[key]
    raise SchemaGap(
        f"{owner}.{field} has no rule in events.schema.FIELD_RULES: decide its pattern, "
        "enum or bound (or FREE) before it is published"
    )


def _apply(prop: dict[str, Any], rule: Rule) -> None:
    """Merge the rule into the property's non-null branch."""
    target = prop
    for branch in prop.get("anyOf", []):
        if branch.get("type") != "null":
            target = branch
    for key, value in rule.items():
        if key == "items":
            target.setdefault("items", {}).update(value)
        elif key == "properties":
            target.setdefault("properties", {}).update(value)
        else:
            target[key] = copy.deepcopy(value)


def _close(definition: dict[str, Any]) -> None:
    """Every property required (the encoder writes them all), no other property."""
    definition["required"] = list(definition.get("properties", {}))
    definition["additionalProperties"] = False
    for prop in definition.get("properties", {}).values():
        prop.pop("default", None)


def _event_def(
    cls: type[Event], definition: dict[str, Any], rules: dict[tuple[str, str], Rule]
) -> dict[str, Any]:
    name = cls.type_name()
    props = definition["properties"]
    token, token_pattern = SUBJECT_TOKENS[cls.KIND]
    props["event_id"] = {"type": "string", "pattern": EVENT_IDS.get(name, RANDOM_EVENT_ID)}
    props["aggregate_id"] = {
        "type": "string",
        "pattern": token_pattern,
        "description": f"the {token}; also the subject's third token",
    }
    props["schema_version"] = {"const": cls.VERSION}
    for field, prop in props.items():
        if field not in ENVELOPE:
            _apply(prop, _rule(name, field, rules))
    _close(definition)
    definition["$comment"] = f"published on {prefix_for(cls.KIND)}.<{token}>.{name}"
    return definition


def _without_required(*fields: str) -> Callable[[dict[str, Any]], None]:
    def change(definition: dict[str, Any]) -> None:
        definition["required"] = [f for f in definition["required"] if f not in fields]

    return change


def _debit_v1(definition: dict[str, Any]) -> None:
    definition["properties"]["basis"].pop("required", None)


# Older versions a stream may hold, each as the current definition changed back to
# what that version's records may look like (see events/upcasters.py).
LEGACY_VERSIONS: dict[str, list[tuple[int, Callable[[dict[str, Any]], None]]]] = {
    "SandboxRequested": [
        (
            1,
            _without_required(
                "route", "checkpoint_policy", "from_checkpoint", "labels", "pool", "use_policy"
            ),
        ),
        (2, _without_required("labels", "pool", "use_policy")),
        (3, _without_required("pool", "use_policy")),
    ],
    "WebhookRegistered": [(1, _without_required("start_seq"))],
    "CreditsDebited": [(1, _debit_v1)],
    "BecameReady": [(1, _without_required("service_states", "endpoints"))],
    "Restored": [(1, _without_required("service_states", "endpoints"))],
}


def catalog() -> tuple[type[Event], ...]:
    from events import ALL_EVENTS

    return ALL_EVENTS


def event_schema(types: tuple[type[Event], ...] | None = None) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of every event type: one of the `$defs`, by
    `type` and `schema_version`. docs/events.schema.json is this, checked in."""
    types = types or catalog()
    (refs, components) = msgspec.json.schema_components(types, ref_template="#/$defs/{name}")
    defs: dict[str, Any] = {}
    one_of: list[dict[str, str]] = list(refs)
    by_name = {t.type_name(): t for t in types}
    # A webhook delivers any type but its own kind's (POST .../webhooks says so too).
    delivered = sorted(t.type_name() for t in types if t.KIND != "webhook")
    rules = {
        **FIELD_RULES,
        ("WebhookRegistered", "event_types"): {"items": {"enum": delivered}},
    }
    for name, definition in components.items():
        cls = by_name.get(name)
        if cls is None:  # a nested struct: RouteCandidate, CheckpointPolicy, ...
            for field, prop in definition.get("properties", {}).items():
                _apply(prop, _rule(name, field, rules))
            _close(definition)
            defs[name] = definition
            continue
        defs[name] = _event_def(cls, definition, rules)
        for version, change in LEGACY_VERSIONS.get(name, []):
            old = copy.deepcopy(defs[name])
            old["title"] = f"{name} (version {version})"
            old["properties"]["schema_version"] = {"const": version}
            change(old)
            defs[f"{name}V{version}"] = old
            one_of.append({"$ref": f"#/$defs/{name}V{version}"})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "sand-boxer events",
        "description": (
            "One JSON object per message on the SANDBOXER stream. Subjects: "
            "GET /v1/events/subjects (docs/events.subjects.json)."
        ),
        "oneOf": one_of,
        "$defs": dict(sorted(defs.items())),
    }


def event_subjects(types: tuple[type[Event], ...] | None = None) -> dict[str, Any]:
    """Where each event type is published, and the rule of each subject token.
    docs/events.subjects.json is this, checked in."""
    types = types or catalog()
    kinds: dict[str, Any] = {}
    for kind, (token, pattern) in SUBJECT_TOKENS.items():
        kinds[kind] = {
            "subject": f"{prefix_for(kind)}.<{token}>.<EventType>",
            "token": token,
            "token_pattern": pattern,
            "aggregate_id": f"the {token} (equals the subject's third token)",
            "types": sorted(t.type_name() for t in types if t.KIND == kind),
        }
    return {
        "stream": STREAM_NAME,
        "subjects": list(STREAM_SUBJECTS),
        "subject": "sandboxer.<kind>.<token>.<EventType>: <EventType> equals the payload's `type`",
        "kinds": kinds,
        "deadletter": {
            "subject": f"{DEAD_LETTER_PREFIX}.<durable>",
            "token": "durable",
            "token_pattern": f"^{SUBJECT_PART_PATTERN}$",
            "payload": "the event a subscriber gave up on, unchanged (one of the schema)",
            "headers": [
                "Sandboxer-Subject",
                "Sandboxer-Seq",
                "Sandboxer-Attempts",
                "Sandboxer-Error",
            ],
        },
        "types": {
            t.type_name(): {
                "kind": t.KIND,
                "subject": f"{prefix_for(t.KIND)}.<{SUBJECT_TOKENS[t.KIND][0]}>.{t.type_name()}",
                "schema_version": t.VERSION,
                "schema": f"#/$defs/{t.type_name()}",
            }
            for t in sorted(types, key=lambda t: t.type_name())
        },
    }
