"""The docs say what the code does: every event type and subject is documented."""

from __future__ import annotations

from events import ALL_EVENTS, SANDBOX_EVENTS
from tests.paths import ROOT


def test_events_md_lists_every_event_type_and_subject() -> None:
    text = (ROOT / "docs" / "events.md").read_text()
    for event in ALL_EVENTS:
        assert f"| `{event.type_name()}` |" in text, f"{event.type_name()} is not documented"
    assert "sandboxer.sandbox.<sandbox_id>.<EventType>" in text
    assert "sandboxer.ledger.<account>.<EventType>" in text
    for field in (
        "event_id",
        "aggregate_id",
        "occurred_at",
        "actor",
        "correlation_id",
        "causation_id",
        "schema_version",
    ):
        assert f"| `{field}` |" in text
    assert len(SANDBOX_EVENTS) >= 10


def test_readme_gives_the_two_fresh_machine_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "scripts/demo" in readme and "scripts/test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test" in ci
