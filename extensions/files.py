"""What the shipped adapters share for `exec`, `put_file` and `get_file`.

- `STOP_TAGGED`: stops the processes carrying a command's tag (`SANDBOXER_COMMAND=<token>`
  in their environment): TERM, then KILL after ~2 s. On a host, every process of
  `/proc` is looked at; for a container, the host pids `<engine> top <container> hpid`
  lists (killing `podman exec`'s client does not stop what runs in the container).
- A tar stream of one file (`tar_member`) for `<engine> cp - <container>:/`, and a
  streaming reader of `<engine> cp <container>:<path> -` (`read_tar_file`).
- `GET_WORKSPACE_FILE` / `PUT_WORKSPACE_FILE`: one file of a workspace on a host, the
  workspace as the root, links resolved and confined there.
Every script is fixed text run as `sh -c SCRIPT sh ARGS...`: arguments stay data.
"""

from __future__ import annotations

import secrets
import tarfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

from extensions.sdk import FILE_CHUNK, ExtensionError, FileRefused, FileStream, FileTooLarge
from extensions.transport import Reader

TAG_NAME = "SANDBOXER_COMMAND"
READ_CHUNK = 256 * 1024
BLOCK = 512


def new_tag() -> str:
    return secrets.token_hex(16)


STOP_TAGGED = r"""
set -u
token=$1; container=$2; shift 2
tagged() {  # "$@": the engine command
  if [ -n "$container" ]; then
    list=$("$@" top "$container" hpid 2>/dev/null | sed 1d) || list=""
  else
    list=$(cd /proc && ls -d [0-9]* 2>/dev/null)
  fi
  for p in $list; do
    [ "$p" = "$$" ] && continue
    if grep -qaF -- "SANDBOXER_COMMAND=$token" "/proc/$p/environ" 2>/dev/null; then
      echo "$p"
    fi
  done
}
pids=$(tagged "$@")
[ -n "$pids" ] || exit 0
kill -TERM $pids 2>/dev/null
i=0
while [ $i -lt 20 ]; do
  alive=""
  for p in $pids; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
  [ -n "$alive" ] || break
  sleep 0.1
  i=$((i + 1))
done
pids=$(tagged "$@")
[ -z "$pids" ] || kill -KILL $pids 2>/dev/null
exit 0
"""


def stop_tagged_argv(token: str, engine_cmd: Sequence[str] = (), container: str = "") -> list[str]:
    """The processes tagged `token`: of the host (`container` ""), or of a container."""
    return ["sh", "-c", STOP_TAGGED, "sh", token, container, *engine_cmd]


# Exit codes of the workspace scripts, and what they mean.
MISSING, LEADS_OUT, IS_DIR, NO_WORKSPACE, NOT_REGULAR, BAD_PARENT, WRITE_FAILED = (
    2,
    3,
    4,
    5,
    6,
    7,
    8,
)
REFUSALS = {
    MISSING: "does not exist",
    LEADS_OUT: "leads out of the workspace through a link",
    IS_DIR: "is a directory",
    NO_WORKSPACE: "the sandbox has no workspace",
    NOT_REGULAR: "is not a regular file",
    BAD_PARENT: "its parent is not a directory",
}

# Prints the file's size on a line, then the file. $1 workspace, $2 path in it.
GET_WORKSPACE_FILE = r"""
set -u
root=$(realpath -e -- "$1" 2>/dev/null) || exit 5
p=$(realpath -e -- "$root/$2" 2>/dev/null) || exit 2
case "$p/" in "$root"/?*) ;; *) exit 3;; esac
[ ! -d "$p" ] || exit 4
[ -f "$p" ] || exit 6
exec 3<"$p" || exit 2
size=$(wc -c <"$p") || exit 2
printf '%s\n' "$size"
exec cat <&3
"""

# Writes stdin to the file (through a temporary beside it, then renamed over it: a
# link there is replaced, never followed). $1 workspace, $2 path in it.
PUT_WORKSPACE_FILE = r"""
set -u
root=$(realpath -e -- "$1" 2>/dev/null) || exit 5
target=$root/$2
parent=$(realpath -m -- "$(dirname -- "$target")") || exit 7
case "$parent/" in "$root"/*) ;; *) exit 3;; esac
if [ -e "$parent" ] && [ ! -d "$parent" ]; then exit 7; fi
mkdir -p -- "$parent" 2>/dev/null || exit 7
parent=$(realpath -e -- "$parent") || exit 7
case "$parent/" in "$root"/*) ;; *) exit 3;; esac
dest=$parent/$(basename -- "$target")
if [ -d "$dest" ] && [ ! -L "$dest" ]; then exit 4; fi
tmp=$parent/.sandboxer-put.$$
cat >"$tmp" || { rm -f -- "$tmp"; exit 8; }
mv -f -T -- "$tmp" "$dest" || { rm -f -- "$tmp"; exit 8; }
"""


def refusal(path: str, code: int, stderr: str, what: str) -> ExtensionError:
    reason = REFUSALS.get(code)
    if reason is not None:
        return FileRefused(f"{path}: {reason}")
    return ExtensionError(f"{what}: {path}: exited {code}: {stderr.strip()[-300:]}")


