"""The publisher's side of the ingest protocol without sockets: a hostile or broken relay gets a
clear error (never an assertion), refusals are pinned on the right batch, frames keep within the
relay's limit, and the agent's and the pushing relay's shells do what the session says."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
import websockets
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Close

from storage_events.agent.outbox import Outbox
from storage_events.agent.uplink import Uplink
from storage_events.publish import (
    BatchRefused,
    PeerProtocolError,
    PublisherRefused,
    PublishSession,
    Refused,
)
from storage_events.relay.config import PushConfig
from storage_events.relay.federation import push
from storage_events.relay.federation.push import Pusher
from storage_events.wire import (
    Ack,
    Batch,
    Error,
    Event,
    Hello,
    Welcome,
    decode_to_relay,
    encode_frame,
)

PEER = "ws://central.example:8808/ingest"
AGENT = Hello(site="s", node="n", stream="n:1")
RELAY = Hello(role="relay", site="r1", node="r1", stream="relay:r1:7")
LIMIT = 65536  # the fake web server's frame limit
TOO_BIG = f"frame with {{}} bytes exceeds limit of {LIMIT}"


def ev(seq: int, path: str = "/d/f", **kw: object) -> Event:
    base: dict = dict(site="s", node="n", path=path, flags=["IN_CLOSE_WRITE"], ts=1)
    return Event(**{**base, "stream": "n:1", "seq": seq, **kw})


def events(first: int, count: int, path: str = "/d/f") -> list[Event]:
    return [ev(seq, path) for seq in range(first, first + count)]


def welcome(acked: int = 0, stream: str = "n:1") -> bytes:
    return encode_frame(Welcome(stream=stream, acked=acked))


def ack(seq: int, stream: str = "n:1") -> bytes:
    return encode_frame(Ack(stream, seq))


def error(message: str) -> bytes:
    return encode_frame(Error(message))


def opened(hello: Hello = AGENT, acked: int = 0, **kw: int) -> PublishSession:
    session = PublishSession(hello, peer=PEER, **kw)
    session.start()
    session.receive(welcome(acked, hello.stream))
    return session


def send_all(session: PublishSession, batch: list[Event]) -> bytes:
    frame, rest = session.frame(batch)
    assert rest == []
    return frame


# -- the batching window ----------------------------------------------------------------------


def test_a_trickle_waits_for_the_ack_and_goes_as_one_batch():
    session = opened(max_events=100)
    assert session.may_send(1)  # nothing in flight: at once
    send_all(session, events(1, 1))
    assert not session.may_send(5)  # a partial batch waits for the ack
    session.receive(ack(1))
    assert session.may_send(5)
    assert send_all(session, events(2, 5))


def test_a_full_batch_goes_ahead_of_the_ack():
    session = opened(max_events=100)
    send_all(session, events(1, 100))
    assert session.may_send(100)  # a burst: both ends stay busy
    assert not session.may_send(99)


def test_what_a_frame_cut_by_bytes_left_behind_goes_ahead_of_the_ack():
    session = opened(max_frame=4096)
    _, rest = session.frame(events(1, 200, path="/d/" + "x" * 100))
    assert rest
    assert session.may_send(len(rest))  # fewer than max_events, but more than a frame holds
    _, left = session.frame(rest[:5])
    assert left == []
    assert not session.may_send(len(rest) - 5)


# -- a hostile or broken relay ------------------------------------------------------------------


def test_the_hello_is_the_first_frame():
    assert decode_to_relay(PublishSession(AGENT, peer=PEER).start()) == AGENT


@pytest.mark.parametrize(
    "reply, complaint",
    [
        (ack(0), "acknowledged seq 0 before its welcome"),
        (b"\xc1\xc1 not msgpack", "cannot be decoded as a reply"),
        (encode_frame(AGENT), "cannot be decoded as a reply"),  # a hello, sent back
        (encode_frame(Welcome(stream="n:1", acked=-1)), "claims to hold seq -1"),
        ("welcome?", "text frame"),
    ],
)
def test_a_first_reply_that_is_not_a_welcome_is_a_protocol_error(reply, complaint):
    session = PublishSession(AGENT, peer=PEER)
    session.start()
    with pytest.raises(PeerProtocolError) as broken:
        session.receive(reply)
    assert complaint in str(broken.value) and PEER in str(broken.value)
    assert not session.open


def test_a_second_welcome_is_a_protocol_error():
    session = opened()
    with pytest.raises(PeerProtocolError, match="second welcome"):
        session.receive(welcome(0))


@pytest.mark.parametrize("frame", [b"\x93\x01\x02", b"", "ack"])
def test_garbage_or_text_after_the_welcome_is_a_protocol_error(frame):
    session = opened()
    send_all(session, events(1, 3))
    with pytest.raises(PeerProtocolError, match=PEER):
        session.receive(frame)


def test_an_ack_beyond_what_was_sent_is_a_protocol_error():
    session = opened(acked=10)
    send_all(session, events(11, 5))
    with pytest.raises(
        PeerProtocolError, match=r"seq 16 of n:1, beyond the last one sent to it \(15\)"
    ):
        session.receive(ack(16))


def test_an_ack_before_anything_was_sent_may_only_repeat_the_welcome():
    session = opened(acked=10)
    assert session.receive(ack(10)) == Ack("n:1", 10)
    with pytest.raises(PeerProtocolError, match="beyond"):
        session.receive(ack(11))


def test_an_ack_going_back_is_a_protocol_error_and_a_repeated_one_is_not():
    session = opened()
    send_all(session, events(1, 5))
    send_all(session, events(6, 5))
    session.receive(ack(5))
    session.receive(ack(5))  # (the relay held that batch already: nothing new to say)
    with pytest.raises(PeerProtocolError, match="after 5: acknowledgements are cumulative"):
        session.receive(ack(4))


def test_an_ack_below_the_welcome_is_going_back():
    session = opened(acked=10)
    send_all(session, events(11, 5))
    with pytest.raises(PeerProtocolError, match="cannot go back"):
        session.receive(ack(9))


# -- refusals -----------------------------------------------------------------------------------


def test_an_error_frame_before_the_welcome_refuses_the_publisher():
    session = PublishSession(AGENT, peer=PEER)
    session.start()
    with pytest.raises(PublisherRefused, match="needs a token"):
        session.receive(error("this relay needs a token"))


def test_an_error_frame_with_nothing_in_flight_refuses_the_publisher():
    session = opened()
    send_all(session, events(1, 3))
    session.receive(ack(3))
    with pytest.raises(PublisherRefused):
        session.receive(error("stream 'n:1' is being published by someone else"))


def test_an_error_frame_mid_stream_refuses_the_oldest_batch_in_flight():
    session = opened()
    for first in (1, 4, 7):
        send_all(session, events(first, 3))
    session.receive(ack(3))  # acks of the batches before come first
    with pytest.raises(BatchRefused) as refused:
        session.receive(error("event 0 (seq 4): path is empty"))
    assert (refused.value.batch.first, refused.value.batch.count) == (4, 3)
    assert str(refused.value) == "event 0 (seq 4): path is empty"
    assert not refused.value.frame_too_big
    assert session.closed(None) is None  # (the refusal ended the connection already)


def test_an_ack_within_a_batch_keeps_it_in_flight():
    session = opened()
    send_all(session, events(1, 4))
    send_all(session, events(5, 4))
    session.receive(ack(6))  # (cannot happen with batches stored whole, but must not confuse)
    with pytest.raises(BatchRefused) as refused:
        session.receive(error("refused"))
    assert refused.value.batch.first == 5


def test_close_1009_with_the_limit_picks_the_big_frame_and_lowers_max_frame():
    session = opened()
    send_all(session, events(1, 5))
    big = send_all(session, events(6, 100, "/d/" + "x" * 1000))
    send_all(session, events(106, 5))
    # The web server refuses the big frame as it arrives: the batch before is not acked yet.
    refused = session.closed(1009, TOO_BIG.format(len(big)))
    assert isinstance(refused, BatchRefused) and refused.frame_too_big
    assert (refused.batch.first, refused.batch.count, refused.batch.size) == (6, 100, len(big))
    session.adapt(refused, lambda seq: pytest.fail(f"seq {seq} replaced for a batch of 100"))
    assert session.max_frame < LIMIT
    assert session.limit < 100 and session.ceiling < 100  # smaller batches, too
    # The next connection resends it in frames the web server takes.
    session.start()
    session.receive(welcome(5))
    rest = events(6, 100, "/d/" + "x" * 1000)
    while rest:
        frame, rest = session.frame(rest)
        assert len(frame) <= LIMIT


def test_close_1009_without_a_reason_blames_the_largest_batch():
    session = opened()
    send_all(session, events(1, 3))
    big = send_all(session, events(4, 50, "/d/" + "y" * 500))
    send_all(session, events(54, 3))
    refused = session.closed(1009, "")
    assert isinstance(refused, BatchRefused) and refused.batch.first == 4
    session.adapt(refused, lambda seq: False)
    assert session.max_frame <= len(big) // 2


@pytest.mark.parametrize("code", [1007, 1008])
def test_a_refusing_close_code_without_an_error_frame_refuses_the_oldest_batch(code):
    session = opened()
    send_all(session, events(1, 3))
    send_all(session, events(4, 3))
    session.receive(ack(3))
    refused = session.closed(code, "event 1 (seq 5): flags are not inotify flag names")
    assert isinstance(refused, BatchRefused) and refused.batch.first == 4
    assert not refused.frame_too_big and "seq 5" in str(refused)


@pytest.mark.parametrize("code", [1000, 1001, 1011, 1012])
def test_other_closes_are_lost_connections(code):
    session = opened()
    send_all(session, events(1, 3))
    assert session.closed(code, "the relay cannot store events right now; retry") is None


def test_a_close_before_the_welcome_or_with_nothing_in_flight_refuses_nothing():
    session = PublishSession(AGENT, peer=PEER)
    session.start()
    assert session.closed(1008, "no hello within 10 s") is None
    session = opened()
    assert session.closed(1009, TOO_BIG.format(70000)) is None


def drop_at(session: PublishSession, acked: int) -> BatchRefused | None:
    """A connection welcomed at ``acked`` that drops (no close frame) with two batches out."""
    session.start()
    session.receive(welcome(acked))
    send_all(session, events(acked + 1, 2))
    send_all(session, events(acked + 3, 40, "/d/" + "z" * 300))
    return session.closed(None)


def test_two_drops_at_the_same_place_are_an_implicit_frame_too_big():
    session = PublishSession(AGENT, peer=PEER)
    assert drop_at(session, 0) is None  # once: a relay restarting does that too
    refused = drop_at(session, 0)
    assert isinstance(refused, BatchRefused) and refused.implicit and refused.frame_too_big
    assert (refused.batch.first, refused.batch.count) == (3, 40)  # the largest
    before = session.max_frame
    session.adapt(refused, lambda seq: False)
    assert session.max_frame <= refused.batch.size // 2 < before


def test_drops_at_different_places_are_not_a_refusal():
    session = PublishSession(AGENT, peer=PEER)
    assert drop_at(session, 0) is None
    assert drop_at(session, 2) is None  # it moved on in between
    assert drop_at(session, 4) is None


# -- how batches adapt --------------------------------------------------------------------------


def test_a_refused_batch_is_resent_smaller_then_grows_back_as_acks_come():
    session = opened(max_events=64)
    send_all(session, events(1, 64))
    with pytest.raises(BatchRefused) as refused:
        session.receive(error("refused"))
    session.adapt(refused.value, lambda seq: pytest.fail("a batch of 64 is not one event"))
    assert (session.limit, session.ceiling) == (16, 32)
    session.start()
    session.receive(welcome(0))
    seq, limits = 1, []
    for _ in range(4):
        send_all(session, events(seq, session.limit))
        seq += session.limit
        session.receive(ack(seq - 1))
        limits.append(session.limit)
    assert limits == [32, 32, 32, 32]  # doubled, up to the lowered ceiling


def test_a_single_refused_event_is_replaced_and_batches_grow_again():
    session = opened(max_events=64)
    session.limit = session.ceiling = 1
    send_all(session, [ev(9)])
    with pytest.raises(BatchRefused) as refused:
        session.receive(error("event 0 (seq 9): path is not canonical"))
    replaced: list[int] = []

    def replace(seq: int) -> bool:
        replaced.append(seq)
        return True

    session.adapt(refused.value, replace)
    assert replaced == [9]
    assert (session.limit, session.ceiling) == (1, 64)


def test_an_event_that_cannot_be_replaced_leaves_the_batches_as_they_are():
    session = opened(max_events=64)
    session.limit = session.ceiling = 1
    send_all(session, [ev(9)])
    with pytest.raises(BatchRefused) as refused:
        session.receive(error("refused"))
    session.adapt(refused.value, lambda seq: False)
    assert (session.limit, session.ceiling) == (1, 1)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(
        st.one_of(st.integers(1, 40), st.integers(2000, 9000), st.integers(10_000, 35_000)),
        min_size=1,
        max_size=40,
    ),
    max_frame=st.integers(1024, 200_000),
)
def test_frames_keep_within_max_frame_whatever_the_sizes_of_events(lengths, max_frame):
    session = opened(max_frame=max_frame)
    rest = [ev(i + 1, "/d/" + "é" * n) for i, n in enumerate(lengths)]
    sent: list[Event] = []
    while rest:
        frame, left = session.frame(rest)
        batch = decode_to_relay(frame)
        assert isinstance(batch, Batch) and batch.events  # always one at least
        assert len(frame) <= max_frame or len(batch.events) == 1
        assert batch.events + left == rest  # nothing lost, nothing reordered
        sent += batch.events
        rest = left
    assert [e.seq for e in sent] == list(range(1, len(lengths) + 1))


# -- a pushing relay: its ids are the positions, and a window --------------------------------


def relayed(first_id: int, count: int) -> list[Event]:
    # Events of other streams: their seq says nothing of the pushing relay's position.
    return [
        ev(1, stream=f"x:{i}", id=i, via=["r1"], origin_id=i)
        for i in range(first_id, first_id + count)
    ]


def test_a_pushing_relay_counts_in_its_ids_within_a_window():
    session = opened(RELAY, acked=100, window=10)
    assert session.can_send
    send_all(session, relayed(101, 4))
    send_all(session, relayed(105, 4))
    assert session.can_send  # 8 ids out of 10
    send_all(session, relayed(109, 4))
    assert not session.can_send and session.sent == 112
    session.receive(ack(104, RELAY.stream))
    assert session.can_send
    with pytest.raises(PeerProtocolError, match="id 113 of relay:r1:7, beyond"):
        session.receive(ack(113, RELAY.stream))


def test_a_pushing_relay_refusal_names_the_batch_by_ids():
    session = opened(RELAY, acked=100, window=1000)
    send_all(session, relayed(101, 4))
    send_all(session, relayed(105, 4))
    session.receive(ack(104, RELAY.stream))
    with pytest.raises(BatchRefused) as refused:
        session.receive(error("event 2 (x:107 seq 1): via names a relay twice"))
    assert (refused.value.batch.first, refused.value.batch.last) == (105, 108)


# -- the shells: the same protocol through the pusher and the uplink, with fake connections ---


class FakePeer:
    """The other relay's end of a push connection: replies scripted, frames kept."""

    def __init__(self, *replies: bytes) -> None:
        self.frames: list[bytes] = []
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()
        for reply in replies:
            self.replies.put_nowait(reply)

    async def send(self, frame: bytes) -> None:
        self.frames.append(frame)

    async def recv(self) -> bytes:
        return await self.replies.get()

    def ids(self) -> list[int]:
        return [e.id for f in self.frames[1:] for e in decode_to_relay(f).events]


