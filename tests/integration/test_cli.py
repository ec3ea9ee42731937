"""The CLI as a user runs it: subprocesses against a real `sandboxer serve`."""

from __future__ import annotations

import argparse
import json
import os
import pty
import re
import signal
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandboxer.cli.main import build_parser
from tests.helpers import METERED_LIFECYCLE
from tests.infra import free_port

# How the failing server stretches each saas-stub hook: long enough that a --wait
# sees the provision step running, short enough to keep the file quick.
STEP_LATENCY_MS = 2000

# A saas-stub profile whose hooks each take 0.3 s: every state lasts long enough for a
# long-poll (woken by each event) to see it, so a --wait shows each step.
SLOW_PROFILE = """\
name: profile.saas-slow
description: saas-stub with slow hooks, so a --wait sees every step
extension: saas-stub
ttl_seconds: 600
inputs:
  size: {default: small}
config: {latency_ms: 300}
"""

ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


class Server:
    """`python -m sandboxer serve` with its own data dir (so its own embedded NATS)."""

    def __init__(self, folder: Path, port: int | None = None, **env: str) -> None:
        self.port = port or free_port()  # a port: restart where a client reconnects
        self.unsettled: list[str] = []  # sandboxes to see terminal before stopping
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_env = {"SANDBOXER_DATA_DIR": str(folder / "data")}
        environ = {k: v for k, v in os.environ.items() if k != "SANDBOXER_NATS_URL"}
        environ.update(
            SANDBOXER_DATA_DIR=str(folder / "data"), SANDBOXER_NATS_PORT=str(free_port()), **env
        )
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


def has_route(url: str, path: str) -> bool:
    """Whether the server's OpenAPI document lists `path` (exec, files and logs are
    being added to the server; their tests skip, saying so, until it has them)."""
    with urllib.request.urlopen(f"{url}/openapi.json", timeout=30) as resp:  # noqa: S310
        return path in json.loads(resp.read())["paths"]


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
    folder = tmp_path_factory.mktemp("cli")
    (folder / "profiles").mkdir()
    (folder / "profiles" / "profile.saas-slow.yaml").write_text(SLOW_PROFILE)
    running = Server(folder, SANDBOXER_PROFILES_PATH=str(folder / "profiles"))
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
    assert types == METERED_LIFECYCLE
    header, *human = cli(server.url, "events", "--sandbox", sid).stdout.splitlines()
    assert header.split() == ["SEQ", "TIME", "TYPE", "AGGREGATE", "ACTOR"]
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
    assert human.stdout.split("\n")[0].split() == [
        "PROFILE",
        "EXTENSION",
        "TTL",
        "INPUT",
        "NOTES",
        "DESCRIPTION",
    ]
    saas = next(line for line in human.stdout.splitlines() if "profile.saas-stub" in line)
    assert saas.split()[:5] == ["profile.saas-stub", "saas-stub", "600s", "size=small", "one"]


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
    code, stdout, terminal = on_terminal(
        failing.url, "create", "--profile", "profile.saas-stub", "--wait", "--json"
    )
    assert code == 1, terminal
    sid = json.loads(stdout)["id"]
    assert json.loads(stdout)["state"] == "failed"
    assert "\r\x1b[K" in terminal, "one line, rewritten in place"
    # The running step and its message, while the hook runs.
    assert f"{sid}: provisioning [provision: creating instance]" in plain(terminal)
    assert re.fullmatch(rf"{sid}: failed \(\d+\.\ds\)", last_line(terminal))


def test_wait_on_a_terminal_shows_steps_and_elapsed_time(server: Server) -> None:
    code, stdout, terminal = on_terminal(
        server.url, "create", "--profile", "profile.saas-slow", "--wait", "--json"
    )
    assert code == 0, terminal
    sid = json.loads(stdout)["id"]
    assert "\x1b" not in stdout, "data on stdout stays plain"
    assert "\r\x1b[K" in terminal and any(frame in terminal for frame in SPINNER)
    assert "\x1b[32mready\x1b[0m" in terminal, "the final state in colour"
    shown = plain(terminal)
    for state in ("provisioning", "starting"):
        assert re.search(rf"{sid}: {state}\b.* \(\d+\.\ds\)", shown), shown
    assert re.fullmatch(rf"{sid}: ready \(\d+\.\ds\)", last_line(terminal))

    code, _, terminal = on_terminal(server.url, "destroy", sid, "--wait", "--json")
    assert code == 0, terminal
    assert f"{sid}: tearing_down" in plain(terminal)
    assert re.fullmatch(rf"{sid}: destroyed \(\d+\.\ds\)", last_line(terminal))


