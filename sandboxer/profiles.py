"""Profiles: named presets for `create` (extension, input schema, config, TTL)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import yaml

from events import CheckpointPolicy, UsePolicy
from profiles import SHIPPED_DIR
from sandboxer.errors import InvalidInput

PROFILE_NAME_RE = re.compile(r"^profile\.[a-z0-9][a-z0-9-]{0,62}$")
INPUT_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
MAX_INPUT_LENGTH = 4096
MAX_POOL_SIZE = 100


class ProfileError(InvalidInput, ValueError):
    """A bad profile file, or a create request that does not fit its profile."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InputSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    description: str = ""
    required: bool = False
    default: str | None = None
    secret: bool = False
    choices: list[str] | None = None
    path: bool = False  # a local directory the extension reads (`repo` always is one)


ADMISSION_RULES = ("always", "credits_cover_estimate")


class RouteSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A route candidate: tried in order; `when` is its admission rule."""

    extension: str
    when: str = "always"
    config: dict[str, Any] = {}


class HealthCheck(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An HTTP GET the validator makes through the extension's `run_command`: `url`
    from the sandbox's host, or `service` + `port` + `path` from inside that service."""

    url: str | None = None
    service: str | None = None
    port: int | None = None
    path: str = "/"


class ValidationSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    health_checks: list[HealthCheck] = []
    test_command: str | None = None  # an input `test_command` overrides it
    timeout_seconds: float = 1800.0


class PoolSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A warm pool: `size` members kept ready with the profile's default inputs (on
    the operator account `pool`); one older than `max_age_seconds` is recycled."""

    size: int
    max_age_seconds: int = 3600


ON_IDLE = ("destroy", "pause")
PAUSE_MODES = ("pause", "stop")


class Profile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    extension: str = ""
    route: list[RouteSpec] = []
    description: str = ""
    ttl_seconds: int = 3600
    max_ttl_seconds: int = 7 * 24 * 3600
    inputs: dict[str, InputSpec] = {}
    config: dict[str, Any] = {}
    checkpoint: CheckpointPolicy | None = None
    validation: ValidationSpec | None = None
    pool: PoolSpec | None = None
    idle_timeout_seconds: int | None = None
    on_idle: str = "destroy"
    pause_mode: str = "pause"

    def use_policy(self) -> UsePolicy:
        return UsePolicy(
            idle_timeout_seconds=self.idle_timeout_seconds,
            on_idle=self.on_idle,
            pause_mode=self.pause_mode,
        )

    def candidates(self) -> list[RouteSpec]:
        """The route, or the one extension with the profile's config."""
        if self.route:
            return list(self.route)
        return [RouteSpec(extension=self.extension, config=dict(self.config))]

    def path_inputs(self) -> list[str]:
        """Inputs naming a directory on this machine: confined to the repo roots."""
        return sorted(k for k, spec in self.inputs.items() if spec.path or k == "repo")

    def secret_inputs(self) -> list[str]:
        return sorted(k for k, spec in self.inputs.items() if spec.secret)

    def resolve_inputs(self, given: Mapping[str, str]) -> dict[str, str]:
        """Check given inputs against the schema and fill in defaults."""
        for key, value in given.items():
            if key not in self.inputs:
                known = ", ".join(sorted(self.inputs)) or "none"
                raise ProfileError(
                    f"{self.name} has no input {key!r} (inputs: {known})", f"inputs.{key}"
                )
            if len(value) > MAX_INPUT_LENGTH:
                raise ProfileError(
                    f"input {key!r} is longer than {MAX_INPUT_LENGTH} characters",
                    f"inputs.{key}",
                )
        resolved: dict[str, str] = {}
        for key, spec in self.inputs.items():
            if key in given:
                value = given[key]
            elif spec.default is not None:
                value = spec.default
            elif spec.required:
                raise ProfileError(f"{self.name} requires input {key!r}", f"inputs.{key}")
            else:
                continue
            if spec.choices is not None and value not in spec.choices:
                raise ProfileError(
                    f"input {key!r} must be one of {', '.join(spec.choices)}; got {value!r}",
                    f"inputs.{key}",
                )
            resolved[key] = value
        return resolved

    def resolve_ttl(self, ttl_seconds: int | None) -> int:
        if ttl_seconds is None:
            return self.ttl_seconds
        if ttl_seconds < 1 or ttl_seconds > self.max_ttl_seconds:
            raise ProfileError(
                f"ttl_seconds must be between 1 and {self.max_ttl_seconds} for {self.name}",
                "ttl_seconds",
            )
        return ttl_seconds


