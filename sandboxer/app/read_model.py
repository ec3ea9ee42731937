"""Keeps the sandbox projection caught up with the stream, and lets callers wait on it.

The projection is a disposable cache: it is rebuilt from sequence 1 on every start,
and `verify()` rebuilds a fresh copy to prove it equals the live one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence

import msgspec

from events import Event, SandboxRequested
from events.subjects import LEDGER_SUBJECTS, SANDBOX_SUBJECTS, WEBHOOK_SUBJECTS
from projections import snapshot
from projections.archive import MemoryArchive, SandboxArchive
from projections.checkpoints import CheckpointsProjection
from projections.ledger import LedgerProjection
from projections.sandboxes import SandboxesProjection, SandboxView
from projections.webhooks import WebhooksProjection
from sandboxer.store.event_store import EventRecorder, RecordedEvent
from sandboxer.store.read_snapshots import ReadModelSnapshots
from sandboxer.tasks import cancel_and_wait

log = logging.getLogger(__name__)

SNAPSHOT_EVERY = 100_000  # events between two snapshots
SNAPSHOT_SECONDS = 300.0  # and at most this long, when anything changed
FLUSH_AT = 1_000  # finished rows kept in memory before they go to the archive
PROGRESS_SECONDS = 10.0  # a long catch-up logs where it is this often
STREAM_CHECK_SECONDS = 5.0  # how often the runner asks where the stream ends


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


def by_id(live: dict[str, SandboxView], archive: SandboxArchive) -> Iterator[SandboxView]:
    """The rows of memory and archive in id order; a row in both: memory's (newer)."""
    merged = heapq.merge(sorted(live.values(), key=_id), archive.rows(), key=_id)
    last = ""
    for view in merged:
        if view.id != last:
            last = view.id
            yield live.get(view.id, view)


def _id(view: SandboxView) -> str:
    return view.id


class VerifyReport(msgspec.Struct, frozen=True):
    equal: bool
    seq: int
    sandboxes: int
    differences: list[str]


