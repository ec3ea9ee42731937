"""The services of a compose sandbox as compose means them: readiness, watching,
published ports. Transport-agnostic: every remote step goes through an async `run`
callable (argv → exit code, stdout, stderr; argv a list, never a shell string), so the
same code serves an SSH host (over its pooled connection) and the local machine.

- `resolve_services`: the services of the *resolved* configuration (`compose config`:
  profiles, override files, interpolation), each with its healthcheck and ports.
- `ServiceMonitor`: one `poll()` asks the engine for the project's containers (one
  `ps`), runs the healthchecks that are due where the engine does not run them itself
  (podman without systemd: `<engine> healthcheck run`, on the check's own interval,
  timeout and retries) and answers a `ServiceStatus` per expected service.
- `wait_ready`: every service running, each with a healthcheck healthy, on
  `settle_polls` polls in a row; an exited service fails at once; a timeout names
  every service not ready with its state, health and last healthcheck output.
- `parse_endpoints`: published ports from the engine's `ps`, with the address a
  client uses.

The parsing functions are pure (no I/O) so they are tested on their own.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import yaml

from extensions.sdk import Endpoint, ExtensionError, Handle, ProgressFn, ServiceStatus

Run = Callable[[list[str]], Awaitable[tuple[int, str, str]]]
"""`await run(argv)` → (exit code, stdout, stderr); never raises for a non-zero exit."""
Clock = Callable[[], float]

OUTPUT_TAIL = 1000  # characters of a healthcheck's output kept
CALL_TIMEOUT = 60.0  # seconds a ps or an inspect may take
CONFIG_TIMEOUT = 120.0  # seconds `compose config` may take
RUNNING = "running"
DEAD = frozenset({"exited", "dead", "stopped", "removing"})
RUN_HEALTHCHECKS = ("auto", "always", "never")
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"

# compose's healthcheck defaults (the compose spec / docker engine)
DEFAULT_INTERVAL = 30.0
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 3
DEFAULT_START_INTERVAL = 5.0


def tail(text: str, keep: int = OUTPUT_TAIL) -> str:
    return text[-keep:] if len(text) > keep else text


async def call(run: Run, argv: list[str], timeout: float, what: str) -> tuple[int, str, str]:
    """`run(argv)` under this module's own limit (the transport may have a longer one)."""
    try:
        return await asyncio.wait_for(run(argv), timeout)
    except TimeoutError:
        raise ExtensionError(f"{what} did not answer within {timeout:g}s") from None


# ---- compose config ------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|us|µs|ns|m|s)")
_DURATION_UNITS = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "ns": 1e-9,
}