@dataclass
class FakeRecord:
    id: int
    _event: Event

    def event(self) -> Event:
        return self._event


class FakeLog:
    """Ids 1..head, as the pusher reads them."""

    first = 1
    epoch = 7

    def __init__(self, head: int) -> None:
        self.head = head

    async def read(self, after: int, limit: int) -> list[FakeRecord]:
        last = min(after + limit, self.head)
        return [FakeRecord(e.id, e) for e in relayed(after + 1, last - after)]


def pusher(head: int) -> Pusher:
    return Pusher(PushConfig(url="http://central:8808"), FakeLog(head), "r1")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "replies, raised",
    [
        ([ack(0, RELAY.stream)], PeerProtocolError),
        ([welcome(0, RELAY.stream), welcome(0, RELAY.stream)], PeerProtocolError),
        ([welcome(0, RELAY.stream), ack(10**6, RELAY.stream)], PeerProtocolError),
        ([welcome(0, RELAY.stream), b"\xc1"], PeerProtocolError),
        ([error("token 't' may publish as relay 'r2', not 'r1'")], Refused),
        ([welcome(0, RELAY.stream), error("event 0: via names a relay twice")], Refused),
    ],
)
def test_a_hostile_peer_ends_the_push_with_an_error_not_an_assertion(replies, raised):
    async def main() -> None:
        await asyncio.wait_for(pusher(50)._push(FakePeer(*replies)), 5)  # type: ignore[arg-type]

    with pytest.raises(raised):
        asyncio.run(main())