def test_no_color_turns_colours_and_the_spinner_off(server: Server) -> None:
    code, _, terminal = on_terminal(
        server.url, "create", "--profile", "profile.saas-slow", "--wait", NO_COLOR="1"
    )
    assert code == 0, terminal
    assert "\x1b" not in terminal and "\r" not in terminal
    assert not any(frame in terminal for frame in SPINNER)
    sid = terminal.split(":", 1)[0]
    # One plain line per change, as in a log; then the sandbox on the same terminal.
    assert re.search(rf"^{sid}: provisioning.* \(\d+\.\ds\)$", terminal, re.M), terminal
    assert "state:        ready" in terminal

    _, _, coloured = on_terminal(server.url, "list", "--state", "ready")
    assert "\x1b[1mID" in coloured and "\x1b[32mready" in coloured
    assert_aligned(plain(coloured))
    _, _, uncoloured = on_terminal(server.url, "list", "--state", "ready", NO_COLOR="1")
    assert "\x1b" not in uncoloured and sid in uncoloured
    assert cli(server.url, "destroy", sid, "--wait").returncode == 0


def test_every_data_command_has_json(server: Server, tmp_path: Path) -> None:
    """Walks the parser, so a new command without --json (or not tried here) fails."""
    made = run_json(server, "create", "--profile", "profile.saas-stub", "--wait", "--json")
    sid = made["id"]
    ckpt = run_json(server, "checkpoint", "create", sid, "--wait", "--json")
    commands = {
        "create": made,
        "checkpoint create": ckpt,
        "list": run_json(server, "list", "--json"),
        "get": run_json(server, "get", sid, "--json"),
        "checkpoint list": run_json(server, "checkpoint", "list", sid, "--json"),
        "checkpoint restore": run_json(
            server, "checkpoint", "restore", sid, ckpt["id"], "--wait", "--json"
        ),
        "checkpoint delete": run_json(server, "checkpoint", "delete", ckpt["id"], "--json"),
        "events": run_json(server, "events", "--sandbox", sid, "--json"),
        "replay": run_json(server, "replay", "--json"),
        "reconcile": run_json(server, "reconcile", "--json", codes=(0, 1)),
        "profiles": run_json(server, "profiles", "--json"),
        "pools": run_json(server, "pools", "--json"),
        "ledger grant": run_json(server, "ledger", "grant", "json-team", "5", "--json"),
        "ledger balance": run_json(server, "ledger", "balance", "--json"),
        "ledger history": run_json(server, "ledger", "history", "json-team", "--json"),
        "ledger audit": run_json(server, "ledger", "audit", "--json"),
    }
    using = has_route(server.url, "/v1/sandboxes/{id}/exec")
    if using:  # exec and cp, once the server has them (see test_exec_cp_logs)
        local = tmp_path / "up.txt"
        local.write_text("hello\n")
        commands["exec"] = run_json(server, "exec", sid, "--json", "--", "echo", "hi")
        commands["cp"] = run_json(server, "cp", str(local), f"{sid}:/tmp/up.txt", "--json")
    commands |= {
        "extend": run_json(server, "extend", sid, "--ttl", "600", "--json"),
        "keepalive": run_json(server, "keepalive", sid, "--json"),
        "pause": run_json(server, "pause", sid, "--wait", "--json"),
        "resume": run_json(server, "resume", sid, "--wait", "--json"),
    }
    commands |= {
        "destroy": run_json(server, "destroy", sid, "--wait", "--json"),
        "nats-info": json.loads(
            cli(server.url, "nats-info", "--json", env={**os.environ, **server.data_env}).stdout
        ),
    }
    with_json, without = leaf_commands(build_parser())
    assert with_json == set(commands) | (set() if using else {"exec", "cp"})
    # e2e prints the test's own output, as `make e2e` did, logs the services' lines; the
    # rest print no data.
    assert without == {"serve", "validate serve", "e2e", "logs"}
    assert commands["checkpoint restore"]["state"] == "ready"
    assert (commands["pause"]["state"], commands["resume"]["state"]) == ("paused", "ready")
    assert commands["destroy"]["state"] == "destroyed"
    assert commands["nats-info"]["embedded"] and commands["nats-info"]["running"]
    assert [e["event"]["type"] for e in commands["events"]][:2] == [
        "SandboxRequested",
        "RouteChosen",
    ]