async def file_chunks(source: Path) -> AsyncIterator[bytes]:
    """A local file, a chunk at a time."""
    with source.open("rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            yield chunk


# ---- tar ----------------------------------------------------------------------------


def tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = int(time.time())
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


async def tar_member(name: str, source: Path) -> AsyncIterator[bytes]:
    """A tar archive of one regular file named `name` (a relative path: the engine
    creates its parents), streamed from `source`."""
    size = source.stat().st_size  # noqa: ASYNC240 - one local stat
    yield tar_header(name, size)
    sent = 0
    async for chunk in file_chunks(source):
        chunk = chunk[: size - sent]
        sent += len(chunk)
        yield chunk
        if sent >= size:
            break
    if sent != size:
        raise ExtensionError(f"{source.name} changed while it was sent")
    yield b"\0" * (-size % BLOCK) + b"\0" * (2 * BLOCK)


class ExactReader:
    """Exact-size reads over a `Reader`."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self.buffer = b""

    async def read_exact(self, size: int) -> bytes:
        while len(self.buffer) < size:
            chunk = await self.reader.read(max(size - len(self.buffer), READ_CHUNK))
            if not chunk:
                break
            self.buffer += chunk
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    async def read_some(self, limit: int) -> bytes:
        if self.buffer:
            data, self.buffer = self.buffer[:limit], self.buffer[limit:]
            return data
        return (await self.reader.read(limit))[:limit]

    async def read_line(self, limit: int = 64) -> bytes:
        while b"\n" not in self.buffer and len(self.buffer) < limit:
            chunk = await self.reader.read(limit)
            if not chunk:
                break
            self.buffer += chunk
        line, sep, rest = self.buffer.partition(b"\n")
        if not sep:
            return b""
        self.buffer = rest
        return line


def _pax_fields(data: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    while data:
        length_text, _, _ = data.partition(b" ")
        try:
            length = int(length_text)
        except ValueError:
            break
        record, data = data[:length], data[length:]
        _, _, keyvalue = record.partition(b" ")
        key, _, value = keyvalue.rstrip(b"\n").partition(b"=")
        fields[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
    return fields


async def read_tar_header(source: ExactReader, path: str) -> int | None:
    """Reads up to the first regular member's data: its size. None: the archive
    ended (empty answer). A directory, link or other kind is `FileRefused`."""
    size_override: int | None = None
    while True:
        block = await source.read_exact(BLOCK)
        if len(block) < BLOCK or block == b"\0" * BLOCK:
            return None
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise ExtensionError(f"{path}: the engine's archive is not a tar: {exc}") from None
        padded = info.size + (-info.size % BLOCK)
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
            if padded > 1024 * 1024:
                raise ExtensionError(f"{path}: a tar extended header is too large")
            fields = _pax_fields((await source.read_exact(padded))[: info.size])
            if info.type != tarfile.XGLTYPE and "size" in fields:
                size_override = int(fields["size"])
            continue
        if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            if padded > 1024 * 1024:
                raise ExtensionError(f"{path}: a tar long name is too large")
            await source.read_exact(padded)
            continue
        if info.type == tarfile.DIRTYPE:
            raise FileRefused(f"{path}: is a directory")
        if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            raise FileRefused(f"{path}: is a link the engine did not follow")
        if info.type not in tarfile.REGULAR_TYPES:
            raise FileRefused(f"{path}: is not a regular file")
        return size_override if size_override is not None else info.size


def stream_of(
    reader: Reader,
    source: ExactReader,
    size: int,
    path: str,
    *,
    after: Callable[[], Awaitable[None]] | None = None,
) -> FileStream:
    """A `FileStream` of the next `size` bytes of `source`; at the end (or on
    `aclose`) the helper process is stopped."""

    async def chunks() -> AsyncIterator[bytes]:
        left = size
        try:
            while left > 0:
                chunk = await source.read_some(min(left, FILE_CHUNK))
                if not chunk:
                    raise ExtensionError(f"{path}: the transfer ended {left} bytes short")
                left -= len(chunk)
                yield chunk
        finally:
            await reader.close()
            if after is not None:
                await after()

    return FileStream(size, chunks(), reader.close)


async def open_tar_file(reader: Reader, path: str, max_bytes: int) -> FileStream:
    """The file an engine's `cp <container>:<path> -` streams as tar."""
    source = ExactReader(reader)
    try:
        size = await read_tar_header(source, path)
        if size is None:
            code, stderr = await reader.finish()
            lowered = stderr.lower()
            if "not a directory" in lowered:
                raise FileRefused(f"{path}: its parent is not a directory")
            if "could not be found" in lowered or "no such file" in lowered:
                raise FileRefused(f"{path}: does not exist")
            raise ExtensionError(f"copy of {path} failed ({code}): {stderr.strip()[-300:]}")
        if size > max_bytes:
            raise FileTooLarge(f"{path}: {size} bytes, more than {max_bytes}")
    except BaseException:
        await reader.close()
        raise
    return stream_of(reader, source, size, path)


async def open_workspace_file(reader: Reader, path: str, max_bytes: int, what: str) -> FileStream:
    """The file `GET_WORKSPACE_FILE` prints (its size on a line, then the bytes)."""
    source = ExactReader(reader)
    try:
        line = await source.read_line()
        if not line.isdigit():
            code, stderr = await reader.finish()
            raise refusal(path, code, stderr, what)
        size = int(line)
        if size > max_bytes:
            raise FileTooLarge(f"{path}: {size} bytes, more than {max_bytes}")
    except BaseException:
        await reader.close()
        raise
    return stream_of(reader, source, size, path)
