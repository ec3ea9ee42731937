"""Pages of sandbox rows: their order, the cursor that resumes one, the filter."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Protocol

import msgspec


class Row(Protocol):
    """What paging reads of a sandbox row (projections.sandboxes.SandboxView)."""

    @property
    def id(self) -> str: ...

    @property
    def state(self) -> str: ...

    @property
    def account(self) -> str: ...

    @property
    def created_at(self) -> dt.datetime: ...

    @property
    def labels(self) -> dict[str, str]: ...


MAX_PAGE = 1000


class Cursor(msgspec.Struct, frozen=True, array_like=True):
    """Where a page ended: rows are ordered by (created_at, id)."""

    created_us: int
    id: str

    def encode(self) -> str:
        return base64.urlsafe_b64encode(msgspec.json.encode(self)).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """ValueError when the text is not a cursor this service handed out."""
        if len(text) > 400:
            raise ValueError("cursor is too long")
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            return msgspec.json.decode(raw, type=cls)
        except (ValueError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ValueError("cursor is not one this service handed out") from exc

    @classmethod
    def of(cls, view: Row) -> Cursor:
        return cls(micros(view.created_at), view.id)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)


def micros(moment: dt.datetime) -> int:
    """A timestamp that orders exactly (ISO text does not: fractions are optional)."""
    return (moment - _EPOCH) // _MICROSECOND


class Filter(msgspec.Struct, frozen=True, kw_only=True):
    state: str | None = None
    account: str | None = None
    labels: dict[str, str] = {}

    def matches(self, view: Row) -> bool:
        return (
            (self.state is None or view.state == self.state)
            and (self.account is None or view.account == self.account)
            and all(view.labels.get(k) == v for k, v in self.labels.items())
        )


def order_key(view: Row) -> tuple[int, str]:
    return micros(view.created_at), view.id


def after_cursor(view: Row, cursor: Cursor | None, newest_first: bool = False) -> bool:
    """Whether `view` comes after the cursor's row in the page order."""
    if cursor is None:
        return True
    key = order_key(view)
    mark = (cursor.created_us, cursor.id)
    return key < mark if newest_first else key > mark
