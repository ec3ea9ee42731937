"""Manifests, config resolution, entry-point discovery."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import yaml

from extensions import (
    CommandResult,
    ConfigError,
    ExtensionError,
    ExtensionRegistry,
    RuntimeInfo,
    StepContext,
)
from extensions.manifest import load_manifest, manifest_from_dict

MINIMAL = {
    "name": "demo",
    "version": "1.0",
    "entry_point": "extensions.saas_stub:SaasStub",
    "capabilities": ["provision", "wait_ready", "teardown"],
    "config": {
        "latency_ms": {"type": "int", "default": 5, "env": "DEMO_LATENCY"},
        "flag": {"type": "bool", "default": False, "env": "DEMO_FLAG"},
    },
}


def test_shipped_saas_stub_manifest() -> None:
    registry = ExtensionRegistry.discover(RuntimeInfo(Path("/nonexistent")), entry_points=False)
    manifest = registry.manifest("saas-stub")
    assert manifest.hook("teardown").retries == 3
    assert manifest.resolve_config({}, environ={})["latency_ms"] == 0


def test_config_precedence_default_profile_env() -> None:
    manifest = manifest_from_dict(MINIMAL, "test")
    assert manifest.resolve_config({}, environ={})["latency_ms"] == 5
    assert manifest.resolve_config({"latency_ms": 7}, environ={})["latency_ms"] == 7
    resolved = manifest.resolve_config(
        {"latency_ms": 7}, environ={"DEMO_LATENCY": "9", "DEMO_FLAG": "yes"}
    )
    assert resolved == {"latency_ms": 9, "flag": True}


@pytest.mark.parametrize(
    ("overrides", "environ", "message"),
    [
        ({"nope": 1}, {}, "unknown config field 'nope'"),
        ({"latency_ms": "fast"}, {}, "'latency_ms' must be int, got str"),
        ({"latency_ms": True}, {}, "'latency_ms' must be int, got bool"),
        ({}, {"DEMO_LATENCY": "soon"}, "DEMO_LATENCY for 'latency_ms' must be int"),
        ({}, {"DEMO_FLAG": "perhaps"}, "DEMO_FLAG for 'flag' must be bool"),
    ],
)
def test_bad_config_names_the_field(
    overrides: dict[str, object], environ: dict[str, str], message: str
) -> None:
    manifest = manifest_from_dict(MINIMAL, "test")
    with pytest.raises(ConfigError, match=message):
        manifest.resolve_config(overrides, environ=environ)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "Bad Name"}, "name 'Bad Name' must match"),
        ({"capabilities": ["provision", "wait_ready"]}, "capability 'teardown' is required"),
        ({"capabilities": ["provision", "wait_ready", "teardown", "fly"]}, "unknown capability"),
        ({"hooks": {"launch": {"timeout": 1}}}, "unknown hook 'launch'"),
        ({"hooks": {"exec": {"retries": 1}}}, "exec: retries must be 0"),
        ({"hooks": {"run_command": {"retries": 1}}}, "exec: retries must be 0"),  # old name
        (
            {"capabilities": ["provision", "wait_ready", "teardown", "put_file"]},
            "put_file and get_file go together",
        ),
        ({"surprise": 1}, "unknown field `surprise`"),
        ({"config": {"x": {"type": "int", "default": "one"}}}, "config.x: default is not int"),
    ],
)
def test_bad_manifests(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        manifest_from_dict({**MINIMAL, **change}, "ext.demo.yaml")


def test_manifest_from_extra_dir_and_bad_entry_point(tmp_path: Path) -> None:
    (tmp_path / "ext.demo.yaml").write_text(
        yaml.safe_dump({**MINIMAL, "entry_point": "no_such_module:Thing"})
    )
    registry = ExtensionRegistry.discover(RuntimeInfo(tmp_path), [tmp_path], entry_points=False)
    assert "demo" in registry.names()
    with pytest.raises(ConfigError, match="cannot load entry_point 'no_such_module:Thing'"):
        registry.get("demo")
    assert load_manifest(tmp_path / "ext.demo.yaml").source == "ext.demo.yaml"


def test_duplicate_extension_names_refused(tmp_path: Path) -> None:
    (tmp_path / "ext.saas-stub.yaml").write_text(yaml.safe_dump({**MINIMAL, "name": "saas-stub"}))
    with pytest.raises(ConfigError, match="declared twice"):
        ExtensionRegistry.discover(RuntimeInfo(tmp_path), [tmp_path], entry_points=False)


def test_third_party_extension_from_entry_point_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real installed distribution (dist-info on sys.path) registering our group."""
    pkg = tmp_path / "acme_ext"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from extensions.saas_stub import SaasStub\n"
        f"MANIFEST = {dict(MINIMAL, name='acme', entry_point='acme_ext:SaasStub')!r}\n"
    )
    dist = tmp_path / "acme_ext-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-ext\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[sandboxer.extensions]\nacme = acme_ext:MANIFEST\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = ExtensionRegistry.discover(RuntimeInfo(tmp_path))
    assert "acme" in registry.names()
    loaded = registry.get("acme")
    assert loaded.manifest.source == "entry point acme"
    assert callable(loaded.adapter.provision)
    sys.modules.pop("acme_ext", None)