def parse_duration(value: object, default: float) -> float:
    """Seconds of a compose duration: "1m30s", "500ms", "5s", "1h2m3.5s"; a bare
    number is seconds; None or "" is `default`. Anything else raises ValueError."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    pos, total = 0, 0.0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise ValueError(f"not a duration: {value!r}")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos == 0:
        raise ValueError(f"not a duration: {value!r}")
    return total


@dataclass(frozen=True)
class Healthcheck:
    test: tuple[str, ...]  # ("CMD", ...) or ("CMD-SHELL", script)
    interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    start_period: float = 0.0
    start_interval: float = DEFAULT_START_INTERVAL  # between checks in the start period


def parse_healthcheck(raw: object) -> Healthcheck | None:
    """A service's `healthcheck:`; None when it has none, `disable: true`, or test
    NONE. A string test is a shell command (CMD-SHELL), as compose takes it."""
    if not isinstance(raw, Mapping) or raw.get("disable") is True:
        return None
    test = raw.get("test")
    if test is None or test == "" or test == []:
        return None  # only timings: the image's own check, which we cannot see
    if isinstance(test, str):
        argv: tuple[str, ...] = ("CMD-SHELL", test)
    elif isinstance(test, list) and all(isinstance(t, str | int | float) for t in test):
        argv = tuple(str(t) for t in test)
    else:
        raise ValueError(f"healthcheck test must be a string or a list, got {test!r}")
    if argv[0] == "NONE":
        return None
    if argv[0] not in ("CMD", "CMD-SHELL"):
        argv = ("CMD", *argv)
    retries = raw.get("retries")
    return Healthcheck(
        test=argv,
        interval=parse_duration(raw.get("interval"), DEFAULT_INTERVAL) or DEFAULT_INTERVAL,
        timeout=parse_duration(raw.get("timeout"), DEFAULT_TIMEOUT) or DEFAULT_TIMEOUT,
        retries=int(retries) if isinstance(retries, int | str) and int(retries) > 0 else 3,
        start_period=parse_duration(raw.get("start_period"), 0.0),
        start_interval=parse_duration(raw.get("start_interval"), DEFAULT_START_INTERVAL)
        or DEFAULT_START_INTERVAL,
    )


@dataclass(frozen=True)
class PortSpec:
    """A `ports:` entry of the compose file; `published` "" is a random host port."""

    container_port: int
    protocol: str = "tcp"
    published: str = ""
    host_ip: str = ""


def _port_range(text: str) -> list[int]:
    first, _, last = text.partition("-")
    start = int(first)
    end = int(last) if last else start
    if not 0 < start <= end <= 65535:
        raise ValueError(f"not a port or range: {text!r}")
    return list(range(start, end + 1))


def parse_port(raw: object) -> list[PortSpec]:
    """One `ports:` entry, short ("8080", "8080:80", "127.0.0.1::80/udp",
    "[::1]:8080:80", "9000-9001:80-81") or long ({target, published, host_ip,
    protocol}) syntax; a range gives one spec per port."""
    if isinstance(raw, Mapping):
        target = raw.get("target")
        if target is None:
            raise ValueError(f"port without target: {dict(raw)!r}")
        published = raw.get("published")
        return [
            PortSpec(
                container_port=int(target),
                protocol=str(raw.get("protocol") or "tcp").lower(),
                published="" if published in (None, "") else str(published),
                host_ip=str(raw.get("host_ip") or ""),
            )
        ]
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise ValueError(f"not a port: {raw!r}")
    text = str(raw).strip()
    protocol = "tcp"
    if "/" in text:
        text, protocol = text.rsplit("/", 1)
    host_ip = ""
    if text.startswith("["):  # [ipv6]:published:target
        end = text.index("]")
        host_ip, text = text[1:end], text[end + 1 :].lstrip(":")
        published, _, target = text.rpartition(":")
    else:
        parts = text.split(":")
        if len(parts) == 1:
            published, target = "", parts[0]
        elif len(parts) == 2:
            published, target = parts
        elif len(parts) == 3:
            host_ip, published, target = parts
        else:
            raise ValueError(f"not a port: {raw!r}")
    targets = _port_range(target)
    hosts: list[str] = [str(p) for p in _port_range(published)] if published else []
    if hosts and len(hosts) != len(targets):
        if len(targets) == 1:  # a host range for one port: the engine picks one of them
            hosts = [published]
        else:
            raise ValueError(f"port ranges of different lengths: {raw!r}")
    return [
        PortSpec(
            container_port=port,
            protocol=protocol.lower(),
            published=hosts[i] if hosts else "",
            host_ip=host_ip,
        )
        for i, port in enumerate(targets)
    ]


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    healthcheck: Healthcheck | None = None
    ports: tuple[PortSpec, ...] = ()


def parse_config(text: str) -> dict[str, ServiceSpec]:
    """Service name → spec, from `compose config` output (YAML, or JSON: a YAML
    subset), in name order. What it prints is already resolved: services of profiles
    not activated are not there. Services scaled to 0 are not expected."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ExtensionError(f"compose config printed no YAML or JSON: {exc}") from exc
    if not isinstance(doc, Mapping) or not isinstance(doc.get("services"), Mapping):
        raise ExtensionError("compose config printed no services")
    specs: dict[str, ServiceSpec] = {}
    for name in sorted(doc["services"], key=str):
        raw = doc["services"][name] or {}
        if not isinstance(raw, Mapping):
            raise ExtensionError(f"compose config: service {name!r} is not a mapping")
        deploy = raw.get("deploy") if isinstance(raw.get("deploy"), Mapping) else {}
        replicas = raw.get("scale", (deploy or {}).get("replicas"))
        if replicas is not None and str(replicas) == "0":
            continue
        try:
            ports = [p for entry in raw.get("ports") or [] for p in parse_port(entry)]
            check = parse_healthcheck(raw.get("healthcheck"))
        except (ValueError, TypeError) as exc:
            raise ExtensionError(f"compose config: service {name!r}: {exc}") from exc
        specs[str(name)] = ServiceSpec(str(name), check, tuple(ports))
    if not specs:
        raise ExtensionError("compose config: no service would run")
    return specs


