"""Hostile inputs through the HTTP API, for the compose-ssh and vm-packer profiles.

Real sshd hosts, real rsync, real podman-compose: each corpus value is sent as a
sandbox input (and as ids in paths). Each must end in a 400 naming the field, or a
sandbox that runs or fails without anything executing: the values carry canaries
(`touch <marker>`) that a shell interpreting them would run, and the hosts' trees
outside the sandbox roots must be the same before and after. docs/reliability.md
("Injection corpus") lists what is covered.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from extensions.compose_ssh import project_name
from tests.conftest import RunningService, StartService
from tests.helpers import destroy, wait_state
from tests.infra import Podman, SSHHost

pytestmark = pytest.mark.timeout(240)

CANARY = "sbx-canary-pwned"  # a relative name: where a stray shell ran, it lands in its cwd
SETTLED = {"failed", "rejected", "destroyed"}


def shell_corpus(marker: Path) -> list[str]:
    """Values a shell would act on: each one would create `marker` if interpreted."""
    m = str(marker)
    return [
        f"x; touch {m}",
        f"$(touch {m})",
        f"`touch {m}`",
        f"x | touch {m}",
        f"x && touch {m}",
        f"x || touch {m}",
        f"x > {m}",
        f"x' ; touch {m} ; '",
        f'x" ; touch {m} ; "',
        f"x\ntouch {m}",
        f"x\ttouch {m}",
        f"-oProxyCommand=touch {m}",
        f"--rsh=touch {m}",
        f"-e touch {m}",
        f"{m}/*",
        f"{m}?",
        f"~/{CANARY}",
        "a" * 255 + "/" + "b" * 300,  # a name longer than NAME_MAX
        "../" * 30 + "nowhere-" + CANARY,
        "/" + CANARY + "-absolute",
    ]


def rejected_corpus() -> list[tuple[str, str]]:
    """Values the API refuses before anything runs: (value, why)."""
    return [
        ("a\x00b", "NUL"),
        ("a\x1b[2Jb", "escape sequence"),
        ("a\rb", "carriage return"),
        ("\x7f", "DEL"),
        ("a\x85b", "C1 control"),
        ("x" * 4097, "longer than 4096"),
    ]


# Raw JSON bodies: not UTF-8, a lone surrogate, an unterminated string.
RAW_BODIES = [
    b'{"profile": "profile.compose-e2e", "inputs": {"repo": "\xff\xfe"}}',
    b'{"profile": "profile.compose-e2e", "inputs": {"repo": "\\ud800"}}',
    b'{"profile": "profile.compose-e2e", "inputs": {"repo": "abc}}',
    b'{"profile": "profile.compose-e2e", "inputs": {"repo\x00": "x"}}',
]

# Ids in paths: each must be refused (404 or 400), never reach a shell or a subject.
HOSTILE_IDS = [
    "sbx-x;touch {m}",
    "$(touch {m})",
    "../../../../etc",
    "sbx-abc/../../x",
    "-oProxyCommand=touch {m}",
    "sbx-a\nb",
    "sbx-" + "a" * 5000,
    "sbx-*",
    "sbx-abc.>",
]


def tree(root: Path, skip: Callable[[Path], bool]) -> dict[str, tuple[int, int, int] | None]:
    """Every entry under root: files with (size, mtime, mode), folders and links by name."""
    out: dict[str, tuple[int, int, int] | None] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not skip(here / d)]
        for name in dirnames:
            out[str((here / name).relative_to(root)) + "/"] = None
        for name in filenames:
            path = here / name
            if skip(path):
                continue
            st = path.lstat()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


class HostSnapshot:
    """The hosts' trees outside the sandbox roots: the test's folder (the service's data
    and the sandbox roots left out), each sshd's folder (its log left out), and the
    names in the SSH user's home."""

    def __init__(self, tmp_path: Path, sandbox_roots: Iterable[Path], hosts: list[SSHHost]):
        self.tmp_path = tmp_path
        self.roots = [r.resolve() for r in sandbox_roots]
        self.hosts = hosts

    def _skip(self, path: Path) -> bool:
        resolved = path.resolve() if not path.is_symlink() else path
        if resolved in (self.tmp_path / "data", self.tmp_path / "nats-data"):
            return True  # the service's data and the test's nats-server store
        return any(resolved.parent == root for root in self.roots) or path.suffix == ".log"

    def take(self) -> dict[str, Any]:
        entries: dict[str, Any] = {}
        for label, root in [("tmp", self.tmp_path)] + [
            (f"host{i}", h.folder) for i, h in enumerate(self.hosts)
        ]:
            entries.update({f"{label}:{k}": v for k, v in tree(root, self._skip).items()})
        entries.update({f"home:{p.name}": None for p in Path.home().iterdir()})
        return entries

    @staticmethod
    def changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
        return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def canaries(marker: Path, *places: Path) -> list[Path]:
    """Markers that exist: the absolute one, and the relative name in likely cwds."""
    found = [marker] if marker.exists() else []
    for place in {Path.cwd(), Path.home(), Path("/"), *places}:
        if (place / CANARY).exists():
            found.append(place / CANARY)
    if Path("/" + CANARY + "-absolute").exists():
        found.append(Path("/" + CANARY + "-absolute"))
    return found


