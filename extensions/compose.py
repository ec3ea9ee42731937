"""The compose adapter, written once against `Transport` (extensions/transport.py).

ext.compose-ssh (a pool of SSH hosts) and ext.compose-local (this machine) differ only
in how they find their host(s) and which transport each gets; every hook is here.

provision: an isolated workspace `<root>/<sandbox id>` → the `repo` input copied into
it (rsync: includes, .gitignore, excludes) → `<compose> -p sandboxer-<id> -f <file>...
up -d`. The compose files are resolved once (config, input or compose's own
discovery) and recorded in the handle; teardown and checkpoints use that list.
teardown: compose down with the recorded files, then everything labelled with the
project (containers, pod, networks, volumes), the images built for it or loaded by a
restore, and the workspace; idempotent, and complete from the sandbox id alone.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import re
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from extensions import compose_services
from extensions.compose_services import labels_of, ps_items
from extensions.files import (
    GET_WORKSPACE_FILE,
    PUT_WORKSPACE_FILE,
    TAG_NAME,
    file_chunks,
    new_tag,
    open_tar_file,
    open_workspace_file,
    refusal,
    stop_tagged_argv,
    tar_member,
)
from extensions.hosts import (
    ID_RE,
    LIST_WORKSPACES,
    PREPARE_WORKSPACE,
    REMOVE_WORKSPACE,
    check_sandbox_id,
    local_repo,
)
from extensions.sdk import (
    PAUSE_MODES,
    CommandRefused,
    CommandResult,
    Endpoint,
    ExtensionError,
    FileRefused,
    FileStream,
    FileTooLarge,
    Handle,
    LogFn,
    OutputBuffer,
    OutputFn,
    Resource,
    RuntimeInfo,
    ServiceStatus,
    StepContext,
    check_command,
    check_file_path,
)
from extensions.transport import CommandFailed, Transport

# compose's own discovery (compose-go's order): the first default file that exists,
# and beside it the first override file that exists.
COMPOSE_FILES = ("compose.yaml", "compose.yml", "docker-compose.yml", "docker-compose.yaml")
OVERRIDE_FILES = (
    "compose.override.yml",
    "compose.override.yaml",
    "docker-compose.override.yml",
    "docker-compose.override.yaml",
)
RUNNING = {"running"}
DEAD = {"exited", "dead", "stopped", "removing"}

PROJECT_PREFIX = "sandboxer-"
CHECKPOINT_REPO = "sandboxer-ckpt"
RESTORE_OVERRIDE = ".sandboxer-restore.yml"
LOGS_TIMEOUT = 7 * 86400.0  # a followed log: bounded by the manifest's hook timeout
FILES_SEPARATOR = "\n"  # never in a validated relative path

# Moves a restored workspace into place (replacing the old one, never via a symlink).
REPLACE_WORKSPACE = r"""
set -eu
new=$1; dir=$2
[ -d "$new" ] && [ ! -L "$new" ] || { echo "archive has no workspace" >&2; exit 3; }
if [ -L "$dir" ]; then rm -f -- "$dir"; fi
rm -rf -- "$dir"
mv -- "$new" "$dir"
"""

# Removes every container, network and volume of one compose project, and
# podman-compose's pod, whatever made them (by the project label). Idempotent.
REMOVE_PROJECT = r"""
set -u
project=$1; shift
label="label=com.docker.compose.project=$project"
ids=$("$@" ps -aq --filter "$label") || exit 1
if [ -n "$ids" ]; then "$@" rm -f $ids >/dev/null || exit 1; fi
"$@" pod rm -f "pod_$project" >/dev/null 2>&1 || true  # podman-compose's pod; docker has none
for n in $("$@" network ls -q --filter "$label"); do "$@" network rm "$n" >/dev/null; done
for v in $("$@" volume ls -q --filter "$label"); do "$@" volume rm -f "$v" >/dev/null; done
left=$("$@" ps -aq --filter "$label") || exit 1
[ -z "$left" ] || { echo "containers of $project are left: $left" >&2; exit 1; }
exit 0
"""

# Runs a command holding the sandbox's lock file (flock, where the host has it) until
# the command ends, also when its caller died (serve killed): flock waits for it.
# `-o`: the command does not inherit the lock, or the engine's long-lived container
# monitors (podman's conmon) would hold it as long as the containers run.
LOCKED = r"""
lock=$1; shift
if command -v flock >/dev/null 2>&1; then exec flock -o "$lock" "$@"; fi
exec "$@"
"""

# Waits until nothing holds the sandbox's lock file (a missing one: nothing to wait for).
WAIT_FOR_LOCK = r"""
lock=$1
[ -f "$lock" ] && [ ! -L "$lock" ] || exit 0
if command -v flock >/dev/null 2>&1; then exec flock -o "$lock" true; fi
"""

# Lists the sandbox ids of `<root>/.lock-<id>` files, one per line.
LIST_LOCKS = r"""
set -eu
root=$1
[ -d "$root" ] || exit 0
for f in "$root"/.lock-*; do
  if [ -f "$f" ] && [ ! -L "$f" ]; then printf '%s\n' "${f##*/.lock-}"; fi
done
"""

# Runs a command in the workspace, if the workspace is still there (else nothing).
IN_WORKSPACE = r"""
set -u
dir=$1; shift
if [ -L "$dir" ] || [ ! -d "$dir" ]; then exit 0; fi
cd -- "$dir" || exit 0
exec "$@"
"""


# Holds a compose project still (every container by the project label): mode "pause"
# freezes the running containers (the engine's pause); mode "stop" stops them (paused
# ones are unpaused first: podman stops no paused container), keeping their
# filesystems and the named volumes (never `down`). Idempotent: what is already held
# is left alone; a container that changed state meanwhile is taken on a second round.
PAUSE_PROJECT = r"""
set -u
mode=$1; limit=$2; project=$3; shift 3
label="label=com.docker.compose.project=$project"
list() { state=$1; shift; "$@" ps -aq --filter "$label" --filter "status=$state"; }
for round in 1 2; do
  if [ "$mode" = stop ]; then
    ids=$(list paused "$@") || exit 1
    if [ -n "$ids" ]; then "$@" unpause $ids >/dev/null 2>&1; fi
    ids=$(list running "$@") || exit 1
    if [ -n "$ids" ]; then "$@" stop -t "$limit" $ids >/dev/null 2>&1; fi
    left=$(list running "$@"; list paused "$@") || exit 1
  else
    ids=$(list running "$@") || exit 1
    if [ -n "$ids" ]; then "$@" pause $ids >/dev/null 2>&1; fi
    left=$(list running "$@") || exit 1
  fi
  [ -n "$left" ] || exit 0
done
echo "containers of $project still run after $mode:" $left >&2
exit 1
"""

# Lets a held project run again: unpauses its paused containers and (mode "stop")
# starts its stopped and created ones. Idempotent: running containers are left alone.
RESUME_PROJECT = r"""
set -u
mode=$1; project=$2; shift 2
label="label=com.docker.compose.project=$project"
ids=$("$@" ps -aq --filter "$label" --filter status=paused) || exit 1
if [ -n "$ids" ]; then "$@" unpause $ids >/dev/null || exit 1; fi
if [ "$mode" = stop ]; then
  ids=$("$@" ps -aq --filter "$label" --filter status=exited --filter status=created) || exit 1
  if [ -n "$ids" ]; then "$@" start $ids >/dev/null || exit 1; fi
