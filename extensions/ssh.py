"""The SSH layer shared by the SSH-based extensions (compose-ssh, vm-packer).

One asyncssh connection per target, reused across sandboxes, with keepalive, and
re-opened when it drops. Every remote command is built from a list and quoted with
`shlex.join`; nothing is ever pasted into a shell string unquoted. Host keys are
always verified: against the configured known_hosts file, or the user's default one.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from extensions.sdk import ENV_NAME_RE, ExtensionError, OutputBuffer

CHUNK = 256 * 1024


class SSHError(ExtensionError):
    """The connection failed (unreachable, auth, unknown or changed host key)."""


class CommandFailed(ExtensionError):
    """A command (on a host or on this machine) exited non-zero; `stderr` is all of
    its error output, the message its tail."""

    where = "command"

    def __init__(self, command: str, exit_status: int | None, stderr: str) -> None:
        tail = stderr.strip().splitlines()[-5:]
        super().__init__(f"{self.where} exited {exit_status}: {command[:200]}: " + " | ".join(tail))
        self.exit_status = exit_status
        self.stderr = stderr


class RemoteCommandFailed(CommandFailed):
    where = "remote command"


@dataclass(frozen=True)
class SSHTarget:
    """Where to connect. `host` may be an alias of `ssh_config` (an OpenSSH client
    config: Host, HostName, Port, User, IdentityFile, ProxyJump, UserKnownHostsFile);
    fields given here win over the config file's."""

    host: str
    port: int | None = None  # None: the ssh config's Port, else 22
    user: str | None = None
    identity_file: str | None = None
    known_hosts: str | None = None  # None: ssh config's UserKnownHostsFile, else ~/.ssh
    ssh_config: str | None = None
    connect_timeout: float = 15.0
    keepalive_interval: float = 15.0

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], where: str) -> SSHTarget:
        host = raw.get("alias") or raw.get("host")
        if not host:
            raise ExtensionError(f"{where}: 'host' (or an ssh config 'alias') is required")
        port = raw.get("port")
        if port is not None and (not isinstance(port, int) or not 0 < port < 65536):
            raise ExtensionError(f"{where}: 'port' must be 1..65535, got {port!r}")
        ssh_config = raw.get("ssh_config")
        if raw.get("alias") and not ssh_config:
            raise ExtensionError(f"{where}: an 'alias' needs an 'ssh_config' file")
        return cls(
            host=str(host),
            port=port,
            ssh_config=str(ssh_config) if ssh_config else None,
            user=str(raw["user"]) if raw.get("user") else None,
            identity_file=str(raw["identity_file"]) if raw.get("identity_file") else None,
            known_hosts=str(raw["known_hosts"]) if raw.get("known_hosts") else None,
            connect_timeout=float(raw.get("connect_timeout", 15.0)),
            keepalive_interval=float(raw.get("keepalive_interval", 15.0)),
        )

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}" if self.port is not None else self.host

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def ssh_command(self) -> list[str]:
        """The OpenSSH client invocation rsync uses: same identity, same host-key rules."""
        argv = ["ssh"]
        if self.ssh_config:
            argv += ["-F", self.ssh_config]
        if self.port is not None:
            argv += ["-p", str(self.port)]
        argv += ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"]
        argv += ["-o", f"ConnectTimeout={int(self.connect_timeout)}"]
        # The same dead-link detection as the asyncssh pool: a cut link fails the
        # transfer within ~3 keepalives instead of hanging until the hook's timeout.
        argv += ["-o", f"ServerAliveInterval={max(int(self.keepalive_interval), 1)}"]
        argv += ["-o", "ServerAliveCountMax=3"]
        if self.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        if self.identity_file:
            argv += ["-i", self.identity_file, "-o", "IdentitiesOnly=yes"]
        return argv


@dataclass(frozen=True)
class CommandResult:
    exit_status: int
    stdout: str
    stderr: str


