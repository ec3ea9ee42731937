"""SnapshotStore: where checkpoint artifacts live, with a digest, streamed in chunks.

The interface moves files: adapters stream an archive into a local spool file (never
into memory), the store streams the file in chunks to its backend and back. Every
artifact has a sha256 computed while it is written; reading verifies it and refuses
an artifact whose bytes changed.

Backends: JetStream Object Store (default; replicas follow the stream) and a
filesystem folder.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from pathlib import Path
from typing import Protocol

import msgspec
import nats.js.errors
from nats.js import JetStreamContext, api
from nats.js.object_store import ObjectStore

CHUNK = 1024 * 1024


class Artifact(msgspec.Struct, frozen=True):
    key: str
    size: int
    digest: str  # "sha256:<hex>"


class DigestMismatch(Exception):
    def __init__(self, key: str, expected: str, actual: str) -> None:
        super().__init__(f"digest mismatch for {key}: expected {expected}, got {actual}")


class ArtifactMissing(Exception):
    pass


class SnapshotStore(Protocol):
    async def put_file(self, key: str, path: Path) -> Artifact: ...

    async def get_file(self, key: str, path: Path, expected_digest: str) -> Artifact: ...

    async def delete(self, key: str) -> None: ...

    async def exists(self, key: str) -> bool: ...


def _digest_file(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, f"sha256:{h.hexdigest()}"


async def digest_file(path: Path) -> tuple[int, str]:
    return await asyncio.to_thread(_digest_file, path)


def _check_key(key: str) -> str:
    if not key or "/" in key or key.startswith(".") or len(key) > 200:
        raise ValueError(f"invalid artifact key {key!r}")
    return key


class FileSnapshotStore:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, key: str) -> Path:
        return self.folder / _check_key(key)

    async def put_file(self, key: str, path: Path) -> Artifact:
        target = self._path(key)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".partial")
        await asyncio.to_thread(shutil.copyfile, path, tmp)
        size, digest = await digest_file(tmp)
        os.replace(tmp, target)
        return Artifact(key, size, digest)

    async def get_file(self, key: str, path: Path, expected_digest: str) -> Artifact:
        source = self._path(key)
        if not source.exists():
            raise ArtifactMissing(key)
        await asyncio.to_thread(shutil.copyfile, source, path)
        size, digest = await digest_file(path)
        if digest != expected_digest:
            raise DigestMismatch(key, expected_digest, digest)
        return Artifact(key, size, digest)

    async def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    async def exists(self, key: str) -> bool:
        return self._path(key).exists()


class ObjectStoreSnapshots:
    """JetStream Object Store; chunked both ways by nats-py (file readers/writers)."""

    def __init__(self, js: JetStreamContext, bucket: str, replicas: int = 1) -> None:
        self.js = js
        self.bucket = bucket
        self.replicas = replicas
        self._store: ObjectStore | None = None

    async def store(self) -> ObjectStore:
        if self._store is None:
            try:
                self._store = await self.js.object_store(self.bucket)
            except nats.js.errors.BucketNotFoundError:
                self._store = await self.js.create_object_store(
                    self.bucket,
                    config=api.ObjectStoreConfig(
                        bucket=self.bucket,
                        storage=api.StorageType.FILE,
                        replicas=self.replicas,
                        description="sand-boxer checkpoint artifacts",
                    ),
                )
        return self._store

    async def put_file(self, key: str, path: Path) -> Artifact:
        store = await self.store()
        size, digest = await digest_file(path)
        with path.open("rb") as f:
            await store.put(_check_key(key), f)
        return Artifact(key, size, digest)

    async def get_file(self, key: str, path: Path, expected_digest: str) -> Artifact:
        store = await self.store()
        try:
            with path.open("wb") as f:
                await store.get(_check_key(key), writeinto=f)
        except nats.js.errors.ObjectNotFoundError as exc:
            raise ArtifactMissing(key) from exc
        except nats.js.errors.DigestMismatchError as exc:
            raise DigestMismatch(key, expected_digest, "a different object-store digest") from (exc)
        size, digest = await digest_file(path)
        if digest != expected_digest:
            raise DigestMismatch(key, expected_digest, digest)
        return Artifact(key, size, digest)

    async def delete(self, key: str) -> None:
        store = await self.store()
        try:
            await store.delete(_check_key(key))
        except nats.js.errors.ObjectNotFoundError:
            pass
        except nats.js.errors.ObjectDeletedError:
            pass

    async def exists(self, key: str) -> bool:
        store = await self.store()
        try:
            info = await store.get_info(_check_key(key))
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError):
            return False
        return not info.deleted