fi
left=$("$@" ps -aq --filter "$label" --filter status=paused) || exit 1
[ -z "$left" ] || { echo "containers of $project are still paused: $left" >&2; exit 1; }
exit 0
"""

# One sample of the running containers' counters: one remote call, the engine's `ps`
# then one `stats --no-stream` of what it listed (nothing running: no output).
STATS_PROJECT = r"""
set -u
project=$1; format=$2; shift 2
label="label=com.docker.compose.project=$project"
ids=$("$@" ps -q --filter "$label" --filter status=running) || exit 1
[ -n "$ids" ] || exit 0
exec "$@" stats --no-stream --no-reset --format "$format" $ids
"""


# ---- names ----------------------------------------------------------------------------


def project_name(sandbox_id: str) -> str:
    return f"{PROJECT_PREFIX}{check_sandbox_id(sandbox_id)}"


def checkpoint_tag(project: str, service: str, checkpoint: str) -> str:
    return f"{CHECKPOINT_REPO}/{project}-{service}:{checkpoint}"


# ---- the compose files ----------------------------------------------------------------


def check_compose_path(raw: str) -> str:
    """A compose file as the profile names it: a relative path inside the repo
    (subfolders allowed), normalised (`./a//b.yml` → `a/b.yml`); anything that could
    leave the repo is an ExtensionError naming `compose_file`."""
    name = raw.strip()
    if not name:
        raise ExtensionError("compose_file: empty path")
    if any(c in name for c in "\x00\n\r\\"):
        raise ExtensionError(f"compose_file {name[:200]!r}: contains a control character or \\")
    path = PurePosixPath(name)
    if path.is_absolute():
        raise ExtensionError(f"compose_file {name!r}: must be relative to the repo, not absolute")
    if ".." in path.parts:
        raise ExtensionError(f"compose_file {name!r}: must stay inside the repo (no '..')")
    normal = posixpath.normpath(name)
    if normal in (".", "") or normal.startswith("-"):
        raise ExtensionError(f"compose_file {name!r}: not a file path")
    return normal


def configured_compose_files(
    inputs: Mapping[str, str], config: Mapping[str, Any]
) -> list[str] | None:
    """The files the sandbox asks for: the `compose_file` input (comma-separated),
    else config `compose_files` (a list), else config `compose_file`; None: discover."""
    raw_input = str(inputs.get("compose_file") or "").strip()
    if raw_input:
        names: list[str] = [n for n in raw_input.split(",") if n.strip()]
    elif config.get("compose_files"):
        names = [str(n) for n in config.get("compose_files") or []]
    elif config.get("compose_file"):
        names = [str(config["compose_file"])]
    else:
        return None
    files = [check_compose_path(n) for n in names]
    if len(set(files)) != len(files):
        raise ExtensionError(f"compose_file: a file is named twice in {', '.join(files)}")
    return files


def discover_compose_files(repo: Path) -> list[str]:
    """compose's own discovery in the repo's top folder: the first of the default
    names, plus the first override file beside it."""
    for name in COMPOSE_FILES:
        if (repo / name).is_file():
            overrides = [o for o in OVERRIDE_FILES if (repo / o).is_file()][:1]
            return [name, *overrides]
    raise ExtensionError(f"no compose file in repo (looked for {', '.join(COMPOSE_FILES)})")


def read_services(repo: Path, files: Sequence[str]) -> list[str]:
    """The services the files define together (each file read inside the repo only)."""
    services: set[str] = set()
    for name in files:
        path = repo / name
        if not path.resolve().is_relative_to(repo):
            # rsync would not copy such a link (--safe-links); never read it here
            raise ExtensionError(f"compose_file {name!r}: a link out of the repo")
        if not path.is_file():
            raise ExtensionError(f"compose_file {name!r}: no such file in the repo")
        try:
            doc = yaml.safe_load(path.read_text())
            services.update((doc or {}).get("services") or {})
        except (yaml.YAMLError, AttributeError, UnicodeDecodeError) as exc:
            raise ExtensionError(f"{name}: not a compose file: {exc}") from exc
    if not services:
        raise ExtensionError(f"{', '.join(files)}: defines no services")
    return sorted(services)


def resolve_compose_files(
    inputs: Mapping[str, str], config: Mapping[str, Any], repo: Path
) -> tuple[list[str], list[str]]:
    """(the compose files, in `-f` order; the services they define)."""
    files = configured_compose_files(inputs, config) or discover_compose_files(repo)
    return files, read_services(repo, files)


def handle_files(handle: Mapping[str, str] | None) -> list[str]:
    """The compose files a handle (or checkpoint metadata) recorded: `compose_files`,
    else the older single `compose_file`; each validated again."""
    if not handle:
        return []
    raw = handle.get("compose_files") or handle.get("compose_file") or ""
    return [check_compose_path(n) for n in raw.split(FILES_SEPARATOR) if n.strip()]


# ---- command construction (pure: docker compose v2 and podman-compose alike) -----------


def compose_argv(
    compose_cmd: Sequence[str], project: str, files: Sequence[str], *args: str
) -> list[str]:
    """`<compose> -p <project> -f <file>... <args>`. The project directory is compose's
    default for both tools, the first file's folder, so relative paths in a file in
    a subfolder (`build:`, `env_file`, volumes) are relative to that file as the
    compose spec says (docker's `--project-directory` would change that; podman-compose
    1.6 has no such option)."""
    argv = [*compose_cmd, "-p", project]
    for name in files:
        argv += ["-f", name]
    return [*argv, *args]


def up_argv(compose_cmd: Sequence[str], project: str, files: Sequence[str]) -> list[str]:
    return compose_argv(compose_cmd, project, files, "up", "-d")


def down_argv(
    compose_cmd: Sequence[str], project: str, files: Sequence[str], stop_timeout: int
) -> list[str]:
    return compose_argv(
        compose_cmd, project, files, "down", "-v", "--remove-orphans", "-t", str(stop_timeout)
    )


def ps_argv(engine_cmd: Sequence[str], project: str | None = None) -> list[str]:
    """The engine's `ps` of one project (or of every compose project), as JSON."""
    label = "label=com.docker.compose.project" + (f"={project}" if project else "")
    return [*engine_cmd, "ps", "-a", "--filter", label, "--format", "json"]


def images_argv(engine_cmd: Sequence[str]) -> list[str]:
    return [*engine_cmd, "images", "--format", "json"]


