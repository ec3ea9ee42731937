"""The reference validator and `sandboxer e2e`: real NATS, sshd, podman-compose."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from nats.aio.client import Client as NatsClient

from sandboxer.store.nats_server import EmbeddedNats
from tests.conftest import StartService
from tests.helpers import create, event_types, wait_state
from tests.infra import Podman
from tests.paths import DATA

pytestmark = pytest.mark.timeout(600)
Factory = Callable[..., dict[str, str]]


@pytest.fixture
def validated_env(
    compose_env: Factory, tmp_path: Path, nats_server: EmbeddedNats
) -> dict[str, str]:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "profile.compose-validated.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "profile.compose-validated",
                "extension": "compose-ssh",
                "ttl_seconds": 600,
                "inputs": {"repo": {"required": True}, "test_command": {}},
                "validation": {
                    "health_checks": [{"service": "web", "port": 8080, "path": "/index.html"}],
                    "test_command": "test -f site/index.html",
                },
            }
        )
    )
    return {
        **compose_env(),
        "SANDBOXER_PROFILES_PATH": str(profiles),
        "SANDBOXER_NATS_URL": nats_server.service_url,
    }


class ValidatorProcess:
    def __init__(self, env: dict[str, str], ack_wait: float = 30.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sandboxer", "validate", "serve", "--ack-wait", str(ack_wait)],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # printed once subscribed
        assert "subscribed" in line, line

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(30)


@pytest.fixture
def validator(validated_env: dict[str, str]) -> Iterator[ValidatorProcess]:
    running = ValidatorProcess(validated_env)
    yield running
    running.stop()


def e2e(url: str, repo: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "sandboxer",
            "--url",
            url,
            "e2e",
            "--profile",
            "profile.compose-validated",
            "--input",
            f"repo={repo}",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def leftovers(podman: Podman, tmp_path: Path, run: subprocess.CompletedProcess[str]) -> list[str]:
    """What the e2e run's sandbox left: its directory, containers, network."""
    sandbox_id = run.stderr.split("e2e: created ", 1)[1].split()[0]
    root = tmp_path / "remote0"
    dirs = [p.name for p in root.iterdir()] if root.exists() else []
    project = f"sandboxer-{sandbox_id}"
    left = [d for d in dirs if d == sandbox_id]
    left += [c["Names"][0] for c in podman.containers(project)]
    left += [n for n in podman.networks() if n.startswith(project)]
    return left


async def test_e2e_passes_and_fails_with_the_test_exit_code(
    start_service: StartService,
    validated_env: dict[str, str],
    validator: ValidatorProcess,
    compose_repo: Path,
    podman: Podman,
    tmp_path: Path,
) -> None:
    svc = await start_service(**validated_env)
    passed = await asyncio.to_thread(e2e, svc.url, compose_repo)
    assert passed.returncode == 0, passed.stderr + passed.stdout
    assert "validation passed" in passed.stderr
    assert leftovers(podman, tmp_path, passed) == []

    failed = await asyncio.to_thread(
        e2e, svc.url, compose_repo, "--test-command", "echo 3 tests failed; exit 7"
    )
    assert failed.returncode == 7, failed.stderr
    assert "3 tests failed" in failed.stdout
    assert "validation failed (exit code 7)" in failed.stderr
    assert leftovers(podman, tmp_path, failed) == []


async def test_failing_health_check_is_reported(
    start_service: StartService,
    validated_env: dict[str, str],
    validator: ValidatorProcess,
    compose_repo: Path,
) -> None:
    (compose_repo / "site" / "index.html").unlink()
    svc = await start_service(**validated_env)
    made = await create(
        svc.http, svc.url, profile="profile.compose-validated", inputs={"repo": str(compose_repo)}
    )
    async with asyncio.timeout(120):
        view = await wait_state(svc.http, svc.url, made["id"], {"ready"}, timeout=120)
        while view["validation"] not in ("passed", "failed"):
            async with svc.http.get(
                f"{svc.url}/v1/sandboxes/{made['id']}",
                params={"wait": "10", "after_seq": str(view["last_seq"])},
            ) as resp:
                view = await resp.json()
    assert view["validation"] == "failed"
    async with svc.http.delete(f"{svc.url}/v1/sandboxes/{made['id']}"):
        pass
    await wait_state(svc.http, svc.url, made["id"], {"destroyed"}, timeout=120)


