"""Real test infrastructure: sshd hosts on loopback and podman with a local image.

Nothing here is a fake: each host is a real sshd with its own host key, checked by
the client through a known_hosts file; compose projects run as real containers.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.paths import ROOT

IMAGE = "localhost/sbx-busybox:latest"
# The podman settings that work on these machines (runc, cgroupfs), as shipped.
CONTAINERS_CONF = (ROOT / "scripts" / "podman-containers.conf").read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)


@dataclass
class Podman:
    """podman with the settings that work on these machines (runc, cgroupfs)."""

    conf: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    @property
    def engine_cmd(self) -> str:
        return f"env CONTAINERS_CONF={self.conf} podman"

    @property
    def compose_cmd(self) -> str:
        compose = Path(sys.executable).parent / "podman-compose"
        return f"env CONTAINERS_CONF={self.conf} {compose}"

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", *args], capture_output=True, text=True, env=self.env, check=False
        )

    def containers(self, project: str) -> list[dict[str, Any]]:
        out = self(
            "ps",
            "-a",
            "--filter",
            f"label=com.docker.compose.project={project}",
            "--format",
            "json",
        )
        return list(json.loads(out.stdout or "[]"))

    def networks(self) -> list[str]:
        return self("network", "ls", "--format", "{{.Name}}").stdout.split()

    def leftovers(self, project: str) -> list[str]:
        """Everything of a compose project the engine still holds: containers, the
        pod, networks and volumes (by the project label), images named for it (built
        by compose: `<project>_<service>`, `<project>-<service>`; loaded by a
        checkpoint restore: `sandboxer-ckpt/<project>-<service>`)."""
        label = f"label=com.docker.compose.project={project}"
        found = [f"container {c['Names']}" for c in self.containers(project)]
        pods = self("pod", "ps", "--format", "{{.Name}}").stdout.split()
        found += [f"pod {p}" for p in pods if p == f"pod_{project}"]
        nets = self("network", "ls", "--filter", label, "--format", "{{.Name}}").stdout.split()
        found += [f"network {n}" for n in nets]
        vols = self("volume", "ls", "--filter", label, "--format", "{{.Name}}").stdout.split()
        found += [f"volume {v}" for v in vols]
        found += [f"image {i}" for i in self.images(project)]
        return found

    def images(self, project: str) -> list[str]:
        """Images named for the project (see `leftovers`)."""
        names = self("images", "--format", "{{.Repository}}").stdout.split()
        prefixes = (
            f"localhost/{project}_",
            f"localhost/{project}-",
            f"localhost/sandboxer-ckpt/{project}-",
        )
        return sorted({n for n in names if n.startswith(prefixes)})

    @classmethod
    def prepare(cls, folder: Path) -> Podman:
        folder.mkdir(parents=True, exist_ok=True)
        conf = folder / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        podman = cls(conf)
        if podman("image", "exists", IMAGE).returncode != 0:
            # the image scripts/setup builds on machines without a registry
            built = subprocess.run(
                [str(ROOT / "scripts" / "busybox-image"), IMAGE],
                capture_output=True,
                text=True,
                env=podman.env,
                check=False,
            )
            assert built.returncode == 0, built.stderr
        return podman


@dataclass
class SSHHost:
    """A real sshd on 127.0.0.1 with its own host key and our client key."""

    folder: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    address: str = "127.0.0.1"
    netns: str | None = None  # run sshd inside this network namespace

    @property
    def client_key(self) -> Path:
        return self.folder / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.folder / "known_hosts"

    @property
    def host_key(self) -> Path:
        return self.folder / "ssh_host_ed25519_key"

    def start(self) -> SSHHost:
        self.folder.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        for key in (self.host_key, self.client_key):
            if not key.exists():
                run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
        (self.folder / "authorized_keys").write_text((self.folder / "id_ed25519.pub").read_text())
        host_pub = (self.folder / "ssh_host_ed25519_key.pub").read_text().split()
        self.known_hosts.write_text(f"[{self.address}]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        config = self.folder / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress {self.address}\n"
            f"HostKey {self.host_key}\nPidFile {self.folder / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.folder / 'authorized_keys'}\n"
            "StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\nUsePAM no\nMaxSessions 100\n"
            "MaxStartups 100:30:200\nLogLevel ERROR\n"
        )
        # nsenter switches the network namespace only: `ip netns exec` would also remount
        # /sys, and the containers the sshd starts need the host's cgroup mounts.
        inside = ["nsenter", f"--net=/run/netns/{self.netns}"] if self.netns else []
        self.proc = subprocess.Popen(
            [*inside, "/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
            stderr=(self.folder / "sshd.log").open("ab"),
        )
        deadline = time.monotonic() + 15
        while True:
            assert self.proc.poll() is None, (self.folder / "sshd.log").read_text()
            try:
                with socket.create_connection((self.address, self.port), timeout=1) as s:
                    if s.recv(4) == b"SSH-":
                        return self
            except OSError:
                pass
            assert time.monotonic() < deadline, "sshd did not answer"
            time.sleep(0.02)  # polling a port, under a deadline

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def host_config(
        self, name: str, root: Path, compose_cmd: str, capacity: int = 4, **extra: Any
    ) -> dict[str, Any]:
        return {
            "name": name,
            "host": self.address,
            "port": self.port,
            "user": getpass.getuser(),
            "identity_file": str(self.client_key),
            "known_hosts": str(self.known_hosts),
            "capacity": capacity,
            "root": str(root),
            "compose_cmd": compose_cmd,
            **extra,
        }


class NetnsSSHHost(SSHHost):
    """An sshd alone in a fresh network namespace, reachable only through a veth pair
    (a random /30 of 10.200.0.0/13: `.1` outside, `.2` inside), so a test can cut the
    link (`cut`) and bring it back (`heal`). `stop` also ends what the sshd started
    there, deletes the veth and the namespace; a failed `start` cleans up the same way."""

    SUPERNET = ipaddress.ip_network("10.200.0.0/13")

    def __init__(self, folder: Path) -> None:
        network = self._free_subnet()
        super().__init__(folder, address=str(network[2]))
        tag = secrets.token_hex(3)
        self.netns = f"sbx-{tag}"
        self.veth = f"sbxv{tag}"  # the host's end; the peer inside is f"{veth}p"
        self.gateway = str(network[1])

    @classmethod
    def _free_subnet(cls) -> ipaddress.IPv4Network:
        """A random /30 that no interface of this namespace is on yet."""
        used = [
            ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network
            for link in json.loads(run(["ip", "-j", "-4", "addr", "show"]).stdout or "[]")
            for a in link.get("addr_info", [])
        ]
        blocks = cls.SUPERNET.num_addresses // 4
        for _ in range(100):
            base = int(cls.SUPERNET.network_address) + 4 * secrets.randbelow(blocks)
            network = ipaddress.IPv4Network((base, 30))
            if not any(network.overlaps(u) for u in used):
                return network
        raise AssertionError(f"no free /30 in {cls.SUPERNET}")

    def start(self) -> NetnsSSHHost:
        ns, outer, inner = self.netns, self.veth, f"{self.veth}p"
        assert ns is not None
        inside = ["ip", "netns", "exec", ns]
        try:
            run(["ip", "netns", "add", ns])
            run(["ip", "link", "add", outer, "type", "veth", "peer", "name", inner])
            run(["ip", "link", "set", inner, "netns", ns])
            run(["ip", "addr", "add", f"{self.gateway}/30", "dev", outer])
            run(["ip", "link", "set", outer, "up"])
            run([*inside, "ip", "addr", "add", f"{self.address}/30", "dev", inner])
            run([*inside, "ip", "link", "set", inner, "up"])
            run([*inside, "ip", "link", "set", "lo", "up"])
            super().start()
        except BaseException:
            self.stop()
            raise
        return self

    def cut(self) -> None:
        run(["ip", "link", "set", self.veth, "down"])

    def heal(self) -> None:
        run(["ip", "link", "set", self.veth, "up"])

    def pids(self) -> list[int]:
        """Processes in the namespace: the sshd, its sessions and what they run (not
        the containers, which live in namespaces of their own)."""
        if not self.netns or not Path(f"/run/netns/{self.netns}").exists():
            return []
        out = subprocess.run(
            ["ip", "netns", "pids", self.netns], capture_output=True, text=True, check=False
        )
        return [int(p) for p in out.stdout.split()]

    def commands(self) -> list[str]:
        """The command lines of the processes in the namespace."""
        found = []
        for pid in self.pids():
            try:
                found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" "))
            except OSError:
                continue  # ended meanwhile
        return [c.decode(errors="replace").strip() for c in found]

    def stop(self) -> None:
        super().stop()
        # A session whose client vanished with the link outlives the listener (no
        # ClientAlive): end the sshd processes started in this namespace, by pid.
        deadline = time.monotonic() + 10
        while sessions := [p for p in self.pids() if _comm(p) == "sshd"]:
            for pid in sessions:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)  # polling for the processes to go, under a deadline
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True, check=False)
        if self.netns:
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, check=False)


def _comm(pid: int) -> str:
    """The process's name, "" once it has ended (also as a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    name, _, rest = stat.partition(" (")[2].rpartition(") ")
    return "" if rest.startswith(("Z", "X")) else name


