"""Where finished sandboxes and settled charges go: out of memory, still answerable.

The projections keep the live rows in memory and hand the finished ones here in
batches (`write`), with the stream sequence the batch brings the archive up to. The
archive is a disposable read model like the others: a full replay rebuilds it, and
`stream_id` ties it to the one stream it was folded from.

`MemoryArchive` is the reference (tests, in-memory stores); the service keeps an
SQLite file under its data dir (sandboxer/store/archive.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from projections.ledger import Charge
from projections.paging import Cursor, Filter, after_cursor, order_key
from projections.sandboxes import SandboxView


class SandboxArchive(Protocol):
    """Finished sandboxes and settled charges, by id, and pages of them."""

    @property
    def seq(self) -> int:
        """The stream sequence every write so far brought the archive up to."""
        ...

    @property
    def stream_id(self) -> str:
        """The stream the rows were folded from ("" while empty)."""
        ...

    def reset(self, stream_id: str) -> None:
        """Forget everything: a full replay of `stream_id` refills it."""
        ...

    def write(self, views: Iterable[SandboxView], charges: Iterable[Charge], seq: int) -> None:
        """Store (or replace) the rows and move `seq` up, all at once."""
        ...

    def get(self, sandbox_id: str) -> SandboxView | None: ...

    def charge(self, sandbox_id: str) -> Charge | None: ...

    def page(
        self, where: Filter, after: Cursor | None, limit: int, newest_first: bool = False
    ) -> list[SandboxView]:
        """Up to `limit` rows matching `where`, after `after`, by (created_at, id)
        (or from the newest)."""
        ...

    def counts(self) -> dict[tuple[str, str], int]:
        """How many rows are in each (state, extension)."""
        ...

    def rows(self) -> Iterator[SandboxView]:
        """Every row, by id (for comparing two archives)."""
        ...

    def close(self) -> None: ...


class MemoryArchive:
    def __init__(self) -> None:
        self.views: dict[str, SandboxView] = {}
        self.charges: dict[str, Charge] = {}
        self._seq = 0
        self._stream_id = ""

    @property
    def seq(self) -> int:
        return self._seq

    @property
    def stream_id(self) -> str:
        return self._stream_id

    def reset(self, stream_id: str) -> None:
        self.views.clear()
        self.charges.clear()
        self._seq = 0
        self._stream_id = stream_id

    def write(self, views: Iterable[SandboxView], charges: Iterable[Charge], seq: int) -> None:
        self.views.update((v.id, v) for v in views)
        self.charges.update((c.sandbox_id, c) for c in charges)
        self._seq = max(self._seq, seq)

    def get(self, sandbox_id: str) -> SandboxView | None:
        return self.views.get(sandbox_id)

    def charge(self, sandbox_id: str) -> Charge | None:
        return self.charges.get(sandbox_id)

    def page(
        self, where: Filter, after: Cursor | None, limit: int, newest_first: bool = False
    ) -> list[SandboxView]:
        rows = [
            v
            for v in self.views.values()
            if where.matches(v) and after_cursor(v, after, newest_first)
        ]
        rows.sort(key=order_key, reverse=newest_first)
        return rows[:limit]

    def counts(self) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        for view in self.views.values():
            key = (view.state, view.extension)
            counts[key] = counts.get(key, 0) + 1
        return counts

    def rows(self) -> Iterator[SandboxView]:
        return iter([self.views[k] for k in sorted(self.views)])

    def close(self) -> None:
        pass
