"""The CLI as a user runs it: subprocesses against a real `sandboxer serve`."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.infra import free_port

# How the failing server stretches each saas-stub hook: long enough that a --wait
# sees the provision step running, short enough to keep the file quick.
STEP_LATENCY_MS = 2000


class Server:
    """`python -m sandboxer serve` with its own data dir (so its own embedded NATS)."""

    def __init__(self, folder: Path, **env: str) -> None:
        self.port = free_port()
        self.unsettled: list[str] = []  # sandboxes to see terminal before stopping
        self.url = f"http://127.0.0.1:{self.port}"
        environ = {k: v for k, v in os.environ.items() if k != "SANDBOXER_NATS_URL"}
        environ.update(SANDBOXER_DATA_DIR=str(folder / "data"), **env)
        # A file, not a pipe: nobody reads a pipe while tests run, and a full one would
        # block the server's logging mid-test.
        self.log_path = folder / "serve.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sandboxer", "serve", "--port", str(self.port)],
                env=environ,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        try:
            self._wait_healthy(deadline=time.monotonic() + 60)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def _wait_healthy(self, deadline: float) -> None:
        while True:
            assert self.proc.poll() is None, f"serve exited early:\n{self.log()}"
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1):  # noqa: S310
                    return
            except OSError:
                assert time.monotonic() < deadline, f"serve did not become healthy:\n{self.log()}"
                time.sleep(0.05)  # polling a condition, under a deadline

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def sandbox(self, sid: str, after_seq: int = 0, wait: float = 0) -> dict[str, Any]:
        url = f"{self.url}/v1/sandboxes/{sid}?wait={wait}&after_seq={after_seq}"
        with urllib.request.urlopen(url, timeout=wait + 30) as resp:  # noqa: S310
            body: dict[str, Any] = json.loads(resp.read())
            return body

    def wait_terminal(self, sid: str, timeout: float = 60) -> dict[str, Any]:
        """Long-polls the API (the server wakes us on each event), under a deadline."""
        deadline = time.monotonic() + timeout
        sandbox = self.sandbox(sid)
        while not sandbox["terminal"]:
            assert time.monotonic() < deadline, f"{sid} stuck in {sandbox['state']}"
            sandbox = self.sandbox(sid, after_seq=sandbox["last_seq"], wait=10)
        return sandbox

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"serve ignored SIGTERM for 30 s:\n{self.log()}") from None


def cli(server_url: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandboxer", "--url", server_url, *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("cli"))
    yield running
    assert running.stop() == 0, f"serve stops cleanly on SIGTERM:\n{running.log()}"


@pytest.fixture(scope="module")
def failing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Every saas-stub provision fails, after a delay that makes steps observable."""
    running = Server(
        tmp_path_factory.mktemp("cli-failing"),
        SANDBOXER_SAAS_STUB_FAIL_HOOK="provision",
        SANDBOXER_SAAS_STUB_LATENCY_MS=str(STEP_LATENCY_MS),
    )
    yield running
    for sid in running.unsettled:
        assert running.wait_terminal(sid)["state"] == "failed"
    assert running.stop() == 0, f"serve stops cleanly on SIGTERM:\n{running.log()}"


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
    assert sandbox["state"] == "ready"
    assert sandbox["inputs"] == {"size": "large"}
    assert "ready" in made.stderr, "progress is shown on stderr"
    sid = sandbox["id"]

    listed = cli(server.url, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert sid in [s["id"] for s in json.loads(listed.stdout)]
    only_ready = json.loads(cli(server.url, "list", "--state", "ready", "--json").stdout)
    assert {s["state"] for s in only_ready} == {"ready"}
    table = cli(server.url, "list")
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["ID", "STATE", "PROFILE", "EXTENSION", "ACCOUNT", "AGE", "REASON"]
    row = next(r for r in rows if r.startswith(sid))
    assert row.split()[1:4] == ["ready", "profile.saas-stub", "saas-stub"]
    assert "\x1b" not in table.stdout + made.stderr, "no escape codes when not a TTY"

    got = cli(server.url, "get", sid)
    assert got.returncode == 0, got.stderr
    assert f"id:           {sid}" in got.stdout and "state:        ready" in got.stdout
    got_json = json.loads(cli(server.url, "get", sid, "--json").stdout)
    assert got_json["id"] == sid and got_json["state"] == "ready"

    gone = cli(server.url, "destroy", sid, "--wait", "--json")
    assert gone.returncode == 0, gone.stderr
    assert json.loads(gone.stdout)["state"] == "destroyed"

    events = cli(server.url, "events", "--sandbox", sid, "--json")
    assert events.returncode == 0, events.stderr
    types = [json.loads(line)["event"]["type"] for line in events.stdout.splitlines()]
    # The saas-stub is metered: the credit hold sits between the route and provisioning.
    assert types == [
        "SandboxRequested",
        "RouteChosen",
        "CreditsHeld",
        "Provisioned",
        "BecameReady",
        "DestroyRequested",
        "TornDown",
    ]
    human = cli(server.url, "events", "--sandbox", sid).stdout.splitlines()
    assert len(human) == len(types)
    assert human[0].split()[2:4] == ["SandboxRequested", sid]

    again = cli(server.url, "destroy", sid)
    assert again.returncode == 3 and "already destroyed" in again.stderr


def test_replay_and_profiles(server: Server) -> None:
    replay = cli(server.url, "replay", "--json")
    assert replay.returncode == 0, replay.stderr
    assert json.loads(replay.stdout)["equal"] is True
    assert "equal" in cli(server.url, "replay").stdout
    profiles = cli(server.url, "profiles", "--json")
    assert "profile.saas-stub" in [p["name"] for p in json.loads(profiles.stdout)]
    human = cli(server.url, "profiles")
    assert "--input size=" in human.stdout


def test_errors_and_exit_codes(server: Server) -> None:
    unknown = cli(server.url, "create", "--profile", "profile.nope")
    assert unknown.returncode == 3 and "field: profile" in unknown.stderr
    missing = cli(server.url, "get", "sbx-000000000000")
    assert missing.returncode == 3 and "field: id" in missing.stderr
    bad_input = cli(server.url, "create", "--profile", "profile.saas-stub", "--input", "novalue")
    assert bad_input.returncode == 2 and "novalue" in bad_input.stderr
    equals = cli(server.url, "create", "--profile", "profile.saas-stub", "--input", "size=a=b")
    assert equals.returncode == 3 and "'a=b'" in equals.stderr, "a value may contain '='"
    usage = cli(server.url, "frobnicate")
    assert usage.returncode == 2
    assert cli("not-a-url", "list").returncode == 2
    assert "Traceback" not in usage.stderr
    down_url = f"http://127.0.0.1:{free_port()}"
    down = cli(down_url, "list")
    assert down.returncode == 4
    assert down_url in down.stderr and "sandboxer serve" in down.stderr
    from_env = subprocess.run(
        [sys.executable, "-m", "sandboxer", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SANDBOXER_URL": down_url},
    )
    assert from_env.returncode == 4 and down_url in from_env.stderr, "SANDBOXER_URL is used"


def test_wait_times_out_with_exit_5(failing: Server) -> None:
    slow = cli(
        failing.url, "create", "--profile", "profile.saas-stub", "--wait", "--timeout", "0.2"
    )
    assert slow.returncode == 5, slow.stderr
    assert "timed out" in slow.stderr
    sid = slow.stderr.split("timed out after 0.2s: ")[1].split()[0]
    failing.unsettled.append(sid)  # it goes on failing while the next test runs


def test_failed_sandbox_exits_1_with_progress_on_a_tty(failing: Server) -> None:
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sandboxer",
                "--url",
                failing.url,
                "create",
                "--profile",
                "profile.saas-stub",
                "--wait",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=follower,
        )
        os.close(follower)
        follower = -1
        stdout, _ = proc.communicate(timeout=120)
        terminal = _drain(leader)
    finally:
        os.close(leader)
        if follower != -1:
            os.close(follower)
    assert proc.returncode == 1, terminal
    assert json.loads(stdout)["state"] == "failed"
    # One line rewritten in place, showing the running step and its message.
    assert "\r" in terminal
    assert "provisioning [provision: creating instance]" in terminal
    assert "failed" in terminal


def _drain(leader: int) -> str:
    """What the child wrote to its terminal; Linux reports EIO once it is all read."""
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")