def compose_files(handle: Mapping[str, str]) -> list[str]:
    """The compose files as the handle carries them: `compose_files` (one a line),
    else `compose_file`, else none (compose discovers them itself)."""
    listed = [f for f in handle.get("compose_files", "").splitlines() if f.strip()]
    if listed:
        return listed
    single = handle.get("compose_file", "")
    return [single] if single else []


def config_argv(compose: Sequence[str], project: str, files: Sequence[str]) -> list[str]:
    argv = [*compose, "-p", project]
    for name in files:
        argv += ["-f", name]
    return [*argv, "config"]


def in_directory(directory: str, argv: Sequence[str]) -> list[str]:
    """argv run in `directory` (entered first), without a shell line being built."""
    return ["sh", "-c", 'cd -- "$1" && shift && exec "$@"', "sh", directory, *argv]


async def resolve_services(
    run: Run, compose: Sequence[str], project: str, files: Sequence[str], directory: str
) -> dict[str, ServiceSpec]:
    """The services `up` runs, from `<compose> -p P [-f F]... config` in the workspace."""
    argv = in_directory(directory, config_argv(compose, project, files))
    code, out, err = await call(run, argv, CONFIG_TIMEOUT, "compose config")
    if code != 0:
        raise ExtensionError(f"compose config failed (exit {code}): {tail(err.strip(), 600)}")
    return parse_config(out)


# ---- the engine's view ---------------------------------------------------------------


def ps_items(output: str) -> list[dict[str, Any]]:
    """`<engine> ps --format json`: podman's JSON array or docker's JSON lines."""
    text = output.strip()
    if not text:
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]
    items = data if isinstance(data, list) else [data]
    return [i for i in items if isinstance(i, dict)]


def labels_of(item: Mapping[str, Any]) -> dict[str, str]:
    labels = item.get("Labels") or {}
    if isinstance(labels, str):  # docker: "k=v,k=v"
        labels = dict(p.split("=", 1) for p in labels.split(",") if "=" in p)
    return {str(k): str(v) for k, v in labels.items()}


_EXITED_RE = re.compile(r"Exited \((-?\d+)\)")
_HEALTH_RE = re.compile(r"\((healthy|unhealthy|starting|health: starting)\)")


@dataclass(frozen=True)
class Container:
    service: str
    id: str
    name: str
    state: str  # the engine's: running, exited, created, paused, ...
    exit_code: int | None = None
    engine_health: str = "none"  # what the engine itself says (docker runs the checks)
    started: str = ""  # changes when the container restarts
    ports: tuple[Mapping[str, Any], ...] = ()
    ports_text: str = ""  # docker's "0.0.0.0:49153->80/tcp, ..."


def container_of(item: Mapping[str, Any]) -> Container | None:
    service = item.get("Service") or labels_of(item).get(SERVICE_LABEL)
    if not service:
        return None
    raw_name = item.get("Names") or item.get("Name") or ""
    name = raw_name[0] if isinstance(raw_name, list) and raw_name else raw_name
    state = str(item.get("State") or "").lower()
    if state == "stopped":
        state = "exited"  # podman's passing state between the exit and its clean-up
    status = str(item.get("Status") or "")
    exit_code: int | None = None
    if state in DEAD or item.get("Exited") is True:
        code = item.get("ExitCode")
        found = _EXITED_RE.search(status)
        if isinstance(code, int) and not isinstance(code, bool):
            exit_code = code
        elif found:
            exit_code = int(found.group(1))
    health_match = _HEALTH_RE.search(status) if state == RUNNING else None
    health = "none"
    if health_match:
        health = "starting" if "starting" in health_match.group(1) else health_match.group(1)
    raw_ports = item.get("Ports")
    listed = raw_ports if isinstance(raw_ports, list) else []
    ports = tuple(p for p in listed if isinstance(p, Mapping))
    return Container(
        service=str(service),
        id=str(item.get("Id") or item.get("ID") or name),
        name=str(name),
        state=state,
        exit_code=exit_code,
        engine_health=health,
        started=str(item.get("StartedAt") or ""),  # podman's; docker's ps has none
        ports=ports,
        ports_text=raw_ports if isinstance(raw_ports, str) else "",
    )


