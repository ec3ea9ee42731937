"""Aggregates and the subject filters the recorders read through."""

from __future__ import annotations

import pytest

from events import Aggregate, CreditsGranted, EventMeta, envelope
from events.subjects import ALL_SUBJECTS, read_filters
from tests.store_conformance import requested

META = EventMeta(actor="test", correlation_id="corr-1")


def test_an_aggregate_is_a_kind_and_a_subject_safe_id() -> None:
    event = requested("sbx-z1")
    assert Aggregate.of(event) == Aggregate("sandbox", "sbx-z1")
    assert Aggregate.of(CreditsGranted(**envelope("acct", META), amount=1)) == Aggregate(
        "ledger", "acct"
    )
    with pytest.raises(ValueError):
        Aggregate("nothing", "sbx-z1")
    for bad_id in ("sbx.z1", "sbx-*", ">", "sbx z1", ""):
        with pytest.raises(ValueError):
            Aggregate("sandbox", bad_id)


def test_read_filters() -> None:
    assert read_filters() == [ALL_SUBJECTS]
    assert read_filters(["sandbox", "ledger", "sandbox"]) == [
        "sandboxer.sandbox.>",
        "sandboxer.ledger.>",
    ]
    assert read_filters(aggregate=Aggregate("ledger", "acme")) == ["sandboxer.ledger.acme.>"]
