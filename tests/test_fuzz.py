"""Property-based fuzzing of the relay's surface with a real relay process: whatever arrives,
the answer is clear, the relay stays up, and a subscriber and an agent notice nothing."""

from __future__ import annotations

import asyncio

import httpx
import msgspec
import websockets
from conftest import Tail, agents_connected, start_agent, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_end_to_end import write

PARAMS = st.sampled_from(["path", "site", "node", "type", "since", "access_token", "x"])
VALUES = st.one_of(
    st.text(max_size=60),
    st.sampled_from(
        [
            "/",
            "/..",
            "../x",
            "earliest",
            "now",
            "-1",
            "99999999999999999999",
            "IN_CREATE",
            "\x00",
            "/a/./b//c/",
            "%2e%2e",
            "\ud800".encode("utf-8", "surrogatepass").decode("latin-1"),
        ]
    ),
)
HEADERS = st.dictionaries(
    st.sampled_from(["Last-Event-ID", "Authorization", "Accept"]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(
        str.strip
    ),  # what HTTP can carry
    max_size=2,
)

INTS = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
FRAMES = st.one_of(
    st.binary(max_size=200),
    st.builds(
        msgspec.msgpack.encode,
        st.recursive(
            st.none() | st.booleans() | INTS | st.text(max_size=20) | st.binary(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=8), inner, max_size=4)
            ),
            max_leaves=12,
        ),
    ),
    st.builds(
        lambda t, body: msgspec.msgpack.encode({"type": t, **body}),
        st.sampled_from(["hello", "batch", "ack", "welcome"]),
        st.dictionaries(
            st.sampled_from(["site", "node", "stream", "events", "token"]),
            st.one_of(st.text(max_size=10), INTS, st.lists(INTS, max_size=3)),
            max_size=5,
        ),
    ),
)

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(["/", "/d", "/d/", "IN_CREATE", "IN_ONESHOT", "IN_DONT_FOLLOW"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["path", "flags", "site", "timeout", "client-id", "x"]),
            inner,
            max_size=4,
        )
    ),
    max_leaves=10,
)
BODIES = st.one_of(JSON.map(lambda v: msgspec.json.encode(v)), st.binary(max_size=100))
SEGMENTS = st.lists(
    st.sampled_from(
        [
            "channels",
            "subscriptions",
            "inotify",
            "eventTypes",
            "selector",
            "event",
            "x",
            "%00",
            "%2e%2e",
            "A" * 300,
        ]
    ),
    max_size=4,
)


def test_hostile_http_and_ingest_input(tmp_path, procs, relay):
    root = tmp_path / "w"
    root.mkdir()
    start_agent(tmp_path, procs, relay.url, root)
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    tail = Tail(tmp_path, procs, relay.url, "--since", "earliest")
    write(root / "before")
    tail.wait_count(2)

    @settings(
        max_examples=150,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(params=st.lists(st.tuples(PARAMS, VALUES), max_size=5), headers=HEADERS)
    def http(params: list[tuple[str, str]], headers: dict[str, str]) -> None:
        with httpx.stream(
            "GET", relay.url + "/events", params=params, headers=headers, timeout=5
        ) as r:
            if r.status_code != 200:
                assert 400 <= r.status_code < 500, r.status_code
                assert r.read().strip(), "an error without a message"
            else:
                assert r.headers["content-type"].startswith("text/event-stream")

    @settings(
        max_examples=80,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(frames=st.lists(FRAMES, min_size=1, max_size=3))
    def ingest(frames: list[bytes]) -> None:
        async def go() -> None:
            async with websockets.connect(relay.url.replace("http", "ws") + "/ingest") as ws:
                try:
                    for frame in frames:
                        await ws.send(frame)
                    while True:
                        await asyncio.wait_for(ws.recv(), 2)
                except websockets.ConnectionClosed as closed:
                    assert closed.rcvd is not None and closed.rcvd.code in (
                        1003,
                        1007,
                        1008,
                        1009,
                    ), closed
                except TimeoutError:
                    pass  # a valid hello with nothing after it: waiting, as it should

        asyncio.run(go())

    api = relay.url + "/api/v1/events"
    channel = httpx.post(api + "/channels").headers["location"]

    @settings(
        max_examples=150,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(
        method=st.sampled_from(["GET", "POST", "PATCH", "DELETE"]),
        segments=SEGMENTS,
        body=BODIES,
        on_channel=st.booleans(),
        last_event_id=st.sampled_from([None, "-5", "x", "99999999999999999999999", "0"]),
    )
    def dcache(
        method: str, segments: list[str], body: bytes, on_channel: bool, last_event_id: str | None
    ) -> None:
        base = channel if on_channel else api
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        url = "/".join([base, *segments])
        with httpx.stream(method, url, content=body, headers=headers, timeout=5) as r:
            assert r.status_code < 500, (method, url, body, r.read())
            if r.status_code >= 400:
                r.read()
                assert r.json()["detail"] and r.json()["status"] == str(r.status_code), r.text

    http()
    ingest()
    dcache()
    write(root / "after")  # the agent and the subscriber noticed nothing
    events = tail.wait_count(4)
    assert [e["path"].rsplit("/", 1)[1] for e in events] == ["before"] * 2 + ["after"] * 2
    assert relay.healthy()["head"] == 4  # nothing from the fuzzer was stored
