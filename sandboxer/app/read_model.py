"""Keeps the sandbox projection caught up with the stream, and lets callers wait on it.

The projection is a disposable cache: it is rebuilt from sequence 1 on every start,
and `verify()` rebuilds a fresh copy to prove it equals the live one.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec

from events import Event, SandboxRequested
from events.subjects import LEDGER_SUBJECTS
from projections.checkpoints import CheckpointsProjection
from projections.ledger import LedgerProjection, from_cache, to_cache
from projections.sandboxes import SandboxesProjection, SandboxView
from sandboxer.store.event_store import EventRecorder, RecordedEvent

log = logging.getLogger(__name__)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector (if it runs) for the block; resume after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class VerifyReport(msgspec.Struct, frozen=True):
    equal: bool
    seq: int
    sandboxes: int
    differences: list[str]


class ProjectionRunner:
    """Follows the stream into the sandbox, checkpoint and ledger projections: the one
    copy of each read model in the process, which the manager and the API read (the
    manager waits here for what it appended before it decides on it again).

    The ledger projection is also kept on disk (`cache_dir/ledger.json`) and loaded
    from there on start: a disposable cache, which `sandboxer ledger audit` checks
    against a fresh replay of the ledger events.
    """

    def __init__(self, store: EventRecorder, cache_dir: Path | None = None) -> None:
        self.store = store
        self.cache_dir = cache_dir
        self.projection = SandboxesProjection()
        self.checkpoints = CheckpointsProjection()
        # Called right after each event is applied (in-process observers, tests).
        self.listeners: list[Callable[[RecordedEvent], None]] = []
        self.ledger = self._load_cache()
        # Long-polls wait on `_changed`, which is replaced and set after an event only
        # while someone waits on it (`_waiting`); `wait_for` waiters wait for their own
        # sequence (a heap of futures), so a replay does not wake them at every event.
        self._changed = asyncio.Event()
        self._waiting = 0
        self._targets: list[tuple[int, int, asyncio.Future[None]]] = []
        self._tiebreak = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None
        self._stream_seq = 0
        self._snapshot_at: float | None = None  # time.time() of the newest snapshot

    @property
    def last_seq(self) -> int:
        return self.projection.last_seq

    @property
    def stream_seq(self) -> int:
        """The highest stream sequence this runner knows was written (>= last_seq):
        `stream_seq - last_seq` is the projection's lag."""
        return max(self._stream_seq, self.projection.last_seq)

    def snapshot_age(self) -> float | None:
        """Seconds since the newest read-model snapshot this runner wrote or loaded
        (None: none yet)."""
        return None if self._snapshot_at is None else time.time() - self._snapshot_at

    async def start(self, timeout: float = 300.0) -> None:
        """Follow the stream from sequence 1; return once caught up with its end.

        The catch-up runs with the cyclic garbage collector paused: it allocates
        millions of short-lived objects and keeps a growing projection, so collections
        would run again and again over the same live rows (a third of a replay's time).
        Nothing of a fold forms reference cycles; what others leave behind meanwhile is
        collected once the collector runs again."""
        target = await self.store.last_seq()
        self._stream_seq = target
        self._task = asyncio.create_task(self._follow(), name="projection")
        with gc_paused():
            await self.wait_for(target, timeout)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self) -> None:
        try:
            async for recorded in self.store.follow(self.projection.last_seq + 1):
                self.projection.apply(recorded.seq, recorded.subject, recorded.event)
                self.checkpoints.apply(recorded.seq, recorded.subject, recorded.event)
                if recorded.seq > self.ledger.last_seq:
                    self.ledger.apply(recorded.seq, recorded.subject, recorded.event)
                for listener in self.listeners:
                    listener(recorded)
                if self._targets and self._targets[0][0] <= recorded.seq:
                    self._reached(recorded.seq)
                if self._waiting:
                    changed, self._changed = self._changed, asyncio.Event()
                    changed.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.exception("projection stopped following the stream")
            self._failed = exc
            for _, _, future in self._targets:
                if not future.done():
                    future.set_exception(RuntimeError("projection is not following the stream"))
            self._targets.clear()
            self._changed.set()
            raise

    def _reached(self, seq: int) -> None:
        while self._targets and self._targets[0][0] <= seq:
            _, _, future = heapq.heappop(self._targets)
            if not future.done():
                future.set_result(None)

    def account_of(self, subject: str, event: Event) -> str | None:
        """The account an event belongs to: a ledger event's own, else its sandbox's."""
        if subject.startswith(LEDGER_SUBJECTS):
            return event.aggregate_id
        if isinstance(event, SandboxRequested):
            return event.account
        view = self.projection.get(event.aggregate_id)
        return view.account if view else None

    def _cache_file(self) -> Path | None:
        return self.cache_dir / "ledger.json" if self.cache_dir is not None else None

    def _load_cache(self) -> LedgerProjection:
        path = self._cache_file()
        if path is None or not path.exists():
            return LedgerProjection()
        try:
            return from_cache(path.read_bytes())
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("ignoring the ledger cache %s: %s", path, exc)
            return LedgerProjection()

    def save_cache(self) -> None:
        path = self._cache_file()
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(to_cache(self.ledger))
        tmp.replace(path)

    async def wait_for(self, seq: int, timeout: float) -> bool:
        """Wait until the projection has applied `seq`. False on timeout."""
        if self.projection.last_seq >= seq:
            return True
        if self._failed is not None:
            raise RuntimeError("projection is not following the stream")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (seq, next(self._tiebreak), future)
        heapq.heappush(self._targets, entry)
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            return False
        finally:
            if not future.done() or future.cancelled():
                with contextlib.suppress(ValueError):
                    self._targets.remove(entry)
                    heapq.heapify(self._targets)
        return True

    async def _changed_wait(self) -> None:
        self._waiting += 1
        try:
            await self._changed.wait()
        finally:
            self._waiting -= 1

    async def wait_change(self, after_seq: int, timeout: float) -> None:
        """Wait until anything past `after_seq` is applied, or the timeout passes."""
        await self.wait_for(after_seq + 1, timeout)

    async def _wait_until(self, done: Callable[[], bool], timeout: float) -> None:
        """Long-poll helper: return once `done()` holds after an applied event, or when
        the timeout passes (the caller answers with what it has)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not done():
                    await self._changed_wait()

    async def wait_sandbox(self, sandbox_id: str, after_seq: int, timeout: float) -> None:
        """Wait until the sandbox's row moves past `after_seq`."""

        def moved() -> bool:
            view = self.projection.get(sandbox_id)
            return view is not None and view.last_seq > after_seq

        await self._wait_until(moved, timeout)

    async def wait_account(self, account: str, after_seq: int, timeout: float) -> None:
        """Wait until the account's ledger row moves past `after_seq`."""

        def moved() -> bool:
            view = self.ledger.accounts.get(account)
            return view is not None and view.last_seq > after_seq

        await self._wait_until(moved, timeout)

    async def wait_checkpoint(self, checkpoint_id: str, after_seq: int, timeout: float) -> None:
        def moved() -> bool:
            view = self.checkpoints.get(checkpoint_id)
            return view is not None and view.last_seq > after_seq

        await self._wait_until(moved, timeout)

    async def verify(self) -> VerifyReport:
        """Replay the stream from sequence 1 into a fresh projection and compare."""
        live: dict[str, SandboxView] = self.projection.snapshot()
        live_checkpoints = dict(self.checkpoints.checkpoints)
        seq = self.projection.last_seq
        fresh = SandboxesProjection()
        fresh_checkpoints = CheckpointsProjection()
        if seq > 0:
            async for recorded in self.store.read(1):
                if recorded.seq > seq:
                    break
                fresh.apply(recorded.seq, recorded.subject, recorded.event)
                fresh_checkpoints.apply(recorded.seq, recorded.subject, recorded.event)
                if recorded.seq == seq:
                    break
        differences = [
            key
            for key in sorted(set(live) | set(fresh.sandboxes))
            if live.get(key) != fresh.sandboxes.get(key)
        ]
        differences += [
            f"checkpoint {key}"
            for key in sorted(set(live_checkpoints) | set(fresh_checkpoints.checkpoints))
            if live_checkpoints.get(key) != fresh_checkpoints.checkpoints.get(key)
        ]
        return VerifyReport(
            equal=not differences and fresh.last_seq == seq,
            seq=seq,
            sandboxes=len(fresh.sandboxes),
            differences=differences[:50],
        )