def parse_containers(output: str) -> dict[str, Container]:
    """Service → its container (a running one if any, else the last listed)."""
    found: dict[str, Container] = {}
    for item in ps_items(output):
        container = container_of(item)
        if container is None:
            continue
        current = found.get(container.service)
        if current is None or current.state != RUNNING:
            found[container.service] = container
    return found


def client_host(host_ip: str, address: str) -> str:
    """Where a client connects: the compose host's address for a wildcard binding,
    else the bound address."""
    ip = host_ip.strip("[]")
    return address if ip in ("", "0.0.0.0", "::") else ip


_DOCKER_PORT_RE = re.compile(
    r"^(?:(?P<ip>\[[^\]]*\]|[^:\s]*):)?(?P<host>\d+)(?:-(?P<host_end>\d+))?->"
    r"(?P<ctr>\d+)(?:-(?P<ctr_end>\d+))?/(?P<proto>\w+)$"
)


def _endpoints_of(container: Container, address: str) -> list[Endpoint]:
    found: list[Endpoint] = []
    for port in container.ports:  # podman: {host_ip, container_port, host_port, range, protocol}
        try:
            host_port, container_port = int(port["host_port"]), int(port["container_port"])
            count = max(int(port.get("range") or 1), 1)
        except (KeyError, TypeError, ValueError):
            continue
        if host_port <= 0:
            continue
        host = client_host(str(port.get("host_ip") or ""), address)
        protocol = str(port.get("protocol") or "tcp").lower()
        found += [
            Endpoint(container.service, container_port + i, protocol, host, host_port + i)
            for i in range(count)
        ]
    for piece in container.ports_text.split(","):  # docker: "0.0.0.0:49153->80/tcp"
        match = _DOCKER_PORT_RE.fullmatch(piece.strip())
        if match is None:
            continue  # "80/tcp": exposed, not published
        host_first, ctr_first = int(match["host"]), int(match["ctr"])
        count = int(match["ctr_end"] or ctr_first) - ctr_first + 1
        host = client_host(match["ip"] or "", address)
        found += [
            Endpoint(container.service, ctr_first + i, match["proto"].lower(), host, host_first + i)
            for i in range(count)
        ]
    return found


def parse_endpoints(
    output: str, address: str, services: Iterable[str] | None = None
) -> list[Endpoint]:
    """Published ports of the project's running containers from `<engine> ps --format
    json` (podman's `Ports` list or docker's `Ports` text), `host` as a client uses it;
    deduplicated (docker lists 0.0.0.0 and :: apart) and sorted."""
    wanted = set(services) if services is not None else None
    found: set[Endpoint] = set()
    for container in parse_containers(output).values():
        if container.state != RUNNING or (wanted is not None and container.service not in wanted):
            continue
        found.update(_endpoints_of(container, address))
    return sorted(found, key=lambda e: (e.service, e.container_port, e.protocol, e.host))


def ps_argv(engine: Sequence[str], project: str) -> list[str]:
    return [
        *engine,
        "ps",
        "-a",
        "--filter",
        f"label={PROJECT_LABEL}={project}",
        "--format",
        "json",
    ]


def engine_runs_healthchecks(engine: Sequence[str], setting: str) -> bool:
    """Whether we leave the healthchecks to the engine. `auto`: docker runs them,
    podman (whose timers need systemd) is run by us; `always`: we run them; `never`:
    we only read what the engine says."""
    if setting not in RUN_HEALTHCHECKS:
        raise ExtensionError(
            f"run_healthchecks must be one of {', '.join(RUN_HEALTHCHECKS)}, got {setting!r}"
        )
    if setting == "auto":
        return not any(PurePosixPath(arg).name == "podman" for arg in engine)
    return setting == "never"


# One remote call runs every due check (at once, each under its own timeout), then
# one inspect reports the checks' results: lines "rc <id> <code>", "<id> <health json>".
RUN_CHECKS = r"""
set -u
checks=$1; shift
for item in $checks; do
  id=${item%%:*}; limit=${item#*:}
  (
    if command -v timeout >/dev/null 2>&1; then
      timeout -s KILL "$limit" "$@" healthcheck run "$id" >/dev/null 2>&1
    else
      "$@" healthcheck run "$id" >/dev/null 2>&1
    fi
    echo "rc $id $?"
  ) &
done
wait
ids=""
for item in $checks; do ids="$ids ${item%%:*}"; done
"$@" inspect --format '{{.Id}} {{json .State.Health}}' $ids 2>/dev/null
exit 0
"""