def test_tables_align(server: Server) -> None:
    made = run_json(server, "create", "--profile", "profile.saas-stub", "--wait", "--json")
    sid = made["id"]
    for _ in range(2):
        ckpt = run_json(server, "checkpoint", "create", sid, "--wait", "--json")
    run_json(server, "checkpoint", "delete", ckpt["id"], "--json")  # a wider status
    run_json(server, "ledger", "grant", "a-team-with-a-rather-long-name", "12345", "--json")
    for args, right in [
        (["list"], ()),
        (["events", "--sandbox", sid], ("SEQ",)),
        (["checkpoint", "list", sid], ("SIZE",)),
        (["ledger", "history", "default"], ("SEQ", "AMOUNT")),
        (["ledger", "balance"], ("AVAILABLE", "GRANTED", "RESERVED", "DEBITED", "RELEASED")),
        (["profiles"], ("TTL",)),
    ]:
        out = cli(server.url, *args)
        assert out.returncode == 0, out.stderr
        assert len(out.stdout.splitlines()) > 2, out.stdout
        assert_aligned(out.stdout, right)
    assert cli(server.url, "destroy", sid, "--wait").returncode == 0


def assert_aligned(text: str, right: tuple[str, ...] = ()) -> None:
    """Every cell starts under its column's header (ends under it when right-aligned);
    cells are told apart by the two spaces between columns."""
    header, *rows = text.splitlines()
    starts, ends = set(), set()
    for name in re.finditer(r"\S+", header):
        (ends if name.group() in right else starts).add(
            name.end() if name.group() in right else name.start()
        )
    for row in rows:
        for cell in re.finditer(r"\S+(?: \S+)*", row):
            assert cell.start() in starts or cell.end() in ends, f"{cell.group()!r}:\n{text}"


def run_json(server: Server, *args: str, codes: tuple[int, ...] = (0,)) -> Any:
    """The command's stdout parsed: one JSON document, or a list of JSON Lines."""
    out = cli(server.url, *args)
    assert out.returncode in codes, out.stderr
    try:
        return json.loads(out.stdout)
    except ValueError:
        return [json.loads(line) for line in out.stdout.splitlines()]


def leaf_commands(parser: argparse.ArgumentParser, prefix: str = "") -> tuple[set[str], set[str]]:
    """(commands with --json, commands without), sub-commands named like `ledger grant`."""
    with_json, without = set(), set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                more, less = leaf_commands(sub, f"{prefix}{name} ")
                with_json |= more
                without |= less
            return with_json, without
    name = prefix.strip()
    options = {o for a in parser._actions for o in a.option_strings}
    return ({name}, set()) if "--json" in options else (set(), {name})


def on_terminal(url: str, *args: str, **env: str) -> tuple[int, str, str]:
    """Runs the CLI with stderr on a pseudo-terminal and stdout on a pipe, except for
    commands without `--json`, whose stdout goes to the terminal too. Returns the exit
    code, the pipe's text and the terminal's (newlines not turned into \\r\\n, so every
    \\r is the CLI's own)."""
    leader, follower = pty.openpty()
    attrs = termios.tcgetattr(follower)
    attrs[1] &= ~termios.ONLCR
    termios.tcsetattr(follower, termios.TCSANOW, attrs)
    environ = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")}
    chunks: list[bytes] = []
    # Read while it runs: a terminal nobody reads fills up and blocks the writer.
    reader = threading.Thread(target=lambda: chunks.extend(_drain(leader)))
    reader.start()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sandboxer", "--url", url, *args],
            stdout=subprocess.PIPE if "--json" in args else follower,
            stderr=follower,
            env={**environ, "TERM": "xterm", **env},
        )
        os.close(follower)
        follower = -1
        stdout, _ = proc.communicate(timeout=120)
        reader.join(timeout=30)
    finally:
        if follower != -1:
            os.close(follower)
        reader.join(timeout=30)
        os.close(leader)
    return proc.returncode, (stdout or b"").decode(), b"".join(chunks).decode()


