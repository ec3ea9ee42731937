"""The warm pools' shared state in JetStream KV (sandboxer/app/pools.py uses it).

Two buckets, replicated like the event stream:

- `sandboxer_pool_locks`: `lock.<profile>` while one worker fills that profile's
  pool (a create-if-absent; the bucket's max age frees the lock of a worker that
  died holding it). Filling under it is what keeps several workers from over-filling.
- `sandboxer_pool_claims`: `claim.<sandbox_id>` once a create claims that member
  (a create-if-absent: of two workers racing for one member, one wins). The value is
  the claim intent (claim id, claimer's account, TTL, labels, actor, correlation id,
  and the claiming worker's `<name>/<incarnation>`).

- `sandboxer_pool_keys`: `key.<derived id>` for a create with an Idempotency-Key
  of a profile with a pool: which sandbox that key names (a claimed member, or the
  derived id itself for a cold create), the claim id and the creating worker. Written
  create-if-absent, then moved only from the revision read: of two creates with one
  key, one binds it, and the other answers as its retry.

Whether a worker is alive is read from the lease table's session bucket
(sandboxer/store/leases.py): an intent whose worker's incarnation is gone and whose
`SandboxClaimed` was never recorded is undone (docs/pools.md).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from sandboxer.store.leases import WORKERS_BUCKET, open_bucket

log = logging.getLogger(__name__)

LOCKS_BUCKET = "sandboxer_pool_locks"
CLAIMS_BUCKET = "sandboxer_pool_claims"
KEYS_BUCKET = "sandboxer_pool_keys"
LOCK_TTL = 20.0


async def _read(bucket: KeyValue, key: str) -> tuple[dict[str, Any], int] | None:
    """A JSON value and its revision; None: no such key (or a deleted one)."""
    try:
        entry = await bucket.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None
    if entry.value is None or entry.revision is None:
        return None
    return json.loads(entry.value), entry.revision


class PoolKV:
    def __init__(self, js: JetStreamContext, *, replicas: int = 1, lock_ttl: float = LOCK_TTL):
        self.js = js
        self.replicas = replicas
        self.lock_ttl = lock_ttl
        self._locks: KeyValue | None = None
        self._claims: KeyValue | None = None
        self._keys: KeyValue | None = None
        self._workers: KeyValue | None = None

    async def start(self) -> None:
        self._locks = await self._bucket(LOCKS_BUCKET, self.lock_ttl)
        self._claims = await self._bucket(CLAIMS_BUCKET, 0)
        self._keys = await self._bucket(KEYS_BUCKET, 0)
        self._workers = await self.js.key_value(WORKERS_BUCKET)

    async def _bucket(self, name: str, ttl: float) -> KeyValue:
        return await open_bucket(self.js, name, ttl, self.replicas)

    # ---- the fill lock ---------------------------------------------------------------

    async def lock(self, profile: str, holder: str) -> int | None:
        """Take the fill lock of `profile`: its revision, or None if another holds it."""
        assert self._locks is not None
        try:
            return await self._locks.create(f"lock.{profile}", holder.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            return None

    async def unlock(self, profile: str, revision: int) -> None:
        assert self._locks is not None
        try:
            await self._locks.delete(f"lock.{profile}", last=revision)
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
            pass  # it expired (and someone else may hold it now): not ours to delete

    # ---- claims ----------------------------------------------------------------------

    async def claim(self, sandbox_id: str, intent: dict[str, Any]) -> int | None:
        """Write the claim intent if the member has none: its revision, or None if
        another create claimed the member first."""
        assert self._claims is not None
        try:
            return await self._claims.create(f"claim.{sandbox_id}", json.dumps(intent).encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            return None

    async def intent(self, sandbox_id: str) -> tuple[dict[str, Any], int] | None:
        assert self._claims is not None
        return await _read(self._claims, f"claim.{sandbox_id}")

    async def intents(self) -> dict[str, tuple[dict[str, Any], int]]:
        """Every claim intent, by member id."""
        assert self._claims is not None
        try:
            keys = await self._claims.keys()
        except nats.js.errors.NoKeysError:
            return {}
        found: dict[str, tuple[dict[str, Any], int]] = {}
        for key in keys:
            sandbox_id = key.removeprefix("claim.")
            got = await self.intent(sandbox_id)
            if got is not None:
                found[sandbox_id] = got
        return found

    async def forget(self, sandbox_id: str, revision: int) -> bool:
        """Delete the claim intent if it is still the one at `revision`."""
        assert self._claims is not None
        try:
            await self._claims.delete(f"claim.{sandbox_id}", last=revision)
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
            return False
        return True

    # ---- Idempotency-Key bindings ----------------------------------------------------

    async def binding(self, key_id: str) -> tuple[dict[str, Any], int] | None:
        """What the key (as its derived id) is bound to, and the revision; None: unbound."""
        assert self._keys is not None
        return await _read(self._keys, f"key.{key_id}")

    async def bind(self, key_id: str, bound: dict[str, Any], revision: int | None) -> int | None:
        """Bind the key (revision None: if unbound; else: if still at `revision`): the
        new revision, or None if another create bound or moved it first."""
        assert self._keys is not None
        value = json.dumps(bound).encode()
        try:
            if revision is None:
                return await self._keys.create(f"key.{key_id}", value)
            return await self._keys.update(f"key.{key_id}", value, last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return None

    async def alive(self, holder: str) -> bool:
        """Whether `<name>/<incarnation>` is a worker's current session."""
        assert self._workers is not None
        name, _, incarnation = holder.partition("/")
        try:
            entry = await self._workers.get(name)
        except nats.js.errors.KeyNotFoundError:
            return False
        return bool(json.loads(entry.value or b"{}").get("incarnation") == incarnation)
