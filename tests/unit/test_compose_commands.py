"""Command construction and parsing of the compose core, for docker compose v2 and
podman-compose alike (pure functions: argv lists, engine answers, compose files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from extensions.compose import (
    FILES_SEPARATOR,
    check_compose_path,
    compose_argv,
    configured_compose_files,
    discover_compose_files,
    down_argv,
    dropped_files,
    exec_argv,
    explain_dropped,
    handle_files,
    image_refs,
    image_sandbox_id,
    images_argv,
    project_images,
    ps_argv,
    read_services,
    transfer_rules,
    up_argv,
)
from extensions.sdk import ExtensionError
from extensions.ssh import SSHTarget, parse_progress2, parse_stats, rsync_argv

DOCKER = ["docker", "compose"]
PODMAN = ["env", "CONTAINERS_CONF=/etc/c.conf", "podman-compose"]


@pytest.mark.parametrize("cmd", [DOCKER, PODMAN])
def test_up_and_down_pass_every_file_in_order(cmd: list[str]) -> None:
    files = ["deploy/compose.yml", "deploy/compose.ci.yml"]
    assert up_argv(cmd, "sandboxer-sbx-1", files) == [
        *cmd,
        "-p",
        "sandboxer-sbx-1",
        "-f",
        "deploy/compose.yml",
        "-f",
        "deploy/compose.ci.yml",
        "up",
        "-d",
    ]
    assert down_argv(cmd, "sandboxer-sbx-1", files[:1], 3) == [
        *cmd,
        "-p",
        "sandboxer-sbx-1",
        "-f",
        "deploy/compose.yml",
        "down",
        "-v",
        "--remove-orphans",
        "-t",
        "3",
    ]
    # no --project-directory: both tools take the first file's folder (podman-compose
    # 1.6 has no such option), so relative paths stay relative to that file
    assert "--project-directory" not in up_argv(cmd, "p", files)
    assert compose_argv(cmd, "p", ["a.yml"], "pause") == [*cmd, "-p", "p", "-f", "a.yml", "pause"]


@pytest.mark.parametrize("engine", [["docker"], ["env", "CONTAINERS_CONF=/x", "podman"]])
def test_engine_commands(engine: list[str]) -> None:
    assert ps_argv(engine, "sandboxer-a1b") == [
        *engine,
        "ps",
        "-a",
        "--filter",
        "label=com.docker.compose.project=sandboxer-a1b",
        "--format",
        "json",
    ]
    assert ps_argv(engine)[-3] == "label=com.docker.compose.project"
    assert images_argv(engine) == [*engine, "images", "--format", "json"]
    hostile = "a; $(id) `id`"
    assert exec_argv(engine, "c1", ["sh", "-c", hostile], workdir="/w", env={"A": hostile}) == [
        *engine,
        "exec",
        "-w",
        "/w",
        "-e",
        f"A={hostile}",
        "c1",
        "sh",
        "-c",
        hostile,
    ]


def test_compose_file_paths_are_confined() -> None:
    assert check_compose_path("./deploy//compose.yml") == "deploy/compose.yml"
    assert check_compose_path("compose.ci.yml") == "compose.ci.yml"
    for bad, why in [
        ("../compose.yml", "inside the repo"),
        ("deploy/../../x.yml", "inside the repo"),
        ("/etc/compose.yml", "absolute"),
        ("a\nb.yml", "control character"),
        ("", "empty"),
        (".", "not a file path"),
        ("-f.yml", "not a file path"),
    ]:
        with pytest.raises(ExtensionError, match=f"compose_file.*{why}"):
            check_compose_path(bad)


def test_configured_files_input_wins_then_list_then_single() -> None:
    config = {"compose_file": "a.yml", "compose_files": ["b.yml", "c.yml"]}
    assert configured_compose_files({"compose_file": "x.yml, deploy/y.yml"}, config) == [
        "x.yml",
        "deploy/y.yml",
    ]
    assert configured_compose_files({}, config) == ["b.yml", "c.yml"]
    assert configured_compose_files({}, {"compose_file": "a.yml"}) == ["a.yml"]
    assert configured_compose_files({}, {"compose_file": "", "compose_files": []}) is None
    with pytest.raises(ExtensionError, match="named twice"):
        configured_compose_files({"compose_file": "a.yml,./a.yml"}, {})


def test_discovery_follows_compose(tmp_path: Path) -> None:
    with pytest.raises(ExtensionError, match="no compose file"):
        discover_compose_files(tmp_path)
    (tmp_path / "docker-compose.yml").write_text("services: {a: {image: x}}\n")
    assert discover_compose_files(tmp_path) == ["docker-compose.yml"]
    (tmp_path / "compose.yaml").write_text("services: {b: {image: x}}\n")
    (tmp_path / "compose.override.yml").write_text("services: {c: {image: x}}\n")
    (tmp_path / "docker-compose.override.yml").write_text("services: {d: {image: x}}\n")
    assert discover_compose_files(tmp_path) == ["compose.yaml", "compose.override.yml"]
    assert read_services(tmp_path, ["compose.yaml", "compose.override.yml"]) == ["b", "c"]


def test_a_link_out_of_the_repo_is_refused(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (tmp_path / "outside.yml").write_text("services: {a: {image: x}}\n")
    (repo / "compose.yml").symlink_to(tmp_path / "outside.yml")
    with pytest.raises(ExtensionError, match=r"compose_file 'compose\.yml': a link out"):
        read_services(repo.resolve(), ["compose.yml"])
    with pytest.raises(ExtensionError, match="no such file"):
        read_services(repo.resolve(), ["deploy/compose.yml"])


def test_handle_files_recorded_list_and_old_handles() -> None:
    files = ["deploy/compose.yml", "deploy/ci.yml"]
    assert (
        handle_files({"compose_files": FILES_SEPARATOR.join(files), "compose_file": "x"}) == files
    )
    assert handle_files({"compose_file": "compose.ci.yml"}) == ["compose.ci.yml"]
    assert handle_files(None) == []
    with pytest.raises(ExtensionError):
        handle_files({"compose_files": "../../etc/passwd"})


def test_images_of_a_project_podman_and_docker_names() -> None:
    podman = json.dumps(
        [
            {"Names": ["localhost/sandboxer-sbx-1_web:latest"]},
            {"Names": ["localhost/sandboxer-ckpt/sandboxer-sbx-1-db:ckpt-9"]},
            {"Names": ["localhost/sbx-busybox:latest"]},  # used, not built: kept
            {"Names": ["localhost/sandboxer-sbx-1-two_web:latest"]},  # another sandbox
            {"Id": "dangling"},
        ]
    )
    docker = "\n".join(
        json.dumps(x)
        for x in [
            {"Repository": "sandboxer-sbx-1-web", "Tag": "latest"},
            {"Repository": "<none>", "Tag": "<none>"},
            {"Repository": "postgres", "Tag": "16"},
        ]
    )
    refs = image_refs(podman) + image_refs(docker)
    assert "postgres:16" in refs and len(refs) == 6
    assert project_images(refs, "sandboxer-sbx-1", ["web", "db"]) == [
        "localhost/sandboxer-ckpt/sandboxer-sbx-1-db:ckpt-9",
        "localhost/sandboxer-sbx-1_web:latest",
        "sandboxer-sbx-1-web:latest",
    ]
    # services unknown: `-` names by prefix, but not another sandbox's podman name
    assert project_images(refs, "sandboxer-sbx-1") == [
        "localhost/sandboxer-ckpt/sandboxer-sbx-1-db:ckpt-9",
        "localhost/sandboxer-sbx-1_web:latest",
        "sandboxer-sbx-1-web:latest",
    ]
    assert image_sandbox_id("localhost/sandboxer-sbx-1_web:latest") == "sbx-1"
    assert image_sandbox_id("localhost/sandboxer-ckpt/sandboxer-sbx-1-db:ckpt-9") == "sbx-1"
    assert image_sandbox_id("localhost/sandboxer-sbx-1-two_web:latest") == "sbx-1-two"
    assert image_sandbox_id("sandboxer-sbx-abc-my-api:latest", ["sbx-abc"]) == "sbx-abc"
    assert image_sandbox_id("sandboxer-sbx-abc-my-api:latest") == "sbx-abc-my"
    assert image_sandbox_id("localhost/sbx-busybox:latest") is None
    assert image_sandbox_id("postgres:16") is None


def test_transfer_rules_and_rsync_argv(tmp_path: Path) -> None:
    rules = transfer_rules({"includes": [".env"], "excludes": [".git/"], "gitignore": True})
    local = rsync_argv(tmp_path, "/w/sbx-1", **rules)
    # includes first: rsync's first matching rule wins over .gitignore and excludes
    assert local.index(".env") < local.index(":- .gitignore") < local.index(".git/")
    assert local[-2:] == [f"{tmp_path}/", "/w/sbx-1/"]
    assert "--safe-links" in local and "-e" not in local
    remote = rsync_argv(tmp_path, "/srv/sbx-1", target=SSHTarget("h", port=2222, user="u"))
    assert remote[-1] == "u@h:/srv/sbx-1/"
    assert "StrictHostKeyChecking=yes" in remote[remote.index("-e") + 1]
    assert transfer_rules({"gitignore": False})["filters"] == []


def test_rsync_progress_and_stats_parse_bytes_transferred() -> None:
    assert parse_progress2("     52,428,800  42%   10.00MB/s    0:00:04 (xfr#3, to-chk=1/5)") == (
        52428800,
        "42%",
    )
    assert parse_progress2("sending incremental file list") is None
    stats = parse_stats(
        "Number of files: 4 (reg: 3, dir: 1)\n"
        "Total file size: 52,429,000 bytes\n"
        "Total transferred file size: 52,428,800 bytes\n"
        "Total bytes sent: 52,441,167\n"
    )
    assert stats["Total transferred file size"] == 52428800
    assert stats["Total bytes sent"] == 52441167


def test_a_compose_error_naming_a_dropped_file_says_so(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "deploy").mkdir(parents=True)
    (repo / ".env").write_text("A=1\n")
    (repo / "deploy" / "app.env").write_text("B=2\n")
    workspace = "/srv/root/sbx-1"
    podman = "ValueError: Env file at /srv/root/sbx-1/.env does not exist"
    docker = "env file /srv/root/sbx-1/deploy/app.env not found: stat: no such file"
    assert dropped_files(podman, workspace, repo) == [".env"]
    assert dropped_files(docker, workspace, repo) == ["deploy/app.env"]
    assert dropped_files("Env file at /etc/passwd does not exist", workspace, repo) == []
    hint = explain_dropped([".env"])
    assert "filter dropped .env" in hint and 'includes: [".env"]' in hint
    assert explain_dropped([]) == ""
