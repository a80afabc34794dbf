"""The other pure pieces: outbox, SSE framing, filters, resume points, ingest protocol, log."""

from __future__ import annotations

import os

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage_events import sse
from storage_events.agent.outbox import Outbox
from storage_events.relay.feed.endpoint import ResumeError, resume_point
from storage_events.relay.feed.filters import Filter, FilterError, normalize_prefix
from storage_events.relay.ingest.session import IngestLimits, IngestSession, ProtocolError
from storage_events.relay.log.base import make_record
from storage_events.wire import (
    MAX_PATH,
    Batch,
    Event,
    Flag,
    Hello,
    display_path,
    encode_frame,
    event_from_json,
    event_json,
    event_problem,
    loss_notice,
)


def ev(seq: int = 0, path: str = "/d/f", stream: str = "n:1", **kw) -> Event:
    return Event(
        **{
            "site": "s",
            "node": "n",
            "path": path,
            "flags": ["IN_CREATE"],
            "ts": 1,
            "stream": stream,
            "seq": seq,
            **kw,
        }
    )


# -- outbox -------------------------------------------------------------------------------------


def test_outbox_resends_exactly_what_the_relay_lacks():
    box = Outbox("n:1", window=3)
    for _ in range(5):
        box.add(ev())
    box.connected(0)
    assert [e.seq for e in box.next_batch(10)] == [1, 2, 3]  # window
    assert box.next_batch(10) == []
    box.ack(2)
    assert [e.seq for e in box.next_batch(10)] == [4, 5]
    # Connection lost; the relay stored up to 4 (its ack for 3-4 never arrived).
    box.connected(4)
    assert [e.seq for e in box.next_batch(10)] == [5]
    box.ack(5)
    assert len(box) == 0 and box.acked == 5


def test_outbox_rejects_a_relay_that_claims_the_future():
    box = Outbox("n:1")
    box.add(ev())
    with pytest.raises(ValueError, match="only numbered up to 1"):
        box.connected(7)


@given(
    st.lists(
        st.tuples(st.sampled_from(["add", "send", "ack", "reconnect"]), st.integers(0, 5)),
        max_size=60,
    )
)
def test_outbox_never_loses_or_reorders(ops):
    """Whatever the interleaving, the relay (simulated) ends up with 1..N exactly once."""
    box = Outbox("n:1", window=4)
    stored: list[int] = []
    inflight: list[int] = []
    box.connected(0)
    for op, n in ops:
        if op == "add":
            box.add(ev())
        elif op == "send":
            inflight += [e.seq for e in box.next_batch(n + 1)]
        elif op == "ack" and inflight:
            k = min(n, len(inflight))
            for seq in inflight[:k]:
                if seq == len(stored) + 1:
                    stored.append(seq)
            inflight = inflight[k:]
            box.ack(len(stored))
        elif op == "reconnect":
            inflight = []
            box.connected(len(stored))
    box.connected(len(stored))
    while len(box):
        for e in box.next_batch(100):
            if e.seq == len(stored) + 1:
                stored.append(e.seq)
        box.ack(len(stored))
    assert stored == list(range(1, box.last_seq + 1))


def test_outbox_replaces_a_refused_event_in_place_and_takes_back_an_unsent_tail():
    box = Outbox("n:1")
    for i in range(4):
        box.add(ev(path=f"/d/{i}"))
    box.connected(0)
    batch = box.next_batch(4)
    box.unsend(batch[2:])  # the frame would have been too big: seq 3-4 go next time
    assert [e.seq for e in batch[:2]] == [1, 2] and box.held(3) is not None
    assert box.replace(loss_notice(box.held(2)))
    box.connected(1)  # the relay refused seq 2: it goes again, as the notice, then 3, 4
    assert [(e.seq, e.flags) for e in box.next_batch(10)] == [
        (2, ["IN_Q_OVERFLOW"]),
        (3, ["IN_CREATE"]),
        (4, ["IN_CREATE"]),
    ]
    assert not box.replace(ev(seq=9))


# -- SSE framing --------------------------------------------------------------------------------


def test_sse_parser_handles_split_chunks_and_commits_ids_only_at_block_end():
    wire = (
        sse.render(b'{"a":1}', event="inotify", id=5)
        + sse.comment("hb")
        + b"retry: 1000\r\nid: 9\r\n\r\n"
        + sse.render(b"x", event="gap", id=10)
    )
    for cut in range(len(wire) + 1):
        p = sse.SSEParser()
        msgs = p.feed(wire[:cut]) + p.feed(wire[cut:])
        assert [(m.event, m.data, m.id) for m in msgs] == [
            ("inotify", '{"a":1}', "5"),
            ("gap", "x", "10"),
        ]
        assert p.last_event_id == "10" and p.retry_ms == 1000
    p = sse.SSEParser()
    p.feed(b"id: 11\ndata: cut off")
    assert p.last_event_id is None


# -- wire ---------------------------------------------------------------------------------------


def test_event_json_matches_the_contract_and_round_trips():
    e = ev(3, cookie=None, old_path=None)
    data = msgspec.json.decode(event_json(e))
    assert list(data)[:11] == [
        "id",
        "site",
        "node",
        "path",
        "flags",
        "is_dir",
        "cookie",
        "old_path",
        "ts",
        "stream",
        "seq",
    ]
    assert event_from_json(event_json(e)) == e