def test_the_pusher_stops_at_its_window_and_goes_on_when_acked():
    head = push.WINDOW + 5 * push.BATCH

    async def main() -> tuple[list[int], list[int]]:
        peer, p = FakePeer(welcome(0, RELAY.stream)), pusher(head)
        task = asyncio.create_task(p._push(peer))  # type: ignore[arg-type]
        for _ in range(100):  # until it stops sending
            await asyncio.sleep(0.01)
        before = peer.ids()
        peer.replies.put_nowait(ack(before[-1], RELAY.stream))
        while peer.ids()[-1] < head:
            await asyncio.sleep(0.01)
        task.cancel()
        return before, peer.ids()

    before, after = asyncio.run(main())
    assert push.WINDOW <= len(before) < push.WINDOW + push.BATCH  # never more out at once
    assert after == list(range(1, head + 1))


class FakeRelay:
    """Stands in for ``websockets.connect``: a relay whose web server closes the connection
    (1009) on a frame over LIMIT, which refuses (error frame) any event at ``evil``, and
    stores the rest. ``garbage``: connections answered with bytes that are not the protocol."""

    def __init__(self, evil: str, garbage: int = 0, overclaim: int = 0) -> None:
        self.evil = evil
        self.garbage = garbage
        self.overclaim = overclaim  # connections welcomed with a seq never sent
        self.stored: list[Event] = []
        self.connections = 0
        self.refused_frames = 0  # frames over LIMIT

    def __call__(self, url: str, **kw: object) -> contextlib.AbstractAsyncContextManager:
        self.connections += 1
        return self._connect()

    @contextlib.asynccontextmanager
    async def _connect(self) -> AsyncIterator[FakeConnection]:
        yield FakeConnection(
            self,
            garbage=self.connections <= self.garbage,
            overclaim=self.connections <= self.overclaim,
        )