def parse_check_results(output: str) -> tuple[dict[str, int], dict[str, str]]:
    """(container id → exit code of `healthcheck run`, container id → the output of
    the last check the engine logged) from RUN_CHECKS' output."""
    codes: dict[str, int] = {}
    outputs: dict[str, str] = {}
    for line in output.splitlines():
        if line.startswith("rc "):
            parts = line.split()
            if len(parts) == 3 and parts[2].lstrip("-").isdigit():
                codes[parts[1]] = int(parts[2])
            continue
        ident, _, raw = line.partition(" ")
        try:
            health = json.loads(raw)
        except json.JSONDecodeError:
            continue
        log = health.get("Log") if isinstance(health, dict) else None
        if isinstance(log, list) and log and isinstance(log[-1], dict):
            outputs[ident] = str(log[-1].get("Output") or "")
    return codes, outputs


def _by_id(table: Mapping[str, Any], ident: str) -> Any:
    """A value keyed by a container id, full or short (docker ps gives 12 digits)."""
    for key, value in table.items():
        if key.startswith(ident) or ident.startswith(key):
            return value
    return None


# ---- health ----------------------------------------------------------------------------


@dataclass
class HealthTracker:
    """The health of one container whose checks we run, as the engine would keep it:
    a check is due at once when it is first seen running, then every `interval`
    (every `start_interval` in the start period until a first success); `retries`
    failures in a row make it unhealthy, one success healthy. Failures in
    `start_period` do not count (until a first success), as compose defines it."""

    check: Healthcheck
    started: float  # when we first saw the container running (our clock)
    health: str = "starting"
    failures: int = 0
    output: str = ""
    next_due: float = field(default=0.0)
    passed_once: bool = False

    def __post_init__(self) -> None:
        self.next_due = self.started

    def due(self, now: float) -> bool:
        return now >= self.next_due

    def record(self, ok: bool, output: str, now: float) -> None:
        self.output = tail(output)
        starting = not self.passed_once and now < self.started + self.check.start_period
        self.next_due = now + self.check.interval
        if ok:
            self.health, self.failures, self.passed_once = "healthy", 0, True
            return
        if starting:  # a failure in the start period does not count
            self.next_due = now + min(self.check.start_interval, self.check.interval)
            return
        self.failures += 1
        if self.failures >= self.check.retries:
            self.health = "unhealthy"


def check_outcome(code: int | None, output: str, timeout: float) -> tuple[bool, str]:
    """A `healthcheck run` exit code → (passed, output to keep)."""
    if code == 0:
        return True, output
    if code == 1:
        return False, output
    if code in (124, 137):
        return False, f"healthcheck timed out after {timeout:g}s\n{output}".strip()
    if code is None:
        return False, output or "healthcheck did not report"
    return False, f"healthcheck could not run (exit {code})\n{output}".strip()


