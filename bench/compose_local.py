"""7. compose-local provision vs a plain shell script: copy the repo, compose up, poll.

podman with podman-compose and the local busybox image (tests/infra.py), no SSH.

Ours: the in-process service creates `profile.compose-local` sandboxes (the shipped
profile and extension defaults); timed from `create` until the sandbox is `ready`
(compose-local: a workspace under the data dir, rsync of the repo, `compose up -d`,
then its readiness polls, all recorded as events). Baseline: the same job as a shell
script a team would write: `cp -a` the repo into a fresh directory, `podman-compose -p
X up -d`, then poll the engine's `ps` every 0.5 s until every service runs and, when
the project has healthchecks, until `podman healthcheck run` passes for each of them
(podman 4.3 runs no healthcheck by itself here). Same definition of done for both.
Teardown (both sides) happens between runs and is not timed.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import yaml

from bench.common import REPO_ROOT, Figure, Options, Section, Stopwatch, alternate, scratch
from bench.compose import COMPOSE_APP, ServiceRig
from sandboxer.bootstrap import Service
from tests.infra import IMAGE

PROFILES = REPO_ROOT / "profiles"

EXAMPLE = REPO_ROOT / "examples" / "compose-hello"

SCRIPT = r"""#!/bin/sh
# Copy the repo, compose up, poll until every service runs (and is healthy).
set -eu
repo=$1; dir=$2; project=$3
mkdir -p "$dir"
cp -a "$repo/." "$dir/"
cd "$dir"
$COMPOSE -p "$project" up -d >/dev/null 2>&1
tries=0
while :; do
    running=$($ENGINE ps -q --filter "label=com.docker.compose.project=$project" \
        --filter status=running | wc -l)
    if [ "$running" -eq "$SERVICES" ]; then
        healthy=yes
        for service in $HEALTHCHECKED; do
            $ENGINE healthcheck run "${project}_${service}_1" >/dev/null 2>&1 || healthy=no
        done
        [ "$healthy" = yes ] && break
    fi
    tries=$((tries + 1))
    [ "$tries" -lt 240 ] || { echo "not ready after 120 s" >&2; exit 1; }
    sleep 0.5