async def post_create(svc: RunningService, body: dict[str, Any] | bytes) -> tuple[int, Any]:
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
    async with svc.http.post(f"{svc.url}/v1/sandboxes", **kwargs) as resp:
        return resp.status, await resp.json()


async def last_seq(svc: RunningService) -> int:
    async with svc.http.get(f"{svc.url}/healthz") as resp:
        return int((await resp.json())["last_seq"])


async def settle(svc: RunningService, sandbox_id: str) -> dict[str, Any]:
    return await wait_state(svc.http, svc.url, sandbox_id, SETTLED, timeout=120)


async def run_corpus(
    svc: RunningService, profile: str, field: str, values: list[str], extra: dict[str, str]
) -> list[dict[str, Any]]:
    """Send every value as `field`; return the final views of the sandboxes made."""
    made: list[str] = []
    for value in values:
        status, body = await post_create(
            svc, {"profile": profile, "inputs": {**extra, field: value}}
        )
        if status == 202:
            made.append(body["id"])
            continue
        assert status == 400, (value, body)
        assert body["error"]["field"] == f"inputs.{field}", (value, body)
        assert len(body["error"]["message"]) < 600, "a hostile value is never echoed whole"
    finals = await asyncio.gather(*(settle(svc, sid) for sid in made))
    for final in finals:
        # None of these name a real directory or a registered VM: nothing gets ready.
        assert final["state"] in ("failed", "rejected"), final
        assert final["reason"], final
    return list(finals)


async def refuse_rejected_values(
    svc: RunningService, profile: str, field: str, extra: dict[str, str]
) -> None:
    before = await last_seq(svc)
    for value, why in rejected_corpus():
        status, body = await post_create(
            svc, {"profile": profile, "inputs": {**extra, field: value}}
        )
        assert status == 400, (why, body)
        assert body["error"]["field"] == f"inputs.{field}", (why, body)
    for raw in RAW_BODIES:
        status, body = await post_create(svc, raw.replace(b"compose-e2e", profile[8:].encode()))
        assert status == 400 and body["error"]["code"] in ("malformed_json", "invalid_body"), body
    status, body = await post_create(svc, {"profile": profile, "account": "x; touch /tmp/y"})
    assert status == 400 and body["error"]["field"] == "account", body
    assert await last_seq(svc) == before, "a refused request records nothing"


