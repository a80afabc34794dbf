"""Hostile or broken ingest clients are closed with a clear reason; everyone else carries on."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
import websockets
from conftest import Relay, Tail, agents_connected, start_agent, wait_for

from storage_events.wire import Batch, Error, Event, Hello, Welcome, decode_to_agent, encode_frame


@pytest.fixture
def small_relay(tmp_path, procs) -> Relay:
    config = tmp_path / "relay.toml"
    config.write_text("max_frame = 65536\nmax_batch = 100\n")
    return Relay(tmp_path, procs, extra=("--config", str(config)))


def ws_url(relay: Relay) -> str:
    return relay.url.replace("http://", "ws://") + "/ingest"


async def refused(relay: Relay, *frames: bytes | str) -> tuple[int, str, list[str]]:
    """Send ``frames``; return the close code, the close reason and any error frames."""
    errors: list[str] = []
    async with websockets.connect(ws_url(relay), max_size=None) as ws:
        for frame in frames:
            await ws.send(frame)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                msg = decode_to_agent(await asyncio.wait_for(ws.recv(), 10))
                if isinstance(msg, Error):
                    errors.append(msg.message)
    rcvd = closed.value.rcvd
    assert rcvd is not None, "the relay dropped the connection without a close frame"
    return rcvd.code, rcvd.reason, errors


def hello(site: str = "evil", stream: str = "n1:1") -> bytes:
    return encode_frame(Hello(site=site, node="n1", stream=stream))


def event(seq: int, **kw) -> Event:
    base = dict(
        site="evil", node="n1", path="/x", flags=["IN_CREATE"], ts=1, stream="n1:1", seq=seq
    )
    return Event(**{**base, **kw})


CASES = [
    ("garbage bytes", [b"\xc1\xc1\xc1 not msgpack"], 1007, "not msgpack"),
    ("text frame", ["hello?"], 1003, "text frames"),
    (
        "wrong type in hello",
        [msgspec.msgpack.encode({"type": "hello", "site": 5})],
        1007,
        "Expected `str`",
    ),
    ("batch before hello", [encode_frame(Batch([event(1)]))], 1008, "first frame must be a hello"),
    ("bad site name", [hello(site="../../etc")], 1008, "site name"),
    (
        "forged site in events",
        [hello(), encode_frame(Batch([event(1, site="cern")]))],
        1008,
        "claims site/node",
    ),
    (
        "foreign stream",
        [hello(), encode_frame(Batch([event(1, stream="other:1")]))],
        1008,
        "belongs to stream",
    ),
    (
        "unknown flag",
        [hello(), encode_frame(Batch([event(1, flags=["IN_NOPE"])]))],
        1008,
        "not inotify flag names",
    ),
    (
        "seq going backwards",
        [hello(), encode_frame(Batch([event(2), event(1)]))],
        1008,
        "go up by one",
    ),
    (
        "too many events",
        [hello(), encode_frame(Batch([event(i) for i in range(1, 102)]))],
        1009,
        "exceeds the limit of 100",
    ),
    ("oversized frame", [hello(), b"\x00" * 70_000], 1009, ""),
]


def test_bad_ingest_clients_are_closed_with_a_reason_while_others_carry_on(
    tmp_path, procs, small_relay
):
    root = tmp_path / "w"
    root.mkdir()
    start_agent(tmp_path, procs, small_relay.url, root)
    wait_for(lambda: agents_connected(small_relay), 10, "agent connection")
    tail = Tail(tmp_path, procs, small_relay.url, "--since", "earliest")

    for i, (what, frames, code, reason) in enumerate(CASES):
        (root / f"before-{i}").write_bytes(b"x")
        got_code, got_reason, errors = asyncio.run(refused(small_relay, *frames))
        assert got_code == code, (what, got_code, got_reason, errors)
        assert reason in got_reason or any(reason in e for e in errors), (what, got_reason, errors)
        (root / f"after-{i}").write_bytes(b"x")

    # The agent and the subscriber noticed nothing: every file arrived, nothing from the intruders.
    expected = 2 * 2 * len(CASES)
    events = tail.wait_count(expected)
    time.sleep(0.5)
    events = tail.events()
    assert len(events) == expected
    assert {e["site"] for e in events} == {"test"}
    assert small_relay.healthy()["head"] == expected


def test_a_clean_resend_of_acknowledged_events_is_stored_once(small_relay):
    async def publish_twice() -> tuple[int, int]:
        acks = []
        for _ in range(2):
            async with websockets.connect(ws_url(small_relay)) as ws:
                await ws.send(hello(site="s1", stream="n1:abc"))
                welcome = decode_to_agent(await ws.recv())
                assert isinstance(welcome, Welcome)
                acks.append(welcome.acked)
                await ws.send(
                    encode_frame(Batch([event(i, site="s1", stream="n1:abc") for i in range(1, 6)]))
                )
                await ws.recv()
        return acks[0], acks[1]

    first, second = asyncio.run(publish_twice())
    assert (first, second) == (0, 5)  # the relay tells a reconnecting agent what it holds
    assert small_relay.healthy()["head"] == 5
