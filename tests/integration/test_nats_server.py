"""The embedded nats-server: real processes, real JetStream, real SIGKILLs."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from sandboxer.config import Settings, SettingsError
from sandboxer.store.nats_server import (
    EmbeddedNats,
    NatsPortInUse,
    _pid_alive,
    sync_interval_from_env,
)
from tests.infra import free_port


def wait_gone(pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        assert time.monotonic() < deadline, f"process {pid} is still alive"
        time.sleep(0.02)  # polling a condition, under a deadline


async def publish_and_count(server: EmbeddedNats, publish: int) -> int:
    nc = await nats.connect(**server.connect_options())
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="T", subjects=["t.>"], storage="file"))
        for i in range(publish):
            await js.publish("t.x", str(i).encode())
        return int((await js.stream_info("T")).state.messages)
    finally:
        await nc.close()


async def test_start_use_stop_restart_keeps_data(tmp_path: Path) -> None:
    port = free_port()
    server = EmbeddedNats(tmp_path, port=port)
    url = server.start()
    assert url == f"nats://127.0.0.1:{port}"
    pid = server.pid
    assert pid is not None and (tmp_path / "nats" / "nats-server.pid").read_text() == str(pid)
    assert await publish_and_count(server, 5) == 5
    server.stop()
    wait_gone(pid)
    assert not (tmp_path / "nats" / "nats-server.pid").exists()
    server.stop()  # idempotent

    again = EmbeddedNats(tmp_path, port=port)
    with again:
        assert await publish_and_count(again, 1) == 6, "every message survived the restart"


def test_sync_interval_settings(tmp_path: Path) -> None:
    assert "sync_interval: always" in EmbeddedNats(tmp_path).config_text()
    assert "sync_interval:" not in EmbeddedNats(tmp_path, sync_interval="default").config_text()
    assert "sync_interval: 500ms" in EmbeddedNats(tmp_path, sync_interval="500ms").config_text()
    assert sync_interval_from_env({}) == "always"
    with pytest.raises(ValueError, match=r"SANDBOXER_NATS_SYNC.*'bogus'"):
        sync_interval_from_env({"SANDBOXER_NATS_SYNC": "bogus"})
    with pytest.raises(ValueError, match="SANDBOXER_NATS_SYNC"):
        Settings.from_env({"SANDBOXER_NATS_SYNC": "sometimes"})
    with pytest.raises(SettingsError, match="SANDBOXER_STREAM_REPLICAS"):
        Settings.from_env({"SANDBOXER_STREAM_REPLICAS": "two"})


@pytest.mark.parametrize("sync", ["always", "default", "500ms"])
def test_server_accepts_each_sync_setting(tmp_path: Path, sync: str) -> None:
    with EmbeddedNats(tmp_path, sync_interval=sync, port=free_port()) as server:
        assert asyncio.run(publish_and_count(server, 1)) == 1


CHILD = """
import sys, time
from pathlib import Path
from sandboxer.store.nats_server import EmbeddedNats
server = EmbeddedNats(Path(sys.argv[1]), port=int(sys.argv[2]))
print(server.start(), server.pid, flush=True)
time.sleep(600)
"""


def test_sigkill_of_parent_takes_the_server_down(tmp_path: Path) -> None:
    port = free_port()
    parent = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    url, pid_text = parent.stdout.readline().split()
    pid = int(pid_text)
    assert url == f"nats://127.0.0.1:{port}"
    assert asyncio.run(publish_and_count(EmbeddedNats(tmp_path, port=port), 3)) == 3
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    wait_gone(pid)
    with EmbeddedNats(tmp_path, port=port) as server:  # the same data dir starts cleanly
        assert asyncio.run(publish_and_count(server, 0)) == 3


def test_stale_server_on_the_data_dir_is_stopped(tmp_path: Path) -> None:
    port = free_port()
    stale = EmbeddedNats(tmp_path, port=port)
    stale.start()
    stale_pid = stale.pid
    assert stale_pid is not None
    # An earlier run that never stopped its server (its parent is still this test).
    fresh = EmbeddedNats(tmp_path, port=port)  # the same port: the stale one goes first
    with fresh:
        wait_gone(stale_pid)
        assert fresh.pid != stale_pid
        assert asyncio.run(publish_and_count(fresh, 1)) == 1
    stale._proc = None  # already gone


def test_stale_pid_file_of_another_process_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "nats").mkdir()
    (tmp_path / "nats" / "nats-server.pid").write_text(str(os.getpid()))
    with EmbeddedNats(tmp_path, port=free_port()) as server:
        assert _pid_alive(os.getpid()), "an unrelated live process was not touched"
        assert server.pid != os.getpid()


def test_early_exit_reports_the_log(tmp_path: Path) -> None:
    bad = EmbeddedNats(tmp_path, binary=str(tmp_path / "fake-nats"), port=free_port())
    (tmp_path / "fake-nats").write_text("#!/bin/sh\necho 'no way' >&2\nexit 3\n")
    (tmp_path / "fake-nats").chmod(0o755)
    with pytest.raises(RuntimeError, match=r"exited with 3 at start:\n.*no way"):
        bad.start()


def test_address_in_use_from_the_server_is_the_port_error(tmp_path: Path) -> None:
    """The port was free when checked, taken when nats-server bound it: the same error."""
    fake = tmp_path / "fake-nats"
    fake.write_text(
        "#!/bin/sh\necho '[FTL] Error listening on port: 127.0.0.1:4223, "
        '"listen tcp 127.0.0.1:4223: bind: address already in use"\' >&2\nexit 1\n'
    )
    fake.chmod(0o755)
    port = free_port()
    with pytest.raises(NatsPortInUse, match=rf"port {port} .*SANDBOXER_NATS_PORT"):
        EmbeddedNats(tmp_path, binary=str(fake), port=port).start()


async def test_no_anonymous_access_and_credentials_kept(tmp_path: Path) -> None:
    port = free_port()
    with EmbeddedNats(tmp_path, port=port) as server:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(server.url, allow_reconnect=False, max_reconnect_attempts=0)
        wrong = {**server.connect_options(), "password": "guess"}
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(**wrong, allow_reconnect=False, max_reconnect_attempts=0)
        first = (server.service, server.reader)
    again = EmbeddedNats(tmp_path, port=port)
    assert (again.service, again.reader) == first, "passwords survive a restart"
    assert first[0].password not in repr(first[0])


async def test_rotating_by_removing_the_credentials_folder(tmp_path: Path) -> None:
    """docs/nats.md: stop, delete the credentials folder, start: new passwords, and the
    old ones no longer get in."""
    port = free_port()
    with EmbeddedNats(tmp_path, port=port) as server:
        old = server.connect_options()
    shutil.rmtree(tmp_path / "nats" / "credentials")
    with EmbeddedNats(tmp_path, port=port) as server:
        assert server.service.password != old["password"]
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(**old, allow_reconnect=False, max_reconnect_attempts=0)
        assert await publish_and_count(server, 1) == 1


async def test_spawn_goes_on_at_once_and_start_waits_for_it(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path, port=free_port())
    try:
        server.spawn()
        pid = server.pid
        assert pid is not None and _pid_alive(pid)
        server.spawn()  # spawned already: the same process
        assert server.pid == pid
        assert server.start() == server.url and server.pid == pid
        assert await publish_and_count(server, 3) == 3
    finally:
        server.stop()
    wait_gone(pid)


def test_a_serve_that_fails_after_spawning_the_server_leaves_none_behind(tmp_path: Path) -> None:
    """`serve` spawns the embedded server before it reads the tokens file; a bad file
    still ends with no server left running."""
    data = tmp_path / "data"
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("- {name: short, token: tooshort, account: acme}\n")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXER_")}
    environ.update(
        SANDBOXER_DATA_DIR=str(data),
        SANDBOXER_TOKENS_FILE=str(tokens),
        SANDBOXER_NATS_PORT=str(free_port()),
    )
    done = subprocess.run(
        [sys.executable, "-m", "sandboxer", "serve", "--port", str(free_port())],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0 and "short" in done.stderr, done.stderr
    started = [
        line
        for line in (data / "nats" / "nats-server.log").read_text().splitlines()
        if "Starting nats-server" in line
    ]
    assert len(started) == 1, started  # it was spawned ...
    wait_gone(int(started[0].split("]")[0].lstrip("[")))  # ... and is gone
    assert not (data / "nats" / "nats-server.pid").exists()
