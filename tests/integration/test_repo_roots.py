"""The `repo` input is confined to the operator's repo roots (SANDBOXER_REPO_ROOTS).

Outside testing, with a VM configured, a member had a root-only directory, `/etc`
through a symlink and `../../..` copied onto the VM. Here each is sent by a member to
a real `sandboxer serve` over HTTP: each must be a 400 naming `inputs.repo`, with
nothing recorded and nothing on the VM; a repo under a root is copied, without the
links in it that lead out.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from sandboxer.config import SettingsError, repo_roots_from_env
from tests.infra import ServeProcess, SSHHost, free_port

MEMBER = "member-token-0123456789abcdef"
TOKENS = yaml.safe_dump([{"name": "acme-ci", "token": MEMBER, "account": "acme"}])
AUTH = {"Authorization": f"Bearer {MEMBER}"}


class Rig:
    def __init__(self, tmp: Path, serve: ServeProcess, http: aiohttp.ClientSession) -> None:
        self.tmp = tmp
        self.serve = serve
        self.http = http
        self.vm_build = tmp / "vm" / "build"

    async def create(self, repo: str) -> tuple[int, dict[str, Any]]:
        body = {"profile": "profile.vm-repo", "inputs": {"vm": "vm1", "repo": repo}}
        async with self.http.post(
            f"{self.serve.url}/v1/sandboxes", json=body, headers=AUTH
        ) as resp:
            return resp.status, await resp.json()

    async def last_seq(self) -> int:
        async with self.http.get(f"{self.serve.url}/healthz") as resp:
            return int((await resp.json())["last_seq"])

    def on_vm(self) -> list[str]:
        return sorted(str(p.relative_to(self.vm_build)) for p in self.vm_build.rglob("*"))


def vm_environment(tmp: Path, host: SSHHost, roots: str | None) -> dict[str, str]:
    (tmp / "vm" / "build").mkdir(parents=True)
    vms = [
        {
            "name": "vm1",
            "host": "127.0.0.1",
            "port": host.port,
            "user": getpass.getuser(),
            "identity_file": str(host.client_key),
            "known_hosts": str(host.known_hosts),
            "root": str(tmp / "vm" / "build"),
            "capacity": 8,
        }
    ]
    profiles = tmp / "profiles"
    profiles.mkdir()
    (profiles / "profile.vm-repo.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "profile.vm-repo",
                "extension": "vm-packer",
                "ttl_seconds": 600,
                "inputs": {"vm": {"required": True}, "repo": {}},
                "config": {"tools": ["rsync --version"]},
            }
        )
    )
    env = {
        "SANDBOXER_VM_PACKER_VMS": json.dumps(vms),
        "SANDBOXER_PROFILES_PATH": str(profiles),
        "SANDBOXER_TOKENS": TOKENS,
        "SANDBOXER_RECONCILE": "off",
    }
    if roots is not None:
        env["SANDBOXER_REPO_ROOTS"] = roots
    return env


async def start(tmp: Path, host: SSHHost, roots: str | None) -> AsyncIterator[Rig]:
    serve = ServeProcess(tmp / "data", free_port(), **vm_environment(tmp, host, roots))
    async with aiohttp.ClientSession() as http:
        try:
            await serve.wait_healthy(http)
            yield Rig(tmp, serve, http)
        finally:
            serve.kill()


@pytest.fixture
async def rig(tmp_path: Path, ssh_hosts: list[SSHHost]) -> AsyncIterator[Rig]:
    roots = tmp_path / "repos"
    roots.mkdir()
    async for made in start(tmp_path, ssh_hosts[0], str(roots)):
        yield made


def hostile_paths(tmp: Path) -> dict[str, str]:
    """Each a way out of <tmp>/repos, as outside testing tried them."""
    repos = tmp / "repos"
    private = tmp / "private"
    private.mkdir(mode=0o700)
    (private / "secret.txt").write_text("not for members\n")
    (repos / "etc-link").symlink_to("/etc")
    (repos / "private-link").symlink_to(private)
    (repos / "looped").symlink_to(repos / "looped")
    return {
        "outside": str(private),
        "etc": "/etc",
        "symlink to /etc": str(repos / "etc-link"),
        "symlink out of the roots": str(repos / "private-link"),
        "dot-dot": str(repos / ".." / ".." / ".."),
        "relative dot-dot": "../../..",
        "root": "/",
        "a file": "/etc/hostname",
        "missing": str(repos / "nowhere"),
        "link loop": str(repos / "looped"),
        "prefix of a root": str(tmp / "repos-evil"),
    }


async def test_paths_out_of_the_repo_roots_are_refused_before_anything_reads_them(
    rig: Rig,
) -> None:
    (rig.tmp / "repos-evil").mkdir()
    before = await rig.last_seq()
    for why, path in hostile_paths(rig.tmp).items():
        status, error = await rig.create(path)
        assert status == 400, (why, error)
        assert error["error"]["field"] == "inputs.repo", (why, error)
        assert "repo" in error["error"]["message"], (why, error)
    assert await rig.last_seq() == before  # nothing recorded
    assert rig.on_vm() == []  # nothing copied


async def test_a_repo_under_a_root_is_copied_without_links_that_lead_out(rig: Rig) -> None:
    repo = rig.tmp / "repos" / "app"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "main.hs").write_text("main = pure ()\n")
    (repo / "shadow").symlink_to("/etc/shadow")
    (repo / "up").symlink_to("../..")
    (repo / "inside").symlink_to("src/main.hs")
    status, made = await rig.create(str(repo))
    assert status == 202, made
    sandbox_id = made["id"]
    view, seq = made, 0
    async with asyncio.timeout(60):
        while view["state"] not in ("ready", "failed", "destroyed", "rejected"):
            async with rig.http.get(
                f"{rig.serve.url}/v1/sandboxes/{sandbox_id}",
                params={"wait": "10", "after_seq": str(seq)},
                headers=AUTH,
            ) as resp:
                view = await resp.json()
            seq = view["last_seq"]
    assert view["state"] == "ready", view
    workspace = sandbox_id
    copied = rig.on_vm()
    assert f"{workspace}/src/main.hs" in copied
    assert f"{workspace}/inside" in copied  # a link inside the repo stays a link
    assert f"{workspace}/shadow" not in copied and f"{workspace}/up" not in copied


async def test_with_tokens_and_no_roots_every_repo_is_refused(
    tmp_path: Path, ssh_hosts: list[SSHHost]
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    async for rig in start(tmp_path, ssh_hosts[0], None):
        status, error = await rig.create(str(repo))
        assert status == 400, error
        assert error["error"]["field"] == "inputs.repo"
        assert "SANDBOXER_REPO_ROOTS" in error["error"]["message"]


def test_default_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert repo_roots_from_env({}) == (tmp_path.resolve(),)
    assert repo_roots_from_env({"SANDBOXER_TOKENS": "- {}"}) == ()
    assert repo_roots_from_env({"SANDBOXER_TOKENS_FILE": "/x"}) == ()
    other = tmp_path / "b"
    other.mkdir()
    assert repo_roots_from_env({"SANDBOXER_REPO_ROOTS": f"{tmp_path}{os.pathsep}{other}"}) == (
        tmp_path.resolve(),
        other.resolve(),
    )
    for bad, says in (("relative/dir", "not an absolute path"), ("/nonexistent", "not a dir")):
        with pytest.raises(SettingsError, match=says):
            repo_roots_from_env({"SANDBOXER_REPO_ROOTS": bad})
