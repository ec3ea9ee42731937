"""Service settings, from the environment (SANDBOXER_*) with operator-friendly defaults."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sandboxer.leases import check_worker_name
from sandboxer.nats_server import sync_interval_from_env

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def default_data_dir(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "sandboxer"


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    nats_url: str | None = None  # None: start the embedded server
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
    environ: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = dict(os.environ if environ is None else environ)
        data_dir = Path(env.get("SANDBOXER_DATA_DIR") or default_data_dir(env)).expanduser()
        replicas_raw = env.get("SANDBOXER_STREAM_REPLICAS", "1")
        try:
            replicas = int(replicas_raw)
        except ValueError:
            raise SettingsError(
                f"SANDBOXER_STREAM_REPLICAS must be an integer, got {replicas_raw!r}"
            ) from None
        if replicas not in (1, 3, 5):
            raise SettingsError(f"SANDBOXER_STREAM_REPLICAS must be 1, 3 or 5, got {replicas}")
        starter_raw = env.get("SANDBOXER_STARTER_CREDITS", "1000")
        try:
            starter = int(starter_raw)
        except ValueError:
            starter = -1
        if starter < 0:
            raise SettingsError(
                f"SANDBOXER_STARTER_CREDITS must be a whole number >= 0, got {starter_raw!r}"
            )
        checkpoint_store = env.get("SANDBOXER_CHECKPOINT_STORE") or "jetstream"
        if checkpoint_store not in ("jetstream", "fs"):
            raise SettingsError(
                f"SANDBOXER_CHECKPOINT_STORE must be 'jetstream' or 'fs', got {checkpoint_store!r}"
            )
        ttl_raw = env.get("SANDBOXER_LEASE_TTL", "10")
        try:
            lease_ttl = float(ttl_raw)
        except ValueError:
            lease_ttl = 0.0
        if not 1.0 <= lease_ttl <= 600.0:
            raise SettingsError(
                f"SANDBOXER_LEASE_TTL must be seconds between 1 and 600, got {ttl_raw!r}"
            )
        worker_name = overrides.get("worker_name") or env.get("SANDBOXER_WORKER_NAME") or None
        if worker_name is not None:
            try:
                check_worker_name(str(worker_name))
            except ValueError as exc:
                raise SettingsError(f"SANDBOXER_WORKER_NAME / --worker-name: {exc}") from None
        reconcile = env.get("SANDBOXER_RECONCILE") or "report"
        if reconcile not in ("off", "report", "remove"):
            raise SettingsError(
                f"SANDBOXER_RECONCILE must be 'off', 'report' or 'remove', got {reconcile!r}"
            )
        interval_raw = env.get("SANDBOXER_RECONCILE_INTERVAL", "300")
        try:
            interval = float(interval_raw)
        except ValueError:
            interval = -1.0
        if interval < 0:
            raise SettingsError(
                f"SANDBOXER_RECONCILE_INTERVAL must be seconds >= 0 (0: no periodic sweep), "
                f"got {interval_raw!r}"
            )
        values: dict[str, object] = {
            "reconcile": reconcile,
            "reconcile_interval": interval,
            "lease_ttl": lease_ttl,
            "worker_name": worker_name,
            "checkpoint_store": checkpoint_store,
            "checkpoint_bucket": env.get("SANDBOXER_CHECKPOINT_BUCKET") or "sandboxer-checkpoints",
            "starter_credits": starter,
            "data_dir": data_dir,
            "nats_url": env.get("SANDBOXER_NATS_URL") or None,
            "nats_sync": sync_interval_from_env(env),
            "stream_replicas": replicas,
            "environ": env,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