done
"""

SCRIPT_DOWN = r"""#!/bin/sh
set -eu
dir=$1; project=$2
cd "$dir" && $COMPOSE -p "$project" down -t 1 >/dev/null 2>&1
cd / && rm -rf "$dir"
"""


class LocalRig(ServiceRig):
    """The service with compose-local on this machine, and the script beside it."""

    profile = "profile.compose-local"

    def __init__(
        self,
        folder: Path,
        project: Path,
        services: int,
        healthchecked: str,
        settle_polls: int | None = None,
    ) -> None:
        super().__init__(folder, project)
        self.profiles = folder / "profiles"
        if settle_polls is not None:  # the shipped profile with one config key changed
            shipped = yaml.safe_load((PROFILES / "profile.compose-local.yaml").read_text())
            shipped["name"] = self.profile = "profile.bench-compose-local"
            shipped["config"] = {**shipped.get("config", {}), "settle_polls": settle_polls}
            self.profiles.mkdir(parents=True, exist_ok=True)
            (self.profiles / f"{self.profile}.yaml").write_text(yaml.safe_dump(shipped))
        self.services = services
        self.healthchecked = healthchecked  # services with a healthcheck, space-separated
        self.workspaces = folder / "script"
        # The example names its image through SANDBOXER_EXAMPLE_IMAGE: the local one.
        self.compose = f"env SANDBOXER_EXAMPLE_IMAGE={IMAGE} {self.podman.compose_cmd}"

    def env(self) -> dict[str, str]:
        return {
            **super().env(),
            "SANDBOXER_COMPOSE_LOCAL_CMD": self.compose,
            "SANDBOXER_COMPOSE_LOCAL_ENGINE_CMD": self.podman.engine_cmd,
            "SANDBOXER_COMPOSE_LOCAL_STOP_TIMEOUT": "1",
            "SANDBOXER_PROFILES_PATH": str(self.profiles),
        }

    def script_env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "COMPOSE": self.compose,
            "ENGINE": self.podman.engine_cmd,
            "SERVICES": str(self.services),
            "HEALTHCHECKED": self.healthchecked,
        }

    def script(self, count: int) -> float:
        """`count` script runs one after another; seconds. Then their teardown."""
        up = self.folder / "local-up.sh"
        down = self.folder / "local-down.sh"
        up.write_text(SCRIPT)
        down.write_text(SCRIPT_DOWN)
        env = self.script_env()
        runs = []
        for _ in range(count):
            name = self.next_id()
            runs.append((str(self.workspaces / name), f"script-{name}"))
        watch = Stopwatch()
        for directory, project in runs:
            subprocess.run(
                ["sh", str(up), str(self.repo), directory, project],
                env=env,
                check=True,
                timeout=300,
            )
        seconds = watch.seconds()
        for directory, project in runs:
            subprocess.run(["sh", str(down), directory, project], env=env, check=True, timeout=300)
        return seconds

    def health_waited(self, service: Service, sandbox_id: str, healthchecked: str) -> bool:
        """Whether ours was ready only once every healthchecked service was healthy:
        the health its view recorded at ready."""
        assert service.runner is not None
        view = service.runner.projection.get(sandbox_id)
        health = {s.service: s.health for s in (view.service_states if view else [])}
        return all(health.get(name) == "healthy" for name in healthchecked.split())


async def measure(
    options: Options,
    section: Section,
    folder: Path,
    project: Path,
    label: str,
    health: str,
    settle_polls: int | None = None,
) -> None:
    services = 2
    rig = LocalRig(folder, project, services, health, settle_polls)
    service = await rig.start()
    try:
        if not options.quick:  # warm up: podman's caches, the first compose run
            await rig.provision(1)
            await asyncio.to_thread(rig.script, 1)

        async def script_one(_run: int) -> float:
            return await asyncio.to_thread(rig.script, 1)

        async def ours_one(_run: int) -> float:
            return await rig.provision(1)

        rig.until_provisioned.clear()
        ours, base = await alternate(options.runs, script_one, ours_one)
        same_done = not health or rig.health_waited(service, rig.last_ids[-1], health)
        note = ""
        if health and not same_done:
            note = "ours did not wait for the healthcheck: not the same definition of done"
        if settle_polls is not None:
            label = f"{label}, settle_polls: {settle_polls}"
            note = "the shipped profile but one readiness poll instead of two in a row"
        section.add(
            Figure(
                f"provision one sandbox: {label}",
                "s",
                ours,
                base,
                "script (cp -a + compose up + poll)",
                higher_is_better=False,
                target_ratio=1.0 if same_done and settle_polls is None else None,
                note=note,
            )
        )
        if settle_polls is not None:
            return
        section.add(
            Figure(
                f"{label}, until `Provisioned` (no readiness check)",
                "s",
                list(rig.until_provisioned),
                base,
                "script (cp -a + compose up + poll)",
                higher_is_better=False,
            )
        )
    finally:
        await rig.stop()


async def run(options: Options) -> Section:
    section = Section(
        "compose-local",
        "compose-local provision vs cp -a + compose up + poll in a shell script",
        sizes=(
            "one sandbox at a time; two-service busybox projects on this machine's podman "
            "with podman-compose: tests/data/compose-app (no healthcheck) and "
            "examples/compose-hello (db healthy after 2 s, web published on a random port)"
        ),
    )
    section.notes.append(
        "seconds, lower is better: ours from `create` until `ready` (profile.compose-local "
        "as shipped: readiness polls of the engine's `ps` 0.5 s apart, two in a row); the "
        "script until its poll (0.5 s apart, once) sees every service running, and healthy "
        "where the compose file has a healthcheck (`podman healthcheck run`)."
    )
    section.notes.append(
        "compose-app with `settle_polls: 1`: a bench-only copy of profile.compose-local "
        "with that one config key, to show what the second readiness poll costs (no target: "
        "not what ships). compose-hello: ours is held to the same definition of done (db "
        "healthy) only when its view records db `healthy` at ready; otherwise the figure "
        "says so and has no target. The script runs the healthcheck itself at each of its "
        "polls (every 0.5 s, twice as often as the file's `interval: 1s`); ours runs it as "
        "the compose file says (interval, start_period, retries) where podman does not."
    )
    with scratch(options, "compose-local") as folder:
        await measure(options, section, folder / "app", COMPOSE_APP, "compose-app", "")
        await measure(
            options, section, folder / "app1", COMPOSE_APP, "compose-app", "", settle_polls=1
        )
        await measure(options, section, folder / "hello", EXAMPLE, "compose-hello", "db")
    return section