async def test_validator_killed_mid_test_gives_exactly_one_result(
    start_service: StartService,
    validated_env: dict[str, str],
    compose_repo: Path,
    nc: NatsClient,
) -> None:
    svc = await start_service(**validated_env)
    first = ValidatorProcess(validated_env, ack_wait=2.0)
    try:
        made = await create(
            svc.http,
            svc.url,
            profile="profile.compose-validated",
            inputs={"repo": str(compose_repo), "test_command": "sleep 4; echo slow suite ok"},
        )
        view = await wait_state(svc.http, svc.url, made["id"], {"ready"}, timeout=120)
        async with asyncio.timeout(60):
            while view["validation"] != "running":
                async with svc.http.get(
                    f"{svc.url}/v1/sandboxes/{made['id']}",
                    params={"wait": "10", "after_seq": str(view["last_seq"])},
                ) as resp:
                    view = await resp.json()
    finally:
        first.stop(signal.SIGKILL)
    second = ValidatorProcess(validated_env, ack_wait=2.0)
    try:
        async with asyncio.timeout(120):
            while view["validation"] not in ("passed", "failed"):
                async with svc.http.get(
                    f"{svc.url}/v1/sandboxes/{made['id']}",
                    params={"wait": "10", "after_seq": str(view["last_seq"])},
                ) as resp:
                    view = await resp.json()
        assert view["validation"] == "passed"
        assert "slow suite ok" in view["validation_output"]
        info = await nc.jetstream().stream_info(
            "SANDBOXER", subjects_filter=f"sandboxer.validation.{made['id']}.>"
        )
        subjects = info.state.subjects or {}
        finals = sum(
            n for s, n in subjects.items() if s.endswith((".ValidationPassed", ".ValidationFailed"))
        )
        assert finals == 1, subjects
    finally:
        assert second.stop() == 0
    async with svc.http.delete(f"{svc.url}/v1/sandboxes/{made['id']}"):
        pass
    await wait_state(svc.http, svc.url, made["id"], {"destroyed"}, timeout=120)


ACME = DATA / "acme_local"


@pytest.fixture
def acme_env(
    tmp_path: Path, nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """A third-party extension (tests/data/acme_local) from SANDBOXER_EXTENSIONS_PATH,
    once with run_command, the old name of exec (acme-local), and once without
    (acme-mute)."""
    folder = tmp_path / "third-party"
    folder.mkdir()
    for name, extra in (("acme-local", ["run_command"]), ("acme-mute", [])):
        manifest = {
            "name": name,
            "version": "1.0.0",
            "entry_point": "acme_local:LocalDirs",
            "capabilities": ["provision", "wait_ready", "teardown", *extra],
            # shared by the service and the validator (each has its own data dir)
            "config": {"root": {"type": "str", "default": str(tmp_path / "acme-dirs")}},
        }
        (folder / f"ext.{name}.yaml").write_text(yaml.safe_dump(manifest))
        profile = {
            "name": f"profile.{name}",
            "extension": name,
            "inputs": {"test_command": {}},
            "validation": {"test_command": "test -f marker"},
        }
        (folder / f"profile.{name}.yaml").write_text(yaml.safe_dump(profile))
    monkeypatch.syspath_prepend(str(ACME))  # the service runs in this process
    return {
        "SANDBOXER_EXTENSIONS_PATH": str(folder),
        "SANDBOXER_PROFILES_PATH": str(folder),
        "SANDBOXER_NATS_URL": nats_server.service_url,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ACME), os.environ.get("PYTHONPATH")) if p),
    }