class FakeConnection:
    def __init__(self, relay: FakeRelay, *, garbage: bool, overclaim: bool) -> None:
        self.relay = relay
        self.garbage = garbage
        self.overclaim = overclaim
        self.replies: asyncio.Queue[bytes | Exception] = asyncio.Queue()
        self.closed: Exception | None = None

    def close(self, code: int, reason: str) -> None:
        self.closed = websockets.ConnectionClosedError(Close(code, reason), None)
        self.replies.put_nowait(self.closed)

    async def send(self, frame: bytes) -> None:
        if self.closed is not None:
            raise self.closed
        stored = self.relay.stored
        msg = decode_to_relay(frame)
        if len(frame) > LIMIT:
            self.relay.refused_frames += 1
            self.close(1009, TOO_BIG.format(len(frame)))
        elif isinstance(msg, Hello):
            held = (stored[-1].seq if stored else 0) + (1000 if self.overclaim else 0)
            self.replies.put_nowait(b"\xc1 garbage" if self.garbage else welcome(held))
        elif any(e.path == self.relay.evil for e in msg.events):
            self.replies.put_nowait(error(f"path {self.relay.evil} is refused here"))
            self.close(1008, "path /d/e")  # (a close reason is cut at 123 bytes)
        else:
            stored += [e for e in msg.events if e.seq > len(stored)]
            self.replies.put_nowait(ack(stored[-1].seq))

    async def recv(self) -> bytes:
        reply = await self.replies.get()
        await asyncio.sleep(0)  # frames arrive one by one: the sender may run in between
        if isinstance(reply, Exception):
            raise reply
        return reply