def test_run_command_is_read_as_exec() -> None:
    """A third-party manifest written before the rename still declares `exec`."""
    old = {
        **MINIMAL,
        "capabilities": ["provision", "wait_ready", "teardown", "run_command"],
        "hooks": {"run_command": {"timeout": 42}},
    }
    manifest = manifest_from_dict(old, "test")
    assert manifest.has("exec") and not manifest.has("run_command")
    assert manifest.hook("exec").timeout == 42


class OldStyle:
    """An adapter written before the rename: `run_command`, no `exec`."""

    def __init__(self, config: dict[str, object], runtime: RuntimeInfo) -> None:
        self.calls: list[list[str]] = []

    async def provision(self, ctx: StepContext) -> dict[str, str]:
        return {}

    async def wait_ready(self, ctx: StepContext, handle: dict[str, str]) -> list[str]:
        return ["it"]

    async def teardown(self, ctx: StepContext, handle: dict[str, str] | None) -> None:
        return None

    async def run_command(
        self, ctx: StepContext, handle: dict[str, str], argv: list[str], **_: object
    ) -> CommandResult:
        self.calls.append(list(argv))
        return CommandResult(0, "said\n", "", 0.0)


async def test_an_adapter_with_only_run_command_gets_it_used_as_exec(tmp_path: Path) -> None:
    old = {
        **MINIMAL,
        "entry_point": f"{__name__}:OldStyle",
        "capabilities": ["provision", "wait_ready", "teardown", "run_command"],
    }
    registry = ExtensionRegistry(RuntimeInfo(tmp_path), [manifest_from_dict(old, "test")])
    adapter = registry.get("demo").adapter
    seen: list[tuple[str, bytes]] = []

    async def collect(stream: str, data: bytes) -> None:
        seen.append((stream, data))

    ctx = StepContext("sbx-1", "p", {}, {})
    result = await adapter.exec(ctx, {}, ["echo", "said"], on_output=collect)  # type: ignore[attr-defined]
    assert result.stdout == "said\n" and result.stdout_bytes == 5
    assert result.stdout_sha256 == hashlib.sha256(b"said\n").hexdigest()
    assert seen == [("stdout", b"said\n")]
    assert adapter.calls == [["echo", "said"]]  # type: ignore[attr-defined]


# ---- compose: pause/resume and activity (pure helpers) ------------------------------


def test_the_compose_manifests_declare_pause_resume_and_activity() -> None:
    registry = ExtensionRegistry.discover(RuntimeInfo(Path("/nonexistent")), entry_points=False)
    for name in ("compose-local", "compose-ssh"):
        manifest = registry.manifest(name)
        for capability in ("pause", "resume", "activity"):
            assert manifest.has(capability), (name, capability)
        # resume runs the engine step (pause_timeout) and then the readiness wait
        fields = manifest.config
        budget = float(fields["pause_timeout"].default) + float(fields["resume_timeout"].default)
        assert manifest.hook("resume").timeout > budget
        assert manifest.hook("pause").timeout > float(fields["pause_timeout"].default)
        assert manifest.hook("activity").timeout > float(fields["activity_timeout"].default)


def test_pause_and_resume_argv_pass_every_value_as_an_argument() -> None:
    from extensions.compose import pause_argv, resume_argv

    engine = ["env", "CONTAINERS_CONF=/x y/c.conf", "podman"]
    argv = pause_argv(engine, "sandboxer-a-b", "stop", 3)
    assert argv[:2] == ["sh", "-c"] and argv[3:] == ["sh", "stop", "3", "sandboxer-a-b", *engine]
    assert resume_argv(engine, "sandboxer-a", "pause")[3:] == [
        "sh",
        "pause",
        "sandboxer-a",
        *engine,
    ]
    with pytest.raises(ExtensionError, match="mode"):
        pause_argv(engine, "sandboxer-a", "freeze; rm -rf /", 1)


def test_parse_stats_podman_and_docker_lines() -> None:
    from extensions.compose import parse_size, parse_stats

    podman = (
        "sandboxer-x_web_1 39327592 586 1360\n"
        "sandboxer-x_worker_1 28953534 0 0\n"
        "garbage line\n"
        "Error: something\n"
    )
    assert parse_stats(podman, "sandboxer-x", ["web", "worker"], 1) == {
        "web.cpu": 39327592,
        "web.net": 1946,
        "worker.cpu": 28953534,
        "worker.net": 0,
    }
    assert parse_stats(podman, "sandboxer-x", ["web", "worker"], 1024)["web.net"] == 1
    # docker compose v2 names; docker prints no CPU time and rounded sizes
    docker = "sandboxer-x-web-1 1.5kB / 2MB\nsandboxer-x-db-1 0B / 0B\n"
    assert parse_stats(docker, "sandboxer-x", ["web", "db"], 1) == {
        "web.net": 1500 + 2_000_000,
        "db.net": 0,
    }
    # an unknown container keeps its name; two of one service are told apart
    scaled = "sandboxer-x_web_1 1 1 1\nsandboxer-x_web_2 2 2 2\nother 3 3 3\n"
    assert parse_stats(scaled, "sandboxer-x", ["web"], 1) == {
        "sandboxer-x_web_1.cpu": 1,
        "sandboxer-x_web_1.net": 2,
        "sandboxer-x_web_2.cpu": 2,
        "sandboxer-x_web_2.net": 4,
        "other.cpu": 3,
        "other.net": 6,
    }
    assert parse_stats("", "sandboxer-x", ["web"]) == {}
    assert parse_size("3.2MiB") == int(3.2 * 2**20) and parse_size("12") is None
