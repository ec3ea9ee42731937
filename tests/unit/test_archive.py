"""One contract for every archive of finished sandboxes: the in-memory reference and
the SQLite file the service keeps."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from projections.archive import MemoryArchive, SandboxArchive
from projections.ledger import Charge
from projections.paging import Cursor, Filter
from projections.sandboxes import SandboxView
from sandboxer.store.archive import SqliteArchive

T0 = dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.UTC)


def view(n: int, state: str = "destroyed", **changes: object) -> SandboxView:
    # Creation times with and without fractions of a second: ordered as instants.
    created = T0 + dt.timedelta(seconds=n // 2, microseconds=500_000 * (n % 2))
    row = SandboxView(
        id=f"sbx-{n:04d}",
        state=state,
        profile="p",
        extension="saas-stub" if n % 3 else "compose-local",
        account="acme" if n % 2 else "other",
        inputs={},
        ttl_seconds=60,
        created_at=created,
        updated_at=created,
        expires_at=created,
        last_seq=n,
        labels={"team/name": "a" if n % 4 == 0 else "b"},
    )
    return msgspec.structs.replace(row, **changes) if changes else row


Make = Callable[[Path], SandboxArchive]
ARCHIVES: dict[str, Make] = {
    "memory": lambda _folder: MemoryArchive(),
    "sqlite": lambda folder: SqliteArchive(folder / "archive.sqlite3"),
}


@pytest.fixture(params=list(ARCHIVES))
def archive(request: pytest.FixtureRequest, tmp_path: Path) -> SandboxArchive:
    made = ARCHIVES[request.param](tmp_path)
    made.reset("S@1")
    return made


def test_rows_charges_and_the_sequence(archive: SandboxArchive) -> None:
    rows = [view(n) for n in range(10)]
    charge = Charge(sandbox_id="sbx-0001", account="acme", reserved=5, settled=True)
    archive.write(rows, [charge], 42)
    assert archive.seq == 42 and archive.stream_id == "S@1"
    assert archive.get("sbx-0003") == rows[3]
    assert archive.get("sbx-9999") is None
    assert archive.charge("sbx-0001") == charge and archive.charge("sbx-0002") is None
    archive.write([], [], 40)  # never backwards
    assert archive.seq == 42
    assert [v.id for v in archive.rows()] == sorted(v.id for v in rows)


def test_pages_follow_creation_time_and_filters(archive: SandboxArchive) -> None:
    rows = [view(n) for n in range(9)]
    archive.write(reversed(rows), [], 9)
    everything = Filter()
    first = archive.page(everything, None, 4)
    assert first == rows[:4]
    second = archive.page(everything, Cursor.of(first[-1]), 4)
    assert second == rows[4:8]
    assert archive.page(everything, Cursor.of(second[-1]), 4) == rows[8:]
    newest = archive.page(everything, None, 3, newest_first=True)
    assert newest == rows[::-1][:3]
    assert archive.page(everything, Cursor.of(newest[-1]), 3, newest_first=True) == rows[::-1][3:6]
    acme = archive.page(Filter(account="acme"), None, 100)
    assert acme == [v for v in rows if v.account == "acme"]
    labelled = archive.page(Filter(labels={"team/name": "a"}), None, 100)
    assert labelled == [v for v in rows if v.labels["team/name"] == "a"]
    assert archive.page(Filter(state="failed"), None, 100) == []


def test_counts_follow_rows_that_are_written_again(archive: SandboxArchive) -> None:
    archive.write([view(n) for n in range(6)], [], 6)
    assert archive.counts() == {("destroyed", "compose-local"): 2, ("destroyed", "saas-stub"): 4}
    archive.write([view(1, state="failed"), view(7)], [], 8)  # one replaced, one new
    assert archive.counts() == {
        ("destroyed", "compose-local"): 2,
        ("destroyed", "saas-stub"): 4,
        ("failed", "saas-stub"): 1,
    }
    archive.reset("S@2")
    assert archive.counts() == {} and archive.seq == 0 and archive.get("sbx-0001") is None


def test_the_sqlite_archive_outlives_its_process(tmp_path: Path) -> None:
    path = tmp_path / "archive.sqlite3"
    first = SqliteArchive(path)
    first.reset("S@1")
    first.write([view(1), view(2)], [], 7)
    first.close()
    again = SqliteArchive(path)
    assert (again.seq, again.stream_id) == (7, "S@1")
    assert again.get("sbx-0002") == view(2)
    assert again.counts() == {("destroyed", "saas-stub"): 2}


def test_a_cursor_that_was_not_handed_out_is_refused() -> None:
    good = Cursor.of(view(3))
    assert Cursor.decode(good.encode()) == good
    for text in ("", "x", "W10", "eyJhIjoxfQ", "A" * 401):
        with pytest.raises(ValueError, match="cursor"):
            Cursor.decode(text)
