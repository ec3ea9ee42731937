"""The CLI as a user runs it: subprocesses against a real `sandboxer serve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port


class Server:
    def __init__(self, data_dir: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environ = {k: v for k, v in os.environ.items() if k != "SANDBOXER_NATS_URL"}
        environ.update(SANDBOXER_DATA_DIR=str(data_dir), **env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sandboxer", "serve", "--port", str(self.port)],
            env=environ,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1):  # noqa: S310
                    return
            except OSError:
                assert time.monotonic() < deadline, "serve did not become healthy"
                time.sleep(0.05)  # polling a condition, under a deadline

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def cli(server_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandboxer", "--url", server_url, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("cli"))
    yield running
    assert running.stop() == 0, "serve stops cleanly on SIGTERM"


def test_create_wait_list_get_destroy_events(server: Server) -> None:
    made = cli(
        server.url,
        "create",
        "--profile",
        "profile.saas-stub",
        "--input",
        "size=large",
        "--wait",
        "--json",
    )
    assert made.returncode == 0, made.stderr
    sandbox = json.loads(made.stdout)
    assert sandbox["state"] == "ready" and sandbox["inputs"] == {"size": "large"}
    assert "ready" in made.stderr, "progress is shown on stderr"
    sid = sandbox["id"]

    listed = cli(server.url, "list", "--json")
    assert sid in [s["id"] for s in json.loads(listed.stdout)]
    table = cli(server.url, "list")
    assert table.stdout.splitlines()[0].split()[:3] == ["ID", "STATE", "PROFILE"]
    assert "\x1b" not in table.stdout + made.stderr, "no escape codes when not a TTY"
    got = cli(server.url, "get", sid)
    assert "state:" in got.stdout and sid in got.stdout

    gone = cli(server.url, "destroy", sid, "--wait", "--json")
    assert gone.returncode == 0, gone.stderr
    assert json.loads(gone.stdout)["state"] == "destroyed"

    events = cli(server.url, "events", "--sandbox", sid, "--json")
    types = [json.loads(line)["event"]["type"] for line in events.stdout.splitlines()]
    assert types == [
        "SandboxRequested",
        "RouteChosen",
        "CreditsHeld",
        "Provisioned",
        "BecameReady",
        "DestroyRequested",
        "TornDown",
    ]
    again = cli(server.url, "destroy", sid)
    assert again.returncode == 3 and "already destroyed" in again.stderr


def test_replay_and_profiles(server: Server) -> None:
    replay = cli(server.url, "replay", "--json")
    assert replay.returncode == 0 and json.loads(replay.stdout)["equal"] is True
    profiles = cli(server.url, "profiles", "--json")
    assert "profile.saas-stub" in [p["name"] for p in json.loads(profiles.stdout)]
    human = cli(server.url, "profiles")
    assert "--input size=" in human.stdout


def test_errors_and_exit_codes(server: Server) -> None:
    unknown = cli(server.url, "create", "--profile", "profile.nope")
    assert unknown.returncode == 3 and "field: profile" in unknown.stderr
    bad_input = cli(server.url, "create", "--profile", "profile.saas-stub", "--input", "novalue")
    assert bad_input.returncode == 2 and "novalue" in bad_input.stderr
    usage = cli(server.url, "frobnicate")
    assert usage.returncode == 2
    down = cli(f"http://127.0.0.1:{free_port()}", "list")
    assert down.returncode == 4 and "sandboxer serve" in down.stderr


def test_failed_sandbox_exits_1(tmp_path: Path) -> None:
    failing = Server(tmp_path, SANDBOXER_SAAS_STUB_FAIL_HOOK="provision")
    try:
        made = cli(failing.url, "create", "--profile", "profile.saas-stub", "--wait", "--json")
        assert made.returncode == 1
        assert json.loads(made.stdout)["state"] == "failed"
    finally:
        assert failing.stop() == 0