def plain(terminal: str) -> str:
    """What the terminal shows line by line: escapes gone, each rewrite on its own line."""
    return ESCAPE.sub("", terminal).replace("\r", "\n")


def last_line(terminal: str) -> str:
    lines = [line.strip() for line in plain(terminal).splitlines() if line.strip()]
    return lines[-1]


def _drain(leader: int) -> Iterator[bytes]:
    """What the child wrote to its terminal; Linux reports EIO once it is all read."""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            return
        if not chunk:
            return
        yield chunk


def test_exec_cp_logs_and_labels(server: Server, tmp_path: Path) -> None:
    """exec passes output and the exit code through; cp copies both ways (and through
    stdin/stdout); logs prints the lines; labels filter the list."""
    if not has_route(server.url, "/v1/sandboxes/{id}/exec"):
        pytest.skip("the server does not publish exec yet (OpenAPI document)")
    made = run_json(
        server,
        "create",
        "--profile",
        "profile.saas-stub",
        "--label",
        "team=cli",
        "--wait",
        "--json",
    )
    sid = made["id"]
    assert made["labels"] == {"team": "cli"}
    assert [s["id"] for s in run_json(server, "list", "--label", "team=cli", "--json")] == [sid]
    assert run_json(server, "list", "--label", "team=other", "--json") == []
    assert cli(server.url, "create", "--profile", "x", "--label", "novalue").returncode == 2

    out = cli(server.url, "exec", sid, "--", "echo", "hello", "-n")
    assert out.returncode == 0 and out.stdout == "hello -n\n", out.stderr
    err = cli(server.url, "exec", sid, "--", "echo", "oops", ">&2")
    assert err.returncode == 0 and err.stderr == "oops\n" and err.stdout == ""
    assert cli(server.url, "exec", sid, "--shell", "exit 7").returncode == 7
    assert cli(server.url, "exec", sid, "--", "false").returncode == 1
    slow = cli(server.url, "exec", sid, "--timeout", "0.3", "--", "sleep", "5")
    assert slow.returncode == 124 and "timeout" in slow.stderr
    record = run_json(server, "exec", sid, "--json", "--", "echo", "json")
    assert record["outcome"] == "exited" and record["stdout"] == "json\n"
    assert cli(server.url, "exec", sid).returncode == 2, "no command: usage"
    missing = cli(server.url, "exec", "sbx-000000000000", "--", "true")
    assert missing.returncode == 3 and "error 404" in missing.stderr

    local = tmp_path / "up.bin"
    local.write_bytes(b"\x00\x01binary\xff" * 1000)
    up = cli(server.url, "cp", str(local), f"{sid}:/data/up.bin")
    assert up.returncode == 0, up.stderr
    back = tmp_path / "back.bin"
    assert cli(server.url, "cp", f"{sid}:/data/up.bin", str(back)).returncode == 0
    assert back.read_bytes() == local.read_bytes()
    piped = subprocess.run(
        [sys.executable, "-m", "sandboxer", "--url", server.url, "cp", "-", f"{sid}:/data/in"],
        input=b"from stdin\n",
        capture_output=True,
        timeout=120,
    )
    assert piped.returncode == 0, piped.stderr
    cat = subprocess.run(
        [sys.executable, "-m", "sandboxer", "--url", server.url, "cp", f"{sid}:/data/in", "-"],
        capture_output=True,
        timeout=120,
    )
    assert cat.returncode == 0 and cat.stdout == b"from stdin\n"
    assert cli(server.url, "cp", str(local), str(back)).returncode == 2, "one side remote"
    gone = cli(server.url, "cp", f"{sid}:/data/nothing", str(back))
    assert gone.returncode == 3 and "error 404" in gone.stderr

    logs = cli(server.url, "logs", sid)
    assert logs.returncode == 0, logs.stderr
    assert "echo hello -n" in logs.stdout and "exit 7" in logs.stdout
    assert len(cli(server.url, "logs", sid, "--tail", "1").stdout.splitlines()) == 1
    assert cli(server.url, "logs", sid, "-f", "--since", "3600").returncode == 0
    assert cli(server.url, "destroy", sid, "--wait").returncode == 0
