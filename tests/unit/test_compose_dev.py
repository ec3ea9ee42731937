"""compose.dev.yml parses and offers what docs/development.md says it does."""

from __future__ import annotations

import yaml

from tests.paths import ROOT


def test_compose_dev_file_names_nats_and_an_ssh_host() -> None:
    doc = yaml.safe_load((ROOT / "compose.dev.yml").read_text())
    services = doc["services"]
    assert set(services) == {"nats", "ssh-host"}
    nats = services["nats"]
    assert nats["image"].split(":")[0] == "nats", "the official NATS image"
    assert "-js" in nats["command"], "JetStream enabled"
    assert any(p.endswith(":4222") for p in nats["ports"])
    ssh = services["ssh-host"]
    assert ssh["image"].startswith("docker:") and "dind" in ssh["image"], "a compose engine"
    script = " ".join(ssh["command"])
    assert "sshd" in script and "rsync" in script
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s["ports"]), (
        "dev services listen on loopback only"
    )
    guide = (ROOT / "docs" / "development.md").read_text()
    for name in ("compose.dev.yml", "nats", "ssh-host", "SANDBOXER_NATS_URL"):
        assert name in guide
