"""Where read-model snapshots are kept: a JetStream Object Store bucket, one object per
worker (each worker folds into its own archive, so it resumes from its own snapshot),
replicated like the event stream."""

from __future__ import annotations

from typing import Protocol

import nats.js.errors
from nats.js import JetStreamContext, api
from nats.js.object_store import ObjectStore

READ_MODELS_BUCKET = "sandboxer_read_models"


class ReadModelSnapshots(Protocol):
    async def load(self) -> bytes | None:
        """The newest snapshot's bytes, None when there is none."""
        ...

    async def save(self, data: bytes) -> None: ...


class ObjectStoreReadModels:
    def __init__(
        self, js: JetStreamContext, key: str, *, bucket: str = READ_MODELS_BUCKET, replicas: int = 1
    ) -> None:
        self.js = js
        self.key = f"read-models.{key}"
        self.bucket = bucket
        self.replicas = replicas
        self._store: ObjectStore | None = None

    async def _bucket(self) -> ObjectStore:
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
                        description="sand-boxer read-model snapshots",
                    ),
                )
        return self._store

    async def load(self) -> bytes | None:
        store = await self._bucket()
        try:
            result = await store.get(self.key)
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError):
            return None
        return bytes(result.data or b"")

    async def save(self, data: bytes) -> None:
        store = await self._bucket()
        await store.put(self.key, data)
