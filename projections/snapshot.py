"""A read-model snapshot: the live rows of every projection at one stream sequence.

A start loads the newest valid one and folds only the tail after it. Valid means: it
decodes, its digest matches its bytes, it was folded by this fold code
(`fold_version`, a hash of the event and projection modules, so any change to a
fold invalidates older snapshots without anyone remembering to bump a number), from
this stream, and no further than the stream's end. Anything else is refused with the
reason, and the caller replays from sequence 1: a snapshot can cost a replay, never
a wrong state.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from pathlib import Path

import msgspec

import events
import projections
from projections.checkpoints import CheckpointView
from projections.ledger import AccountView, Charge
from projections.sandboxes import SandboxView
from projections.webhooks import WebhookState

MAGIC = b"sandboxer-read-models\n"
FORMAT = 1


class SnapshotRejected(Exception):
    """Why a snapshot cannot be used (the start replays from sequence 1 instead)."""


class ReadModelState(msgspec.Struct, kw_only=True):
    seq: int
    stream_id: str
    fold_version: str
    written_at: dt.datetime
    sandboxes: list[SandboxView]  # the live ones; finished ones are in the archive
    checkpoints: list[CheckpointView]
    accounts: list[AccountView]
    charges: list[Charge]  # the open ones
    webhooks: WebhookState = msgspec.field(default_factory=WebhookState)


class SnapshotHeader(msgspec.Struct, frozen=True, kw_only=True):
    format: int
    seq: int
    stream_id: str
    fold_version: str
    digest: str  # sha256 of the payload that follows the header line
    size: int


@functools.cache
def fold_version() -> str:
    """A hash of every module that decides what a fold yields: the events (their
    shapes, upcasters, lifecycle table) and the projections."""
    digest = hashlib.sha256()
    for package in (events, projections):
        folder = Path(package.__file__ or "").parent
        for path in sorted(folder.glob("*.py")):
            digest.update(f"{package.__name__}/{path.name}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:32]


_payload_encoder = msgspec.msgpack.Encoder()
_payload_decoder = msgspec.msgpack.Decoder(ReadModelState)
_header_decoder = msgspec.json.Decoder(SnapshotHeader)


def encode(state: ReadModelState) -> bytes:
    payload = _payload_encoder.encode(state)
    header = SnapshotHeader(
        format=FORMAT,
        seq=state.seq,
        stream_id=state.stream_id,
        fold_version=state.fold_version,
        digest=hashlib.sha256(payload).hexdigest(),
        size=len(payload),
    )
    return MAGIC + msgspec.json.encode(header) + b"\n" + payload


def header_of(data: bytes) -> SnapshotHeader:
    if not data.startswith(MAGIC):
        raise SnapshotRejected("not a read-model snapshot")
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        raise SnapshotRejected("the header is cut short")
    try:
        return _header_decoder.decode(data[len(MAGIC) : end])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SnapshotRejected(f"the header does not decode: {exc}") from None


def decode(data: bytes, *, stream_id: str, last_seq: int) -> ReadModelState:
    """The state in `data`, or SnapshotRejected saying why it cannot be used."""
    header = header_of(data)
    if header.format != FORMAT:
        raise SnapshotRejected(f"format {header.format}, this code reads {FORMAT}")
    if header.fold_version != fold_version():
        raise SnapshotRejected(
            f"folded by other code (fold version {header.fold_version}, "
            f"this code is {fold_version()})"
        )
    if header.stream_id != stream_id:
        raise SnapshotRejected(f"taken from stream {header.stream_id}, not {stream_id}")
    if header.seq > last_seq:
        raise SnapshotRejected(f"covers seq {header.seq}, past the stream's end {last_seq}")
    payload = memoryview(data)[data.index(b"\n", len(MAGIC)) + 1 :]
    if len(payload) != header.size or hashlib.sha256(payload).hexdigest() != header.digest:
        raise SnapshotRejected("its digest does not match its bytes")
    try:
        state = _payload_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SnapshotRejected(f"the payload does not decode: {exc}") from None
    if (state.seq, state.stream_id, state.fold_version) != (
        header.seq,
        header.stream_id,
        header.fold_version,
    ):
        raise SnapshotRejected("the payload does not match its header")
    return state