class SSHPool:
    """Reuses one connection per target; safe to share between many sandboxes."""

    def __init__(self) -> None:
        self._connections: dict[SSHTarget, asyncssh.SSHClientConnection] = {}
        self._locks: dict[SSHTarget, asyncio.Lock] = {}

    async def connection(self, target: SSHTarget) -> asyncssh.SSHClientConnection:
        lock = self._locks.setdefault(target, asyncio.Lock())
        async with lock:
            conn = self._connections.get(target)
            if conn is not None and not conn.is_closed():
                return conn
            conn = await self._connect(target)
            self._connections[target] = conn
            return conn

    async def _connect(self, target: SSHTarget) -> asyncssh.SSHClientConnection:
        options: dict[str, Any] = {
            "connect_timeout": target.connect_timeout,
            "keepalive_interval": target.keepalive_interval,
            "keepalive_count_max": 3,
        }
        if target.port is not None:
            options["port"] = target.port
        if target.ssh_config:
            if not Path(target.ssh_config).exists():  # noqa: ASYNC240 - one local stat
                raise SSHError(f"ssh config file {target.ssh_config} does not exist")
            options["config"] = [target.ssh_config]
        if target.user:
            options["username"] = target.user
        if target.identity_file:
            options["client_keys"] = [target.identity_file]
            options["agent_path"] = None
        if target.known_hosts:
            if not Path(target.known_hosts).exists():  # noqa: ASYNC240 - one local stat
                raise SSHError(f"known_hosts file {target.known_hosts} does not exist")
            options["known_hosts"] = target.known_hosts
        try:
            return await asyncssh.connect(target.host, **options)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise SSHError(
                f"host key of {target.label} is not trusted (unknown or "
                f"changed; check known_hosts): {exc}"
            ) from exc
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            raise SSHError(f"cannot connect to {target.label}: {exc}") from exc

    async def run(
        self,
        target: SSHTarget,
        argv: Sequence[str],
        *,
        timeout: float = 60.0,
        check: bool = True,
        cwd: str | None = None,
        stdin: str | None = None,
    ) -> CommandResult:
        """Run argv on the target (quoted); `cwd` is entered first, also quoted."""
        command = shlex.join(argv)
        if cwd is not None:
            command = f"cd -- {shlex.quote(cwd)} && {command}"
        return await self.run_shell(target, command, timeout=timeout, check=check, stdin=stdin)

    async def run_shell(
        self,
        target: SSHTarget,
        command: str,
        *,
        timeout: float = 60.0,
        check: bool = True,
        stdin: str | None = None,
    ) -> CommandResult:
        """Run an already-quoted command line. Callers build it with shlex only."""
        for attempt in (1, 2):
            conn = await self.connection(target)
            try:
                result = await asyncio.wait_for(
                    conn.run(command, check=False, input=stdin), timeout
                )
                break
            except (asyncssh.ConnectionLost, asyncssh.DisconnectError, BrokenPipeError) as exc:
                self._connections.pop(target, None)
                if attempt == 2:
                    raise SSHError(f"connection to {target.host} lost: {exc}") from exc
            except asyncssh.ChannelOpenError as exc:
                self._connections.pop(target, None)
                if attempt == 2:
                    raise SSHError(f"cannot open a channel to {target.host}: {exc}") from exc
        if result.exit_status is None and check:
            # Neither an exit status nor a signal came back: the channel closed under
            # the command (the connection was lost while it ran, e.g. a dead link
            # caught by the keepalive). Say so; its outcome on the host is unknown.
            raise SSHError(f"connection to {target.label} lost while running: {_brief(command)}")
        out = CommandResult(
            exit_status=result.exit_status if result.exit_status is not None else -1,
            stdout=_text(result.stdout),
            stderr=_text(result.stderr),
        )
        if check and out.exit_status != 0:
            raise RemoteCommandFailed(command, out.exit_status, out.stderr)
        return out

    async def run_streaming(
        self, target: SSHTarget, command: str, output: OutputBuffer, *, timeout: float
    ) -> int:
        """Run an already-quoted command line (see `command_line`), passing its
        output to `output` as it arrives; returns its exit code (128 + the signal's
        number if a signal ended it). Not retried once started: a command is not
        idempotent. Past `timeout` the command is signalled, its channel closed, and
        `TimeoutError` raised."""
        async with asyncio.timeout(timeout):
            for attempt in (1, 2):
                conn = await self.connection(target)
                try:
                    proc = await conn.create_process(command, encoding=None)
                    break
                except (asyncssh.ChannelOpenError, asyncssh.ConnectionLost) as exc:
                    self._connections.pop(target, None)
                    if attempt == 2:
                        raise SSHError(f"cannot open a channel to {target.label}: {exc}") from exc
            try:
                proc.stdin.write_eof()  # no input: a command reading stdin sees its end
                await asyncio.gather(
                    _pump(proc.stdout, "stdout", output), _pump(proc.stderr, "stderr", output)
                )
                await proc.wait()
            finally:
                if proc.returncode is None:  # timed out or cancelled: stop it
                    try:
                        proc.send_signal("TERM")  # the caller stops what is left (tagged)
                    except (OSError, asyncssh.Error):
                        pass
                    proc.close()
        if proc.exit_status is not None:
            return proc.exit_status
        if proc.exit_signal:
            name = str(proc.exit_signal[0])
            try:
                return 128 + signal.Signals[f"SIG{name}"].value
            except KeyError:
                return 128
        raise SSHError(f"connection to {target.label} lost while running: {_brief(command)}")

    async def stream_to_file(
        self,
        target: SSHTarget,
        argv: Sequence[str],
        path: Path,
        *,
        timeout: float,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Run argv and write its stdout to a local file, chunk by chunk (never all in
        memory). Returns the byte count."""
        conn = await self.connection(target)
        command = shlex.join(argv)
        written = 0
        async with asyncio.timeout(timeout):
            async with conn.create_process(command, encoding=None) as proc:
                with path.open("wb") as out:
                    # Written inline: a 256 KiB write lands in the page cache at once,
                    # and handing each chunk to a worker thread spreads freed buffers
                    # over per-thread malloc arenas (measured: RSS grew with the size).
                    while chunk := await proc.stdout.read(CHUNK):
                        out.write(chunk)
                        written += len(chunk)
                        if progress is not None:
                            progress(written)
                await proc.wait()
                stderr = await proc.stderr.read()
        if proc.exit_status != 0:
            raise RemoteCommandFailed(command, proc.exit_status, _text(stderr))
        return written

    async def stream_from_file(
        self,
        target: SSHTarget,
        argv: Sequence[str],
        path: Path,
        *,
        timeout: float,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Run argv with a local file as its stdin, chunk by chunk."""
        conn = await self.connection(target)
        command = shlex.join(argv)
        sent = 0
        async with asyncio.timeout(timeout):
            async with conn.create_process(command, encoding=None) as proc:
                with path.open("rb") as source:
                    while chunk := source.read(CHUNK):
                        proc.stdin.write(chunk)
                        await proc.stdin.drain()
                        sent += len(chunk)
                        if progress is not None:
                            progress(sent)
                proc.stdin.write_eof()
                await proc.wait()
                stderr = await proc.stderr.read()
        if proc.exit_status != 0:
            raise RemoteCommandFailed(command, proc.exit_status, _text(stderr))

    async def open_reader(self, target: SSHTarget, argv: Sequence[str]) -> RemoteReader:
        """Start argv (quoted) with no input; its stdout is read by the caller."""
        command = shlex.join(argv)
        conn = await self.connection(target)
        try:
            proc = await conn.create_process(command, encoding=None)
        except (asyncssh.ChannelOpenError, asyncssh.ConnectionLost) as exc:
            self._connections.pop(target, None)
            raise SSHError(f"cannot open a channel to {target.label}: {exc}") from exc
        proc.stdin.write_eof()
        return RemoteReader(proc, command)

    async def run_with_input(
        self,
        target: SSHTarget,
        argv: Sequence[str],
        chunks: AsyncIterator[bytes],
        *,
        timeout: float,
    ) -> None:
        """Run argv (quoted) with `chunks` as its stdin, each written once the last
        drained; a non-zero exit raises `RemoteCommandFailed`."""
        conn = await self.connection(target)
        command = shlex.join(argv)
        async with asyncio.timeout(timeout):
            async with conn.create_process(command, encoding=None) as proc:
                errors = asyncio.ensure_future(proc.stderr.read())
                try:
                    async for chunk in chunks:
                        proc.stdin.write(chunk)
                        await proc.stdin.drain()
                    proc.stdin.write_eof()
                    await proc.wait()
                    stderr = await errors
                finally:
                    errors.cancel()
        if proc.exit_status != 0:
            raise RemoteCommandFailed(command, proc.exit_status, _text(stderr))

    async def close(self) -> None:
        for conn in self._connections.values():
            conn.close()
        for conn in self._connections.values():
            await conn.wait_closed()
        self._connections.clear()


async def _pump(reader: Any, stream: str, output: OutputBuffer) -> None:
    """One stream into `output`, a chunk at a time: the next read waits until the
    consumer took the last one (asyncssh's window then holds the remote writer)."""
    while chunk := await reader.read(CHUNK):
        await output.add(stream, chunk)


class RemoteReader:
    """A remote command's stdout, read by the caller; its stderr collected (the
    tail). `close` stops it."""

    def __init__(self, proc: Any, command: str) -> None:
        self.proc = proc
        self.command = command
        self.errors = asyncio.ensure_future(_tail(proc.stderr))

    async def read(self, size: int) -> bytes:
        data: bytes = await self.proc.stdout.read(size)
        return data

    async def finish(self) -> tuple[int, str]:
        """Waits for the end: the exit code and the error output's tail."""
        await self.proc.wait()
        stderr = await self.errors
        status = self.proc.exit_status
        return (status if status is not None else -1), stderr

    async def close(self) -> None:
        self.errors.cancel()
        if self.proc.returncode is None:
            try:
                self.proc.send_signal("KILL")
            except (OSError, asyncssh.Error):
                pass
        self.proc.close()
        try:
            await asyncio.wait_for(self.proc.wait_closed(), 5)
        except (TimeoutError, OSError, asyncssh.Error):
            pass


async def _tail(reader: Any, keep: int = 64 * 1024) -> str:
    """Everything a reader gives, its last `keep` bytes kept."""
    kept = b""
    while chunk := await reader.read(CHUNK):
        kept = (kept + chunk)[-keep:]
    return kept.decode(errors="replace")


def command_line(
    argv: Sequence[str], *, cwd: str | None = None, env: Mapping[str, str] | None = None
) -> str:
    """`cd -- <cwd> && NAME=value ... exec <argv>`, every part quoted. `exec` makes
    argv[0] the command even if it looks like an assignment, and lets a signal reach it."""
    for name in env or {}:
        if not ENV_NAME_RE.fullmatch(name):
            raise ExtensionError(f"env name {name[:64]!r} must match {ENV_NAME_RE.pattern}")
    words = [f"{name}={shlex.quote(value)}" for name, value in (env or {}).items()]
    words += ["exec", shlex.join(argv)]
    line = " ".join(words)
    return f"cd -- {shlex.quote(cwd)} && {line}" if cwd is not None else line


def _brief(command: str, keep: int = 120) -> str:
    """A long command line shortened in the middle: its start and what it runs."""
    return command if len(command) <= 2 * keep else f"{command[:keep]} ... {command[-keep:]}"


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def rsync_argv(
    source: Path,
    destination: str,
    *,
    target: SSHTarget | None = None,
    includes: Sequence[str] = (),
    excludes: Sequence[str] = (),
    filters: Sequence[str] = (),
    dry_run: bool = False,
) -> list[str]:
    """The rsync invocation mirroring `source/` into `destination/`: on `target` over
    OpenSSH (same identity and host-key rules), or a local directory (`target` None).
    Rule order is rsync's first match: `includes` win over `filters` (the .gitignore
    merge) and `excludes`."""
    # --safe-links: a link in the repo that points out of it is not copied (-a copies
    # links as links, never what they point to).
    argv = ["rsync", "-a", "--safe-links", "--delete", "--protect-args"]
    if dry_run:
        argv += ["--dry-run", "--out-format=%n"]
    else:
        argv += ["--info=progress2", "--no-inc-recursive", "--stats"]
    for pattern in includes:
        argv += ["--include", pattern]
    for rule in filters:
        argv += ["--filter", rule]
    for pattern in excludes:
        argv += ["--exclude", pattern]
    if target is not None:
        argv += ["-e", shlex.join(target.ssh_command())]
        argv += [f"{source}/", f"{target.destination}:{destination}/"]
    else:
        argv += [f"{source}/", f"{destination}/"]
    return argv


def human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{count} B"  # unreachable


def parse_progress2(line: str) -> tuple[int, str] | None:
    """`      52,428,800  42%   10.00MB/s    0:00:04 (xfr#3, to-chk=1/5)` → (bytes
    transferred so far, "42%"); None for any other line."""
    fields = line.split()
    if len(fields) >= 2 and fields[1].endswith("%"):
        try:
            return int(fields[0].replace(",", "")), fields[1]
        except ValueError:
            return None
    return None


def parse_stats(text: str) -> dict[str, int]:
    """rsync --stats: "Total transferred file size: 52,428,800 bytes" → its numbers."""
    stats: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        words = rest.split()
        if sep and words:
            try:
                stats[name.strip()] = int(words[0].replace(",", ""))
            except ValueError:
                continue
    return stats


async def run_rsync(
    argv: Sequence[str],
    where: str,
    *,
    timeout: float = 600.0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, int]:
    """Run an rsync built by `rsync_argv`, reporting progress as bytes actually
    transferred (`rsync 42%: 22.0 MB`) and, at the end, the totals; returns --stats."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LC_ALL": "C"},
    )
    assert proc.stdout is not None and proc.stderr is not None
    rest: list[str] = []

    async def read_progress() -> None:
        assert proc.stdout is not None
        buffer = b""
        last = ""
        while chunk := await proc.stdout.read(4096):
            buffer += chunk
            *lines, buffer = buffer.replace(b"\r", b"\n").split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                parsed = parse_progress2(line)
                if parsed is None:
                    rest.append(line)
                    continue
                message = f"rsync {parsed[1]}: {human_bytes(parsed[0])}"
                if progress is not None and message != last:
                    last = message
                    progress(message)
        rest.append(buffer.decode(errors="replace"))

    try:
        async with asyncio.timeout(timeout):
            _, stderr = await asyncio.gather(read_progress(), proc.stderr.read())
            status = await proc.wait()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if status != 0:
        raise ExtensionError(
            f"rsync to {where} failed ({status}): " + stderr.decode(errors="replace").strip()[-500:]
        )
    stats = parse_stats("\n".join(rest))
    if progress is not None and "Total transferred file size" in stats:
        progress(
            f"rsync 100%: {human_bytes(stats['Total transferred file size'])} transferred"
            f" ({human_bytes(stats.get('Total bytes sent', 0))} sent)"
        )
    return stats


async def rsync(
    target: SSHTarget,
    source: Path,
    remote_dir: str,
    *,
    includes: Sequence[str] = (),
    excludes: Sequence[str] = (),
    filters: Sequence[str] = (),
    timeout: float = 600.0,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Mirror `source/` into `remote_dir/` with rsync over OpenSSH (same key rules)."""
    argv = rsync_argv(
        source, remote_dir, target=target, includes=includes, excludes=excludes, filters=filters
    )
    await run_rsync(argv, f"{target.host}:{remote_dir}", timeout=timeout, progress=progress)
