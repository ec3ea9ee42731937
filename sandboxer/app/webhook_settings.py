"""The webhook settings: limits and the networks webhooks may reach although internal.

Read by Settings.from_env so a bad value stops serve before it starts anything, and
by the webhooks themselves; no aiohttp here (the settings are read by the CLI too).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from sandboxer.errors import SettingsError

ALLOW_VARIABLE = "SANDBOXER_WEBHOOK_ALLOW_NETS"
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_allow_nets(environ: Mapping[str, str]) -> tuple[IPNetwork, ...]:
    """The operator's allowed CIDRs; a bad one stops the start, naming the variable."""
    nets = []
    for item in environ.get(ALLOW_VARIABLE, "").split(","):
        if not item.strip():
            continue
        try:
            nets.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError as exc:
            raise SettingsError(
                f"{ALLOW_VARIABLE} must be comma-separated CIDRs (e.g. 10.1.0.0/16), "
                f"got {item.strip()[:80]!r}: {exc}"
            ) from None
    return tuple(nets)


def check_env(environ: Mapping[str, str]) -> tuple[int, int, tuple[IPNetwork, ...]]:
    """The limits and allowed networks; SettingsError naming the variable if bad."""
    return (
        _env_int(environ, "SANDBOXER_WEBHOOK_MAX_PER_ACCOUNT", 10),
        _env_int(environ, "SANDBOXER_WEBHOOK_DISABLE_AFTER", 5),
        parse_allow_nets(environ),
    )


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name) or str(default)
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise SettingsError(f"{name} must be a whole number >= 1, got {raw!r}")
    return value