def load_profile(path: Path) -> Profile:
    try:
        raw = yaml.safe_load(path.read_text())
        profile = msgspec.convert(raw, Profile)
    except (yaml.YAMLError, msgspec.ValidationError) as exc:
        raise ProfileError(f"{path.name}: {exc}") from exc
    expected = path.name.removesuffix(".yaml")
    if profile.name != expected:
        raise ProfileError(f"{path.name}: name must be {expected!r}, is {profile.name!r}")
    if not PROFILE_NAME_RE.fullmatch(profile.name):
        raise ProfileError(f"{path.name}: name must match {PROFILE_NAME_RE.pattern}")
    if bool(profile.extension) == bool(profile.route):
        raise ProfileError(f"{path.name}: give either 'extension' or 'route', not both or none")
    for index, spec in enumerate(profile.route):
        if spec.when not in ADMISSION_RULES:
            raise ProfileError(
                f"{path.name}: route[{index}].when must be one of "
                f"{', '.join(ADMISSION_RULES)}, got {spec.when!r}"
            )
    if profile.on_idle not in ON_IDLE:
        raise ProfileError(
            f"{path.name}: on_idle must be one of {', '.join(ON_IDLE)}, got {profile.on_idle!r}"
        )
    if profile.pause_mode not in PAUSE_MODES:
        raise ProfileError(
            f"{path.name}: pause_mode must be one of {', '.join(PAUSE_MODES)}, "
            f"got {profile.pause_mode!r}"
        )
    if profile.idle_timeout_seconds is not None and not (
        4 <= profile.idle_timeout_seconds <= profile.max_ttl_seconds
    ):
        raise ProfileError(
            f"{path.name}: idle_timeout_seconds must be between 4 and max_ttl_seconds "
            f"({profile.max_ttl_seconds})"
        )
    if profile.pool is not None:
        if not 0 <= profile.pool.size <= MAX_POOL_SIZE:
            raise ProfileError(f"{path.name}: pool.size must be between 0 and {MAX_POOL_SIZE}")
        if profile.pool.max_age_seconds < 10:
            raise ProfileError(f"{path.name}: pool.max_age_seconds must be at least 10")
    for key in profile.inputs:
        if not INPUT_NAME_RE.fullmatch(key):
            raise ProfileError(
                f"{path.name}: input name {key!r} must match {INPUT_NAME_RE.pattern}"
            )
    return profile


class ProfileCatalog:
    def __init__(self, profiles: Iterable[Profile]) -> None:
        self.profiles = {p.name: p for p in profiles}

    @classmethod
    def discover(cls, extra_dirs: Iterable[Path] = ()) -> ProfileCatalog:
        found: dict[str, Profile] = {}
        for folder in (SHIPPED_DIR, *extra_dirs):
            for path in sorted(folder.glob("profile.*.yaml")):
                profile = load_profile(path)
                found[profile.name] = profile  # later folders override shipped presets
        return cls(found.values())

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ProfileCatalog:
        raw = environ.get("SANDBOXER_PROFILES_PATH", "")
        return cls.discover([Path(p) for p in raw.split(os.pathsep) if p])

    def get(self, name: str) -> Profile:
        profile = self.profiles.get(name)
        if profile is None:
            known = ", ".join(sorted(self.profiles)) or "none"
            raise ProfileError(f"unknown profile {name!r} (profiles: {known})", "profile")
        return profile

    def names(self) -> list[str]:
        return sorted(self.profiles)