async def refuse_hostile_ids(svc: RunningService, marker: Path) -> None:
    before = await last_seq(svc)
    for raw in HOSTILE_IDS:
        hostile = quote(raw.format(m=marker), safe="")
        for method, path, body in [
            ("GET", f"/v1/sandboxes/{hostile}", None),
            ("DELETE", f"/v1/sandboxes/{hostile}", None),
            ("GET", f"/v1/sandboxes/{hostile}/events", None),
            ("POST", f"/v1/sandboxes/{hostile}/checkpoints", None),
            ("POST", f"/v1/sandboxes/{hostile}/restore", {"checkpoint": "ckpt-000000000000"}),
            ("GET", f"/v1/checkpoints/{hostile}", None),
            ("DELETE", f"/v1/checkpoints/{hostile}", None),
            ("GET", f"/v1/accounts/{hostile}", None),
            ("POST", f"/v1/accounts/{hostile}/credits", {"amount": 1}),
            ("GET", f"/v1/accounts/{hostile}/ledger", None),
            ("DELETE", f"/v1/webhooks/{hostile}", None),
            ("GET", f"/v1/events?sandbox={hostile}", None),
        ]:
            async with svc.http.request(method, f"{svc.url}{path}", json=body) as resp:
                assert resp.status in (400, 404), (method, path, resp.status)
                error = (await resp.json())["error"]
                assert error["status"] == resp.status
    assert await last_seq(svc) == before, "a hostile id records nothing"


def hostile_repo(compose_repo: Path, tmp_path: Path) -> Path:
    """A real repository whose folder name is full of shell syntax."""
    name = f"repo; touch {CANARY} $(touch {CANARY}) `touch {CANARY}` 'q' \"dq\" -oX=y *?"
    odd = tmp_path / "odd" / name
    odd.parent.mkdir()
    shutil.copytree(compose_repo, odd)
    return odd


# ---- compose-ssh (profile.compose-e2e) --------------------------------------------------


async def test_compose_e2e_corpus_is_refused_or_inert(
    start_service: StartService,
    compose_env: Callable[..., dict[str, str]],
    compose_repo: Path,
    ssh_hosts: list[SSHHost],
    podman: Podman,
    tmp_path: Path,
) -> None:
    marker = tmp_path / "canary" / "pwned"
    marker.parent.mkdir()
    odd = hostile_repo(compose_repo, tmp_path)
    roots = [tmp_path / "remote0", tmp_path / "remote1"]
    for root in roots:
        root.mkdir()
    snapshot = HostSnapshot(tmp_path, roots, ssh_hosts)
    svc = await start_service(**compose_env(capacities=(16, 16)))
    before = snapshot.take()

    await refuse_rejected_values(svc, "profile.compose-e2e", "repo", {})
    await refuse_hostile_ids(svc, marker)
    finals = await run_corpus(svc, "profile.compose-e2e", "repo", shell_corpus(marker), {})
    assert all(f["state"] == "failed" for f in finals)

    # A real repo with a hostile folder name, and a hostile test_command (only a
    # validator runs it, by design; provisioning never does): it gets ready.
    made = await post_create(
        svc,
        {
            "profile": "profile.compose-e2e",
            "inputs": {"repo": str(odd), "test_command": f"$(touch {marker}); touch {CANARY}"},
        },
    )
    assert made[0] == 202, made
    sandbox_id = made[1]["id"]
    ready = await wait_state(svc.http, svc.url, sandbox_id, {"ready"}, timeout=120)
    workspace = Path(ready["handle"]["directory"])
    assert workspace.parent in roots
    assert (workspace / "compose.yml").exists(), "the odd repo was rsynced as it is"
    assert not canaries(marker, workspace, odd, odd.parent)
    await destroy(svc.http, svc.url, sandbox_id)
    await wait_state(svc.http, svc.url, sandbox_id, {"destroyed"}, timeout=120)

    assert not canaries(marker, odd, odd.parent)
    for final in [*finals, ready]:
        assert podman.containers(project_name(final["id"])) == []
    assert all(list(root.iterdir()) == [] for root in roots), "every sandbox dir is gone"
    assert snapshot.changes(before, snapshot.take()) == [], "nothing outside the roots changed"