class ProjectionRunner:
    """Follows the stream into the sandbox, checkpoint and ledger projections: the one
    copy of each read model in the process, which the manager and the API read (the
    manager waits here for what it appended before it decides on it again).

    Memory holds the live rows; finished sandboxes and closed charges go to the
    archive in batches. A start loads the newest valid snapshot (live rows at one
    sequence, see projections/snapshot.py) and folds only the tail after it; without
    one it replays from sequence 1. Snapshots are written every `snapshot_every`
    events or `snapshot_seconds` (when something changed) and at a clean stop.
    """

    def __init__(
        self,
        store: EventRecorder,
        *,
        archive: SandboxArchive | None = None,
        snapshots: ReadModelSnapshots | None = None,
        snapshot_every: int = SNAPSHOT_EVERY,
        snapshot_seconds: float = SNAPSHOT_SECONDS,
        fresh_archive: Callable[[], SandboxArchive] = MemoryArchive,
    ) -> None:
        self.store = store
        self.archive: SandboxArchive = archive if archive is not None else MemoryArchive()
        self.snapshots = snapshots
        self.snapshot_every = snapshot_every
        self.snapshot_seconds = snapshot_seconds
        self.fresh_archive = fresh_archive
        self.projection = SandboxesProjection(self.archive)
        self.checkpoints = CheckpointsProjection()
        self.ledger = LedgerProjection(self.archive)
        self.webhooks = WebhooksProjection()
        # Called right after each event is applied (in-process observers, tests).
        self.listeners: list[Callable[[RecordedEvent], None]] = []
        # Long-polls wait on `_changed`, which is replaced and set after an event only
        # while someone waits on it (`_waiting`); `wait_for` waiters wait for their own
        # sequence (a heap of futures), so a replay does not wake them at every event.
        self._changed = asyncio.Event()
        self._waiting = 0
        self._targets: list[tuple[int, int, asyncio.Future[None]]] = []
        self._tiebreak = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.Task[None] | None = None
        self._saving: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None
        self._stream_seq = 0
        self._stream_id = ""
        self._snapshot_at: float | None = None  # time.time() of the newest snapshot
        self._snapshot_seq = 0
        self.started_from = ""  # how the last start got its state (for logs and tests)

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

    async def start(self, timeout: float | None = None) -> None:
        """Load the newest valid snapshot, then follow the stream from the sequence
        after it; return once caught up with the end the stream had at the start.

        The catch-up runs with the cyclic garbage collector paused: it allocates
        millions of short-lived objects, so collections would run again and again
        over the same live rows. Nothing of a fold forms reference cycles; what others
        leave behind meanwhile is collected once the collector runs again."""
        self._stream_id = await self.store.identity()
        target = await self.store.last_seq()
        self._stream_seq = target
        await self._load(target)
        began, first = time.monotonic(), self.last_seq
        self._task = asyncio.create_task(self._follow(), name="projection")
        deadline = None if timeout is None else time.monotonic() + timeout
        with gc_paused():
            while not await self.wait_for(target, PROGRESS_SECONDS):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"the read models did not catch up with seq {target}")
                log.info("read models: at seq %d of %d", self.last_seq, target)
        self.flush()
        folded, seconds = self.last_seq - first, time.monotonic() - began
        if folded >= 10_000:  # a replay or a long tail: how fast it went
            log.info(
                "read models: caught up with seq %d: %d events folded in %.1f s (%d events/s)",
                self.last_seq,
                folded,
                seconds,
                folded / max(seconds, 1e-9),
            )
        self._timer = asyncio.create_task(self._timers(), name="read-model-timers")

    async def _load(self, target: int) -> None:
        reason = await self._install_snapshot(target)
        if reason is None:
            self.started_from = f"snapshot at seq {self._snapshot_seq}"
            log.info(
                "read models: snapshot at seq %d; folding the %d events after it",
                self._snapshot_seq,
                target - self._snapshot_seq,
            )
            return
        self.started_from = f"replay from seq 1 ({reason})"
        if target > 0:
            log.warning("read models: replaying %d events from seq 1: %s", target, reason)
        self.archive.reset(self._stream_id)

    async def _install_snapshot(self, target: int) -> str | None:
        """Install the stored snapshot; or say why not (then nothing was changed)."""
        if self.snapshots is None:
            return "no snapshot store"
        try:
            data = await self.snapshots.load()
        except Exception as exc:  # a store that fails costs a replay, not the start
            return f"the snapshot could not be read ({type(exc).__name__}: {exc})"
        if data is None:
            return "no snapshot yet"
        try:
            state = snapshot.decode(data, stream_id=self._stream_id, last_seq=target)
        except snapshot.SnapshotRejected as exc:
            return f"the snapshot is not usable: {exc}"
        if self.archive.stream_id != self._stream_id or self.archive.seq < state.seq:
            return f"the archive (seq {self.archive.seq}) is behind the snapshot (seq {state.seq})"
        self.projection.unfinished = {v.id: v for v in state.sandboxes}
        self.projection.last_seq = state.seq
        self.checkpoints.load(state.checkpoints)
        self.ledger.accounts = {v.account: v for v in state.accounts}
        self.ledger.charges = {c.sandbox_id: c for c in state.charges}
        self.ledger.last_seq = state.seq
        self.webhooks.state = state.webhooks
        self._snapshot_seq = state.seq
        self._snapshot_at = state.written_at.timestamp()
        return None

    def flush(self) -> None:
        """Hand what ended since the last flush to the archive."""
        views = self.projection.take_finished()
        charges = self.ledger.take_closed()
        if views or charges or self.archive.seq < self.last_seq:
            self.archive.write(views, charges, self.last_seq)

    def _capture(self) -> bytes:
        """The live rows at one sequence, encoded (synchronous: nothing moves meanwhile)."""
        self.flush()
        return snapshot.encode(
            snapshot.ReadModelState(
                seq=self.last_seq,
                stream_id=self._stream_id,
                fold_version=snapshot.fold_version(),
                written_at=dt.datetime.now(dt.UTC),
                sandboxes=list(self.projection.unfinished.values()),
                checkpoints=list(self.checkpoints.checkpoints.values()),
                accounts=list(self.ledger.accounts.values()),
                charges=list(self.ledger.charges.values()),
                webhooks=self.webhooks.state,
            )
        )

    async def save_snapshot(self) -> None:
        """Write a snapshot of the read models as they are now."""
        if self.snapshots is None or not self._stream_id:
            return
        seq = self.last_seq
        data = self._capture()
        await self.snapshots.save(data)
        self._snapshot_seq = max(self._snapshot_seq, seq)
        self._snapshot_at = time.time()
        log.info("read models: snapshot at seq %d (%d bytes)", seq, len(data))

    def _save_in_background(self) -> None:
        if self._saving is None or self._saving.done():
            self._saving = asyncio.create_task(self._save_logged(), name="snapshot")

    async def _save_logged(self) -> None:
        try:
            await self.save_snapshot()
        except Exception as exc:  # the next one is due soon; the stream stays the truth
            log.warning("read models: the snapshot was not written: %s", exc)

    async def _timers(self) -> None:
        """Learn the stream's end now and then (the lag metrics show what is not
        applied yet), and write a snapshot when one is due by time."""
        last_snapshot = time.monotonic()
        while True:
            await asyncio.sleep(STREAM_CHECK_SECONDS)
            with contextlib.suppress(Exception):  # a NATS hiccup: the next check
                self._stream_seq = max(self._stream_seq, await self.store.last_seq())
            due = time.monotonic() - last_snapshot >= self.snapshot_seconds
            if due and self.snapshots is not None:
                last_snapshot = time.monotonic()
                if self.last_seq > self._snapshot_seq:
                    self._save_in_background()

    async def stop(self) -> None:
        """Stop following; a clean stop writes a snapshot of where it got to."""
        for task in (self._timer, self._task):
            if task is not None:
                await cancel_and_wait(task)
        if self._saving is not None:
            with contextlib.suppress(Exception):
                await self._saving
        if self._task is None or self._failed is not None:
            return
        self._task = None
        if self.last_seq > self._snapshot_seq:
            await self._save_logged()
        else:
            self.flush()

    async def _follow(self) -> None:
        try:
            # Catch up in batches (the fast reader; the loop runs between batches),
            # then follow live events one by one.
            upto = self._stream_seq
            if self.last_seq < upto:
                async for batch in self.store.read_batches(self.last_seq + 1, upto=upto):
                    self._apply(batch)
                    self._applied(batch[-1].seq)
            async for recorded in self.store.follow(self.last_seq + 1):
                self._apply((recorded,))
                self._applied(recorded.seq)
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

    def _apply(self, batch: Sequence[RecordedEvent]) -> None:
        """Fold events into the read models that read their kind of subject (each
        model's `apply` skips the others' on its own: a replay of millions of events
        does not call them to find out)."""
        sandboxes, ledger = self.projection, self.ledger
        apply_sandbox, apply_checkpoint = sandboxes.apply, self.checkpoints.apply
        apply_ledger, apply_webhook = ledger.apply, self.webhooks.apply
        listeners = self.listeners
        for recorded in batch:
            seq, subject, event = recorded.seq, recorded.subject, recorded.event
            if subject.startswith(SANDBOX_SUBJECTS):
                apply_sandbox(seq, subject, event)
                apply_checkpoint(seq, subject, event)
            elif subject.startswith(LEDGER_SUBJECTS):
                apply_ledger(seq, subject, event)
            elif subject.startswith(WEBHOOK_SUBJECTS):
                apply_webhook(subject, event)
            else:
                apply_sandbox(seq, subject, event)  # validations (and kinds it ignores)
            sandboxes.last_seq = ledger.last_seq = seq
            for listener in listeners:
                listener(recorded)
        if len(sandboxes.finished) + len(ledger.closed) >= FLUSH_AT:
            self.flush()

    def _applied(self, seq: int) -> None:
        """After an event or a batch: snapshots due, waiters to wake."""
        if seq > self._stream_seq:
            self._stream_seq = seq
        if self.snapshots is not None and seq - self._snapshot_seq >= self.snapshot_every:
            self._snapshot_seq = seq  # one save per stretch, even while it runs
            self._save_in_background()
        if self._targets and self._targets[0][0] <= seq:
            self._reached(seq)
        if self._waiting:
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

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
        """Replay the stream from sequence 1 into fresh projections and compare them
        with the live ones (rows that moved past the replay's end are skipped)."""
        seq = self.projection.last_seq
        fresh_archive = self.fresh_archive()
        fresh_archive.reset(self._stream_id)
        fresh = SandboxesProjection(fresh_archive)
        fresh_checkpoints = CheckpointsProjection()
        if seq > 0:
            async for batch in self.store.read_batches(1, upto=seq):
                for recorded in batch:
                    fresh.apply(recorded.seq, recorded.subject, recorded.event)
                    fresh_checkpoints.apply(recorded.seq, recorded.subject, recorded.event)
                if len(fresh.finished) >= FLUSH_AT:
                    fresh_archive.write(fresh.take_finished(), [], batch[-1].seq)
        fresh_archive.write(fresh.take_finished(), [], seq)
        self.flush()
        differences: list[str] = []
        count = 0
        # Both sides in id order, side by side: nothing of either is held at once.
        fresh_rows = by_id(fresh.unfinished, fresh_archive)
        live_rows = by_id(self.projection.unfinished, self.archive)
        theirs, mine = next(fresh_rows, None), next(live_rows, None)
        while theirs is not None or mine is not None:
            if mine is None or (theirs is not None and theirs.id < mine.id):
                assert theirs is not None
                count += 1
                differences.append(theirs.id)  # missing from the live read model
                theirs = next(fresh_rows, None)
            elif theirs is None or mine.id < theirs.id:
                if mine.last_seq <= seq:  # a row the replay should have made
                    differences.append(mine.id)
                mine = next(live_rows, None)
            else:
                count += 1
                if mine.last_seq <= seq and mine != theirs:
                    differences.append(mine.id)
                theirs, mine = next(fresh_rows, None), next(live_rows, None)
        fresh_archive.close()
        live_checkpoints = self.checkpoints.checkpoints
        for key in sorted(set(live_checkpoints) | set(fresh_checkpoints.checkpoints)):
            kept, made = live_checkpoints.get(key), fresh_checkpoints.checkpoints.get(key)
            if kept is not None and kept.last_seq > seq:
                continue  # moved on after the replay's end
            if kept != made:
                differences.append(f"checkpoint {key}")
        return VerifyReport(
            equal=not differences and fresh.last_seq == seq,
            seq=seq,
            sandboxes=count,
            differences=sorted(differences)[:50],
        )
