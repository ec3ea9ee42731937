"""SqliteArchive: finished sandboxes and settled charges in one SQLite file.

A disposable cache under the data dir (a full replay rebuilds it), so it runs with
`synchronous=OFF`: what a crash loses is found again by the replay the next start
does when the archive is behind the snapshot. Rows are msgpack blobs beside the
columns that lists filter and order on.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import msgspec

from projections.ledger import Charge
from projections.paging import Cursor, Filter, micros
from projections.sandboxes import SandboxView

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    extension TEXT NOT NULL,
    account TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    labels TEXT NOT NULL,
    row BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS sandboxes_by_created ON sandboxes (created_us, id);
CREATE INDEX IF NOT EXISTS sandboxes_by_state ON sandboxes (state, created_us, id);
CREATE INDEX IF NOT EXISTS sandboxes_by_account ON sandboxes (account, created_us, id);
CREATE TABLE IF NOT EXISTS charges (sandbox_id TEXT PRIMARY KEY, row BLOB NOT NULL);
"""

_view_decoder = msgspec.msgpack.Decoder(SandboxView)
_charge_decoder = msgspec.msgpack.Decoder(Charge)
_encoder = msgspec.msgpack.Encoder()
_json = msgspec.json.Encoder()


class SqliteArchive:
    def __init__(self, path: Path, *, temporary: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.temporary = temporary  # removed on close (a replay's scratch archive)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.executescript(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=OFF; PRAGMA temp_store=MEMORY;"
        )
        self.db.executescript(SCHEMA)
        self._counts: dict[tuple[str, str], int] | None = None  # kept once counted
        self._seq = int(self._meta("seq") or 0)
        self._stream_id = self._meta("stream_id") or ""

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    @property
    def seq(self) -> int:
        return self._seq

    @property
    def stream_id(self) -> str:
        return self._stream_id

    def reset(self, stream_id: str) -> None:
        with self._transaction():
            self.db.execute("DELETE FROM sandboxes")
            self.db.execute("DELETE FROM charges")
            self.db.execute("DELETE FROM meta")
            self.db.execute("INSERT INTO meta VALUES ('stream_id', ?), ('seq', '0')", (stream_id,))
        self._seq = 0
        self._stream_id = stream_id
        self._counts = {}

    def _transaction(self) -> sqlite3.Connection:
        self.db.execute("BEGIN")
        return self.db  # the connection commits on success, rolls back on error

    def write(self, views: Iterable[SandboxView], charges: Iterable[Charge], seq: int) -> None:
        seq = max(seq, self._seq)
        views = list(views)
        if self._counts is not None and views:
            self._count(views)
        with self._transaction():
            self.db.executemany(
                "INSERT OR REPLACE INTO sandboxes VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        v.id,
                        v.state,
                        v.extension,
                        v.account,
                        micros(v.created_at),
                        _json.encode(v.labels).decode(),
                        _encoder.encode(v),
                    )
                    for v in views
                ],
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO charges VALUES (?, ?)",
                [(c.sandbox_id, _encoder.encode(c)) for c in charges],
            )
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('seq', ?)", (str(seq),))
        self._seq = seq

    def get(self, sandbox_id: str) -> SandboxView | None:
        row = self.db.execute("SELECT row FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
        return None if row is None else _view_decoder.decode(row[0])

    def charge(self, sandbox_id: str) -> Charge | None:
        row = self.db.execute(
            "SELECT row FROM charges WHERE sandbox_id = ?", (sandbox_id,)
        ).fetchone()
        return None if row is None else _charge_decoder.decode(row[0])

    def page(
        self, where: Filter, after: Cursor | None, limit: int, newest_first: bool = False
    ) -> list[SandboxView]:
        clauses: list[str] = []
        params: list[object] = []
        if where.state is not None:
            clauses.append("state = ?")
            params.append(where.state)
        if where.account is not None:
            clauses.append("account = ?")
            params.append(where.account)
        for key, value in sorted(where.labels.items()):
            # Keys are checked whole against LABEL_KEY_RE (no quotes), so the path holds.
            clauses.append("json_extract(labels, ?) = ?")
            params += [f'$."{key}"', value]
        if after is not None:
            clauses.append(f"(created_us, id) {'<' if newest_first else '>'} (?, ?)")
            params += [after.created_us, after.id]
        sql = "SELECT row FROM sandboxes"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        direction = "DESC" if newest_first else "ASC"
        sql += f" ORDER BY created_us {direction}, id {direction} LIMIT ?"
        params.append(limit)
        return [_view_decoder.decode(r[0]) for r in self.db.execute(sql, params)]

    def _count(self, views: list[SandboxView]) -> None:
        """Keep the counts: the rows these replace leave them, these join them."""
        assert self._counts is not None
        ids = _json.encode([v.id for v in views]).decode()
        for state, extension in self.db.execute(
            "SELECT state, extension FROM sandboxes WHERE id IN (SELECT value FROM json_each(?))",
            (ids,),
        ):
            self._counts[(state, extension)] -= 1
        for view in views:
            key = (view.state, view.extension)
            self._counts[key] = self._counts.get(key, 0) + 1

    def counts(self) -> dict[tuple[str, str], int]:
        """Counted once (a scan), then kept as rows are written (metrics read it)."""
        if self._counts is None:
            rows = self.db.execute(
                "SELECT state, extension, count(*) FROM sandboxes GROUP BY state, extension"
            )
            self._counts = {(state, extension): int(n) for state, extension, n in rows}
        return {key: n for key, n in self._counts.items() if n}

    def rows(self) -> Iterator[SandboxView]:
        for (blob,) in self.db.execute("SELECT row FROM sandboxes ORDER BY id"):
            yield _view_decoder.decode(blob)

    @classmethod
    def scratch(cls, folder: Path) -> SqliteArchive:
        """A fresh archive in `folder` that is gone once closed."""
        folder.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix="replay-", suffix=".sqlite3", dir=folder)
        os.close(handle)
        return cls(Path(name), temporary=True)

    def close(self) -> None:
        self.db.close()
        if self.temporary:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
