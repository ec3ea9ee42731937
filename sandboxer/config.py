"""Service settings, from the environment (SANDBOXER_*) with operator-friendly defaults."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from sandboxer.app.webhook_settings import check_env
from sandboxer.errors import SettingsError
from sandboxer.store.nats_server import (
    DEFAULT_NATS_PORT,
    PORT_VARIABLE,
    EmbeddedNats,
    sync_interval_from_env,
)
from sandboxer.store.worker_names import check_worker_name

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def default_data_dir(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "sandboxer"


__all__ = ["Settings", "SettingsError", "repo_roots_from_env"]


N = TypeVar("N", int, float)


def _number(
    env: Mapping[str, str],
    name: str,
    default: str,
    parse: Callable[[str], N],
    valid: Callable[[N], bool],
    expected: str,
) -> N:
    raw = env.get(name, default)
    try:
        value = parse(raw)
    except ValueError:
        raise SettingsError(f"{name} must be {expected}, got {raw!r}") from None
    if not valid(value):
        raise SettingsError(f"{name} must be {expected}, got {raw!r}")
    return value


def repo_roots_from_env(env: Mapping[str, str]) -> tuple[Path, ...]:
    """Where a `repo` input may point (`SANDBOXER_REPO_ROOTS`, `:`-separated folders,
    symlinks resolved). Unset: the folder the service runs in when the API has no
    tokens (one user on a laptop), nothing at all when it has them (callers are
    other people: the operator lists what they may copy)."""
    raw = env.get("SANDBOXER_REPO_ROOTS")
    if raw is None or not raw.strip():
        tokens = env.get("SANDBOXER_TOKENS", "").strip() or env.get("SANDBOXER_TOKENS_FILE")
        return () if tokens else (Path.cwd().resolve(),)
    roots: list[Path] = []
    for entry in raw.split(os.pathsep):
        if not entry:
            continue
        path = Path(entry).expanduser()
        if not path.is_absolute():
            raise SettingsError(f"SANDBOXER_REPO_ROOTS: {entry!r} is not an absolute path")
        if not path.is_dir():
            raise SettingsError(f"SANDBOXER_REPO_ROOTS: {entry!r} is not a directory")
        roots.append(path.resolve())
    return tuple(roots)


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    """The variable's value, one of `choices`; unset or empty: the first."""
    value = env.get(name) or choices[0]
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
        raise SettingsError(f"{name} must be {listed}, got {value!r}")
    return value


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    nats_url: str | None = field(default=None, repr=False)  # None: the embedded server
    nats_port: int = DEFAULT_NATS_PORT  # the embedded server's
    nats_user: str | None = None  # with nats_url: its user, unless the URL names one
    nats_password: str | None = field(default=None, repr=False)
    allow_mutable_stream: bool = False  # run on an operator's stream that allows deletes
    nats_sync: str = "always"
    stream_replicas: int = 1
    starter_credits: int = 1000
    checkpoint_store: str = "jetstream"  # or "fs"
    checkpoint_bucket: str = "sandboxer-checkpoints"
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    worker_name: str | None = None  # None: derived from the host and the data directory
    lease_ttl: float = 10.0
    reconcile: str = "report"  # off | report | remove
    reconcile_interval: float = 300.0
    repo_roots: tuple[Path, ...] = ()
    max_file_bytes: int = 1024**3  # the largest file PUT or GET .../files moves
    snapshot_every: int = 100_000  # events between two read-model snapshots (0: none)
    snapshot_seconds: float = 300.0  # and at most this long between them
    environ: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def embedded_server(self) -> EmbeddedNats | None:
        """The embedded NATS server these settings run (None: a NATS URL is set)."""
        if self.nats_url is not None:
            return None
        return EmbeddedNats(self.data_dir, sync_interval=self.nats_sync, port=self.nats_port)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = dict(os.environ if environ is None else environ)
        data_dir = Path(env.get("SANDBOXER_DATA_DIR") or default_data_dir(env)).expanduser()
        replicas = _number(
            env, "SANDBOXER_STREAM_REPLICAS", "1", int, lambda n: n in (1, 3, 5), "1, 3 or 5"
        )
        starter = _number(
            env, "SANDBOXER_STARTER_CREDITS", "1000", int, lambda n: n >= 0, "a whole number >= 0"
        )
        checkpoint_store = _choice(env, "SANDBOXER_CHECKPOINT_STORE", ("jetstream", "fs"))
        lease_ttl = _number(
            env,
            "SANDBOXER_LEASE_TTL",
            "10",
            float,
            lambda t: 1.0 <= t <= 600.0,
            "seconds between 1 and 600",
        )
        worker_name = overrides.get("worker_name") or env.get("SANDBOXER_WORKER_NAME") or None
        if worker_name is not None:
            try:
                check_worker_name(str(worker_name))
            except ValueError as exc:
                raise SettingsError(f"SANDBOXER_WORKER_NAME / --worker-name: {exc}") from None
        check_env(env)  # webhook limits and allowed networks: fail before starting
        reconcile = _choice(env, "SANDBOXER_RECONCILE", ("report", "off", "remove"))
        interval = _number(
            env,
            "SANDBOXER_RECONCILE_INTERVAL",
            "300",
            float,
            lambda t: t >= 0,
            "seconds >= 0 (0: no periodic sweep)",
        )
        nats_port = _number(
            env,
            PORT_VARIABLE,
            str(DEFAULT_NATS_PORT),
            int,
            lambda p: 1 <= p <= 65535,
            "a TCP port between 1 and 65535",
        )
        nats_user = env.get("SANDBOXER_NATS_USER") or None
        nats_password = env.get("SANDBOXER_NATS_PASSWORD") or None
        if (nats_user is None) != (nats_password is None):
            raise SettingsError("set SANDBOXER_NATS_USER and SANDBOXER_NATS_PASSWORD together")
        nats_url = env.get("SANDBOXER_NATS_URL") or None
        if nats_user is not None and (nats_url is None or "@" in nats_url):
            raise SettingsError(
                "SANDBOXER_NATS_USER and SANDBOXER_NATS_PASSWORD go with a SANDBOXER_NATS_URL "
                "that names no user (the embedded server has its own credentials)"
            )
        max_file_bytes = _number(
            env,
            "SANDBOXER_MAX_FILE_BYTES",
            str(1024**3),
            int,
            lambda n: 1 <= n <= 2**50,
            "a byte count between 1 and 2**50",
        )
        snapshot_every = _number(
            env,
            "SANDBOXER_SNAPSHOT_EVERY",
            "100000",
            int,
            lambda n: n == 0 or 100 <= n <= 10**9,
            "0 (no snapshots) or a count of events between 100 and 10**9",
        )
        snapshot_seconds = _number(
            env,
            "SANDBOXER_SNAPSHOT_SECONDS",
            "300",
            float,
            lambda t: 1.0 <= t <= 86_400.0,
            "seconds between 1 and 86400",
        )
        allow_mutable = _choice(env, "SANDBOXER_ALLOW_MUTABLE_STREAM", ("0", "1")) == "1"
        values: dict[str, object] = {
            "repo_roots": repo_roots_from_env(env),
            "max_file_bytes": max_file_bytes,
            "snapshot_every": snapshot_every,
            "snapshot_seconds": snapshot_seconds,
            "reconcile": reconcile,
            "reconcile_interval": interval,
            "lease_ttl": lease_ttl,
            "worker_name": worker_name,
            "checkpoint_store": checkpoint_store,
            "checkpoint_bucket": env.get("SANDBOXER_CHECKPOINT_BUCKET") or "sandboxer-checkpoints",
            "starter_credits": starter,
            "data_dir": data_dir,
            "nats_url": nats_url,
            "nats_port": nats_port,
            "nats_user": nats_user,
            "nats_password": nats_password,
            "allow_mutable_stream": allow_mutable,
            "nats_sync": sync_interval_from_env(env),
            "stream_replicas": replicas,
            "environ": env,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
