"""Bearer tokens, each bound to an account and a role.

`admin` may grant credits, audit, and see and act on every account; `member` sees and
acts on its own account's sandboxes only. Tokens come from SANDBOXER_TOKENS_FILE (a
YAML list of {name, token, account, role}) or SANDBOXER_TOKENS (the same YAML
inline). Only their sha256 is kept in memory, and events and logs name the token's
`name`, never the token.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from pathlib import Path

import msgspec
import yaml

from sandboxer.ids import ACCOUNT_RE
from sandboxer.wire import Role


class AuthConfigError(ValueError):
    pass


class Principal(msgspec.Struct, frozen=True):
    name: str
    account: str
    role: Role

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    def may_see(self, account: str | None) -> bool:
        return self.admin or account == self.account


class _TokenEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    token: str
    account: str
    role: Role = "member"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenBook:
    def __init__(self, entries: list[_TokenEntry]) -> None:
        """Refuses a book that is not what its author meant: with two entries of the
        same token the later one would win silently (an admin read as a member), and
        two of the same name could not be told apart in events and logs. Errors name
        entries by `name`, never by token."""
        self._by_digest: dict[str, Principal] = {}
        names: set[str] = set()
        for entry in entries:
            if len(entry.token) < 16:
                raise AuthConfigError(f"token {entry.name!r}: at least 16 characters")
            if not ACCOUNT_RE.fullmatch(entry.account):
                raise AuthConfigError(f"token {entry.name!r}: invalid account {entry.account!r}")
            if entry.name in names:
                raise AuthConfigError(f"tokens: two entries are named {entry.name!r}")
            names.add(entry.name)
            digest = _digest(entry.token)
            earlier = self._by_digest.get(digest)
            if earlier is not None:
                raise AuthConfigError(
                    f"tokens {earlier.name!r} and {entry.name!r} have the same token: "
                    "give each its own"
                )
            self._by_digest[digest] = Principal(entry.name, entry.account, entry.role)

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def lookup(self, token: str) -> Principal | None:
        return self._by_digest.get(_digest(token))

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> TokenBook:
        raw = environ.get("SANDBOXER_TOKENS") or ""
        path = environ.get("SANDBOXER_TOKENS_FILE")
        if path:
            try:
                raw = Path(path).read_text()
            except OSError as exc:
                raise AuthConfigError(f"SANDBOXER_TOKENS_FILE {path}: {exc}") from exc
        if not raw.strip():
            return cls([])
        try:
            entries = msgspec.convert(yaml.safe_load(raw), list[_TokenEntry])
        except (yaml.YAMLError, msgspec.ValidationError) as exc:
            # The message must not echo the file (it holds tokens): name the problem only.
            raise AuthConfigError(f"tokens: {str(exc).split(' - ')[-1]}") from None
        return cls(entries)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