def test_non_utf8_paths_keep_their_bytes():
    import os

    path = os.fsdecode(b"/d/caf\xe9")
    shown, raw = display_path(path)
    assert shown == "/d/caf\ufffd" and raw == b"/d/caf\xe9"
    assert display_path("/d/ok ü") == ("/d/ok ü", None)


def test_event_limits_are_defined_once_and_a_loss_notice_always_passes_them():
    assert event_problem(ev(1)) is None
    deep = "/d/" + "/".join(["x" * 250] * 300) + "/f"
    assert len(deep) > MAX_PATH
    for bad, why in [
        (ev(1, path=""), "empty"),
        (ev(1, path=deep), "limit"),
        (ev(1, path="/d/a\0b/c"), "NUL"),
        (ev(1, old_path=deep), "old_path"),
        (ev(1, flags=["IN_NOPE"]), "not inotify flag names"),
        (ev(1, raw_path=b"/" + b"\xff" * (4 * MAX_PATH)), "raw_path"),
    ]:
        assert why in (event_problem(bad) or ""), bad.path[:40]
        notice = loss_notice(bad)
        assert event_problem(notice) is None
        assert (notice.flags, notice.is_dir, notice.seq) == (["IN_Q_OVERFLOW"], True, 1)
        assert bad.path.startswith(notice.path.rstrip("/") + "/") or notice.path == "/"
    assert loss_notice(ev(1, path=deep)).path == deep[: MAX_PATH + 1].rpartition("/")[0]
    assert loss_notice(ev(1, path="/d/a\0b/c")).path == "/d"
    raw = os.fsencode("/d/caf\udce9/" + "y" * 70_000)
    notice = loss_notice(ev(1, path=display_path(os.fsdecode(raw))[0], raw_path=raw))
    assert (notice.path, notice.raw_path) == ("/d/caf\ufffd", b"/d/caf\xe9")


# -- filters ------------------------------------------------------------------------------------


def rec(path: str, site: str = "s", node: str = "n", flags: int = Flag.CREATE):
    return make_record(1, site, node, path, flags, b"{}")


def test_path_prefixes_match_on_component_boundaries():
    f = Filter(["/data/"])
    assert f.matches(rec("/data")) and f.matches(rec("/data/x/y"))
    assert not f.matches(rec("/data2")) and not f.matches(rec("/dat"))
    assert Filter(["/"]).matches_all


def test_filters_combine_and_overflow_always_reaches_the_affected_subtree():
    f = Filter(["/data/run1"], sites=["a"], types=["IN_CLOSE_WRITE"])
    assert f.matches(rec("/data/run1/f", site="a", flags=Flag.CLOSE_WRITE))
    assert not f.matches(rec("/data/run1/f", site="b", flags=Flag.CLOSE_WRITE))
    assert not f.matches(rec("/data/run1/f", site="a", flags=Flag.CREATE))
    # An overflow of root /data covers /data/run1, whatever types were asked for.
    assert f.matches(rec("/data", site="a", flags=Flag.Q_OVERFLOW))
    assert not f.matches(rec("/other", site="a", flags=Flag.Q_OVERFLOW))


@pytest.mark.parametrize("bad", ["relative", "/a/../b", "/a\nb", "/" + "x" * 5000])
def test_hostile_prefixes_are_rejected(bad):
    with pytest.raises(FilterError):
        normalize_prefix(bad)


@given(st.text(max_size=200))
def test_any_filter_value_either_works_or_raises_filter_error(value):
    try:
        Filter([value], [value], [value], [value])
    except FilterError as e:
        assert str(e)


# -- resume points ------------------------------------------------------------------------------


def test_resume_point():
    assert resume_point(None, None, 50) == 50
    assert resume_point(None, "earliest", 50) == 0
    assert resume_point("7", "earliest", 50) == 7  # a reconnecting client wins
    assert resume_point(None, "50", 50) == 50
    for bad in ("x", "-1", "51", "٣", "9" * 30):
        with pytest.raises(ResumeError):
            resume_point(None, bad, 50)


# -- ingest protocol ----------------------------------------------------------------------------


def test_ingest_session_accepts_a_well_formed_stream():
    s = IngestSession(IngestLimits())
    assert isinstance(s.receive(encode_frame(Hello(site="s", node="n", stream="n:1"))), Hello)
    events = s.receive(encode_frame(Batch([ev(1, id=99), ev(2)])))
    assert [e.seq for e in events] == [1, 2] and events[0].id == 0  # ids are the relay's


def test_ingest_session_refuses_what_the_wire_says_no_relay_accepts():
    s = IngestSession(IngestLimits())
    s.receive(encode_frame(Hello(site="s", node="n", stream="n:1")))
    with pytest.raises(ProtocolError, match="event 1 \\(seq 2\\): path is 65,537 characters"):
        s.receive(encode_frame(Batch([ev(1), ev(2, path="/" * (MAX_PATH + 1))])))


@given(st.binary(max_size=300))
def test_ingest_session_answers_any_bytes_with_a_protocol_error_or_a_message(frame):
    s = IngestSession(IngestLimits())
    try:
        s.receive(frame)
    except ProtocolError as e:
        assert str(e) and e.code in (1003, 1007, 1008, 1009)