def exec_argv(
    engine_cmd: Sequence[str],
    container: str,
    argv: Sequence[str],
    *,
    workdir: str | None = None,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    command = [*engine_cmd, "exec"]
    if workdir:
        command += ["-w", workdir]
    for name, value in (env or {}).items():
        command += ["-e", f"{name}={value}"]
    return [*command, container, *argv]


def locked_argv(lock: str, argv: Sequence[str]) -> list[str]:
    """argv run holding `lock` (see LOCKED)."""
    return ["sh", "-c", LOCKED, "sh", lock, *argv]


def remove_project_argv(engine_cmd: Sequence[str], project: str) -> list[str]:
    return ["sh", "-c", REMOVE_PROJECT, "sh", project, *engine_cmd]


def check_pause_mode(mode: str) -> str:
    if mode not in PAUSE_MODES:
        raise ExtensionError(f"pause mode must be one of {', '.join(PAUSE_MODES)}, got {mode!r}")
    return mode


def pause_argv(engine_cmd: Sequence[str], project: str, mode: str, stop_timeout: int) -> list[str]:
    return [
        "sh",
        "-c",
        PAUSE_PROJECT,
        "sh",
        check_pause_mode(mode),
        str(max(int(stop_timeout), 0)),
        project,
        *engine_cmd,
    ]


def resume_argv(engine_cmd: Sequence[str], project: str, mode: str) -> list[str]:
    return ["sh", "-c", RESUME_PROJECT, "sh", check_pause_mode(mode), project, *engine_cmd]


def is_podman(engine_cmd: Sequence[str]) -> bool:
    return any(PurePosixPath(arg).name == "podman" for arg in engine_cmd)


# podman's raw counters (nanoseconds, bytes); docker's stats has no cumulative CPU time
# and prints its network bytes rounded for people ("1.2kB / 3.4MB").
PODMAN_STATS_FORMAT = "{{.Name}} {{.CPUNano}} {{.NetInput}} {{.NetOutput}}"
DOCKER_STATS_FORMAT = "{{.Name}} {{.NetIO}}"


def stats_argv(engine_cmd: Sequence[str], project: str) -> list[str]:
    fmt = PODMAN_STATS_FORMAT if is_podman(engine_cmd) else DOCKER_STATS_FORMAT
    return ["sh", "-c", STATS_PROJECT, "sh", project, fmt, *engine_cmd]


_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kKMGTP]?i?)B$")
_SIZE_UNITS = {
    "": 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def parse_size(text: str) -> int | None:
    """Bytes of a size as docker prints it ("586B", "1.36kB", "3.2MiB"); else None."""
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None or match.group(2) not in _SIZE_UNITS:
        return None
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def container_service(name: str, project: str, services: Iterable[str]) -> str:
    """The service a container is named for: `<project>_<service>_<n>` (podman-compose)
    or `<project>-<service>-<n>` (docker compose v2); else the container's own name."""
    for service in sorted(services, key=len, reverse=True):
        for sep in ("_", "-"):
            head = f"{project}{sep}{service}{sep}"
            if name.startswith(head) and name[len(head) :].isdigit():
                return service
    return name


def parse_stats(
    output: str, project: str, services: Iterable[str], net_unit: int = 1
) -> dict[str, int]:
    """`{"<service>.cpu": ns, "<service>.net": (rx+tx) // net_unit}` from STATS_PROJECT's
    lines (a container keyed by its name when its service is unknown or has several
    containers); lines that do not parse are left out, never guessed. podman lines:
    `<name> <cpu ns> <rx bytes> <tx bytes>`; docker lines: `<name> <rx> / <tx>`."""
    known = list(services)
    rows: list[tuple[str, int | None, int | None]] = []
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 4 and all(p.isdigit() for p in parts[1:]):  # podman
            rows.append((parts[0], int(parts[1]), int(parts[2]) + int(parts[3])))
        elif len(parts) == 4 and parts[2] == "/":  # docker: name rx / tx
            rx, tx = parse_size(parts[1]), parse_size(parts[3])
            net = rx + tx if rx is not None and tx is not None else None
            rows.append((parts[0], None, net))
    keys = [container_service(name, project, known) for name, _, _ in rows]
    counters: dict[str, int] = {}
    for (name, cpu, net), key in zip(rows, keys, strict=True):
        if keys.count(key) > 1:
            key = name
        if cpu is not None:
            counters[f"{key}.cpu"] = cpu
        if net is not None:
            counters[f"{key}.net"] = net // max(int(net_unit), 1)
    return counters


# ---- what the engine answers ----------------------------------------------------------


def service_of(item: Mapping[str, Any]) -> str | None:
    service = item.get("Service") or labels_of(item).get("com.docker.compose.service")
    return str(service) if service else None


def _name(item: Mapping[str, Any]) -> str | None:
    raw = item.get("Names") or item.get("Name")
    name = raw[0] if isinstance(raw, list) and raw else raw
    return name if isinstance(name, str) else None


def container_names(output: str) -> dict[str, str]:
    """Service → the name of its (first) container, from `ps --format json`."""
    names: dict[str, str] = {}
    for item in ps_items(output):
        service, name = service_of(item), _name(item)
        if service and name and service not in names:
            names[service] = name
    return names


# Exit codes an engine's `exec` gives when it could not start the command (podman 4
# 255 or 125-127, docker 1 and 126-127), which the command itself may give too.
ENGINE_FAILURES = frozenset({1, 125, 126, 127, 255})


def running_container(output: str, service: str) -> str | None:
    """The name of a running container of `service`, from `ps --format json` of the
    project (found by the compose labels, whatever the engine named it)."""
    for item in ps_items(output):
        name = _name(item)
        state = str(item.get("State") or "").lower()
        if service_of(item) == service and state in RUNNING and name:
            return name
    return None


def parse_ps(output: str) -> dict[str, str]:
    """Service → state, from `ps --format json` of docker compose (JSON lines or an
    array) or podman-compose (podman's array, services in compose labels)."""
    states: dict[str, str] = {}
    for item in ps_items(output):
        service = service_of(item)
        state = str(item.get("State") or "").lower()
        # Any running container of a service counts; otherwise keep the worst.
        if service and states.get(service) not in RUNNING:
            states[service] = state
    return states


def image_refs(output: str) -> list[str]:
    """Every `repository:tag` of `images --format json`: podman's array (`Names`) or
    docker's JSON lines (`Repository`, `Tag`); untagged images are left out."""
    refs: list[str] = []
    for item in ps_items(output):
        names = item.get("Names")
        if isinstance(names, list):
            refs += [str(n) for n in names]
        elif item.get("Repository") and item.get("Repository") != "<none>":
            refs.append(f"{item['Repository']}:{item.get('Tag') or 'latest'}")
    return sorted(set(refs))


def _short(ref: str) -> str:
    """The repository of a reference without the registry our engines add to local
    names (`localhost/`, `docker.io/library/`) and without its tag."""
    name = ref.rsplit(":", 1)[0] if ":" in ref.rsplit("/", 1)[-1] else ref
    for prefix in ("localhost/", "docker.io/library/", "docker.io/"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def project_images(refs: Iterable[str], project: str, services: Iterable[str] = ()) -> list[str]:
    """The images named for `project`: built by compose for a service without an
    `image:` (`<project>_<service>` by podman-compose, `<project>-<service>` by docker
    compose v2) and loaded by a checkpoint restore (`sandboxer-ckpt/<project>-<service>`).
    With the services known the `-` names are matched exactly; without them by prefix
    (a sandbox id may itself contain `-`: see docs/compose.md). An image the project
    only pulled or used keeps its own name and is never matched."""
    known = set(services)
    found = []
    for ref in refs:
        name = _short(ref)
        for prefix in (f"{project}-", f"{CHECKPOINT_REPO}/{project}-"):
            rest = name[len(prefix) :]
            # unknown services: not `<project>-x_y`, podman-compose's name for project `-x`
            if name.startswith(prefix) and (rest in known if known else "_" not in rest):
                found.append(ref)
        if name.startswith(f"{project}_"):  # `_` is in no sandbox id: exact already
            found.append(ref)
    return sorted(set(found))


def image_sandbox_id(ref: str, known_ids: Iterable[str] = ()) -> str | None:
    """Which sandbox an image is named for, if any (see `project_images`). A `-`
    name is ambiguous when sandbox ids contain `-`: an id the host knows (a workspace
    or a project) wins, else the longest id that fits."""
    name = _short(ref).removeprefix(f"{CHECKPOINT_REPO}/")
    if not name.startswith(PROJECT_PREFIX):
        return None
    rest = name[len(PROJECT_PREFIX) :]
    head, sep, _ = rest.partition("_")
    if sep and ID_RE.fullmatch(head):
        return head
    candidates = [
        rest[:i]
        for i, c in enumerate(rest)
        if c == "-" and i + 1 < len(rest) and ID_RE.fullmatch(rest[:i])
    ]
    if not candidates:
        return None
    for candidate in sorted(candidates, key=len, reverse=True):
        if candidate in set(known_ids):
            return candidate
    return max(candidates, key=len)


# ---- the repo transfer ------------------------------------------------------------------

PATH_RE = re.compile(r"(?:\.{0,2}/)?[\w.@+-]+(?:/[\w.@+-]+)*")


def transfer_rules(config: Mapping[str, Any]) -> dict[str, list[str]]:
    """rsync rules from the config: `includes` win over `.gitignore` and `excludes`."""
    return {
        "includes": [str(p) for p in config.get("includes") or []],
        "excludes": [str(p) for p in config.get("excludes") or []],
        "filters": [":- .gitignore"] if config.get("gitignore", True) else [],
    }


def dropped_files(error: str, directory: str, repo: Path) -> list[str]:
    """Files an error names that are in the local repo: candidates for what the
    transfer's filter dropped (.gitignore or `excludes`), once the workspace shows
    they are missing there (`MISSING_FILES`). Paths are taken as absolute under the
    workspace, or relative to it; only the local repo is looked at."""
    found: list[str] = []
    for token in PATH_RE.findall(error):
        path = token
        if path.startswith(directory.rstrip("/") + "/"):
            path = path[len(directory.rstrip("/")) + 1 :]
        elif path.startswith("/"):
            continue
        path = posixpath.normpath(path)
        if path.startswith("..") or path in (".", ""):
            continue
        local = repo / path
        try:
            inside = local.resolve().is_relative_to(repo)
        except (OSError, RuntimeError):
            continue
        if inside and local.is_file() and path not in found:
            found.append(path)
    return found


# Prints those of its arguments (paths relative to the cwd) that do not exist.
MISSING_FILES = r"""
for f; do [ -e "$f" ] || [ -L "$f" ] || printf '%s\n' "$f"; done
"""


def explain_dropped(missing: Sequence[str]) -> str:
    """A sentence for a compose failure that names files the filter dropped (in the
    local repo, missing in the workspace)."""
    if not missing:
        return ""
    names = ", ".join(missing)
    first = missing[0]
    return (
        f"; the repo transfer's filter dropped {names} (not copied: .gitignore or "
        f"'excludes'); add it to the profile's config 'includes' (e.g. includes: "
        f'["{first}"]) to copy it'
    )


# ---- the adapter ------------------------------------------------------------------------


@dataclass(frozen=True)
class ComposeHost:
    """A machine that runs compose projects, and how to reach it."""

    name: str  # recorded in RouteChosen and in the handle
    address: str  # where clients reach its published ports
    root: str  # one workspace per sandbox below it
    transport: Transport
    compose_cmd: tuple[str, ...]
    engine_cmd: tuple[str, ...]

    def workspace(self, sandbox_id: str) -> str:
        return f"{self.root}/{check_sandbox_id(sandbox_id)}"

    def lock(self, sandbox_id: str) -> str:
        """Held by a running `compose up` of the sandbox (see LOCKED); beside the
        workspace, which teardown removes."""
        return f"{self.root}/.lock-{check_sandbox_id(sandbox_id)}"


class ComposeAdapter:
    """Every hook of a compose extension; subclasses say where the hosts are."""

    what = "compose"  # the extension's name in messages
    # Inventory only what this adapter's roots show it made (workspaces, lock files,
    # projects whose compose working_dir is under the root): for an engine shared with
    # other users (this machine), never another service's `sandboxer-*` projects.
    scoped = False

    def __init__(self, config: dict[str, Any], runtime: RuntimeInfo) -> None:
        self.runtime = runtime
        self.base_config = config
        self._monitors: dict[str, compose_services.ServiceMonitor] = {}
        # (host, project, service) -> its running container, as `ps` last named it:
        # an exec needs no `ps` of its own while the container stays (see `exec`).
        self._running: dict[tuple[str, str, str], str] = {}
        # sandbox id -> the mode it was paused in by this process (see `pause`): what
        # `services`, `exec` and the files hooks tell from it is cheap, no engine call.
        self._paused: dict[str, str] = {}

    # ---- what subclasses provide --------------------------------------------------------

    def hosts(self, config: Mapping[str, Any]) -> dict[str, ComposeHost]:
        raise NotImplementedError

    def host(self, ctx: StepContext) -> ComposeHost:
        hosts = self.hosts(ctx.config)
        if ctx.host is None or ctx.host not in hosts:
            raise ExtensionError(f"{self.what} host {ctx.host!r} is not configured")
        return hosts[ctx.host]

    def placed(self, ctx: StepContext) -> bool:
        """Whether the sandbox may have anything on a host (it was placed)."""
        return ctx.host is not None

    async def prepare_root(self, host: ComposeHost) -> None:
        """Before the first workspace on a host (compose-local makes its root 0700)."""

    def engine_present(self, host: ComposeHost) -> bool:
        """Whether the host has its container engine (compose-local may have none)."""
        return True

    # ---- helpers -----------------------------------------------------------------------

    def _repo(self, ctx: StepContext) -> Path:
        raw = ctx.inputs.get("repo")
        if not raw:
            raise ExtensionError(f"{self.what}: input 'repo' is required")
        return local_repo(raw, self.what, self.runtime.repo_roots)

    async def _ps(self, host: ComposeHost, project: str) -> str:
        """The project's containers as the engine's `ps --format json`, by the compose
        project label: asking the engine takes a fraction of a compose tool's `ps`
        (podman-compose is a Python program: ~0.7 s a call, two calls per readiness)."""
        result = await host.transport.run(ps_argv(host.engine_cmd, project), timeout=60)
        return result.stdout

    @staticmethod
    def _handle(
        host: ComposeHost, directory: str, project: str, files: Sequence[str], services: str
    ) -> Handle:
        return {
            "host": host.name,
            "address": host.address,
            "directory": directory,
            "project": project,
            "compose_file": files[0],
            "compose_files": FILES_SEPARATOR.join(files),
            "services": services,
        }

    # ---- hooks ---------------------------------------------------------------------------

    async def provision(self, ctx: StepContext) -> Handle:
        host = self.host(ctx)
        repo = self._repo(ctx)
        files, services = resolve_compose_files(ctx.inputs, ctx.config, repo)
        directory = host.workspace(ctx.sandbox_id)
        project = project_name(ctx.sandbox_id)
        await self.prepare_root(host)
        ctx.progress(f"preparing {directory} on {host.name}")
        await host.transport.run(
            ["sh", "-c", PREPARE_WORKSPACE, "sh", host.root, directory], timeout=60
        )
        ctx.progress("rsync 0%")
        rules = transfer_rules(ctx.config)
        await host.transport.copy_repo(
            repo,
            directory,
            **rules,
            progress=ctx.progress,
            timeout=float(ctx.config.get("rsync_timeout", 600)),
        )
        ctx.progress(f"compose up ({len(services)} services)")
        # The resolved configuration (what readiness waits for) is read while `up`
        # runs: `compose config` costs a compose tool's start, off the critical path.
        run = self._run(host)
        resolving = asyncio.ensure_future(
            compose_services.resolve_services(run, host.compose_cmd, project, files, directory)
        )
        try:
            await host.transport.run(
                locked_argv(host.lock(ctx.sandbox_id), up_argv(host.compose_cmd, project, files)),
                cwd=directory,
                timeout=float(ctx.config.get("up_timeout", 600)),
            )
        except CommandFailed as exc:
            resolving.cancel()
            named = dropped_files(exc.stderr, directory, repo)
            if not named:
                raise
            absent = await host.transport.run(
                ["sh", "-c", MISSING_FILES, "sh", *named], cwd=directory, check=False
            )
            hint = explain_dropped([p for p in named if p in absent.stdout.splitlines()])
            if not hint:
                raise
            raise ExtensionError(f"{exc}{hint}") from exc
        except BaseException:
            resolving.cancel()
            raise
        try:
            specs = await resolving
        except ExtensionError:
            pass  # wait_ready reads it again, and fails saying why
        else:
            services = sorted(specs)  # those `up` ran (profiles and overrides applied)
            self._monitors[ctx.sandbox_id] = compose_services.ServiceMonitor(
                run,
                host.engine_cmd,
                project,
                specs,
                run_healthchecks=str(ctx.config.get("run_healthchecks", "auto")),
            )
        return self._handle(host, directory, project, files, ",".join(services))

    async def wait_ready(self, ctx: StepContext, handle: Handle) -> list[str]:
        """Every service of the resolved configuration running, each with a
        healthcheck healthy (see extensions.compose_services)."""
        started = time.monotonic()
        monitor = await self._monitor(ctx, handle)
        return await compose_services.wait_ready(
            monitor,
            ctx.progress,
            poll_interval=float(ctx.config.get("poll_interval", 0.5)),
            settle_polls=int(ctx.config.get("settle_polls", 2)),
            timeout=float(ctx.config.get("ready_timeout", 290)),
            started=started,
            settle_interval=float(ctx.config.get("settle_interval", 0.2)),
        )

    # ---- watching ------------------------------------------------------------------------

    async def _monitor(self, ctx: StepContext, handle: Handle) -> compose_services.ServiceMonitor:
        """The sandbox's service monitor, kept in memory (rebuilt after a restart)."""
        monitor = self._monitors.get(ctx.sandbox_id)
        if monitor is None:
            host = self.host(ctx)
            monitor = await compose_services.build_monitor(
                self._run(host),
                compose=host.compose_cmd,
                engine=host.engine_cmd,
                project=handle.get("project") or project_name(ctx.sandbox_id),
                directory=handle.get("directory") or host.workspace(ctx.sandbox_id),
                handle=handle,
                run_healthchecks=str(ctx.config.get("run_healthchecks", "auto")),
            )
            self._monitors[ctx.sandbox_id] = monitor
        return monitor

    @staticmethod
    def _run(host: ComposeHost) -> compose_services.Run:
        transport = host.transport

        async def run(argv: list[str]) -> tuple[int, str, str]:
            # compose_services puts its own limit on each call
            result = await transport.run(argv, timeout=600, check=False)
            return result.exit_status, result.stdout, result.stderr

        return run

    async def services(self, ctx: StepContext, handle: Handle) -> list[ServiceStatus]:
        """One poll: each service's state and health (running the due healthchecks).
        Asked right after wait_ready, the poll that found it ready is the answer."""
        monitor = await self._monitor(ctx, handle)
        ready, monitor.ready_statuses = monitor.ready_statuses, None
        statuses = ready if ready is not None else await monitor.poll()
        if self._paused.get(ctx.sandbox_id) == "stop":
            # stopped by `pause`, not exited on their own: no ServiceExited to record
            statuses = [
                ServiceStatus(s.service, "paused", s.health, None, s.output)
                if s.state in DEAD or s.state == "created"
                else s
                for s in statuses
            ]
        return statuses

    async def endpoints(self, ctx: StepContext, handle: Handle) -> list[Endpoint]:
        """The published ports, `host` the compose host's address for a wildcard bind
        (from the last `ps` if it is under a second old: ports do not move)."""
        monitor = await self._monitor(ctx, handle)
        if not monitor.last_ps or monitor.clock() - monitor.ps_at > 1.0:
            await monitor.ps()
        return monitor.endpoints(handle.get("address") or self.host(ctx).address)

    # ---- pause and resume ----------------------------------------------------------------

    async def pause(self, ctx: StepContext, handle: Handle, mode: str) -> None:
        """Mode "pause": the engine's pause of every running container of the project
        (processes frozen, memory kept); mode "stop": the engine's stop of them (`-t`
        stop_timeout), containers kept, so their filesystems, the named volumes and
        the workspace stay. Idempotent (see PAUSE_PROJECT); one remote call."""
        check_pause_mode(mode)
        host = self.host(ctx)
        project = handle.get("project") or project_name(ctx.sandbox_id)
        # Marked first: an exec or a copy into a container that is being frozen would
        # hang, so they are refused from now on.
        self._paused[ctx.sandbox_id] = mode
        monitor = self._monitors.get(ctx.sandbox_id)
        if monitor is not None:
            monitor.ready_statuses = None  # what wait_ready saw is no answer any more
        ctx.progress(f"{'pausing' if mode == 'pause' else 'stopping'} the services")
        await host.transport.run(
            pause_argv(host.engine_cmd, project, mode, int(ctx.config.get("stop_timeout", 10))),
            timeout=float(ctx.config.get("pause_timeout", 120)),
        )

    async def resume(self, ctx: StepContext, handle: Handle, mode: str) -> None:
        """Unpause (mode "pause") or start (mode "stop") the project's containers, then
        wait as wait_ready does (every service running, healthy where it has a
        healthcheck) for at most `resume_timeout` seconds. Resuming a running sandbox
        only waits for it. After a stop the engine may publish new host ports:
        `endpoints` reads them from the engine again."""
        check_pause_mode(mode)
        host = self.host(ctx)
        project = handle.get("project") or project_name(ctx.sandbox_id)
        ctx.progress(f"{'unpausing' if mode == 'pause' else 'starting'} the services")
        await host.transport.run(
            resume_argv(host.engine_cmd, project, mode),
            timeout=float(ctx.config.get("pause_timeout", 120)),
        )
        self._paused.pop(ctx.sandbox_id, None)
        started = time.monotonic()
        monitor = await self._monitor(ctx, handle)
        await compose_services.wait_ready(
            monitor,
            ctx.progress,
            poll_interval=float(ctx.config.get("poll_interval", 0.5)),
            settle_polls=int(ctx.config.get("settle_polls", 2)),
            timeout=float(ctx.config.get("resume_timeout", 120)),
            started=started,
            settle_interval=float(ctx.config.get("settle_interval", 0.2)),
        )

    def _refuse_if_frozen(self, ctx: StepContext, service: str | None, files: bool) -> None:
        """A container frozen by a mode-pause `pause` would hang an exec or a copy."""
        if service is not None and self._paused.get(ctx.sandbox_id) == "pause":
            message = f"{self.what}: the sandbox is paused (service {service!r} is frozen)"
            raise FileRefused(message) if files else CommandRefused(message)

    async def activity(self, ctx: StepContext, handle: Handle) -> dict[str, int]:
        """Each running container's counters, one remote call (`ps` + `stats
        --no-stream`): `<service>.cpu` its CPU time in nanoseconds (podman only:
        docker's stats has no cumulative CPU time), `<service>.net` its network bytes
        received and sent, in units of `activity_net_unit` bytes (an idle container's
        kernel still sends IPv6 router solicitations, 70-140 bytes at doubling
        intervals after a start: docs/compose.md; the manager takes a move of up to
        `activity_noise` units for noise). A service with a healthcheck reports no CPU
        time (its checks move it). A paused or stopped container reports nothing."""
        host = self.host(ctx)
        project = handle.get("project") or project_name(ctx.sandbox_id)
        services = [s for s in handle.get("services", "").split(",") if s]
        result = await host.transport.run(
            stats_argv(host.engine_cmd, project),
            timeout=float(ctx.config.get("activity_timeout", 30)),
            check=False,
        )
        unit = int(ctx.config.get("activity_net_unit", 1024))
        counters = parse_stats(result.stdout, project, services, unit)
        # A healthcheck is a process in its container, run at every interval: such a
        # service's CPU time moves whether or not anyone uses it. Its network counts.
        monitor = self._monitors.get(ctx.sandbox_id)
        if monitor is not None:
            for name, spec in monitor.specs.items():
                if spec.healthcheck is not None:
                    counters.pop(f"{name}.cpu", None)
        if result.exit_status != 0 and not counters:
            # e.g. a container stopped between the ps and the stats: the next sample
            # answers; never a guess
            error = result.stderr.strip()[-300:]
            raise ExtensionError(
                f"{self.what}: stats of {project} failed (exit {result.exit_status}): {error}"
            )
        return counters

    async def teardown(self, ctx: StepContext, handle: Handle | None) -> None:
        """compose down with the files the handle recorded (never a re-discovery: a
        profile's `compose.ci.yml` is what was brought up), then by the project label
        whatever is left, the project's images and the workspace. Without a handle
        (a crash), the label sweep alone removes everything."""
        sandbox_id = check_sandbox_id(ctx.sandbox_id)
        self._monitors.pop(sandbox_id, None)
        self._paused.pop(sandbox_id, None)
        for key in [k for k in self._running if k[1] == project_name(sandbox_id)]:
            del self._running[key]
        if not self.placed(ctx):
            return  # never placed: nothing was made
        host = self.host(ctx)
        directory = host.workspace(sandbox_id)
        project = project_name(sandbox_id)
        timeout = float(ctx.config.get("down_timeout", 300))
        lock = host.lock(sandbox_id)
        # A compose up that a killed serve started may still be making things: wait
        # until its last process let go of the lock, so the sweep sees all it made.
        await host.transport.run(["sh", "-c", WAIT_FOR_LOCK, "sh", lock], timeout=timeout)
        services = {s for s in (handle or {}).get("services", "").split(",") if s}
        services |= set(container_names(await self._ps(host, project)))
        files = handle_files(handle)
        ctx.progress("compose down")
        if files:
            stop = int(ctx.config.get("stop_timeout", 10))
            # Its failure is not final: the label sweep below removes what it left.
            await host.transport.run(
                [
                    "sh",
                    "-c",
                    IN_WORKSPACE,
                    "sh",
                    directory,
                    *down_argv(host.compose_cmd, project, files, stop),
                ],
                timeout=timeout,
                check=False,
            )
        await host.transport.run(remove_project_argv(host.engine_cmd, project), timeout=timeout)
        await self._remove_images(host, project, services, timeout)
        await host.transport.run(["sh", "-c", REMOVE_WORKSPACE, "sh", directory], timeout=timeout)
        await host.transport.run(["rm", "-f", "--", lock], timeout=60)

    async def _images(self, host: ComposeHost) -> list[str]:
        return image_refs((await host.transport.run(images_argv(host.engine_cmd))).stdout)

    async def _remove_images(
        self, host: ComposeHost, project: str, services: Iterable[str], timeout: float
    ) -> None:
        """The images named for the project (built for it, loaded by a restore). Not
        forced: an image a container still uses stays and the step fails saying so."""
        refs = project_images(await self._images(host), project, services)
        if not refs:
            return
        await host.transport.run([*host.engine_cmd, "rmi", *refs], timeout=timeout, check=False)
        left = project_images(await self._images(host), project, services)
        if left:
            raise ExtensionError(f"{self.what}: images of {project} could not be removed: {left}")

    # ---- commands -----------------------------------------------------------------------

    async def _container(
        self, ctx: StepContext, handle: Handle, host: ComposeHost, service: str, *, running: bool
    ) -> str:
        """The container of `service` (a running one for `exec`; any for files and
        logs). An unknown service is refused naming the known ones."""
        project = handle.get("project") or project_name(ctx.sandbox_id)
        output = await self._ps(host, project)
        container = running_container(output, service) if running else None
        if container is None and not running:
            container = container_names(output).get(service)
        if container is not None:
            return container
        known = sorted(
            {*container_names(output), *filter(None, handle.get("services", "").split(","))}
        )
        if service in known:
            raise CommandRefused(
                f"{self.what}: service {service!r} has no running container in project {project}"
            )
        raise CommandRefused(
            f"{self.what}: no service {service[:64]!r} in project {project} "
            f"(services: {', '.join(known) or 'none'})"
        )

    def _key(
        self, ctx: StepContext, handle: Handle, host: ComposeHost, service: str
    ) -> tuple[str, str, str]:
        return (host.name, handle.get("project") or project_name(ctx.sandbox_id), service)

    async def _named(
        self, ctx: StepContext, handle: Handle, host: ComposeHost, service: str, cached: bool
    ) -> tuple[str, bool]:
        """The container of `service` for a copy: the one the last exec or copy used
        (`cached`, and one is known: True), else the one `ps` names now."""
        known = self._running.get(self._key(ctx, handle, host, service)) if cached else None
        if known is not None:
            return known, True
        return await self._container(ctx, handle, host, service, running=False), False

    def _forget(self, ctx: StepContext, handle: Handle, host: ComposeHost, service: str) -> None:
        self._running.pop(self._key(ctx, handle, host, service), None)

    async def _stop_tagged(self, host: ComposeHost, token: str, container: str) -> None:
        """Stops what still runs of a cancelled or timed-out command (see STOP_TAGGED)."""
        argv = stop_tagged_argv(token, host.engine_cmd if container else (), container)
        try:
            await host.transport.run(argv, timeout=10, check=False)
        except (ExtensionError, OSError, TimeoutError):
            pass  # the host is gone: nothing of it can be stopped from here

    async def exec(
        self,
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
        """On the host, in the sandbox's workspace (`service` None), or inside a
        running container of a service through `<engine> exec`; every argument
        quoted (SSH) or passed as a list (this machine). The command carries a tag
        in its environment, so a timeout or a cancellation stops it where it runs."""
        variables = check_command(argv, env)
        self._refuse_if_frozen(ctx, service, files=False)
        host = self.host(ctx)
        directory = host.workspace(ctx.sandbox_id)
        output = OutputBuffer(on_output)
        token = new_tag()
        tagged = {**variables, TAG_NAME: token}
        started = time.monotonic()
        container = ""
        try:
            async with asyncio.timeout(timeout):
                if service is None:
                    cwd = posixpath.join(directory, workdir) if workdir else directory
                    code = await host.transport.run_streaming(
                        argv, output, cwd=cwd, env=tagged, timeout=timeout
                    )
                else:
                    key = (
                        host.name,
                        handle.get("project") or project_name(ctx.sandbox_id),
                        service,
                    )
                    cached = self._running.get(key)
                    container = cached or await self._container(
                        ctx, handle, host, service, running=True
                    )
                    self._running[key] = container
                    command = exec_argv(
                        host.engine_cmd, container, argv, workdir=workdir, env=tagged
                    )
                    code = await host.transport.run_streaming(command, output, timeout=timeout)
                    if cached and code in ENGINE_FAILURES and not output.streams["stdout"].count:
                        # The engine may have refused: the container went away or
                        # stopped since. Ask `ps` (the command is never run again).
                        self._running.pop(key, None)
                        await self._container(ctx, handle, host, service, running=True)
        except (TimeoutError, asyncio.CancelledError):
            await asyncio.shield(self._stop_tagged(host, token, container))
            raise
        return output.result(code, time.monotonic() - started)

    # ---- files --------------------------------------------------------------------------

    async def put_file(
        self,
        ctx: StepContext,
        handle: Handle,
        path: str,
        source: Path,
        *,
        service: str | None = None,
    ) -> None:
        """Into a service's container through `<engine> cp - <container>:/` (a tar of
        one member, its parents created by the engine), or into the workspace."""
        checked = check_file_path(path)
        self._refuse_if_frozen(ctx, service, files=True)
        host = self.host(ctx)
        if service is None:
            argv = ["sh", "-c", PUT_WORKSPACE_FILE, "sh", host.workspace(ctx.sandbox_id), checked]
            try:
                await host.transport.run_with_input(argv, file_chunks(source), timeout=3600)
            except CommandFailed as exc:
                raise refusal(path, exc.exit_status or 1, exc.stderr, self.what) from None
            return
        for cached in (True, False):
            container, was_cached = await self._named(ctx, handle, host, service, cached)
            argv = [*host.engine_cmd, "cp", "-", f"{container}:/"]
            try:
                await host.transport.run_with_input(
                    argv, tar_member(checked.lstrip("/"), source), timeout=3600
                )
                self._running[self._key(ctx, handle, host, service)] = container
                return
            except CommandFailed as exc:
                lowered = exc.stderr.lower()
                if "directory" in lowered or "could not be found" in lowered:
                    raise FileRefused(f"{path}: {exc.stderr.strip()[-200:]}") from None
                self._forget(ctx, handle, host, service)
                if not was_cached:
                    raise

    async def get_file(
        self,
        ctx: StepContext,
        handle: Handle,
        path: str,
        *,
        service: str | None = None,
        max_bytes: int,
    ) -> FileStream:
        """From a service's container through `<engine> cp <container>:<path> -` (its
        tar read as it streams: the engine resolves links inside the container), or
        from the workspace."""
        checked = check_file_path(path)
        self._refuse_if_frozen(ctx, service, files=True)
        host = self.host(ctx)
        if service is None:
            argv = ["sh", "-c", GET_WORKSPACE_FILE, "sh", host.workspace(ctx.sandbox_id), checked]
            reader = await host.transport.open_reader(argv)
            return await open_workspace_file(reader, path, max_bytes, self.what)
        for cached in (True, False):
            container, was_cached = await self._named(ctx, handle, host, service, cached)
            reader = await host.transport.open_reader(
                [*host.engine_cmd, "cp", f"{container}:{checked}", "-"]
            )
            try:
                stream = await open_tar_file(reader, path, max_bytes)
                self._running[self._key(ctx, handle, host, service)] = container
                return stream
            except (FileRefused, FileTooLarge):
                raise
            except ExtensionError:  # the copy failed: the container may be gone
                self._forget(ctx, handle, host, service)
                if not was_cached:
                    raise
        raise AssertionError("unreachable")  # the second round raises or returns

    # ---- logs ---------------------------------------------------------------------------

    async def logs(
        self,
        ctx: StepContext,
        handle: Handle,
        *,
        service: str | None = None,
        follow: bool = False,
        tail: int | None = None,
        since: float | None = None,
        on_output: LogFn,
    ) -> None:
        """`<engine> logs [--follow] [--tail N] [--since T] <container>` per service,
        concurrently; each engine process carries a tag, so a cancellation stops it
        on the host too."""
        host = self.host(ctx)
        project = handle.get("project") or project_name(ctx.sandbox_id)
        if service is not None:
            containers = {service: await self._container(ctx, handle, host, service, running=False)}
        else:
            containers = container_names(await self._ps(host, project))
        options: list[str] = []
        if follow:
            options.append("--follow")
        if tail is not None:
            options += ["--tail", str(max(int(tail), 0))]
        if since is not None:
            options += ["--since", str(int(since))]
        tokens = {name: new_tag() for name in containers}

        async def one(name: str, container: str) -> None:
            async def passed(stream: str, data: bytes) -> None:
                await on_output(name, stream, data)

            argv = [*host.engine_cmd, "logs", *options, container]
            output = OutputBuffer(passed, keep=4096)  # a tail, for the error below
            code = await host.transport.run_streaming(
                argv, output, env={TAG_NAME: tokens[name]}, timeout=LOGS_TIMEOUT
            )
            if code != 0:
                tail = output.text("stderr").strip().splitlines()[-1:] or [""]
                raise ExtensionError(
                    f"{self.what}: logs of {name} ended with exit {code}: {tail[0][:300]}"
                )

        tasks = [asyncio.ensure_future(one(name, c)) for name, c in containers.items()]
        try:
            await asyncio.gather(*tasks)  # the first failure as itself, not in a group
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if follow:
                await asyncio.shield(
                    asyncio.gather(*(self._stop_tagged(host, t, "") for t in tokens.values()))
                )
            raise

    # ---- checkpoints --------------------------------------------------------------------

    async def snapshot(self, ctx: StepContext, handle: Handle, target: Path) -> dict[str, str]:
        """Pause the services, commit and save each container's filesystem, stream the
        workspace and the images as one tar into `target`, unpause."""
        host = self.host(ctx)
        run = host.transport.run
        directory = host.workspace(ctx.sandbox_id)
        project = handle.get("project") or project_name(ctx.sandbox_id)
        checkpoint = ctx.checkpoint_id or ""
        if not ID_RE.fullmatch(checkpoint):
            raise ExtensionError(f"invalid checkpoint id {checkpoint!r}")
        files = handle_files(handle) or [COMPOSE_FILES[1]]
        engine = list(host.engine_cmd)
        scratch = f"{host.root}/.ckpt-{checkpoint}"
        names = container_names(await self._ps(host, project))
        tags = {service: checkpoint_tag(project, service, checkpoint) for service in names}
        timeout = float(ctx.config.get("checkpoint_timeout", 1800))
        ctx.progress("pausing services")
        await run(
            compose_argv(host.compose_cmd, project, files, "pause"), cwd=directory, timeout=120
        )
        try:
            await run(["mkdir", "-p", "--", f"{scratch}/images"])
            for service, name in sorted(names.items()):
                ctx.progress(f"committing {service}")
                await run([*engine, "commit", name, tags[service]], timeout=timeout)
                await run(
                    [*engine, "save", "-o", f"{scratch}/images/{service}.tar", tags[service]],
                    timeout=timeout,
                )
            ctx.progress("streaming the archive")
            await host.transport.stream_to_file(
                ["tar", "-cf", "-", "-C", host.root, ctx.sandbox_id, "-C", scratch, "images"],
                target,
                timeout=timeout,
                progress=lambda n: ctx.progress(f"streamed {n // (1024 * 1024)} MiB"),
            )
        finally:
            await run(
                compose_argv(host.compose_cmd, project, files, "unpause"),
                cwd=directory,
                timeout=120,
                check=False,
            )
            await run(["rm", "-rf", "--", scratch], check=False)
            if tags:
                await run([*engine, "rmi", *tags.values()], check=False, timeout=120)
        return {
            "source_sandbox": ctx.sandbox_id,
            "project": project,
            "compose_file": files[0],
            "compose_files": FILES_SEPARATOR.join(files),
            "services": ",".join(sorted(names)),
            "images": ",".join(f"{s}={t}" for s, t in sorted(tags.items())),
        }

    async def restore(
        self, ctx: StepContext, handle: Handle | None, source: Path, metadata: dict[str, str]
    ) -> Handle:
        """Put a checkpoint back: into this sandbox (its project is stopped first), or
        into a fresh one (a clone, `handle` None). The project comes up on the images
        committed at checkpoint time, tagged for this sandbox's project
        (`sandboxer-ckpt/<project>-<service>:<checkpoint>`) so its teardown removes them."""
        host = self.host(ctx)
        run = host.transport.run
        directory = host.workspace(ctx.sandbox_id)
        project = project_name(ctx.sandbox_id)
        old = check_sandbox_id(metadata["source_sandbox"])
        files = handle_files(metadata) or [COMPOSE_FILES[1]]
        engine = list(host.engine_cmd)
        staging = f"{host.root}/.restore-{ctx.sandbox_id}"
        timeout = float(ctx.config.get("checkpoint_timeout", 1800))
        stop = int(ctx.config.get("stop_timeout", 10))
        if handle is not None:
            ctx.progress("stopping the project")
            await run(down_argv(host.compose_cmd, project, files, stop), cwd=directory, timeout=300)
        await self.prepare_root(host)
        await run(["sh", "-c", PREPARE_WORKSPACE, "sh", host.root, staging], timeout=60)
        images: dict[str, str] = dict(
            pair.split("=", 1) for pair in metadata.get("images", "").split(",") if pair
        )
        ours: dict[str, str] = {}
        try:
            ctx.progress("streaming the archive back")
            await host.transport.stream_from_file(
                ["tar", "-xf", "-", "-C", staging], source, timeout=timeout
            )
            await run(
                ["sh", "-c", REPLACE_WORKSPACE, "sh", f"{staging}/{old}", directory],
                timeout=300,
            )
            for service in sorted(images):
                ctx.progress(f"loading the image of {service}")
                loaded = images[service]
                existed = (
                    await run([*engine, "image", "inspect", loaded], check=False)
                ).exit_status == 0
                await run(
                    [*engine, "load", "-i", f"{staging}/images/{service}.tar"], timeout=timeout
                )
                tag = loaded.rsplit(":", 1)[1] if ":" in loaded else "latest"
                ours[service] = checkpoint_tag(project, service, tag)
                if ours[service] != loaded:
                    await run([*engine, "tag", loaded, ours[service]], timeout=120)
                    if not existed:  # the loaded name is not ours to keep
                        await run([*engine, "rmi", loaded], timeout=120)
        finally:
            await run(["rm", "-rf", "--", staging], check=False)
        override = {"services": {s: {"image": tag} for s, tag in ours.items()}}
        await run(
            ["sh", "-c", 'cat > "$1"', "sh", f"{directory}/{RESTORE_OVERRIDE}"],
            stdin=yaml.safe_dump(override),
        )
        ctx.progress("compose up on the checkpoint's images")
        await run(
            up_argv(host.compose_cmd, project, [*files, RESTORE_OVERRIDE]),
            cwd=directory,
            timeout=float(ctx.config.get("up_timeout", 600)),
        )
        return self._handle(host, directory, project, files, metadata.get("services", ""))

    # ---- reconciliation -----------------------------------------------------------------

    async def inventory(self, config: Mapping[str, Any]) -> list[Resource]:
        """Per host: workspaces under the root, compose projects named like ours
        (`sandboxer-<id>`) that have containers, with or without their workspace, and
        images named for such a project (built for it, or loaded by a restore)."""
        found: list[Resource] = []
        for host in self.hosts(config).values():
            listed = await host.transport.run(
                ["sh", "-c", LIST_WORKSPACES, "sh", host.root], timeout=60
            )
            workspaces = [n for n in listed.stdout.split() if ID_RE.fullmatch(n)]
            here: list[Resource] = [
                Resource(sandbox_id, host.name, "workspace", host.workspace(sandbox_id))
                for sandbox_id in workspaces
            ]
            locks = await host.transport.run(["sh", "-c", LIST_LOCKS, "sh", host.root], timeout=60)
            ours = set(workspaces) | {n for n in locks.stdout.split() if ID_RE.fullmatch(n)}
            if not self.engine_present(host):
                found += here
                continue
            result = await host.transport.run(ps_argv(host.engine_cmd), timeout=60)
            projects: dict[str, bool] = {}
            for item in ps_items(result.stdout):
                labels = labels_of(item)
                project = labels.get("com.docker.compose.project", "")
                workdir = labels.get("com.docker.compose.project.working_dir", "")
                inside = workdir.startswith(host.root.rstrip("/") + "/")
                projects[project] = projects.get(project, False) or inside
            ids = set(workspaces)
            for project, inside in sorted(projects.items()):
                sandbox_id = project.removeprefix(PROJECT_PREFIX)
                if project.startswith(PROJECT_PREFIX) and ID_RE.fullmatch(sandbox_id):
                    ids.add(sandbox_id)
                    if inside:
                        ours.add(sandbox_id)
                    here.append(Resource(sandbox_id, host.name, "compose_project", project))
            for ref in await self._images(host):
                owner = image_sandbox_id(ref, ids | ours)
                if owner is not None:
                    here.append(Resource(owner, host.name, "image", ref))
            found += [r for r in here if not self.scoped or r.sandbox_id in ours]
        return found

    async def remove_orphan(self, config: Mapping[str, Any], resource: Resource) -> None:
        hosts = self.hosts(config)
        if resource.host not in hosts:
            raise ExtensionError(f"{self.what} host {resource.host!r} is not configured")
        host = hosts[resource.host]
        sandbox_id = check_sandbox_id(resource.sandbox_id)
        timeout = float(config.get("down_timeout", 300))
        if resource.kind == "workspace":
            # everything of the sandbox, as a teardown without a handle does
            await self.teardown(StepContext(sandbox_id, "", {}, config, host=resource.host), None)
        elif resource.kind == "compose_project":
            await host.transport.run(
                remove_project_argv(host.engine_cmd, project_name(sandbox_id)), timeout=timeout
            )
        elif resource.kind == "image":
            if image_sandbox_id(resource.detail) is None or resource.detail.startswith("-"):
                raise ExtensionError(f"{self.what}: {resource.detail!r} is not one of our images")
            # Its containers first (an orphan's), then the image; gone already is success.
            await host.transport.run(
                remove_project_argv(host.engine_cmd, project_name(sandbox_id)), timeout=timeout
            )
            if resource.detail in await self._images(host):
                await host.transport.run(
                    [*host.engine_cmd, "rmi", resource.detail], timeout=timeout
                )
        else:
            raise ExtensionError(f"{self.what}: no such resource kind {resource.kind!r}")

    async def close(self) -> None:
        return None


def default_cmd(candidates: Sequence[tuple[str, str]]) -> str:
    """The first command whose program is on PATH (`(program, command)` pairs); else
    the last command."""
    for program, command in candidates:
        if shutil.which(program, path=os.environ.get("PATH")):
            return command
    return candidates[-1][1]