class ServiceMonitor:
    """The services of one sandbox as the engine sees them, polled on demand.

    `poll()` costs one `ps`, plus one call running every healthcheck that is due
    (when we run them), plus one `inspect` when the engine reports a service newly
    unhealthy (when it runs them), so its output can be kept."""

    def __init__(
        self,
        run: Run,
        engine: Sequence[str],
        project: str,
        specs: Mapping[str, ServiceSpec],
        *,
        run_healthchecks: str = "auto",
        clock: Clock = time.monotonic,
        check_slack: float = 30.0,
    ) -> None:
        self.run = run
        self.engine = list(engine)
        self.project = project
        self.specs = dict(specs)
        self.engine_checks = engine_runs_healthchecks(self.engine, run_healthchecks)
        self.clock = clock
        self.check_slack = check_slack
        self.trackers: dict[str, tuple[str, HealthTracker]] = {}  # service → (container key, …)
        self.engine_outputs: dict[str, str] = {}  # service → output when it turned unhealthy
        self.engine_unhealthy: set[str] = set()  # services the engine said unhealthy last poll
        self.last_ps = ""
        self.prefetched: str | None = None  # a `ps` taken as the monitor was built
        # What the poll that found the sandbox ready saw: its first report, unasked.
        self.ready_statuses: list[ServiceStatus] | None = None
        self.ps_at = clock()  # when the last `ps` was sent (the monitor's clock)

    @property
    def expected(self) -> list[str]:
        return list(self.specs)

    async def ps(self) -> str:
        self.ps_at = self.clock()
        code, out, err = await call(
            self.run, ps_argv(self.engine, self.project), CALL_TIMEOUT, "ps"
        )
        if code != 0:
            raise ExtensionError(f"engine ps failed (exit {code}): {tail(err.strip(), 600)}")
        self.last_ps, self.prefetched = out, None
        return out

    def _tracker(self, container: Container, check: Healthcheck, now: float) -> HealthTracker:
        key = f"{container.id}@{container.started}"  # a restarted container starts over
        known = self.trackers.get(container.service)
        if known is None or known[0] != key:
            known = (key, HealthTracker(check, started=now))
            self.trackers[container.service] = known
        return known[1]

    async def _run_checks(self, due: list[tuple[Container, HealthTracker]]) -> None:
        items = " ".join(f"{c.id}:{max(int(t.check.timeout + 0.999), 1)}" for c, t in due)
        limit = max(t.check.timeout for _, t in due) + self.check_slack
        argv = ["sh", "-c", RUN_CHECKS, "sh", items, *self.engine]
        try:
            _code, out, _err = await asyncio.wait_for(self.run(argv), limit)
        except TimeoutError:
            out = ""
        codes, outputs = parse_check_results(out)
        now = self.clock()
        for container, tracker in due:
            code = _by_id(codes, container.id)
            ok, text = check_outcome(
                code, _by_id(outputs, container.id) or "", tracker.check.timeout
            )
            tracker.record(ok, text, now)

    async def _engine_outputs(self, containers: list[Container]) -> None:
        ids = [c.id for c in containers]
        fmt = "{{.Id}} {{json .State.Health}}"
        argv = [*self.engine, "inspect", "--format", fmt, *ids]
        _code, out, _err = await call(self.run, argv, CALL_TIMEOUT, "inspect")
        _codes, outputs = parse_check_results(out)
        for container in containers:
            self.engine_outputs[container.service] = tail(str(_by_id(outputs, container.id) or ""))

    async def poll(self) -> list[ServiceStatus]:
        """Every expected service, now: one `ps`, then the due healthchecks."""
        if self.prefetched is not None:
            self.last_ps, self.prefetched = self.prefetched, None
        else:
            await self.ps()
        containers = parse_containers(self.last_ps)
        now = self.clock()
        due: list[tuple[Container, HealthTracker]] = []
        if not self.engine_checks:
            for name, spec in self.specs.items():
                container = containers.get(name)
                if spec.healthcheck is None or container is None or container.state != RUNNING:
                    continue
                tracker = self._tracker(container, spec.healthcheck, now)
                if tracker.due(now):
                    due.append((container, tracker))
            if due:
                await self._run_checks(due)
        else:
            unhealthy = {
                name
                for name, c in containers.items()
                if name in self.specs and c.state == RUNNING and c.engine_health == "unhealthy"
            }
            fresh = [containers[name] for name in sorted(unhealthy - self.engine_unhealthy)]
            self.engine_unhealthy = unhealthy
            if fresh:  # newly unhealthy: keep what its last check said
                await self._engine_outputs(fresh)
        return [self._status(name, containers.get(name)) for name in self.specs]

    def _status(self, name: str, container: Container | None) -> ServiceStatus:
        spec = self.specs[name]
        if container is None:
            health = "none" if spec.healthcheck is None else "starting"
            return ServiceStatus(name, "missing", health)
        if spec.healthcheck is None:
            return ServiceStatus(name, container.state, "none", container.exit_code)
        if container.state != RUNNING:
            known = self.trackers.get(name)
            output = known[1].output if known else ""
            health = known[1].health if known else "starting"
            return ServiceStatus(name, container.state, health, container.exit_code, output)
        if self.engine_checks:
            health = container.engine_health if container.engine_health != "none" else "starting"
            output = self.engine_outputs.get(name, "") if health == "unhealthy" else ""
            return ServiceStatus(name, container.state, health, container.exit_code, output)
        known = self.trackers.get(name)
        if known is None:
            return ServiceStatus(name, container.state, "starting")
        return ServiceStatus(name, container.state, known[1].health, None, known[1].output)

    def endpoints(self, address: str) -> list[Endpoint]:
        """Published ports of the last `ps` (call `ps()` or `poll()` first)."""
        return parse_endpoints(self.last_ps, address, self.specs)


