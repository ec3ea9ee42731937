"""Read-model snapshots and the archive: a start from the newest valid snapshot plus
the tail, a full replay when the snapshot cannot be used, finished sandboxes out of
memory but still answered, and pages of them."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from events import EventMeta, SandboxRejected, SandboxRequested, envelope
from projections import snapshot
from sandboxer.app.read_model import FLUSH_AT, ProjectionRunner
from sandboxer.store.archive import SqliteArchive
from sandboxer.store.event_store import JetStreamEventStore
from sandboxer.store.nats_server import EmbeddedNats
from sandboxer.store.read_snapshots import ObjectStoreReadModels
from tests.conftest import RunningService, StartService
from tests.helpers import create, destroy, get, wait_state

META = EventMeta(actor="test", correlation_id="c")


async def lifecycles(svc: RunningService, ended: int, live: int) -> tuple[list[str], list[str]]:
    """`ended` sandboxes created and destroyed, then `live` ones left ready."""
    done = []
    for _ in range(ended):
        made = await create(svc.http, svc.url, labels={"batch": "old"})
        await wait_state(svc.http, svc.url, made["id"], {"ready"})
        await destroy(svc.http, svc.url, made["id"])
        await wait_state(svc.http, svc.url, made["id"], {"destroyed"})
        done.append(made["id"])
    running = []
    for _ in range(live):
        made = await create(svc.http, svc.url)
        await wait_state(svc.http, svc.url, made["id"], {"ready"})
        running.append(made["id"])
    return done, running


def runner_of(svc: RunningService) -> ProjectionRunner:
    assert svc.service.runner is not None
    return svc.service.runner


async def replay_equal(svc: RunningService) -> dict[str, Any]:
    async with svc.http.post(f"{svc.url}/v1/replay") as resp:
        report: dict[str, Any] = await resp.json()
        assert resp.status == 200, report
    assert report["equal"] is True, report
    return report


async def test_a_restart_starts_from_the_snapshot_and_old_sandboxes_still_answer(
    start_service: StartService,
) -> None:
    svc = await start_service()
    ended, live = await lifecycles(svc, ended=3, live=1)
    stopped_at = runner_of(svc).last_seq
    views = {sid: await get(svc.http, svc.url, sid) for sid in ended + live}
    await svc.stop()

    again = await start_service()
    runner = runner_of(again)
    assert runner.started_from == f"snapshot at seq {stopped_at}"
    # Only the live sandbox is in memory; the finished ones answer from the archive.
    assert set(runner.projection.unfinished) == set(live)
    assert runner.projection.finished == {}
    assert all(runner.archive.get(sid) is not None for sid in ended)
    for sid, before in views.items():
        now = await get(again.http, again.url, sid)
        assert {k: now[k] for k in ("state", "last_seq", "events", "labels")} == {
            k: before[k] for k in ("state", "last_seq", "events", "labels")
        }
    report = await replay_equal(again)
    assert report["sandboxes"] == 4
    # The live one is still driven: it can be destroyed after the restart.
    await destroy(again.http, again.url, live[0])
    await wait_state(again.http, again.url, live[0], {"destroyed"})


async def test_the_tail_after_an_older_snapshot_is_folded(start_service: StartService) -> None:
    """A crash after a snapshot: the next start folds the tail, even where the
    archive already holds rows that ended after the snapshot."""
    svc = await start_service()
    first, _ = await lifecycles(svc, ended=2, live=0)
    runner = runner_of(svc)
    taken_at = runner.last_seq  # the snapshot is taken when the call starts
    await runner.save_snapshot()
    later, live = await lifecycles(svc, ended=2, live=1)
    runner.snapshots = None  # as if it crashed: no snapshot on the way out
    await svc.stop()

    again = await start_service()
    restarted = runner_of(again)
    assert restarted.started_from == f"snapshot at seq {taken_at}"
    assert restarted.archive.seq >= taken_at
    for sid in first + later:
        assert (await get(again.http, again.url, sid))["state"] == "destroyed"
    assert set(restarted.projection.unfinished) == set(live)
    await replay_equal(again)


Tamper = Callable[[bytes], bytes]


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def other_fold(data: bytes) -> bytes:
    state = snapshot.decode(data, stream_id=snapshot.header_of(data).stream_id, last_seq=10**9)
    state.fold_version = "0" * 32
    return snapshot.encode(state)


def past_the_end(data: bytes) -> bytes:
    state = snapshot.decode(data, stream_id=snapshot.header_of(data).stream_id, last_seq=10**9)
    state.seq += 1000
    return snapshot.encode(state)


def other_stream(data: bytes) -> bytes:
    state = snapshot.decode(data, stream_id=snapshot.header_of(data).stream_id, last_seq=10**9)
    state.stream_id = "SANDBOXER@another"
    return snapshot.encode(state)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (flip_last_byte, "its digest does not match its bytes"),
        (lambda data: data[: len(data) // 2], "digest does not match"),
        (lambda data: b"garbage", "not a read-model snapshot"),
        (other_fold, "folded by other code"),
        (past_the_end, "past the stream's end"),
        (other_stream, "taken from stream SANDBOXER@another"),
        (None, "the archive (seq 0) is behind the snapshot"),
    ],
    ids=["flipped", "truncated", "garbage", "fold", "past-end", "stream", "archive-lost"],
)
async def test_a_snapshot_that_cannot_be_used_means_a_full_replay(
    start_service: StartService,
    nats_server: EmbeddedNats,
    caplog: pytest.LogCaptureFixture,
    tamper: Tamper | None,
    reason: str,
) -> None:
    svc = await start_service()
    ended, live = await lifecycles(svc, ended=2, live=1)
    before = {sid: await get(svc.http, svc.url, sid) for sid in ended + live}
    assert svc.service.leases is not None
    worker = svc.service.leases.name
    await svc.stop()
    if tamper is None:
        for path in (svc.data_dir / "cache").glob("archive.sqlite3*"):
            path.unlink()
    else:
        await rewrite_snapshot(nats_server, worker, tamper)

    caplog.set_level(logging.WARNING, logger="sandboxer.app.read_model")
    again = await start_service()
    runner = runner_of(again)
    assert runner.started_from.startswith("replay from seq 1"), runner.started_from
    assert reason in runner.started_from
    assert any("replaying" in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    for sid, view in before.items():
        assert (await get(again.http, again.url, sid))["state"] == view["state"]
    assert set(runner.projection.unfinished) == set(live)
    await replay_equal(again)


async def rewrite_snapshot(nats_server: EmbeddedNats, worker: str, tamper: Tamper) -> None:
    nc = await nats.connect(**nats_server.connect_options())
    try:
        store = ObjectStoreReadModels(nc.jetstream(), worker)
        data = await store.load()
        assert data is not None
        await store.save(tamper(data))
    finally:
        await nc.close()


async def test_finished_sandboxes_leave_memory(store: JetStreamEventStore, tmp_path: Path) -> None:
    """Memory holds the live rows; what ended goes to the archive in batches."""
    count = FLUSH_AT * 3 + 7
    for i in range(count):
        sid = f"sbx-m{i:06d}"
        seq = (await store.append([requested(sid)], 0))[0]
        if i % 10:  # nine in ten end, one in ten stays live
            await store.append([rejected(sid)], seq)
    archive = SqliteArchive(tmp_path / "archive.sqlite3")
    runner = ProjectionRunner(store, archive=archive)
    await runner.start(timeout=60)
    try:
        live = {f"sbx-m{i:06d}" for i in range(0, count, 10)}
        assert set(runner.projection.unfinished) == live
        assert runner.projection.finished == {}
        assert runner.projection.get("sbx-m000001") == archive.get("sbx-m000001")
        assert archive.counts() == {("rejected", "saas-stub"): count - len(live)}
        assert runner.projection.state_counts() == {
            ("rejected", "saas-stub"): count - len(live),
            ("requested", "saas-stub"): len(live),
        }
        # more endings while following: they reach the archive by the next flush
        seq = (await store.append([requested("sbx-late")], 0))[0]
        last = (await store.append([rejected("sbx-late")], seq))[0]
        assert await runner.wait_for(last, 30)
        assert runner.projection.get("sbx-late") is not None
        runner.flush()
        assert archive.get("sbx-late") is not None and runner.projection.finished == {}
        report = await runner.verify()
        assert report.equal and report.sandboxes == count + 1
        # An archived row that differs, and one the history never made: both named.
        changed = archive.get("sbx-m000003")
        assert changed is not None
        extra = msgspec.structs.replace(changed, id="sbx-m999999")
        archive.write([msgspec.structs.replace(changed, reason="edited"), extra], [], last)
        report = await runner.verify()
        assert not report.equal and report.differences == ["sbx-m000003", "sbx-m999999"]
    finally:
        await runner.stop()
        archive.close()


def requested(sandbox_id: str) -> SandboxRequested:
    return SandboxRequested(
        **envelope(sandbox_id, META),
        profile="p",
        extension="saas-stub",
        inputs={},
        ttl_seconds=60,
        labels={"team": "a" if sandbox_id[-1] in "02468" else "b"},
    )


def rejected(sandbox_id: str) -> SandboxRejected:
    return SandboxRejected(**envelope(sandbox_id, META), reason="no")


async def test_lists_of_finished_sandboxes_come_in_pages(start_service: StartService) -> None:
    svc = await start_service()
    ended, live = await lifecycles(svc, ended=5, live=1)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"state": "destroyed", "limit": "2", **({"cursor": cursor} if cursor else {})}
        async with svc.http.get(f"{svc.url}/v1/sandboxes", params=params) as resp:
            page = await resp.json()
            assert resp.status == 200, page
        pages += 1
        assert page["count"] == len(page["sandboxes"]) <= 2
        seen += [row["id"] for row in page["sandboxes"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ended and pages == 3  # in creation order, none twice, none missed
    # all states at once: the live one after the finished ones (it was created last)
    async with svc.http.get(f"{svc.url}/v1/sandboxes", params={"limit": "4"}) as resp:
        first = await resp.json()
    async with svc.http.get(
        f"{svc.url}/v1/sandboxes", params={"limit": "4", "cursor": first["next_cursor"]}
    ) as resp:
        second = await resp.json()
    rows = [r["id"] for r in first["sandboxes"] + second["sandboxes"]]
    assert rows == ended + live and second["next_cursor"] is None
    async with svc.http.get(
        f"{svc.url}/v1/sandboxes", params={"state": "destroyed", "label": "batch=old"}
    ) as resp:
        assert [r["id"] for r in (await resp.json())["sandboxes"]] == ended
    newest: list[str] = []
    params = {"order": "newest", "limit": "4"}
    while True:
        async with svc.http.get(f"{svc.url}/v1/sandboxes", params=params) as resp:
            page = await resp.json()
        newest += [r["id"] for r in page["sandboxes"]]
        if page["next_cursor"] is None:
            break
        params = {**params, "cursor": page["next_cursor"]}
    assert newest == (ended + live)[::-1]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": "x" * 401}, "cursor"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"order": "sideways"}, "order"),
    ],
)
async def test_a_bad_page_request_names_the_field(
    api: RunningService, params: dict[str, str], field: str
) -> None:
    async with api.http.get(f"{api.url}/v1/sandboxes", params=params) as resp:
        body = await resp.json()
        assert resp.status == 400, body
    assert body["error"]["field"] == field, body


def test_the_snapshot_format_refuses_what_it_did_not_write() -> None:
    state = snapshot.ReadModelState(
        seq=5,
        stream_id="S@1",
        fold_version=snapshot.fold_version(),
        written_at=dt.datetime(2026, 12, 1, tzinfo=dt.UTC),
        sandboxes=[],
        checkpoints=[],
        accounts=[],
        charges=[],
    )
    data = snapshot.encode(state)
    assert snapshot.decode(data, stream_id="S@1", last_seq=5) == state
    with pytest.raises(snapshot.SnapshotRejected, match="past the stream's end 4"):
        snapshot.decode(data, stream_id="S@1", last_seq=4)
    with pytest.raises(snapshot.SnapshotRejected, match="taken from stream"):
        snapshot.decode(data, stream_id="S@2", last_seq=5)
    header_swapped = data.replace(b'"seq":5', b'"seq":4')
    with pytest.raises(snapshot.SnapshotRejected, match="does not match its header"):
        snapshot.decode(header_swapped, stream_id="S@1", last_seq=5)


class KeptSnapshots:
    """The snapshot store's contract in memory: every save kept, the newest loaded."""

    def __init__(self) -> None:
        self.saved: list[bytes] = []

    async def load(self) -> bytes | None:
        return self.saved[-1] if self.saved else None

    async def save(self, data: bytes) -> None:
        self.saved.append(data)