def drain(relay: FakeRelay, outbox: Outbox, on_replace: Callable[[Event], None]) -> None:
    uplink = Uplink(
        "http://relay.example:8008",
        AGENT,
        outbox,
        asyncio.Event(),
        drain_only=True,
        max_backoff=0.01,
        on_replace=on_replace,
    )
    asyncio.run(asyncio.wait_for(uplink.run(), 20))


def test_the_uplink_meets_a_frame_limit_and_replaces_the_event_the_relay_refuses(
    monkeypatch, caplog
):
    evil = "/d/evil"
    relay = FakeRelay(evil)
    monkeypatch.setattr(websockets, "connect", relay)
    outbox = Outbox("n:1")
    for i in range(300):
        outbox.add(ev(0, evil if i == 136 else f"/d/{i:03d}-" + "x" * 500))
    notices: list[Event] = []
    with caplog.at_level(logging.WARNING, logger="storage_events.agent"):
        drain(relay, outbox, notices.append)
    assert [e.seq for e in relay.stored] == list(range(1, 301))  # every seq, once, in order
    assert relay.stored[136].flags == ["IN_Q_OVERFLOW"] and relay.stored[136].path == "/d"
    assert [(n.seq, n.path) for n in notices] == [(137, "/d")]
    assert relay.refused_frames == 1  # the limit learnt once, from the close reason
    assert outbox.unacked == 0
    # The operator is told what the relay said: its error frame, not the close reason cut short.
    said = [r.getMessage() for r in caplog.records]
    said = [line for line in said if "refused a batch" in line or "refuses event" in line]
    assert "exceeds limit of 65536" in said[0] and len(said) > 2
    assert all("path /d/evil is refused here" in line for line in said[1:]), said
    assert "refuses event seq 137" in said[-1]


