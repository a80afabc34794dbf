"""Federation rules without sockets: reading an upstream's feed, loops, what a pushing relay may
send, and exactly-once storage when the same events come by two routes."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from storage_events import sse
from storage_events.relay.auth import Authenticator, TokenConfig, hash_token
from storage_events.relay.config import PushConfig
from storage_events.relay.federation.core import FeedReader, LoopGuard
from storage_events.relay.federation.push import Pusher
from storage_events.relay.ingest.session import (
    IngestLimits,
    IngestSession,
    ProtocolError,
    check_relayed,
)
from storage_events.relay.log.sqlite import SQLiteLog
from storage_events.wire import (
    FRAME_BUDGET,
    Batch,
    Event,
    Hello,
    Welcome,
    decode_to_relay,
    encode_frame,
    event_json,
)


def ev(
    stream: str,
    seq: int,
    *,
    site: str = "s",
    id: int = 0,
    via: list[str] | None = None,
    flag: str = "IN_CLOSE_WRITE",
) -> Event:
    return Event(
        id=id,
        site=site,
        node="n",
        path=f"/d/{stream}-{seq}",
        flags=[flag],
        ts=seq,
        stream=stream,
        seq=seq,
        via=via or [],
        origin_id=id if via else None,
    )


def test_feed_reader_takes_events_gaps_and_shutdowns_across_chunk_boundaries():
    stream = b"retry: 1000\nid: 0\n\n" + sse.comment("heartbeat")
    stream += sse.render(event_json(ev("x", 1, id=7, via=["up"])), event="inotify", id=7)
    stream += sse.render(
        b'{"type":"gap","lost_from":8,"lost_to":20,"resumes_after":20}', event="gap", id=20
    )
    stream += sse.render(
        event_json(ev("x", 2, id=21, via=["up"], flag="IN_Q_OVERFLOW")), event="overflow", id=21
    )
    stream += b"event: shutdown\ndata: {}\n\n"
    reader = FeedReader("up")
    taken = [reader.feed(stream[i : i + 7], now=99) for i in range(0, len(stream), 7)]
    events = [e for t in taken for e in t.events]
    assert [(e.stream, e.seq, e.flags) for e in events] == [
        ("x", 1, ["IN_CLOSE_WRITE"]),
        ("up.gap", 20, ["IN_Q_OVERFLOW"]),
        ("x", 2, ["IN_Q_OVERFLOW"]),
    ]
    assert events[1].path == "/" and events[1].ts == 99 and reader.gaps == 1
    assert check_relayed(events, 0, None) == 21  # what a puller checks before storing
    with pytest.raises(ProtocolError, match="name is not valid"):
        check_relayed([ev("bad stream", 1, id=30, via=["up"])], 21, None)
    assert [t.last_id for t in taken if t.last_id is not None] == [7, 20, 21]
    assert taken[-1].reconnect
    with pytest.raises(ValueError, match="upstream up sent an event that is not one"):
        FeedReader("up").feed(b'event: inotify\ndata: {"path": 1}\n\n', now=0)


def test_loop_guard_drops_what_came_round_and_says_so_once():
    guard = LoopGuard("a", "upstream 'c'")
    kept = guard.admit([ev("x", 1, via=["a", "b", "c"]), ev("y", 1, via=["z", "c"])])
    assert [e.stream for e in kept] == ["y"] and guard.looped == 1
    assert guard.report and "via a → b → c" in guard.report and "upstream 'c'" in guard.report
    guard.report = None
    guard.admit([ev("x", 2, via=["a", "c"])])
    assert guard.looped == 2 and guard.report is None  # logged once per connection


def session(me: str = "central", sites: list[str] | None = None) -> IngestSession:
    auth = Authenticator(
        [
            TokenConfig(
                name="r1", role="relay", hash=hash_token("t-relay"), site="site1", sites=sites
            ),
            TokenConfig(name="ag", role="agent", site="s", hash=hash_token("t-agent")),
        ],
        None,
    )
    return IngestSession(IngestLimits(), auth, me)


def hello(site: str = "site1", token: str = "t-relay", role: str = "relay") -> bytes:
    return encode_frame(
        Hello(role=role, site=site, node=site, stream=f"relay:{site}:42", token=token)
    )


def test_a_pushing_relay_is_checked():
    with pytest.raises(ProtocolError, match="agent token: it cannot publish as relay"):
        session().receive(hello(token="t-agent"))
    with pytest.raises(ProtocolError, match="relay token: it cannot publish as agent"):
        session().receive(hello(role="agent"))
    with pytest.raises(ProtocolError, match="pushing to itself"):
        session().receive(hello(site="central"))
    with pytest.raises(ProtocolError, match="may publish as relay 'site1', not 'site2'"):
        session().receive(hello(site="site2"))  # a relay token is bound to its relay
    with pytest.raises(ProtocolError, match="a relay's stream is relay:<its name>"):
        session().receive(
            encode_frame(
                Hello(
                    role="relay",
                    site="site1",
                    node="site1",
                    stream="relay:other:1",
                    token="t-relay",
                )
            )
        )
    s = session(sites=["s"])
    s.receive(hello())
    batch = [
        ev("x", 1, id=5, via=["site1"]),
        ev("y", 9, id=6, via=["o", "site1"]),
        ev("z", 1, id=7, via=["central", "site1"]),
    ]
    assert [e.stream for e in s.receive(encode_frame(Batch(batch)))] == ["x", "y"]
    assert s.checkpoint == 7 and s.loops is not None and s.loops.looped == 1
    notice = msgspec.structs.replace(
        ev("site1.gap", 30, id=8, via=["site1"], site="site1", flag="IN_Q_OVERFLOW"),
        node="site1",
        path="/",
    )
    assert s.receive(encode_frame(Batch([notice]))) == [notice]  # its own loss notices pass
    for bad, message in (
        ([ev("x", 2, id=7, via=["site1"])], "ids must increase"),
        ([ev("x", 2, id=9, via=["other"])], "via must end with the pushing relay"),
        ([ev("x", 2, id=9, via=["site1"], site="t")], "may not push events of site 't'"),
    ):
        with pytest.raises(ProtocolError, match=message):
            s.receive(encode_frame(Batch(bad)))


def test_an_agent_cannot_pretend_to_be_relayed():
    s = session()
    s.receive(encode_frame(Hello(site="s", node="n", stream="n:1", token="t-agent")))
    with pytest.raises(ProtocolError, match="cannot set via"):
        s.receive(
            encode_frame(
                Batch(
                    [
                        Event(
                            site="s",
                            node="n",
                            path="/p",
                            flags=["IN_CREATE"],
                            ts=1,
                            stream="n:1",
                            seq=1,
                            via=["x"],
                        )
                    ]
                )
            )
        )


def test_a_pushing_relay_keeps_its_frames_within_the_budget(tmp_path):
    """Events with long paths: the pusher sends fewer a frame, and all of them, in order."""
    log = SQLiteLog(tmp_path, name="site1")
    deep = "/d/" + "x" * 8000
    appended = log.append(
        [
            Event(
                site="s",
                node="n",
                path=f"{deep}/{i}",
                flags=["IN_CLOSE_WRITE"],
                ts=1,
                stream="n:1",
                seq=i,
            )
            for i in range(1, 1501)
        ]
    )

    class Peer:  # the other relay's end of the WebSocket: welcomes, then takes frames
        def __init__(self) -> None:
            self.frames: list[bytes] = []
            self.replies: asyncio.Queue[bytes] = asyncio.Queue()
            self.replies.put_nowait(encode_frame(Welcome(stream="relay:site1:1", acked=0)))

        async def send(self, frame: bytes) -> None:
            self.frames.append(frame)

        async def recv(self) -> bytes:
            return await self.replies.get()

    async def main() -> Peer:
        await appended
        peer, pusher = Peer(), Pusher(PushConfig(url="http://central:8808"), log, "site1")
        task = asyncio.create_task(pusher._push(peer))  # type: ignore[arg-type]
        while sum(len(decode_to_relay(f).events) for f in peer.frames[1:]) < 1500:
            await asyncio.sleep(0.01)
        task.cancel()
        return peer

    peer = asyncio.run(main())
    batches = [decode_to_relay(f).events for f in peer.frames[1:]]
    assert all(len(f) <= FRAME_BUDGET for f in peer.frames) and len(batches) > 2
    assert [e.id for b in batches for e in b] == list(range(1, 1501))
