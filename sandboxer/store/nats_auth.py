"""How the service connects to NATS: one place for the address and the credentials.

Embedded server (no `SANDBOXER_NATS_URL`): the service user from
`<data_dir>/nats/credentials/service.json`. An operator's server or cluster: the
credentials come from the URL's userinfo (`nats://user:password@host:port`) or from
`SANDBOXER_NATS_USER` and `SANDBOXER_NATS_PASSWORD`. Either way a URL that goes to a
log passes through `redact` first.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandboxer.store.event_store import MutablePolicy
from sandboxer.store.nats_server import SERVICE_INBOX_PREFIX, Credentials

if TYPE_CHECKING:
    from sandboxer.config import Settings


def credentials_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "nats" / "credentials"


def redact(url: str) -> str:
    """The URL(s) without user or password."""
    return ",".join(_redact_one(u.strip()) for u in url.split(","))


def _redact_one(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def external_connect_options(settings: Settings) -> dict[str, Any]:
    """`nats.connect` keyword arguments for `SANDBOXER_NATS_URL`."""
    assert settings.nats_url is not None
    options: dict[str, Any] = {
        "servers": [u.strip() for u in settings.nats_url.split(",")],
        "inbox_prefix": SERVICE_INBOX_PREFIX,
    }
    if settings.nats_user is not None:
        options.update(user=settings.nats_user, password=settings.nats_password)
    return options


def service_connect_options(settings: Settings) -> dict[str, Any]:
    """`nats.connect` keyword arguments for a part of the service that runs in its own
    process (the validator): the operator's server, or the embedded one of a `serve`
    on the same data dir. Raises FileNotFoundError when there is no such serve."""
    if settings.nats_url is not None:
        return external_connect_options(settings)
    creds = Credentials.load(credentials_dir(settings.data_dir) / "service.json")
    return {**creds.connect_options(), "inbox_prefix": SERVICE_INBOX_PREFIX}


def mutable_policy(settings: Settings) -> MutablePolicy:
    """What to do with an event stream that still allows deletes or purges: the
    embedded one is ours to lock; an operator's must already be locked, unless the
    operator says otherwise (`SANDBOXER_ALLOW_MUTABLE_STREAM=1`)."""
    if settings.nats_url is None:
        return "lock"
    return "allow" if settings.allow_mutable_stream else "refuse"