class NatsNode:
    """One nats-server of a JetStream cluster on loopback, in its own folder."""

    def __init__(self, name: str, folder: Path, routes: list[int], cluster_port: int) -> None:
        self.name = name
        self.folder = folder
        self.port = free_port()
        self.monitor_port = free_port()
        self.cluster_port = cluster_port
        self.routes = routes
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        from sandboxer.store.nats_server import find_nats_server

        self.folder.mkdir(parents=True, exist_ok=True)
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)
        argv = [
            find_nats_server(),
            "--name", self.name,
            "--addr", "127.0.0.1",
            "--port", str(self.port),
            "--http_port", str(self.monitor_port),
            "--jetstream",
            "--store_dir", str(self.folder),
            "--cluster_name", "sbx-test",
            "--cluster", f"nats://127.0.0.1:{self.cluster_port}",
            "--routes", routes,
        ]  # fmt: skip
        log = (self.folder / "server.log").open("ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def log(self) -> str:
        return (self.folder / "server.log").read_text(errors="replace")[-4000:]


class NatsCluster:
    """Three nats-server processes, routed to each other: a real JetStream cluster."""

    def __init__(self, folder: Path, size: int = 3) -> None:
        cluster_ports = [free_port() for _ in range(size)]
        self.nodes = [
            NatsNode(
                f"n{i + 1}",
                folder / f"n{i + 1}",
                [p for j, p in enumerate(cluster_ports) if j != i],
                cluster_ports[i],
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> str:
        return ",".join(node.url for node in self.nodes)

    async def start(self, http: aiohttp.ClientSession, timeout: float = 60) -> None:
        for node in self.nodes:
            node.start()
        # Healthy means: JetStream on, the meta group has a leader and this node is current.
        async with asyncio.timeout(timeout):
            for node in self.nodes:
                restarts = 0
                while True:
                    assert node.proc is not None
                    if node.proc.poll() is not None and restarts < 3 and "in use" in node.log():
                        # free_port() races with other processes: take new ports, retry.
                        restarts += 1
                        node.port, node.monitor_port = free_port(), free_port()
                        node.start()
                        continue
                    assert node.proc.poll() is None, node.log()
                    try:
                        url = f"http://127.0.0.1:{node.monitor_port}/healthz"
                        async with http.get(url) as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        pass
                    await asyncio.sleep(0.1)  # polling a condition, under a deadline

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


class ServeProcess:
    def __init__(self, data_dir: Path, port: int, *args: str, **env: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        environ = {k: v for k, v in os.environ.items() if k != "SANDBOXER_NATS_URL"}
        if "SANDBOXER_NATS_URL" not in env:
            # Many servers run at once in tests: each embedded NATS on a port of its own.
            environ["SANDBOXER_NATS_PORT"] = str(free_port())
        environ.update(SANDBOXER_DATA_DIR=str(data_dir), **env)
        self.data_dir = data_dir
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sandboxer", "serve", "--port", str(port), *args],
            env=environ,
            stdout=self._log_file(data_dir).open("ab"),  # a file: a pipe nobody reads fills up
            stderr=subprocess.STDOUT,
        )

    @staticmethod
    def _log_file(data_dir: Path) -> Path:
        data_dir.mkdir(parents=True, exist_ok=True)
        return data_dir / "serve.log"

    async def wait_healthy(self, http: aiohttp.ClientSession, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while True:
                assert self.proc.poll() is None, self.output()
                try:
                    async with http.get(f"{self.url}/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)  # polling a condition, under a deadline

    def output(self) -> str:
        return self._log_file(self.data_dir).read_text(errors="replace")[-8000:]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


# ---- compose project shapes (real files in a repo folder) -------------------------------

BUILD_FILE = f"FROM {IMAGE}\nCOPY greeting /greeting\n"

# A compose file in a subfolder: `build:` and `env_file` relative to deploy/, a named
# volume; busybox ignores SIGTERM, so SIGKILL.
SUBFOLDER_REPO = {
    "deploy/compose.yml": (
        "services:\n"
        "  app:\n"
        "    build: ./app\n"
        "    env_file: app.env\n"
        '    command: ["sleep", "3600"]\n'
        "    stop_signal: SIGKILL\n"
        "    volumes: [data:/data]\n"
        "volumes:\n"
        "  data: {}\n"
    ),
    "deploy/app.env": "GREETING=from deploy/app.env\n",
    "deploy/app/Dockerfile": BUILD_FILE,
    "deploy/app/greeting": "built from deploy/app\n",
}

# Only a non-default file name: nothing compose would discover by itself.
CI_REPO = {
    "compose.ci.yml": (
        "services:\n"
        "  web:\n"
        f"    image: {IMAGE}\n"
        '    command: ["httpd", "-f", "-p", "8080", "-h", "/cache"]\n'
        "    stop_signal: SIGKILL\n"
        "    volumes: [cache:/cache]\n"
        "  built:\n"
        "    build: .\n"
        '    command: ["sleep", "3600"]\n'
        "    stop_signal: SIGKILL\n"
        "volumes:\n"
        "  cache: {}\n"
    ),
    "Dockerfile": BUILD_FILE,
    "greeting": "built from the repo root\n",
}

# compose.yml plus compose.override.yml beside it (compose applies both).
OVERRIDE_REPO = {
    "compose.yml": (
        "services:\n"
        "  web:\n"
        f"    image: {IMAGE}\n"
        '    command: ["sleep", "3600"]\n'
        "    stop_signal: SIGKILL\n"
    ),
    "compose.override.yml": (
        "services:\n"
        "  web:\n"
        "    environment: {FROM_OVERRIDE: 'yes'}\n"
        "  sidecar:\n"
        f"    image: {IMAGE}\n"
        '    command: ["sleep", "3600"]\n'
        "    stop_signal: SIGKILL\n"
    ),
    "compose.extra.yml": (
        "services:\n"
        "  extra:\n"
        f"    image: {IMAGE}\n"
        '    command: ["sleep", "3600"]\n'
        "    stop_signal: SIGKILL\n"
    ),
}

# A .env the repo's .gitignore excludes, which compose needs (env_file).
DOTENV_REPO = {
    ".gitignore": ".env\n",
    ".env": "SECRET_ISH=from the ignored .env\n",
    "compose.yml": (
        "services:\n"
        "  app:\n"
        f"    image: {IMAGE}\n"
        "    env_file: .env\n"
        '    command: ["sleep", "3600"]\n'
        "    stop_signal: SIGKILL\n"
    ),
}


def write_repo(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder


def compose_processes(projects: set[str]) -> list[str]:
    """Command lines of processes on this machine that name one of the projects."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes().decode(errors="replace")
            words = [w for w in raw.split("\0") if w]
        except OSError:
            continue  # ended meanwhile
        if projects & set(words):
            found.append(" ".join(words))
    return found


async def kill_while_provisioning(
    http: aiohttp.ClientSession,
    data_dir: Path,
    env: dict[str, str],
    body: dict[str, Any],
    count: int = 10,
) -> list[str]:
    """SIGKILL a serve while `count` sandboxes of `body` provision (one of them in
    compose up), start another on the same data dir and take each to its end:
    recovered as failed (torn down), or ready and then destroyed. Returns their ids
    once no compose process the dead serve started is left; the second serve has
    stopped cleanly."""
    from extensions.compose import project_name
    from tests.helpers import destroy, get, wait_state

    first = ServeProcess(data_dir, free_port(), **env)
    try:
        await first.wait_healthy(http)
        ids = []
        for _ in range(count):
            async with http.post(f"{first.url}/v1/sandboxes", json=body) as resp:
                assert resp.status == 202, await resp.text()
                ids.append((await resp.json())["id"])
        async with asyncio.timeout(120):
            while True:
                views = [await get(http, first.url, i) for i in ids]
                messages = [(v.get("progress") or {}).get("message") or "" for v in views]
                if any(m.startswith("compose up") for m in messages):
                    break
                await asyncio.sleep(0.05)  # polling a condition, under a deadline
    finally:
        first.kill()

    second = ServeProcess(data_dir, free_port(), **env)
    try:
        await second.wait_healthy(http)
        for sandbox_id in ids:
            final = await wait_state(http, second.url, sandbox_id, {"ready", "failed"}, timeout=180)
            if final["state"] == "ready":
                await destroy(http, second.url, sandbox_id)
                await wait_state(http, second.url, sandbox_id, {"destroyed"}, timeout=120)
        projects = {project_name(i) for i in ids}
        async with asyncio.timeout(120):
            while compose_processes(projects):
                await asyncio.sleep(0.1)  # the dead serve's compose runs: wait it out
        assert second.terminate() == 0
    finally:
        if second.proc.poll() is None:
            second.kill()
    return ids
