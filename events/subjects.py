"""Subjects are a public contract: validators filter on them.

Inside the service, the recorder is called with an `Aggregate(kind, id)` or kinds;
this module alone turns those into subjects and filters."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from events.base import Event

# One subject token: NATS splits subjects at `.`, treats `*` and `>` as wildcards and
# whitespace or control characters as the end of the subject.
SUBJECT_PART_PATTERN = r"[^\s.*>\x00-\x1f\x7f]+"
_TOKEN_RE = re.compile(SUBJECT_PART_PATTERN)


class BadSubjectToken(ValueError):
    pass


def _token(value: str) -> str:
    """The last guard before NATS: an id from outside that slipped past its own check
    must not widen a filter (`*`, `>`) or split a subject (`.`, a newline)."""
    if _TOKEN_RE.fullmatch(value) is None:
        raise BadSubjectToken(f"not a subject token: {value[:80]!r}")
    return value


STREAM_NAME = "SANDBOXER"
SANDBOX_PREFIX = "sandboxer.sandbox"
LEDGER_PREFIX = "sandboxer.ledger"
VALIDATION_PREFIX = "sandboxer.validation"
DEAD_LETTER_PREFIX = "sandboxer.deadletter"
ALL_SUBJECTS = "sandboxer.>"
STREAM_SUBJECTS = [ALL_SUBJECTS]
# What a subject of each kind starts with: `subject.startswith(LEDGER_SUBJECTS)` is
# how folds tell kinds apart (cheap enough for a replay of millions of events).
SANDBOX_SUBJECTS = SANDBOX_PREFIX + "."
LEDGER_SUBJECTS = LEDGER_PREFIX + "."
VALIDATION_SUBJECTS = VALIDATION_PREFIX + "."


def sandbox_subject(sandbox_id: str, event_type: str) -> str:
    return f"{SANDBOX_PREFIX}.{_token(sandbox_id)}.{event_type}"


def ledger_subject(account: str, event_type: str) -> str:
    return f"{LEDGER_PREFIX}.{_token(account)}.{event_type}"


WEBHOOK_PREFIX = "sandboxer.webhook"
WEBHOOK_SUBJECTS = WEBHOOK_PREFIX + "."
RECONCILE_PREFIX = "sandboxer.reconcile"
_PREFIXES = {
    "reconcile": RECONCILE_PREFIX,
    "sandbox": SANDBOX_PREFIX,
    "ledger": LEDGER_PREFIX,
    "validation": VALIDATION_PREFIX,
    "webhook": WEBHOOK_PREFIX,
}


# The third token of each kind's subjects: its name and its rule. Each rule is also
# the rule of that id where it is made (ids are checked before they reach a subject),
# and none of them admits `.`, `*`, `>` or whitespace.
SUBJECT_TOKENS: dict[str, tuple[str, str]] = {
    "sandbox": ("sandbox_id", r"^[a-z0-9][a-z0-9-]{2,62}$"),
    "ledger": ("account", r"^[a-z0-9][a-z0-9_-]{0,62}$"),
    "validation": ("sandbox_id", r"^[a-z0-9][a-z0-9-]{2,62}$"),
    "webhook": ("webhook_id", r"^wh-[a-f0-9]{12}$"),
    "reconcile": ("extension", r"^[a-z][a-z0-9-]{0,62}$"),
}


@dataclass(frozen=True, slots=True)
class Aggregate:
    """One aggregate, by kind and id: what the recorder versions, reads and appends
    to. Which subjects that is stays in this module (`aggregate_filter`)."""

    kind: str
    id: str

    def __post_init__(self) -> None:
        if self.kind not in _PREFIXES:
            raise ValueError(f"unknown aggregate kind: {self.kind!r}")
        _token(self.id)

    @classmethod
    def of(cls, event: Event) -> Aggregate:
        return cls(event.KIND, event.aggregate_id)

    def __str__(self) -> str:
        return f"{self.kind} {self.id}"


def prefix_for(kind: str) -> str:
    return _PREFIXES[kind]


def aggregate_filter(aggregate: Aggregate) -> str:
    """Every event of one aggregate: the optimistic-concurrency scope of its appends."""
    return f"{_PREFIXES[aggregate.kind]}.{_token(aggregate.id)}.>"


def read_filters(
    kinds: Sequence[str] | None = None, aggregate: Aggregate | None = None
) -> list[str]:
    """The subject filters of a recorder read: one aggregate, the events of some kinds,
    or (neither) everything. Both recorders read through this, so they match alike."""
    if aggregate is not None:
        if kinds is not None:
            raise ValueError("a read names kinds or one aggregate, not both")
        return [aggregate_filter(aggregate)]
    if kinds is None:
        return [ALL_SUBJECTS]
    if isinstance(kinds, str):
        raise TypeError(f"kinds is a sequence of kinds, not one string: {kinds!r}")
    unknown = [kind for kind in kinds if kind not in _PREFIXES]
    if unknown:
        raise ValueError(f"unknown aggregate kind: {unknown[0]!r}")
    if not kinds:
        raise ValueError("no kinds to read (None reads everything)")
    return [f"{_PREFIXES[kind]}.>" for kind in dict.fromkeys(kinds)]


def subject_for(event: Event) -> str:
    return f"{_PREFIXES[event.KIND]}.{_token(event.aggregate_id)}.{event.type_name()}"


CONTROL_PREFIX = "sbxctl"  # outside the stream: commands forwarded between workers


def control_subject(worker: str) -> str:
    """Where a worker takes commands for the sandboxes it drives (request-reply)."""
    return f"{CONTROL_PREFIX}.{_token(worker)}"


def type_filter(event_type: type[Event]) -> str:
    """Every event of one type, whichever aggregate: what validators subscribe to."""
    return f"{_PREFIXES[event_type.KIND]}.*.{event_type.type_name()}"
