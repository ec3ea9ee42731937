"""`ext.<name>.yaml`: what an extension is, what it can do, and how to configure it.

Config is resolved in this order, the later winning: manifest default, profile
override, environment variable named by the manifest (the operator has the last
word on the machine the service runs on).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from extensions.sdk import ALIASES, OPTIONAL_HOOKS, REQUIRED_HOOKS

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")

ConfigType = Literal["str", "int", "float", "bool", "list", "dict"]
_PY_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (float, int),
    "bool": (bool,),
    "list": (list,),
    "dict": (dict,),
}


class ConfigError(ValueError):
    """A manifest, or a config value, that does not fit its schema. Names the field."""


class ConfigField(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    type: ConfigType
    default: Any = None
    env: str | None = None
    description: str = ""
    secret: bool = False


class HookPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    timeout: float = 60.0
    retries: int = 0
    backoff: float = 1.0


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    version: str
    entry_point: str
    description: str = ""
    capabilities: list[str] = []
    config: dict[str, ConfigField] = {}
    hooks: dict[str, HookPolicy] = {}
    source: str = ""

    @property
    def metered(self) -> bool:
        """Metered extensions reserve credits on create and debit the actual on destroy."""
        return self.has("estimate_cost") and self.has("meter_actual")

    def hook(self, name: str) -> HookPolicy:
        return self.hooks.get(name, HookPolicy())

    def has(self, capability: str) -> bool:
        return capability in self.capabilities

    def resolve_config(
        self,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Defaults, then overrides, then env; every value checked against its type."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for key, spec in self.config.items():
            values[key] = spec.default
        for key, value in (overrides or {}).items():
            if key not in self.config:
                raise ConfigError(f"{self.name}: unknown config field {key!r}")
            values[key] = value
        for key, spec in self.config.items():
            if spec.env and spec.env in env:
                values[key] = _from_env(self.name, key, spec, env[spec.env])
        for key, spec in self.config.items():
            value = values[key]
            if value is not None and not _type_ok(value, spec.type):
                raise ConfigError(
                    f"{self.name}: config field {key!r} must be {spec.type}, "
                    f"got {type(value).__name__}"
                )
        return values


def _type_ok(value: Any, type_name: str) -> bool:
    if type_name != "bool" and isinstance(value, bool):
        return False
    return isinstance(value, _PY_TYPES[type_name])


def _from_env(ext: str, key: str, spec: ConfigField, raw: str) -> Any:
    try:
        if spec.type == "int":
            return int(raw)
        if spec.type == "float":
            return float(raw)
        if spec.type == "bool":
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if spec.type in ("list", "dict"):
            return yaml.safe_load(raw)
    except ValueError as exc:
        raise ConfigError(
            f"{ext}: environment variable {spec.env} for {key!r} must be {spec.type}, got {raw!r}"
        ) from exc
    return raw


def load_manifest(path: Path) -> Manifest:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path.name}: not valid YAML: {exc}") from exc
    return manifest_from_dict(raw, source=path.name)


def _renamed(raw: dict[Any, Any]) -> dict[Any, Any]:
    """A manifest with old capability and hook names (`run_command`) read as the new
    ones (`exec`); the new name wins where both are given."""
    out = dict(raw)
    capabilities = out.get("capabilities")
    if isinstance(capabilities, list):
        renamed = [ALIASES.get(c, c) if isinstance(c, str) else c for c in capabilities]
        out["capabilities"] = list(dict.fromkeys(renamed))
    hooks = out.get("hooks")
    if isinstance(hooks, dict):
        new: dict[Any, Any] = {}
        for name, policy in hooks.items():
            key = ALIASES.get(name, name) if isinstance(name, str) else name
            if key not in new or key == name:
                new[key] = policy
        out["hooks"] = new
    return out


def manifest_from_dict(raw: Any, source: str) -> Manifest:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a manifest is a mapping")
    raw = _renamed(raw)
    try:
        manifest = msgspec.convert({**raw, "source": source}, Manifest)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    if not NAME_RE.fullmatch(manifest.name):
        raise ConfigError(f"{source}: name {manifest.name!r} must match {NAME_RE.pattern}")
    known = set(REQUIRED_HOOKS) | set(OPTIONAL_HOOKS)
    for capability in manifest.capabilities:
        if capability not in known:
            raise ConfigError(f"{source}: unknown capability {capability!r}")
    for hook in REQUIRED_HOOKS:
        if hook not in manifest.capabilities:
            raise ConfigError(f"{source}: capability {hook!r} is required")
    if manifest.has("estimate_cost") != manifest.has("meter_actual"):
        raise ConfigError(f"{source}: estimate_cost and meter_actual go together")
    if manifest.has("snapshot") != manifest.has("restore"):
        raise ConfigError(f"{source}: snapshot and restore go together")
    if manifest.has("inventory") != manifest.has("remove_orphan"):
        raise ConfigError(f"{source}: inventory and remove_orphan go together")
    for hook in manifest.hooks:
        if hook not in known:
            raise ConfigError(f"{source}: hooks: unknown hook {hook!r}")
    if manifest.hook("exec").retries:
        raise ConfigError(f"{source}: hooks.exec: retries must be 0 (not idempotent)")
    if manifest.has("put_file") != manifest.has("get_file"):
        raise ConfigError(f"{source}: put_file and get_file go together")
    if manifest.has("pause") != manifest.has("resume"):
        raise ConfigError(f"{source}: pause and resume go together")
    for key, spec in manifest.config.items():
        if spec.default is not None and not _type_ok(spec.default, spec.type):
            raise ConfigError(f"{source}: config.{key}: default is not {spec.type}")
    return manifest