async def test_a_snapshot_is_written_every_n_events_and_at_stop(
    store: JetStreamEventStore, tmp_path: Path
) -> None:
    kept = KeptSnapshots()
    archive = SqliteArchive(tmp_path / "archive.sqlite3")
    runner = ProjectionRunner(store, archive=archive, snapshots=kept, snapshot_every=100)
    await runner.start(timeout=30)
    assert runner.started_from == "replay from seq 1 (no snapshot yet)"
    assert runner.snapshot_age() is None
    last = 0
    for i in range(250):
        last = (await store.append([requested(f"sbx-n{i:05d}")], 0))[0]
    assert await runner.wait_for(last, 30)
    async with asyncio.timeout(30):
        while len(kept.saved) < 2:
            await asyncio.sleep(0.01)
    seqs = [snapshot.header_of(data).seq for data in kept.saved]
    assert seqs[0] >= 100 and seqs[1] >= 200 and seqs == sorted(seqs)
    await runner.stop()
    assert snapshot.header_of(kept.saved[-1]).seq == last  # the clean stop's
    archive.close()

    again = ProjectionRunner(
        store, archive=SqliteArchive(tmp_path / "archive.sqlite3"), snapshots=kept
    )
    await again.start(timeout=30)
    try:
        assert again.started_from == f"snapshot at seq {last}"
        assert again.snapshot_age() is not None and len(again.projection.unfinished) == 250
    finally:
        await again.stop()
