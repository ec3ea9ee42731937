"""6. compose-ssh provision vs the legacy steps as a plain shell script.

A real sshd on loopback (its own host key, checked), podman with podman-compose and
the local busybox image: the test infrastructure of tests/infra.py. The repo and
compose file are the tests' two-service project (tests/data/compose-app).

Ours: the in-process service creates `profile.compose-e2e` sandboxes; timed from
`create` until the sandbox is `ready` (compose-ssh: prepare the directory, rsync,
`compose up -d`, then the engine's `ps` until every service runs, all recorded as events).
Baseline: a shell script doing what `make e2e` did to provision: `ssh mkdir`, `rsync`,
`ssh compose up -d`, each a fresh ssh connection. One sandbox vs one script run, and
ten sandboxes at once on one host vs ten script runs one after another. Teardown
(both sides) happens between runs and is not timed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from bench.common import REPO_ROOT, Figure, Options, Section, Stopwatch, alternate, scratch
from bench.lifecycle import service_settings
from events import EventMeta
from sandboxer.app.lifecycle import TERMINAL
from sandboxer.app.manager import CreateRequest
from sandboxer.bootstrap import Service
from sandboxer.store.event_store import RecordedEvent
from tests.infra import Podman, SSHHost

META = EventMeta(actor="bench", correlation_id="bench-compose")
COMPOSE_APP = REPO_ROOT / "tests" / "data" / "compose-app"

SCRIPT = r"""#!/bin/sh
# The legacy provisioning steps of `make e2e`: ssh + rsync + compose up.
set -eu
dir=$1; project=$2
ssh $SSH_OPTS "$TARGET" mkdir -p "$dir"
rsync -a --delete --filter=':- .gitignore' -e "ssh $SSH_OPTS" "$REPO/" "$TARGET:$dir/"
ssh $SSH_OPTS "$TARGET" "cd $dir && $COMPOSE -p $project -f compose.yml up -d" >/dev/null 2>&1
"""

SCRIPT_DOWN = r"""#!/bin/sh
set -eu
dir=$1; project=$2
ssh $SSH_OPTS "$TARGET" "cd $dir && $COMPOSE -p $project -f compose.yml down -t 1 && \
  cd / && rm -rf $dir" >/dev/null 2>&1
"""


class ServiceRig:
    """podman + the in-process service; creates `profile` sandboxes from `repo` and
    times them until ready (the compose benchmarks' common part)."""

    profile = "profile.compose-e2e"

    def __init__(self, folder: Path, project: Path = COMPOSE_APP) -> None:
        self.folder = folder
        self.podman = Podman.prepare(folder / "podman")
        self.repo = folder / "repo"
        shutil.copytree(project, self.repo)
        self.service: Service | None = None
        self.waiting: dict[str, tuple[set[str], asyncio.Future[str]]] = {}
        self.provisioned: dict[str, float] = {}  # when each Provisioned was applied
        self.until_provisioned: list[float] = []  # per provision(): seconds to the last
        self.counter = 0
        self.last_ids: list[str] = []

    def env(self) -> dict[str, str]:
        return {
            "SANDBOXER_RECONCILE": "off",
            "SANDBOXER_REPO_ROOTS": str(self.folder.resolve()),
        }

    async def start(self, **extra: str) -> Service:
        settings = service_settings(str(self.folder / "data"), "always", **self.env(), **extra)
        self.service = Service(settings)
        await self.service.start()
        assert self.service.runner is not None
        self.service.runner.listeners.append(self._observe)
        return self.service

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stop()

    def _observe(self, recorded: RecordedEvent) -> None:
        assert self.service is not None and self.service.runner is not None
        sid = recorded.event.aggregate_id
        entry = self.waiting.get(sid)
        view = self.service.runner.projection.get(sid)
        if entry is None or view is None:
            return
        if type(recorded.event).__name__ == "Provisioned":
            self.provisioned[sid] = time.perf_counter()
        states, future = entry
        if not future.done() and (view.state in states or view.state in TERMINAL):
            future.set_result(
                view.state if view.state in states else f"{view.state}: {view.reason}"
            )

    def next_id(self) -> str:
        self.counter += 1
        return f"sbx-cmp{self.counter:09d}"

    async def create(self, sandbox_id: str, **inputs: str) -> None:
        assert self.service is not None and self.service.manager is not None
        self.waiting[sandbox_id] = (
            {"ready"},
            asyncio.get_running_loop().create_future(),
        )
        await self.service.manager.create(
            CreateRequest(
                profile=self.profile,
                inputs={"repo": str(self.repo), **inputs},
                sandbox_id=sandbox_id,
            ),
            META,
        )

    async def provision(self, count: int) -> float:
        """Create `count` sandboxes at once; seconds until all are ready. Then tear
        them down (untimed)."""
        ids = [self.next_id() for _ in range(count)]
        self.last_ids = ids
        watch = Stopwatch()

        async def one(sandbox_id: str) -> None:
            await self.create(sandbox_id)
            _, future = self.waiting[sandbox_id]
            async with asyncio.timeout(600):
                state = await future
            if state != "ready":
                raise RuntimeError(f"{sandbox_id} ended {state}")

        await asyncio.gather(*(one(i) for i in ids))
        seconds = watch.seconds()
        last = max(self.provisioned.pop(i) for i in ids)
        self.until_provisioned.append(last - watch.started)
        await self.destroy(ids)
        return seconds

    async def destroy(self, ids: list[str]) -> None:
        assert self.service is not None and self.service.manager is not None
        manager = self.service.manager

        async def one(sandbox_id: str) -> None:
            done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self.waiting[sandbox_id] = ({"destroyed"}, done)
            await manager.destroy(sandbox_id, META)
            async with asyncio.timeout(600):
                state = await done
            if state != "destroyed":
                raise RuntimeError(f"{sandbox_id} ended {state}")

        await asyncio.gather(*(one(i) for i in ids))


class ComposeRig(ServiceRig):
    """sshd + podman + the service with one compose host of capacity `capacity`."""

    def __init__(self, folder: Path, capacity: int) -> None:
        super().__init__(folder)
        self.capacity = capacity
        self.host = SSHHost(folder / "sshd")
        self.remote = folder / "remote"

    def env(self) -> dict[str, str]:
        hosts = [
            self.host.host_config(
                "h1", self.remote, self.podman.compose_cmd, capacity=self.capacity
            )
        ]
        return {
            **super().env(),
            "SANDBOXER_COMPOSE_HOSTS": json.dumps(hosts),
            "SANDBOXER_COMPOSE_CMD": self.podman.compose_cmd,
            "SANDBOXER_COMPOSE_ENGINE_CMD": self.podman.engine_cmd,
            "SANDBOXER_COMPOSE_STOP_TIMEOUT": "1",
        }

    async def start(self, **extra: str) -> Service:
        self.host.start()
        return await super().start(**extra)

    async def stop(self) -> None:
        await super().stop()
        self.host.stop()

    # ---- the script ---------------------------------------------------------------

    def script_env(self) -> dict[str, str]:
        ssh_opts = [
            "-p", str(self.host.port),
            "-i", str(self.host.client_key),
            "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.host.known_hosts}",
        ]  # fmt: skip
        config = self.host.host_config("h1", self.remote, self.podman.compose_cmd)
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "SSH_OPTS": shlex.join(ssh_opts),
            "TARGET": f"{config['user']}@127.0.0.1",
            "REPO": str(self.repo),
            "COMPOSE": self.podman.compose_cmd,
        }

    def script(self, count: int) -> float:
        """`count` script runs one after another; seconds. Then their teardown."""
        up = self.folder / "legacy-e2e-up.sh"
        down = self.folder / "legacy-e2e-down.sh"
        up.write_text(SCRIPT)
        down.write_text(SCRIPT_DOWN)
        env = self.script_env()
        runs = []
        for _ in range(count):
            name = self.next_id()
            runs.append((str(self.remote / "script" / name), f"legacy-{name}"))
        watch = Stopwatch()
        for directory, project in runs:
            subprocess.run(["sh", str(up), directory, project], env=env, check=True)
        seconds = watch.seconds()
        downs = [
            subprocess.Popen(["sh", str(down), directory, project], env=env)
            for directory, project in runs
        ]
        if any(proc.wait(300) != 0 for proc in downs):
            raise RuntimeError("the legacy teardown failed")
        return seconds


