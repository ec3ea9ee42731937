"""extensions.compose_services: the pure parts (compose config, ports, the engine's
ps, the health state machine) and the monitor driven by a scripted engine and clock."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from extensions.compose_services import (
    RUN_CHECKS,
    Healthcheck,
    HealthTracker,
    PortSpec,
    ServiceMonitor,
    build_monitor,
    client_host,
    compose_files,
    config_argv,
    engine_runs_healthchecks,
    parse_check_results,
    parse_config,
    parse_containers,
    parse_duration,
    parse_endpoints,
    parse_healthcheck,
    parse_port,
    wait_ready,
)
from extensions.sdk import Endpoint, ExtensionError, ServiceStatus

# What podman-compose 1.6 printed for `config` of a project with a profile service
# (left out), healthchecks in three forms and ports in both syntaxes.
PODMAN_COMPOSE_CONFIG = """\
services:
  db:
    command:
    - sh
    - -c
    - sleep 4; touch /tmp/ok; sleep 1000
    healthcheck:
      interval: 1s
      retries: 3
      start_period: 1m30s
      test:
      - CMD-SHELL
      - test -f /tmp/ok
      timeout: 500ms
    image: localhost/sbx-busybox:latest
  quit:
    healthcheck:
      disable: true
    image: localhost/sbx-busybox:latest
  cache:
    healthcheck:
      test: ["NONE"]
    image: localhost/sbx-busybox:latest
  api:
    healthcheck:
      test: wget -q -O /dev/null http://127.0.0.1:8080/
    image: localhost/sbx-busybox:latest
  idle:
    image: localhost/sbx-busybox:latest
    deploy: {replicas: 0}
  web:
    depends_on:
      db:
        condition: service_healthy
    image: localhost/sbx-busybox:latest
    ports:
    - '8080'
    - 127.0.0.1::8081/udp
    - protocol: tcp
      published: '19000'
      target: 9000
