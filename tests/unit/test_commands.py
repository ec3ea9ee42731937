"""Commands are data: they travel between workers as JSON and come back the same."""

from __future__ import annotations

import pytest

from events import EventMeta
from sandboxer.app.commands import (
    CreateSandbox,
    DeleteCheckpoint,
    DestroySandbox,
    GrantCredits,
    RequestCheckpoint,
    RestoreCheckpoint,
    decode_command,
    encode_command,
)

META = EventMeta(actor="api:ops", correlation_id="r-1", causation_id=None)


@pytest.mark.parametrize(
    "command",
    [
        CreateSandbox(profile="profile.saas-stub", inputs={"size": "small"}, meta=META),
        DestroySandbox(sandbox_id="sbx-abc", reason="ttl", meta=META),
        RequestCheckpoint(sandbox_id="sbx-abc", meta=META),
        RestoreCheckpoint(sandbox_id="sbx-abc", checkpoint_id="ckpt-0123456789ab", meta=META),
        DeleteCheckpoint(checkpoint_id="ckpt-0123456789ab", reason="deleted", meta=META),
        GrantCredits(account="acme", amount=5, meta=META),
    ],
)
def test_a_command_survives_the_wire(command: object) -> None:
    wire = encode_command(command)  # type: ignore[arg-type]
    assert wire["command"] == type(command).__name__
    assert decode_command(wire) == command


def test_the_previous_releases_forwarding_form_is_understood() -> None:
    """Workers of two releases share a cluster while it is upgraded."""
    meta = {"actor": "api:ops", "correlation_id": "r-1", "causation_id": None}
    assert decode_command(
        {"op": "destroy", "sandbox_id": "sbx-abc", "meta": meta, "reason": "user"}
    ) == DestroySandbox(sandbox_id="sbx-abc", reason="user", meta=META)
    assert decode_command(
        {
            "op": "delete_checkpoint",
            "sandbox_id": "sbx-abc",
            "checkpoint_id": "ckpt-0123456789ab",
            "reason": "x",
            "meta": meta,
        }
    ) == DeleteCheckpoint(checkpoint_id="ckpt-0123456789ab", reason="x", meta=META)
    with pytest.raises(ValueError, match="not a command"):
        decode_command({"op": "format_disk", "meta": meta})
