"""The SDK's path rules for put_file/get_file, and the streaming tar reader."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from extensions.files import ExactReader, open_tar_file, read_tar_header, tar_member
from extensions.sdk import (
    MAX_PATH_BYTES,
    FileRefused,
    FileTooLarge,
    OutputBuffer,
    check_file_path,
    confine_file,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a/b", "/a/b"),
        ("/a/b", "/a/b"),
        ("//a///b/", "/a/b"),
        ("./a/./b", "/a/b"),
        ("straße/ünï code.txt", "/straße/ünï code.txt"),
    ],
)
def test_paths_are_normalized(raw: str, expected: str) -> None:
    assert check_file_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "/",
        "..",
        "../x",
        "a/../b",
        "a/..",
        "a\x00b",
        "a\nb",
        "a\x1bb",
        "x" * (MAX_PATH_BYTES + 1),
    ],
)
def test_bad_paths_are_refused(raw: str) -> None:
    with pytest.raises(FileRefused):
        check_file_path(raw)


def test_confined_to_the_workspace(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_text("x")
    outside = tmp_path / "secret"
    outside.write_text("s")
    os.symlink(outside, root / "out")
    os.symlink(tmp_path, root / "outdir")
    os.symlink("d/f", root / "in")
    assert confine_file(root, "/d/f") == (root / "d" / "f").resolve()
    assert confine_file(root, "in") == (root / "d" / "f").resolve()
    for bad in ("out", "outdir/secret", "d", "missing", "d/f/under"):
        with pytest.raises(FileRefused):
            confine_file(root, bad)
    with pytest.raises(FileRefused):
        confine_file(root, "outdir/new", for_write=True)
    with pytest.raises(FileRefused):
        confine_file(root, "d", for_write=True)
    # writing over a link replaces the link: the target named is the link itself
    assert confine_file(root, "out", for_write=True) == root.resolve() / "out"


class BytesReader:
    """A `Reader` over bytes, handing out small pieces."""

    command = "test"

    def __init__(self, data: bytes, piece: int = 700) -> None:
        self.data = data
        self.piece = piece
        self.closed = False

    async def read(self, size: int) -> bytes:
        chunk, self.data = self.data[: min(size, self.piece)], self.data[min(size, self.piece) :]
        return chunk

    async def finish(self) -> tuple[int, str]:
        return 125, 'Error: "/x" could not be found on container c: no such file or directory'

    async def close(self) -> None:
        self.closed = True


def _tar(*members: tarfile.TarInfo, data: bytes = b"", fmt: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as archive:
        for member in members:
            archive.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return out.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
async def test_tar_reader_streams_the_file(fmt: int) -> None:
    data = os.urandom(300_000)
    name = "n" * 150 if fmt != tarfile.USTAR_FORMAT else "short"
    info = tarfile.TarInfo(name + ("-ü" if fmt == tarfile.PAX_FORMAT else ""))
    info.size = len(data)
    reader = BytesReader(_tar(info, data=data, fmt=fmt))
    stream = await open_tar_file(reader, "/x", max_bytes=len(data))
    assert stream.size == len(data)
    got = b"".join([chunk async for chunk in stream.chunks])
    assert got == data and reader.closed


async def test_tar_reader_refuses_directories_links_and_large_files() -> None:
    folder = tarfile.TarInfo("d")
    folder.type = tarfile.DIRTYPE
    with pytest.raises(FileRefused, match="directory"):
        await read_tar_header(ExactReader(BytesReader(_tar(folder))), "/d")
    link = tarfile.TarInfo("l")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    with pytest.raises(FileRefused, match="link"):
        await read_tar_header(ExactReader(BytesReader(_tar(link))), "/l")
    big = tarfile.TarInfo("big")
    big.size = 10
    reader = BytesReader(_tar(big, data=b"0123456789"))
    with pytest.raises(FileTooLarge):
        await open_tar_file(reader, "/big", max_bytes=9)
    assert reader.closed
    with pytest.raises(FileRefused, match="does not exist"):
        await open_tar_file(BytesReader(b""), "/x", max_bytes=9)


async def test_tar_member_is_a_valid_archive(tmp_path: Path) -> None:
    source = tmp_path / "f"
    source.write_bytes(os.urandom(5000))
    archive = b"".join([chunk async for chunk in tar_member("a/ü/" + "x" * 120, source)])
    with tarfile.open(fileobj=io.BytesIO(archive)) as opened:
        (member,) = opened.getmembers()
        assert member.name == "a/ü/" + "x" * 120
        extracted = opened.extractfile(member)
        assert extracted is not None and extracted.read() == source.read_bytes()


async def test_output_buffer_counts_digests_and_keeps_the_tail() -> None:
    seen: list[bytes] = []

    async def slow(stream: str, data: bytes) -> None:
        await asyncio.sleep(0)
        seen.append(data)

    buffer = OutputBuffer(slow, keep=10)
    pieces = ["ü".encode()[:1], "ü".encode()[1:] + b"0123456789abc"]
    for piece in pieces:
        await buffer.add("stdout", piece)
    result = buffer.result(0, 0.1)
    whole = b"".join(pieces)
    assert result.stdout_bytes == len(whole)
    assert result.stdout_sha256 == hashlib.sha256(whole).hexdigest()
    assert result.stdout == "3456789abc" and result.truncated
    assert seen == pieces
    assert result.stderr == "" and result.stderr_sha256 == hashlib.sha256(b"").hexdigest()
