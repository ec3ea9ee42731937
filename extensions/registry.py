"""Finds extensions: manifests shipped beside this module, extra folders, entry points."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extensions.manifest import ConfigError, Manifest, load_manifest, manifest_from_dict
from extensions.sdk import (
    OPTIONAL_HOOKS,
    REQUIRED_HOOKS,
    CommandResult,
    Extension,
    Handle,
    OutputFn,
    RuntimeInfo,
    StepContext,
)

ENTRY_POINT_GROUP = "sandboxer.extensions"
SHIPPED_DIR = Path(__file__).resolve().parent


@dataclass
class LoadedExtension:
    manifest: Manifest
    adapter: Extension
    base_config: dict[str, Any]
    environ: Mapping[str, str] | None = None

    @property
    def name(self) -> str:
        return self.manifest.name

    def config_for(self, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
        return self.manifest.resolve_config(overrides, self.environ)


class ExtensionRegistry:
    """Manifests are read eagerly (bad ones fail start-up); adapters are built on first use."""

    def __init__(
        self,
        runtime: RuntimeInfo,
        manifests: Iterable[Manifest],
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.runtime = runtime
        self.environ = environ  # None: the process environment
        self.manifests: dict[str, Manifest] = {}
        for manifest in manifests:
            if manifest.name in self.manifests:
                raise ConfigError(
                    f"extension {manifest.name!r} is declared twice "
                    f"({self.manifests[manifest.name].source}, {manifest.source})"
                )
            self.manifests[manifest.name] = manifest
        self._loaded: dict[str, LoadedExtension] = {}

    @classmethod
    def discover(
        cls,
        runtime: RuntimeInfo,
        extra_dirs: Iterable[Path] = (),
        entry_points: bool = True,
        environ: Mapping[str, str] | None = None,
    ) -> ExtensionRegistry:
        manifests: list[Manifest] = []
        for folder in (SHIPPED_DIR, *extra_dirs):
            for path in sorted(folder.glob("ext.*.yaml")):
                manifests.append(load_manifest(path))
        if entry_points:
            manifests.extend(_entry_point_manifests())
        return cls(runtime, manifests, environ)

    @classmethod
    def from_env(cls, runtime: RuntimeInfo, environ: Mapping[str, str]) -> ExtensionRegistry:
        raw = environ.get("SANDBOXER_EXTENSIONS_PATH", "")
        dirs = [Path(p) for p in raw.split(os.pathsep) if p]
        return cls.discover(runtime, dirs, environ=environ)

    def names(self) -> list[str]:
        return sorted(self.manifests)

    def manifest(self, name: str) -> Manifest:
        try:
            return self.manifests[name]
        except KeyError:
            raise ConfigError(f"unknown extension {name!r}") from None

    def resolve_config(self, name: str, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
        return self.manifest(name).resolve_config(overrides, self.environ)

    def get(self, name: str) -> LoadedExtension:
        loaded = self._loaded.get(name)
        if loaded is None:
            loaded = self._load(self.manifest(name))
            self._loaded[name] = loaded
        return loaded

    async def close(self) -> None:
        """Let adapters close what they hold open (SSH connections)."""
        for loaded in self._loaded.values():
            close = getattr(loaded.adapter, "close", None)
            if close is not None:
                await close()

    def _load(self, manifest: Manifest) -> LoadedExtension:
        factory = _import_object(manifest.entry_point, manifest.source)
        config = manifest.resolve_config(None, self.environ)
        adapter = factory(config, self.runtime)
        if not callable(getattr(adapter, "exec", None)) and callable(
            getattr(adapter, "run_command", None)
        ):
            adapter.exec = _exec_from_run_command(adapter.run_command)
        for hook in REQUIRED_HOOKS:
            if not callable(getattr(adapter, hook, None)):
                raise ConfigError(f"{manifest.source}: adapter has no {hook}()")
        for hook in OPTIONAL_HOOKS:
            if manifest.has(hook) and not callable(getattr(adapter, hook, None)):
                raise ConfigError(f"{manifest.source}: declares {hook} but does not implement it")
        return LoadedExtension(manifest, adapter, config, self.environ)


def _exec_from_run_command(run_command: Any) -> Any:
    """An older adapter's `run_command` used as `exec`. Its `on_output` was a plain
    function of text, so it is given none; what it kept is passed on at the end."""

    async def exec(
        ctx: StepContext,
        handle: Handle,
        argv: Sequence[str],
        *,
        service: str | None = None,
        workdir: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        on_output: OutputFn | None = None,
    ) -> CommandResult:
        result: CommandResult = await run_command(
            ctx, handle, argv, service=service, workdir=workdir, env=env, timeout=timeout
        )
        out, err = result.stdout.encode(), result.stderr.encode()
        if on_output is not None:
            for stream, data in (("stdout", out), ("stderr", err)):
                if data:
                    await on_output(stream, data)
        if result.stdout_bytes or result.stderr_bytes:
            return result
        return dataclasses.replace(
            result,
            stdout_bytes=len(out),
            stderr_bytes=len(err),
            stdout_sha256=hashlib.sha256(out).hexdigest(),
            stderr_sha256=hashlib.sha256(err).hexdigest(),
        )

    return exec


def _import_object(target: str, source: str) -> Any:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{source}: entry_point must be 'module:object', got {target!r}")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{source}: cannot load entry_point {target!r}: {exc}") from exc


def _entry_point_manifests() -> list[Manifest]:
    """Third-party packages register `name = "pkg.module:MANIFEST"` in our group.

    The object is a manifest mapping, or a path to an ext.<name>.yaml file.
    """
    found: list[Manifest] = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if isinstance(obj, (str, Path)):
            found.append(load_manifest(Path(obj)))
        else:
            found.append(manifest_from_dict(obj, source=f"entry point {ep.name}"))
    return found
