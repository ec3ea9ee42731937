"""The extension SDK and the shipped adapters. See docs/extension-sdk.md."""

from extensions.manifest import ConfigError, HookPolicy, Manifest, load_manifest
from extensions.registry import ENTRY_POINT_GROUP, ExtensionRegistry, LoadedExtension
from extensions.sdk import (
    Cost,
    Extension,
    ExtensionError,
    Handle,
    Metered,
    NoCapacity,
    PathRefused,
    Placement,
    Placing,
    ProgressFn,
    Reconciling,
    Resource,
    RuntimeInfo,
    Snapshotting,
    StepContext,
    confine_path,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "ConfigError",
    "Cost",
    "Extension",
    "ExtensionError",
    "ExtensionRegistry",
    "Handle",
    "HookPolicy",
    "LoadedExtension",
    "Manifest",
    "Metered",
    "NoCapacity",
    "PathRefused",
    "Placement",
    "Placing",
    "ProgressFn",
    "Reconciling",
    "Resource",
    "RuntimeInfo",
    "Snapshotting",
    "StepContext",
    "confine_path",
    "load_manifest",
]
