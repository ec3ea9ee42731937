"""`route_raw`'s fast path in front of nats-py's protocol parser, fed the bytes a
server sends cut at every place: routed messages arrive whole and in order, and
everything else (another subscription's messages, MSG, PING) still reaches nats-py's
own handling at once, not only when the next read comes."""

from __future__ import annotations

import asyncio

import pytest
from nats.protocol.parser import Parser

from sandboxer.store.catchup import route_raw

ROUTED, OTHER = 7, 9


class Client:
    """What nats-py's parser calls back on its client, recorded."""

    def __init__(self) -> None:
        self._ps = Parser(self)
        self.seen: list[tuple[str, bytes]] = []

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        self.seen.append((f"nats-py {sid}", data))

    async def _process_ping(self) -> None:
        self.seen.append(("ping", b""))

    async def _process_pong(self) -> None:
        self.seen.append(("pong", b""))


class Sub:
    def __init__(self, sid: int) -> None:
        self._id = sid


def hmsg(sid: int, seq: int, body: bytes) -> bytes:
    headers = b"NATS/1.0\r\nX-Seq: %d\r\n\r\n" % seq
    reply = b"$JS.ACK.S.c.1.%d.%d.1700000000.0" % (seq, seq)
    control = b"HMSG s.%d %d %s %d %d\r\n" % (seq, sid, reply, len(headers), len(headers + body))
    return control + headers + body + b"\r\n"


WIRE = b"".join(
    [
        hmsg(ROUTED, 1, b"one"),
        hmsg(ROUTED, 2, b"two" * 50),
        hmsg(OTHER, 3, b"other"),
        hmsg(ROUTED, 4, b"four"),
        b"MSG plain 9 5\r\nhello\r\n",
        b"PING\r\n",
        hmsg(ROUTED, 5, b""),
    ]
)
EXPECTED = [
    ("routed", b"one"),
    ("routed", b"two" * 50),
    ("nats-py 9", b"other"),
    ("routed", b"four"),
    ("nats-py 9", b"hello"),
    ("ping", b""),
    ("routed", b""),
]


def feed(cuts: list[int]) -> list[tuple[str, bytes]]:
    client = Client()

    def routed(subject: bytes, reply: bytes, headers: bytes | None, body: bytes) -> None:
        assert headers is not None and headers.startswith(b"NATS/1.0\r\nX-Seq: ")
        assert subject == b"s." + headers[17:].split(b"\r\n")[0]
        client.seen.append(("routed", body))

    route_raw(client, Sub(ROUTED), routed)  # type: ignore[arg-type]

    async def run() -> None:
        last = 0
        for cut in [*cuts, len(WIRE)]:
            await client._ps.parse(WIRE[last:cut])
            last = cut

    asyncio.run(run())
    return client.seen


def test_the_whole_wire_in_one_read() -> None:
    assert feed([]) == EXPECTED


@pytest.mark.parametrize("cut", range(1, len(WIRE)))
def test_cut_anywhere_into_two_reads(cut: int) -> None:
    assert feed([cut]) == EXPECTED


def test_one_byte_per_read() -> None:
    assert feed(list(range(1, len(WIRE)))) == EXPECTED


def test_another_subscriptions_message_after_routed_ones_is_not_held_back() -> None:
    """The read ends right after it: nothing else will come to push it through."""
    end_of_other = WIRE.index(b"other\r\n") + len(b"other\r\n")
    client = Client()
    route_raw(client, Sub(ROUTED), lambda _s, _r, _h, b: client.seen.append(("routed", b)))  # type: ignore[arg-type]
    asyncio.run(client._ps.parse(WIRE[:end_of_other]))
    assert client.seen == EXPECTED[:3]