# ---- readiness ---------------------------------------------------------------------------


def is_ready(status: ServiceStatus, spec: ServiceSpec) -> bool:
    if status.state != RUNNING:
        return False
    return spec.healthcheck is None or status.health == "healthy"


def describe(status: ServiceStatus) -> str:
    """Why a service is not ready: `db (health: starting)`, `web (state: created)`."""
    if status.state != RUNNING:
        return f"{status.service} (state: {status.state})"
    return f"{status.service} (health: {status.health})"


def not_ready_report(statuses: Sequence[ServiceStatus], specs: Mapping[str, ServiceSpec]) -> str:
    lines = []
    for status in statuses:
        if is_ready(status, specs[status.service]):
            continue
        line = f"{status.service}: state {status.state}, health {status.health}"
        if status.output.strip():
            line += f", last healthcheck output: {tail(status.output.strip(), 300)!r}"
        lines.append(line)
    return "; ".join(lines)


async def wait_ready(
    monitor: ServiceMonitor,
    progress: ProgressFn,
    *,
    poll_interval: float = 0.5,
    settle_polls: int = 2,
    timeout: float = 290.0,
    started: float | None = None,
    settle_interval: float | None = None,
) -> list[str]:
    """Poll until every expected service is running (and healthy, with a healthcheck)
    on `settle_polls` polls in a row (after the first ready look, `settle_interval`
    apart); returns the service names. An exited service
    fails at once; `timeout` seconds after `started` (the monitor's clock; default
    now) the error names every service not ready. A poll held up by a slow
    healthcheck is cut off at the deadline, so the error beats the hook's timeout."""
    settle = max(settle_polls, 1)
    deadline = (monitor.clock() if started is None else started) + timeout
    streak = 0
    last = ""
    statuses: list[ServiceStatus] = []
    while True:
        try:
            remaining = max(deadline - monitor.clock(), 0.5)
            statuses = await asyncio.wait_for(monitor.poll(), remaining)
        except TimeoutError:
            report = not_ready_report(statuses, monitor.specs) or "the engine did not answer"
            raise ExtensionError(f"services not ready after {timeout:g}s: {report}") from None
        for status in statuses:
            if status.state in DEAD:
                code = "" if status.exit_code is None else f" (exit code {status.exit_code})"
                raise ExtensionError(f"service {status.service!r} is {status.state}{code}")
        waiting = [s for s in statuses if not is_ready(s, monitor.specs[s.service])]
        streak = 0 if waiting else streak + 1
        if streak >= settle:
            monitor.ready_statuses = statuses
            return monitor.expected
        if waiting:
            message = "waiting for " + ", ".join(describe(s) for s in waiting)
            if message != last:
                progress(message)
                last = message
        if monitor.clock() >= deadline:
            report = not_ready_report(statuses, monitor.specs)
            raise ExtensionError(f"services not ready after {timeout:g}s: {report}")
        # polls `poll_interval` apart, counted from when the last `ps` was sent; the
        # polls that confirm a ready look come `settle_interval` apart
        gap = poll_interval if waiting or settle_interval is None else settle_interval
        pause = gap - (monitor.clock() - monitor.ps_at)
        await asyncio.sleep(max(pause, 0.0))  # polling the engine, under the deadline above


async def build_monitor(
    run: Run,
    *,
    compose: Sequence[str],
    engine: Sequence[str],
    project: str,
    directory: str,
    handle: Handle,
    run_healthchecks: str = "auto",
    clock: Clock = time.monotonic,
) -> ServiceMonitor:
    """A monitor for a sandbox: its resolved services, then the engine's view."""
    # The first `ps` goes out beside `config`: the first poll, so the slower `config`
    # overlaps the pause before the second.
    sent = clock()
    specs, (code, out, _err) = await asyncio.gather(
        resolve_services(run, compose, project, compose_files(handle), directory),
        call(run, ps_argv(engine, project), CALL_TIMEOUT, "ps"),
    )
    monitor = ServiceMonitor(
        run, engine, project, specs, run_healthchecks=run_healthchecks, clock=clock
    )
    if code == 0:
        monitor.prefetched, monitor.ps_at = out, sent
    return monitor