async def run(options: Options) -> Section:
    many = options.size(10, 2)
    section = Section(
        "compose",
        "compose-ssh provision vs ssh + rsync + compose up in a shell script",
        sizes=(
            f"one sandbox; {many} at once on one host (capacity {many}); the two-service "
            "busybox project of tests/data/compose-app over a real sshd to podman-compose"
        ),
    )
    section.notes.append(
        "seconds, lower is better: ours from `create` until `ready` (includes compose-ssh's "
        "readiness polls of the engine's `ps`, 0.5 s apart, two in a row), the script until its "
        "`compose up -d` returns (it does not wait for the services)."
    )
    with scratch(options, "compose") as folder:
        rig = ComposeRig(folder, capacity=many)
        await rig.start()
        try:
            if not options.quick:  # warm up: the first ssh connection, podman's caches
                await rig.provision(1)
                await asyncio.to_thread(rig.script, 1)

            async def script_one(_run: int) -> float:
                return await asyncio.to_thread(rig.script, 1)

            async def ours_one(_run: int) -> float:
                return await rig.provision(1)

            rig.until_provisioned.clear()
            ours, base = await alternate(options.runs, script_one, ours_one)
            section.add(
                Figure(
                    "provision one sandbox",
                    "s",
                    ours,
                    base,
                    "script (ssh + rsync + compose up)",
                    higher_is_better=False,
                    target_ratio=1.0,
                )
            )
            section.add(
                Figure(
                    "one sandbox, until `Provisioned` (the script's steps only)",
                    "s",
                    list(rig.until_provisioned),
                    base,
                    "script (ssh + rsync + compose up)",
                    higher_is_better=False,
                    note="no readiness check: what the script does",
                )
            )

            async def script_many(_run: int) -> float:
                return await asyncio.to_thread(rig.script, many)

            async def ours_many(_run: int) -> float:
                return await rig.provision(many)

            rig.until_provisioned.clear()
            ours, base = await alternate(options.runs, script_many, ours_many)
            section.add(
                Figure(
                    f"provision {many} at once on one host",
                    "s",
                    ours,
                    base,
                    f"{many} script runs in a row",
                    higher_is_better=False,
                    target_ratio=0.4,
                )
            )
            section.add(
                Figure(
                    f"{many} at once, until the last `Provisioned`",
                    "s",
                    list(rig.until_provisioned),
                    base,
                    f"{many} script runs in a row",
                    higher_is_better=False,
                    note="no readiness check: what the script does",
                )
            )
        finally:
            await rig.stop()
    return section