def test_the_uplink_retries_a_relay_that_sends_garbage_and_says_why(monkeypatch, caplog):
    relay = FakeRelay("/nowhere", garbage=2)
    monkeypatch.setattr(websockets, "connect", relay)
    outbox = Outbox("n:1")
    for i in range(5):
        outbox.add(ev(0, f"/d/{i}"))
    with caplog.at_level(logging.ERROR, logger="storage_events.agent"):
        drain(relay, outbox, lambda notice: pytest.fail(f"{notice} replaced nothing"))
    assert [e.seq for e in relay.stored] == [1, 2, 3, 4, 5] and relay.connections == 3
    complaints = [r.getMessage() for r in caplog.records if "ingest protocol" in r.getMessage()]
    assert len(complaints) == 2 and "relay.example" in complaints[0]


def test_the_uplink_acknowledges_nothing_from_a_relay_claiming_events_never_sent(
    monkeypatch, caplog
):
    relay = FakeRelay("/nowhere", overclaim=1)
    monkeypatch.setattr(websockets, "connect", relay)
    outbox = Outbox("n:1")
    for i in range(5):
        outbox.add(ev(0, f"/d/{i}"))
    uplink = Uplink("http://relay.example:8008", AGENT, outbox, asyncio.Event(), max_backoff=0.01)

    async def main() -> None:
        task = asyncio.create_task(uplink.run())
        while outbox.unacked:
            assert not task.done(), task  # (it must not crash on the answer)
            await asyncio.sleep(0.01)
        task.cancel()

    with caplog.at_level(logging.ERROR, logger="storage_events.agent"):
        asyncio.run(asyncio.wait_for(main(), 20))
    assert [e.seq for e in relay.stored] == [1, 2, 3, 4, 5] and relay.connections == 2
    said = [r.getMessage() for r in caplog.records]
    assert any("says it holds seq 1000" in line and "numbered only 5" in line for line in said)