async def validated(svc: Any, profile: str, **inputs: str) -> dict[str, Any]:
    made = await create(svc.http, svc.url, profile=profile, inputs=inputs)
    view = await wait_state(svc.http, svc.url, made["id"], {"ready"}, timeout=60)
    async with asyncio.timeout(60):
        while view["validation"] not in ("passed", "failed"):
            async with svc.http.get(
                f"{svc.url}/v1/sandboxes/{made['id']}",
                params={"wait": "10", "after_seq": str(view["last_seq"])},
            ) as resp:
                view = await resp.json()
    async with svc.http.delete(f"{svc.url}/v1/sandboxes/{made['id']}"):
        pass
    await wait_state(svc.http, svc.url, made["id"], {"destroyed"}, timeout=60)
    return view


async def test_a_third_party_extension_is_validated_through_its_old_run_command(
    start_service: StartService, acme_env: dict[str, str]
) -> None:
    svc = await start_service(**acme_env)
    running = ValidatorProcess(acme_env)
    try:
        passed = await validated(svc, "profile.acme-local")  # `marker`: in its directory
        assert passed["validation"] == "passed", passed["validation_reason"]
        failed = await validated(
            svc,
            "profile.acme-local",
            test_command="test -f marker && echo 3 tests failed; exit 7",
        )
        assert failed["validation"] == "failed"
        assert failed["validation_exit_code"] == 7
        assert "3 tests failed" in failed["validation_output"]
    finally:
        assert running.stop() == 0


async def test_an_extension_without_exec_fails_validation_naming_it(
    start_service: StartService, acme_env: dict[str, str]
) -> None:
    svc = await start_service(**acme_env)
    running = ValidatorProcess(acme_env)
    try:
        view = await validated(svc, "profile.acme-mute")
        assert view["validation"] == "failed"
        assert "lacks the exec capability" in view["validation_reason"]
        assert "acme-mute" in view["validation_reason"]
    finally:
        assert running.stop() == 0  # a missing capability is a result, not a crash


async def test_the_api_names_a_capability_the_extension_lacks(
    start_service: StartService, acme_env: dict[str, str]
) -> None:
    """acme-mute has no exec, files or logs: each is a 409 naming what is missing, and
    nothing is recorded; acme-local's old run_command serves exec through the API."""
    svc = await start_service(**acme_env)
    mute = await create(svc.http, svc.url, profile="profile.acme-mute")
    await wait_state(svc.http, svc.url, mute["id"], {"ready"}, timeout=60)
    url = f"{svc.url}/v1/sandboxes/{mute['id']}"
    before = await event_types(svc.http, svc.url, mute["id"])
    calls = [
        ("POST", "/exec", {"json": {"argv": ["true"]}}, "exec"),
        ("PUT", "/files", {"params": {"path": "/x"}, "data": b"x"}, "put_file"),
        ("GET", "/files", {"params": {"path": "/x"}}, "get_file"),
        ("GET", "/logs", {}, "logs"),
    ]
    for method, path, kwargs, capability in calls:
        async with svc.http.request(method, url + path, **kwargs) as resp:  # type: ignore[arg-type]
            answer = await resp.json()
            assert resp.status == 409, answer
        assert answer["error"]["code"] == "not_capable"
        assert capability in answer["error"]["message"]
    assert await event_types(svc.http, svc.url, mute["id"]) == before

    local = await create(svc.http, svc.url, profile="profile.acme-local")
    await wait_state(svc.http, svc.url, local["id"], {"ready"}, timeout=60)
    async with svc.http.post(
        f"{svc.url}/v1/sandboxes/{local['id']}/exec", json={"shell": "echo old name; exit 4"}
    ) as resp:
        frames = [json.loads(line) async for line in resp.content if line.strip()]
    assert frames[-1]["exit_code"] == 4, frames[-1]["message"]
    assert "".join(f["data"] for f in frames if f["type"] == "stdout") == "old name\n"