"""

# `podman ps -a --format json` (podman 4.3.1), trimmed to the fields read; as it was
# printed for the project above a few seconds after `up -d`.
PODMAN_PS: list[dict[str, Any]] = [
    {
        "Id": "9a46036b48832891bf06e8d3f91a7909494ff59e9cebd072b5f5cd30a109996a",
        "Exited": False,
        "ExitCode": 0,
        "Labels": {"com.docker.compose.project": "p", "com.docker.compose.service": "db"},
        "Names": ["p_db_1"],
        "Ports": None,
        "StartedAt": 1796144336,
        "State": "running",
        "Status": "Up 6 seconds ago (starting)",
    },
    {
        "Id": "bb905de56a32a593573994c7a06658bb80cf0bd8ef0a83777f55bb9512c2a2ea",
        "Exited": True,
        "ExitCode": 1,
        "Labels": {"com.docker.compose.project": "p", "com.docker.compose.service": "quit"},
        "Names": ["p_quit_1"],
        "Ports": None,
        "StartedAt": 1796144337,
        "State": "exited",
        "Status": "Exited (1) 2 seconds ago",
    },
    {
        "Id": "3fcb72c81c7005e13067a98b25cdeb212f5ee46ebe623993e35a2356b40f0234",
        "Exited": False,
        "ExitCode": 0,
        "Labels": {"com.docker.compose.project": "p", "com.docker.compose.service": "web"},
        "Names": ["p_web_1"],
        "Ports": [
            {
                "host_ip": "",
                "container_port": 9000,
                "host_port": 19000,
                "range": 1,
                "protocol": "tcp",
            },
            {
                "host_ip": "",
                "container_port": 8080,
                "host_port": 37777,
                "range": 1,
                "protocol": "tcp",
            },
            {
                "host_ip": "127.0.0.1",
                "container_port": 8081,
                "host_port": 36215,
                "range": 1,
                "protocol": "udp",
            },
        ],
        "StartedAt": 1796144337,
        "State": "running",
        "Status": "Up 5 seconds ago",
    },
]

# `docker ps -a --format json` (docker 24+): one JSON object a line, labels and ports
# as text, no exit code field.
DOCKER_PS = "\n".join(
    json.dumps(item)
    for item in [
        {
            "ID": "1f2e3d4c5b6a",
            "Labels": "com.docker.compose.project=p,com.docker.compose.service=web",
            "Names": "p-web-1",
            "Ports": "0.0.0.0:49153->8080/tcp, :::49153->8080/tcp, 9000/tcp, "
            "10.0.0.7:7000-7001->7000-7001/udp",
            "State": "running",
            "Status": "Up 3 minutes (healthy)",
        },
        {
            "ID": "aaaabbbbcccc",
            "Labels": "com.docker.compose.service=db,com.docker.compose.project=p",
            "Names": "p-db-1",
            "Ports": "",
            "State": "running",
            "Status": "Up 4 seconds (health: starting)",
        },
        {
            "ID": "ddddeeeeffff",
            "Labels": "com.docker.compose.service=job,com.docker.compose.project=p",
            "Names": "p-job-1",
            "Ports": "",
            "State": "exited",
            "Status": "Exited (3) 1 second ago",
        },
    ]
)


# ---- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1m30s", 90.0),
        ("500ms", 0.5),
        ("5s", 5.0),
        ("1h2m3.5s", 3723.5),
        ("250us", 0.00025),
        ("10", 10.0),
        (3, 3.0),
        (None, 7.0),
        ("", 7.0),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text, 7.0) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["5 seconds", "1x", "m", True])
def test_bad_durations_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(bad, 1.0)


def test_resolved_config_services_healthchecks_and_ports() -> None:
    specs = parse_config(PODMAN_COMPOSE_CONFIG)
    # "idle" is scaled to 0; a profile service is already absent from `config`
    assert list(specs) == ["api", "cache", "db", "quit", "web"]
    assert specs["db"].healthcheck == Healthcheck(
        ("CMD-SHELL", "test -f /tmp/ok"), interval=1.0, timeout=0.5, retries=3, start_period=90.0
    )
    assert specs["quit"].healthcheck is None  # disable: true
    assert specs["cache"].healthcheck is None  # test: NONE
    assert specs["api"].healthcheck == Healthcheck(
        ("CMD-SHELL", "wget -q -O /dev/null http://127.0.0.1:8080/")
    )  # a string test is a shell command; compose's defaults 30s, 30s, 3, 0
    assert specs["web"].healthcheck is None
    assert specs["web"].ports == (
        PortSpec(8080),
        PortSpec(8081, "udp", "", "127.0.0.1"),
        PortSpec(9000, "tcp", "19000"),
    )


def test_docker_compose_json_config_is_read_too() -> None:
    doc = {
        "name": "p",
        "services": {
            "db": {
                "image": "postgres",
                "healthcheck": {
                    "test": ["CMD", "pg_isready"],
                    "interval": "2s",
                    "timeout": "1s",
                    "retries": 5,
                    "start_period": "10s",
                },
                "ports": [
                    {"mode": "ingress", "target": 5432, "published": "5433", "protocol": "tcp"}
                ],
            }
        },
    }
    specs = parse_config(json.dumps(doc))
    assert specs["db"].healthcheck == Healthcheck(("CMD", "pg_isready"), 2.0, 1.0, 5, 10.0)
    assert specs["db"].ports == (PortSpec(5432, "tcp", "5433"),)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("8080", [PortSpec(8080)]),
        (8080, [PortSpec(8080)]),
        ("8000:80", [PortSpec(80, "tcp", "8000")]),
        ("127.0.0.1:8000:80/udp", [PortSpec(80, "udp", "8000", "127.0.0.1")]),
        ("127.0.0.1::80", [PortSpec(80, "tcp", "", "127.0.0.1")]),
        ("[::1]:8000:80", [PortSpec(80, "tcp", "8000", "::1")]),
        ("9000-9001:80-81", [PortSpec(80, "tcp", "9000"), PortSpec(81, "tcp", "9001")]),
        ("3000-3005", [PortSpec(p) for p in range(3000, 3006)]),
        (
            {"target": 80, "host_ip": "0.0.0.0", "published": 8080},
            [PortSpec(80, "tcp", "8080", "0.0.0.0")],
        ),
    ],
)
def test_port_syntaxes(entry: object, expected: list[PortSpec]) -> None:
    assert parse_port(entry) == expected


@pytest.mark.parametrize("bad", ["a:b:c:d:e", "x", "70000", {"published": 1}, "1-3:1-2"])
def test_bad_ports_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_port(bad)


def test_config_errors_name_the_service() -> None:
    with pytest.raises(ExtensionError, match="service 'web'"):
        parse_config("services:\n  web:\n    ports: ['x']\n")
    with pytest.raises(ExtensionError, match="no services"):
        parse_config("version: '3'\n")
    with pytest.raises(ExtensionError, match="no service would run"):
        parse_config("services:\n  a: {scale: 0}\n")


def test_healthcheck_forms() -> None:
    assert parse_healthcheck(None) is None
    assert parse_healthcheck({"disable": True, "test": ["CMD", "true"]}) is None
    assert parse_healthcheck({"test": "NONE"}) == Healthcheck(("CMD-SHELL", "NONE"))
    assert parse_healthcheck({"test": ["NONE"]}) is None
    assert parse_healthcheck({"interval": "5s"}) is None  # timings only: no test to run
    check = parse_healthcheck({"test": ["CMD", "true"], "retries": 0, "interval": "0s"})
    assert check == Healthcheck(("CMD", "true"), interval=30.0, retries=3)


def test_compose_files_from_the_handle_and_the_config_command() -> None:
    assert compose_files(
        {"compose_files": "compose.yml\ndeploy/ci.yml\n", "compose_file": "x"}
    ) == [
        "compose.yml",
        "deploy/ci.yml",
    ]
    assert compose_files({"compose_file": "compose.ci.yml"}) == ["compose.ci.yml"]
    assert compose_files({}) == []
    assert config_argv(["docker", "compose"], "p", ["a.yml", "b.yml"]) == [
        "docker", "compose", "-p", "p", "-f", "a.yml", "-f", "b.yml", "config",
    ]  # fmt: skip
    assert config_argv(["podman-compose"], "p", []) == ["podman-compose", "-p", "p", "config"]


def test_containers_from_podman_and_docker_ps() -> None:
    podman = parse_containers(json.dumps(PODMAN_PS))
    assert {s: (c.state, c.exit_code, c.engine_health) for s, c in podman.items()} == {
        "db": ("running", None, "starting"),
        "quit": ("exited", 1, "none"),
        "web": ("running", None, "none"),
    }
    docker = parse_containers(DOCKER_PS)
    assert {s: (c.state, c.exit_code, c.engine_health) for s, c in docker.items()} == {
        "web": ("running", None, "healthy"),
        "db": ("running", None, "starting"),
        "job": ("exited", 3, "none"),
    }
    assert parse_containers("") == {}


def test_a_running_container_of_a_service_wins_over_an_exited_one() -> None:
    old = {**PODMAN_PS[1], "Labels": PODMAN_PS[0]["Labels"]}  # an exited db container
    assert parse_containers(json.dumps([PODMAN_PS[0], old]))["db"].state == "running"
    assert parse_containers(json.dumps([old, PODMAN_PS[0]]))["db"].state == "running"


def test_endpoints_from_podman_ps() -> None:
    assert parse_endpoints(json.dumps(PODMAN_PS), "10.1.2.3") == [
        Endpoint("web", 8080, "tcp", "10.1.2.3", 37777),  # random host port: the real one
        Endpoint("web", 8081, "udp", "127.0.0.1", 36215),  # a specific binding
        Endpoint("web", 9000, "tcp", "10.1.2.3", 19000),
    ]
    ranged = [{**PODMAN_PS[2], "Ports": [{**PODMAN_PS[2]["Ports"][0], "range": 2}]}]
    assert [(e.container_port, e.host_port) for e in parse_endpoints(json.dumps(ranged), "h")] == [
        (9000, 19000),
        (9001, 19001),
    ]
    assert parse_endpoints(json.dumps(PODMAN_PS), "h", services=["db"]) == []


def test_endpoints_from_docker_ps() -> None:
    assert parse_endpoints(DOCKER_PS, "build-1.internal") == [
        Endpoint("web", 7000, "udp", "10.0.0.7", 7000),
        Endpoint("web", 7001, "udp", "10.0.0.7", 7001),
        Endpoint("web", 8080, "tcp", "build-1.internal", 49153),  # 0.0.0.0 and :: once
    ]


def test_client_host() -> None:
    assert client_host("", "h") == "h"
    assert client_host("0.0.0.0", "h") == "h"
    assert client_host("::", "h") == "h"
    assert client_host("[::]", "h") == "h"
    assert client_host("192.168.1.4", "h") == "192.168.1.4"


def test_who_runs_healthchecks() -> None:
    podman = ["env", "CONTAINERS_CONF=/x", "/usr/bin/podman"]
    assert engine_runs_healthchecks(podman, "auto") is False  # podman: we run them
    assert engine_runs_healthchecks(["docker"], "auto") is True
    assert engine_runs_healthchecks(["docker"], "always") is False
    assert engine_runs_healthchecks(podman, "never") is True
    with pytest.raises(ExtensionError, match="run_healthchecks"):
        engine_runs_healthchecks(["docker"], "sometimes")


def test_check_results_parsing() -> None:
    out = (
        "rc 9a46 1\nrc bb90 0\n"
        '9a46aaaa {"Status":"starting","FailingStreak":1,"Log":[{"ExitCode":1,"Output":"a"},'
        '{"ExitCode":1,"Output":"not yet"}]}\n'
        "bb90bbbb null\n"
    )
    codes, outputs = parse_check_results(out)
    assert codes == {"9a46": 1, "bb90": 0}
    assert outputs == {"9a46aaaa": "not yet"}


# ---- the health state machine ---------------------------------------------------------------


def test_retries_failures_in_a_row_make_it_unhealthy() -> None:
    tracker = HealthTracker(Healthcheck(("CMD", "x"), interval=2.0, retries=3), started=100.0)
    assert tracker.due(100.0) and tracker.health == "starting"  # due as soon as running
    tracker.record(False, "no", 100.0)
    assert not tracker.due(101.9) and tracker.due(102.0)  # then every interval
    tracker.record(False, "no", 102.0)
    assert tracker.health == "starting"
    tracker.record(False, "still no", 104.0)
    assert (tracker.health, tracker.failures, tracker.output) == ("unhealthy", 3, "still no")
    tracker.record(True, "yes", 106.0)
    assert (tracker.health, tracker.failures) == ("healthy", 0)  # one success: healthy


def test_a_success_resets_the_count() -> None:
    tracker = HealthTracker(Healthcheck(("CMD", "x"), interval=1.0, retries=2), started=0.0)
    for now, ok in [(0, False), (1, True), (2, False), (3, True), (4, False)]:
        tracker.record(ok, "", float(now))
    assert tracker.health == "healthy"
    tracker.record(False, "", 5.0)
    assert tracker.health == "unhealthy"


def test_failures_in_the_start_period_do_not_count() -> None:
    check = Healthcheck(("CMD", "x"), interval=1.0, retries=1, start_period=5.0)
    tracker = HealthTracker(check, started=10.0)
    for now in (10.0, 11.0, 14.9):
        tracker.record(False, "booting", now)
    assert (tracker.health, tracker.failures) == ("starting", 0)
    tracker.record(False, "broken", 15.0)  # the start period is over
    assert tracker.health == "unhealthy"
    assert tracker.next_due == 16.0  # the interval once the start period is over
    early = HealthTracker(check, started=0.0)
    early.record(True, "", 1.0)
    early.record(False, "", 2.0)  # after a first success, failures count at once
    assert early.health == "unhealthy"


def test_start_interval_paces_checks_in_the_start_period() -> None:
    check = parse_healthcheck(
        {"test": "true", "interval": "30s", "start_period": "20s", "start_interval": "2s"}
    )
    assert check is not None and check.start_interval == 2.0
    tracker = HealthTracker(check, started=0.0)
    tracker.record(False, "", 0.0)
    assert tracker.next_due == 2.0  # not 30 s: the service is still starting
    tracker.record(True, "", 2.0)
    assert tracker.next_due == 32.0  # healthy: the interval
    assert parse_healthcheck({"test": "true"}) == Healthcheck(("CMD-SHELL", "true"))
    default = HealthTracker(Healthcheck(("CMD", "x"), interval=30.0), started=0.0)
    default.record(False, "", 0.0)
    assert default.next_due == 30.0  # no start period: the interval from the start


def test_output_is_kept_to_its_tail() -> None:
    tracker = HealthTracker(Healthcheck(("CMD", "x")), started=0.0)
    tracker.record(False, "x" * 5000 + "END", 0.0)
    assert len(tracker.output) == 1000 and tracker.output.endswith("END")


# ---- the monitor, with a scripted engine and clock -------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedEngine:
    """Answers the two calls a poll makes, `ps` and the RUN_CHECKS script, from a table
    the test sets; records every call. It stands in for podman, not for the monitor."""

    def __init__(self, containers: list[dict[str, Any]]) -> None:
        self.containers = containers
        self.passing: dict[str, bool] = {}  # container id → does its check pass now
        self.calls: list[list[str]] = []
        self.clock: Clock | None = None
        self.config: tuple[int, str, str] = (0, PODMAN_COMPOSE_CONFIG, "")

    async def __call__(self, argv: list[str]) -> tuple[int, str, str]:
        self.calls.append(argv)
        if argv[:2] == ["sh", "-c"] and argv[2] == RUN_CHECKS:
            ids = [item.split(":")[0] for item in argv[4].split()]
            lines = [f"rc {i} {0 if self.passing.get(i) else 1}" for i in ids]
            for i in ids:
                output = "ok" if self.passing.get(i) else f"{i} not yet"
                lines.append(f"{i} " + json.dumps({"Log": [{"Output": output}]}))
            return 0, "\n".join(lines) + "\n", ""
        if argv[-1] == "config":
            return self.config
        if "inspect" in argv:
            ids = argv[argv.index("inspect") + 3 :]
            lines = [f"{i} " + json.dumps({"Log": [{"Output": f"{i} says no"}]}) for i in ids]
            return 0, "\n".join(lines), ""
        if "ps" in argv:
            if self.clock is not None:
                self.clock.now += 1.0
            return 0, json.dumps(self.containers), ""
        return 127, "", f"unexpected {argv}"

    def checks_run(self) -> int:
        return sum(1 for c in self.calls if c[2:3] == [RUN_CHECKS])


def podman_container(
    service: str, ident: str, state: str = "running", code: int = 0
) -> dict[str, Any]:
    return {
        "Id": ident,
        "ExitCode": code,
        "Exited": state == "exited",
        "Labels": {"com.docker.compose.service": service},
        "Names": [f"p_{service}_1"],
        "StartedAt": 1,
        "State": state,
        "Status": f"Exited ({code}) 1 second ago" if state == "exited" else "Up (starting)",
    }


def by_service(statuses: list[ServiceStatus]) -> dict[str, ServiceStatus]:
    return {s.service: s for s in statuses}


SPECS = parse_config(
    """\
