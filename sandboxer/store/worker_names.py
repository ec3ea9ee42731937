"""Worker names: checked whole, and the default one per host and data directory.

A module of its own, free of the NATS client, so reading the settings stays cheap
(`serve` starts the embedded server before it imports the rest)."""

from __future__ import annotations

import hashlib
import re
import socket
from pathlib import Path

_NAME_OK = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_worker_name(name: str) -> str:
    if not _NAME_OK.fullmatch(name):
        raise ValueError(f"worker name {name!r}: use 1-64 letters, digits, '-' or '_'")
    return name


def default_worker_name(data_dir: Path) -> str:
    """Stable per host and data directory, so a restarted worker finds its own leases."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40] or "host"
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:8]
    return f"{host}-{digest}"
