"""The in-memory recorder holds to the same conformance suite as JetStream."""

from __future__ import annotations

import pytest

from sandboxer.store.memory_store import InMemoryEventStore, subject_matches
from tests.store_conformance import RecorderConformance


class TestInMemoryRecorder(RecorderConformance):
    @pytest.fixture
    def recorder(self) -> InMemoryEventStore:
        return InMemoryEventStore()


@pytest.mark.parametrize(
    ("subject", "filter_subject", "matches"),
    [
        ("sandboxer.sandbox.sbx-1.BecameReady", "sandboxer.>", True),
        ("sandboxer.sandbox.sbx-1.BecameReady", "sandboxer.sandbox.sbx-1.>", True),
        ("sandboxer.sandbox.sbx-12.BecameReady", "sandboxer.sandbox.sbx-1.>", False),
        ("sandboxer.sandbox.sbx-1.BecameReady", "sandboxer.sandbox.*.BecameReady", True),
        ("sandboxer.sandbox.sbx-1.TornDown", "sandboxer.sandbox.*.BecameReady", False),
        ("sandboxer.sandbox", "sandboxer.sandbox.>", False),
        ("sandboxer.ledger.acme.CreditsGranted", "sandboxer.ledger.acme.CreditsGranted", True),
        ("sandboxer.ledger.acme.CreditsGranted", "sandboxer.ledger.acme", False),
    ],
)
def test_subject_matching(subject: str, filter_subject: str, matches: bool) -> None:
    assert subject_matches(subject, filter_subject) is matches