services:
  db:
    healthcheck: {test: ["CMD", "true"], interval: 2s, retries: 2}
  web: {}
"""
)


async def test_monitor_runs_due_checks_on_their_interval() -> None:
    engine = ScriptedEngine([podman_container("db", "d1"), podman_container("web", "w1")])
    clock = Clock()
    monitor = ServiceMonitor(engine, ["podman"], "p", SPECS, clock=clock)
    first = await monitor.poll()
    assert first == [
        ServiceStatus("db", "running", "starting", None, "d1 not yet"),
        ServiceStatus("web", "running", "none"),
    ]
    assert engine.checks_run() == 1
    clock.now += 1.0
    await monitor.poll()
    assert engine.checks_run() == 1, "not due before its interval"
    clock.now += 1.0
    second = await monitor.poll()
    assert engine.checks_run() == 2
    assert second[0].health == "unhealthy"  # retries 2: two failures in a row
    engine.passing["d1"] = True
    clock.now += 2.0
    assert (await monitor.poll())[0] == ServiceStatus("db", "running", "healthy", None, "ok")
    # one ps plus at most one check call per poll
    assert len(engine.calls) == 4 + 3


async def test_monitor_leaves_checks_to_docker() -> None:
    containers = [json.loads(line) for line in DOCKER_PS.splitlines()]
    engine = ScriptedEngine(containers)
    specs = parse_config(
        "services:\n  web:\n    healthcheck: {test: 'true'}\n"
        "  db:\n    healthcheck: {test: 'true'}\n  job: {}\n"
    )
    monitor = ServiceMonitor(engine, ["docker"], "p", specs, clock=Clock())
    statuses = {s.service: s for s in await monitor.poll()}
    assert engine.checks_run() == 0
    assert statuses["web"].health == "healthy"
    assert statuses["db"].health == "starting"
    assert (statuses["job"].state, statuses["job"].exit_code) == ("exited", 3)


async def test_a_restarted_container_starts_its_health_over() -> None:
    engine = ScriptedEngine([podman_container("db", "d1"), podman_container("web", "w1")])
    engine.passing["d1"] = True
    clock = Clock()
    monitor = ServiceMonitor(engine, ["podman"], "p", SPECS, clock=clock)
    assert (await monitor.poll())[0].health == "healthy"
    engine.containers[0] = podman_container("db", "d2")  # compose recreated it
    clock.now += 0.1
    assert (await monitor.poll())[0].health == "starting"


async def test_wait_ready_waits_for_health_and_names_what_it_waits_for() -> None:
    engine = ScriptedEngine([podman_container("db", "d1"), podman_container("web", "w1")])
    clock = Clock()
    monitor = ServiceMonitor(engine, ["podman"], "p", SPECS, clock=clock)
    seen: list[str] = []

    def progress(message: str) -> None:
        seen.append(message)
        clock.now += 2.0  # each poll that waits moves time on by the check's interval
        if len(seen) == 1:
            engine.passing["d1"] = True

    assert await wait_ready(monitor, progress, poll_interval=0, settle_polls=2) == ["db", "web"]
    assert seen == ["waiting for db (health: starting)"]


async def test_wait_ready_fails_at_once_on_an_exited_service() -> None:
    engine = ScriptedEngine(
        [podman_container("db", "d1"), podman_container("web", "w1", "exited", 1)]
    )
    monitor = ServiceMonitor(engine, ["podman"], "p", SPECS, clock=Clock())
    with pytest.raises(ExtensionError, match=r"service 'web' is exited \(exit code 1\)"):
        await wait_ready(monitor, lambda _m: None, poll_interval=0)


async def test_wait_ready_timeout_names_each_service_not_ready() -> None:
    engine = ScriptedEngine([podman_container("db", "d1")])  # web has no container
    clock = Clock()
    engine.clock = clock  # each ps moves time on by a second
    monitor = ServiceMonitor(engine, ["podman"], "p", SPECS, clock=clock)
    with pytest.raises(ExtensionError) as caught:
        await wait_ready(monitor, lambda _m: None, poll_interval=0, timeout=10)
    message = str(caught.value)
    assert message.startswith("services not ready after 10s: ")
    assert "db: state running, health unhealthy, last healthcheck output: 'd1 not yet'" in message
    assert "web: state missing, health none" in message


async def test_build_monitor_resolves_in_the_workspace_and_reuses_its_first_ps() -> None:
    engine = ScriptedEngine(PODMAN_PS)
    handle = {"compose_files": "compose.yml\ncompose.ci.yml", "project": "p"}
    monitor = await build_monitor(
        engine,
        compose=["podman-compose"],
        engine=["podman"],
        project="p",
        directory="/srv/sandboxer/sbx-1",
        handle=handle,
    )
    config_call = next(c for c in engine.calls if c[-1] == "config")
    assert config_call[:5] == [
        "sh",
        "-c",
        'cd -- "$1" && shift && exec "$@"',
        "sh",
        "/srv/sandboxer/sbx-1",
    ]
    assert config_call[5:] == [
        "podman-compose",
        "-p",
        "p",
        "-f",
        "compose.yml",
        "-f",
        "compose.ci.yml",
        "config",
    ]
    assert monitor.expected == ["api", "cache", "db", "quit", "web"]
    calls = len(engine.calls)
    statuses = by_service(await monitor.poll())
    assert not any("ps" in c for c in engine.calls[calls:]), "the prefetched ps was used"
    assert (statuses["quit"].state, statuses["quit"].exit_code) == ("exited", 1)
    assert statuses["api"].state == "missing"
    await monitor.poll()
    assert any("ps" in c for c in engine.calls[calls:]), "then each poll asks again"


async def test_a_failing_compose_config_names_its_error() -> None:
    engine = ScriptedEngine([])
    engine.config = (1, "", "Traceback ...\nKeyError: 'services'\nvariable FOO is not set\n")
    with pytest.raises(
        ExtensionError, match=r"(?s)compose config failed \(exit 1\): .*FOO is not set"
    ):
        await build_monitor(
            engine,
            compose=["docker", "compose"],
            engine=["docker"],
            project="p",
            directory="/w",
            handle={},
        )


async def test_docker_unhealthy_output_is_read_once_per_container() -> None:
    web = {
        "ID": "abc123",
        "Labels": "com.docker.compose.service=web",
        "Names": "p-web-1",
        "State": "running",
        "Status": "Up 1 minute (unhealthy)",
    }
    engine = ScriptedEngine([web])
    specs = parse_config("services:\n  web:\n    healthcheck: {test: 'false'}\n")
    monitor = ServiceMonitor(engine, ["docker"], "p", specs, clock=Clock())
    first = await monitor.poll()
    assert first == [ServiceStatus("web", "running", "unhealthy", None, "abc123 says no")]
    await monitor.poll()
    assert sum(1 for c in engine.calls if "inspect" in c) == 1, "once while it stays unhealthy"
    web["Status"] = "Up 2 minutes (healthy)"
    assert (await monitor.poll())[0] == ServiceStatus("web", "running", "healthy")
    web["Status"] = "Up 3 minutes (unhealthy)"
    await monitor.poll()
    assert sum(1 for c in engine.calls if "inspect" in c) == 2, "and again when it turns again"
    assert engine.checks_run() == 0


async def test_docker_checks_run_by_us_keep_their_state_between_polls() -> None:
    """docker's ps has no start time (only "RunningFor", which changes): the health
    of a container we check must not start over on every poll."""
    web = {
        "ID": "abc123",
        "Labels": "com.docker.compose.service=web",
        "RunningFor": "3 seconds ago",
        "State": "running",
        "Status": "Up 3 seconds",
    }
    engine = ScriptedEngine([web])
    engine.passing["abc123"] = True
    specs = parse_config("services:\n  web:\n    healthcheck: {test: 'true'}\n")
    clock = Clock()
    monitor = ServiceMonitor(engine, ["docker"], "p", specs, run_healthchecks="always", clock=clock)
    assert (await monitor.poll())[0].health == "healthy"
    web["RunningFor"] = "4 seconds ago"
    clock.now += 1
    assert (await monitor.poll())[0].health == "healthy"
    assert engine.checks_run() == 1


async def test_a_hanging_healthcheck_does_not_hold_wait_ready_past_its_deadline() -> None:
    class Hanging(ScriptedEngine):
        async def __call__(self, argv: list[str]) -> tuple[int, str, str]:
            if argv[2:3] == [RUN_CHECKS]:
                await asyncio.Event().wait()  # a check that never comes back
            return await super().__call__(argv)

    engine = Hanging([podman_container("db", "d1"), podman_container("web", "w1")])
    monitor = ServiceMonitor(engine, ["podman"], "p", SPECS)  # the real clock
    started = time.monotonic()
    with pytest.raises(ExtensionError, match="services not ready after 1s: the engine did not"):
        await wait_ready(monitor, lambda _m: None, poll_interval=0.1, timeout=1.0)
    assert time.monotonic() - started < 5


def test_podmans_passing_stopped_state_is_an_exit() -> None:
    """Between a container's exit and its clean-up podman says `stopped`: reported as
    the exit it is, with its code, so a watcher sees one change, not two."""
    stopping = {**PODMAN_PS[1], "State": "stopped", "Status": "Stopped"}
    (quit_,) = parse_containers(json.dumps([stopping])).values()
    assert (quit_.state, quit_.exit_code) == ("exited", 1)
