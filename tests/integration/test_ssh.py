"""The shared SSH layer against a real sshd: reuse, reconnect, quoting, host keys."""

from __future__ import annotations

import asyncio
import getpass
from pathlib import Path

import pytest

from extensions.ssh import RemoteCommandFailed, SSHError, SSHPool, SSHTarget
from tests.infra import SSHHost


def target_for(host: SSHHost, **changes: object) -> SSHTarget:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": host.port,
        "user": getpass.getuser(),
        "identity_file": str(host.client_key),
        "known_hosts": str(host.known_hosts),
    }
    values.update(changes)
    return SSHTarget(**values)  # type: ignore[arg-type]


async def test_one_connection_reused_and_reopened(ssh_hosts: list[SSHHost]) -> None:
    pool = SSHPool()
    target = target_for(ssh_hosts[0])
    try:
        first = await pool.connection(target)
        assert await pool.connection(target) is first
        outs = await asyncio.gather(*(pool.run(target, ["echo", f"n {i}"]) for i in range(20)))
        assert [o.stdout for o in outs] == [f"n {i}\n" for i in range(20)]
        assert await pool.connection(target) is first, "20 commands, one connection"
        first.close()
        await first.wait_closed()
        again = await pool.run(target, ["echo", "back"])
        assert again.stdout == "back\n"
        assert await pool.connection(target) is not first
    finally:
        await pool.close()


async def test_arguments_are_quoted(ssh_hosts: list[SSHHost], tmp_path: Path) -> None:
    pool = SSHPool()
    target = target_for(ssh_hosts[0])
    marker = tmp_path / "pwned"
    tricky = [f"; touch {marker}", f"$(touch {marker})", f"`touch {marker}`", "'\"", "a b"]
    try:
        out = await pool.run(target, ["printf", "%s\\n", *tricky])
        assert out.stdout.splitlines() == tricky
        assert not marker.exists()
        with pytest.raises(RemoteCommandFailed, match="exited 3"):
            await pool.run(target, ["sh", "-c", "echo oops >&2; exit 3"])
        cwd = await pool.run(target, ["pwd"], cwd=str(tmp_path))
        assert cwd.stdout.strip() == str(tmp_path)
    finally:
        await pool.close()


async def test_unknown_or_missing_host_key_is_refused(
    ssh_hosts: list[SSHHost], tmp_path: Path
) -> None:
    other = ssh_hosts[1].known_hosts.read_text().split()
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{ssh_hosts[0].port} {other[1]} {other[2]}\n")
    pool = SSHPool()
    with pytest.raises(SSHError, match="not trusted"):
        await pool.run(target_for(ssh_hosts[0], known_hosts=str(wrong)), ["true"])
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(SSHError, match="not trusted"):
        await pool.run(target_for(ssh_hosts[0], known_hosts=str(empty)), ["true"])
    with pytest.raises(SSHError, match="does not exist"):
        await pool.run(target_for(ssh_hosts[0], known_hosts=str(tmp_path / "nope")), ["true"])
    await pool.close()