# ---- vm-packer (profile.vm-haskell-build) -----------------------------------------------


@pytest.fixture
def vm_setup(ssh_hosts: list[SSHHost], tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """One registered "VM" (a real sshd) whose workspaces live under <tmp>/vm/build."""
    vm = tmp_path / "vm"
    (vm / "build").mkdir(parents=True)
    (vm / "home-sentinel").write_text("the VM's own data\n")
    host = ssh_hosts[0]
    vms = [
        {
            "name": "haskell-vm",
            "host": "127.0.0.1",
            "port": host.port,
            "user": getpass.getuser(),
            "identity_file": str(host.client_key),
            "known_hosts": str(host.known_hosts),
            "root": str(vm / "build"),
            "capacity": 64,
        }
    ]
    return vm, {"SANDBOXER_VM_PACKER_VMS": json.dumps(vms), "SANDBOXER_REPO_ROOTS": str(tmp_path)}


async def test_vm_haskell_build_corpus_is_refused_or_inert(
    start_service: StartService,
    vm_setup: tuple[Path, dict[str, str]],
    compose_repo: Path,
    ssh_hosts: list[SSHHost],
    tmp_path: Path,
) -> None:
    vm, env = vm_setup
    marker = tmp_path / "canary" / "pwned"
    marker.parent.mkdir()
    odd = hostile_repo(compose_repo, tmp_path)
    snapshot = HostSnapshot(tmp_path, [vm / "build"], ssh_hosts)
    svc = await start_service(**env)
    before = snapshot.take()

    await refuse_rejected_values(svc, "profile.vm-haskell-build", "repo", {"vm": "haskell-vm"})
    await refuse_rejected_values(svc, "profile.vm-haskell-build", "vm", {})
    corpus = shell_corpus(marker)
    repo_finals = await run_corpus(
        svc, "profile.vm-haskell-build", "repo", corpus, {"vm": "haskell-vm"}
    )
    for final in repo_finals:
        assert any(
            why in final["reason"] for why in ("is not a directory", "File name too long")
        ), final
    vm_finals = await run_corpus(svc, "profile.vm-haskell-build", "vm", corpus, {})
    assert all(f["state"] == "rejected" for f in vm_finals)
    assert all("is not registered" in f["reason"] for f in vm_finals)

    # A real repo with a hostile folder name: rsynced into the workspace, then the
    # profile's tool check fails (no ghc on this "VM") and the workspace is removed.
    status, made = await post_create(
        svc,
        {"profile": "profile.vm-haskell-build", "inputs": {"vm": "haskell-vm", "repo": str(odd)}},
    )
    assert status == 202, made
    final = await settle(svc, made["id"])
    assert final["state"] == "failed" and "tool check failed: ghc" in final["reason"], final
    assert not canaries(marker, vm / "build", odd, odd.parent)
    assert list((vm / "build").iterdir()) == [], "every workspace is gone"
    assert (vm / "home-sentinel").read_text() == "the VM's own data\n"
    assert snapshot.changes(before, snapshot.take()) == [], "nothing outside the root changed"


async def test_the_canary_works(tmp_path: Path) -> None:
    """Each shell value of the corpus does create the marker when a shell interprets it
    (bare, or inside the quotes it breaks out of), and the option value does when ssh
    takes it as an option: the checks above can fail."""
    marker = tmp_path / "pwned"

    async def fires(command: str) -> bool:
        marker.unlink(missing_ok=True)
        proc = await asyncio.create_subprocess_shell(
            command,
            cwd=tmp_path,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(30):
            await proc.wait()
        return marker.exists()

    for value in shell_corpus(marker)[:10]:
        contexts = [f"echo {value}", f"echo '{value}'", f'echo "{value}"', f"test -d {value}"]
        assert [c for c in contexts if await fires(c)], value
    option = shell_corpus(marker)[11]
    assert option.startswith("-oProxyCommand=")
    assert await fires(f"ssh -F /dev/null -o BatchMode=yes '{option}' canary-host true")
