"""The SSE parser is linear and bounded: a peer sending one endless line (or an endless message)
costs the reader one pass over the bytes and at most the limit in memory, then a clear error; a
relay pulling such an upstream drops it, says so, stays healthy and retries."""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator
from itertools import repeat

import pytest
from conftest import Relay, command, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from storage_events import sse
from storage_events.wire import MAX_PATH, MAX_RAW_PATH, Event, event_from_json, event_json

MiB = 1024 * 1024


def parse(*chunks: bytes) -> tuple[list[tuple[str, str, str | None]], str | None, int | None]:
    p = sse.SSEParser()
    msgs = [m for chunk in chunks for m in p.feed(chunk)]
    return [(m.event, m.data, m.id) for m in msgs], p.last_event_id, p.retry_ms


# -- the parser ---------------------------------------------------------------------------------

LINE = st.one_of(
    st.builds(lambda v: b"data: " + v, st.binary(max_size=8)),
    st.builds(lambda v: b"data:" + v, st.sampled_from([b"", b"x", b" y", b"\xff\xfe"])),
    st.sampled_from(
        [
            b"",
            b"",
            b"event: gap",
            b"event:",
            b"id: 7",
            b"id: 1\x002",
            b"id",
            b": comment",
            b"retry: 1500",
            b"retry: 1x",
            b"retry: \xc2\xb2",
            b"data",
            b"nonsense: 1",
        ]
    ),
)
END = st.sampled_from([b"\n", b"\r", b"\r\n"])
STREAM = st.lists(st.tuples(LINE, END), max_size=25).map(
    lambda lines: b"".join(line + end for line, end in lines)
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(stream=STREAM, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_any_chunking_gives_the_messages_of_the_whole_stream(stream: bytes, cuts: list[int]):
    """CR, LF and CRLF end lines; a CRLF cut between its CR and its LF is still one line end.
    Hostile field values (a NUL in an id, a retry that is not ASCII digits) are ignored, as the
    HTML spec says, never an exception."""
    points = sorted({min(c, len(stream)) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert parse(*pieces) == parse(stream)
    assert parse(*(stream[i : i + 1] for i in range(len(stream)))) == parse(stream)


def test_line_ends_across_chunks():
    # A CR ending one chunk and an LF starting the next are one line end, not an empty line
    # (which would end the message early): one message with two data lines.
    assert parse(b"data: a\r", b"\ndata: b\r\n\r\n")[0] == [("message", "a\nb", None)]
    # A message ended by CRs is complete at once: the parser does not wait for the next chunk
    # to see whether an LF follows.
    p = sse.SSEParser()
    assert [m.data for m in p.feed(b"data: now\r\r")] == ["now"]
    assert p.feed(b"\ndata: next\n\n")[0].data == "next"  # that LF closed the CRLF, nothing more
    # More digits than int() takes (4,300) is no retry either, not an exception.
    assert p.feed(b"retry: " + b"9" * 5000 + b"\n") == [] and p.retry_ms is None


def test_an_endless_line_is_refused_once_it_passes_the_limit():
    p = sse.SSEParser()
    chunk = b"x" * 65536
    fed = 0
    with pytest.raises(sse.MessageTooLarge, match="4,194,304 bytes") as refused:
        for _ in range(32 * MiB // len(chunk)):
            fed += len(chunk)
            p.feed(chunk)
    # Refused by the chunk that took it past the limit: no more than that was ever held.
    assert fed <= sse.MAX_MESSAGE + len(chunk)
    assert refused.value.limit == sse.MAX_MESSAGE and isinstance(refused.value, ValueError)
    # An endless message of short lines is refused too: what it holds is its data lines.
    p = sse.SSEParser(max_message=10_000)
    with pytest.raises(sse.MessageTooLarge, match="10,000 bytes"):
        for _ in range(1000):
            p.feed(b"data: " + b"y" * 94 + b"\n")
    # Up to the limit, all is well (the limit counts what a message's lines hold).
    p = sse.SSEParser(max_message=100)
    assert p.feed(b"data:" + b"z" * 95 + b"\n\n")[0].data == "z" * 95


def test_feeding_is_one_pass_over_the_bytes(monkeypatch):
    """The old parser re-joined and re-split its whole buffer for every chunk: quadratic. Now
    each byte is scanned for line ends once, whatever the chunk size."""
    scanned = 0
    split = sse._split_lines

    def counting(chunk: bytes) -> list[bytes]:
        nonlocal scanned
        scanned += len(chunk)
        return split(chunk)

    monkeypatch.setattr(sse, "_split_lines", counting)
    p = sse.SSEParser()
    stream = b"data: " + b"w" * (3 * MiB) + b"\n\n" + sse.render(b"{}", event="inotify", id=1)
    got = []
    for i in range(0, len(stream), 100):
        got += p.feed(stream[i : i + 100])
    assert [m.event for m in got] == ["message", "inotify"]
    assert scanned == len(stream)


def test_the_largest_event_the_wire_allows_fits_with_room_to_spare():
    # Every path character a control character (6 bytes in JSON: \u0001), both raw paths at
    # their limit (base64: 4/3), every list at its longest: about 1.5 MB of JSON.
    name = "r" * 64
    ev = Event(
        site="s" * 256,
        node="n" * 256,
        path="/" + "\x01" * (MAX_PATH - 1),
        old_path="/" + "\x01" * (MAX_PATH - 1),
        raw_path=b"\xff" * MAX_RAW_PATH,
        raw_old_path=b"\xff" * MAX_RAW_PATH,
        flags=["IN_CLOSE_NOWRITE"] * 16,
        ts=1,
        stream="x" * 256,
        seq=1,
        via=[name] * 32,
        id=2**63 - 1,
        origin_id=2**63 - 1,
    )
    data = event_json(ev)
    assert 2 * len(data) < sse.MAX_MESSAGE
    msgs = sse.SSEParser().feed(sse.render(data, event="inotify", id=ev.id))
    assert event_from_json(msgs[0].data) == ev


# -- a relay, and the client, against an upstream that never ends its line ----------------------


class FakeRelay:
    """A tiny HTTP server posing as a relay: ``/healthz`` says ``{"epoch": 1}``, ``/events``
    sends the chunks ``body()`` yields, then holds the connection open until the client goes."""

    def __init__(self, body: Callable[[], Iterable[bytes]]) -> None:
        self.body = body
        self.streams = 0  # /events requests answered
        self.loop = asyncio.new_event_loop()
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            path = (await reader.readuntil(b"\r\n\r\n")).split(b" ", 2)[1].partition(b"?")[0]
            if path == b"/healthz":
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b'Content-Length: 13\r\nConnection: close\r\n\r\n{"epoch": 1}\n'
                )
            elif path == b"/events":
                self.streams += 1
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Connection: close\r\n\r\n"
                )
                for chunk in self.body():
                    writer.write(chunk)
                    await writer.drain()
                await reader.read()
            else:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up: what the endless line is waiting for
        finally:
            writer.close()

    def close(self) -> None:
        async def shut() -> None:
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()  # the connections still open

        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def endless() -> Iterator[FakeRelay]:
    upstream = FakeRelay(lambda: repeat(b"data: " + b"x" * 65530))  # not one line end, ever
    yield upstream
    upstream.close()


def test_a_relay_drops_an_upstream_sending_an_endless_line_and_retries(tmp_path, procs, endless):
    config = tmp_path / "relay.toml"
    config.write_text(f'[[upstream]]\nurl = "{endless.url}"\nbroken_feed_retry = 0.5\n')
    relay = Relay(tmp_path, procs, extra=("--config", str(config)))
    assert relay.proc is not None
    label = endless.url.removeprefix("http://").replace(":", "_")
    wait_for(lambda: endless.streams >= 2, 20, "the relay to pull the upstream again")
    log = relay.proc.output()
    assert f"upstream {label}: " in log and "4,194,304 bytes" in log, log
    assert "dropped the connection, retrying in" in log and "Traceback" not in log, log
    assert relay.healthy()  # and it serves everyone else meanwhile


def test_the_client_stops_with_a_clear_error_on_an_endless_line(endless):
    tail = subprocess.run(
        [command("storage-events"), "tail", endless.url, "--count", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert tail.returncode == 1, tail
    assert f"relay {endless.url}/events sent a feed this client cannot read" in tail.stderr
    assert "4,194,304 bytes" in tail.stderr and "Traceback" not in tail.stderr
    assert endless.streams == 1  # not retried: the same request would get the same answer


def test_the_client_stops_with_a_clear_error_on_an_id_that_is_not_one():
    upstream = FakeRelay(lambda: [b"id: \xc2\xb2\x1b[2J\nevent: inotify\ndata: {}\n\n"])
    try:
        tail = subprocess.run(
            [command("storage-events"), "tail", upstream.url, "--count", "1"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        upstream.close()
    assert tail.returncode == 1, tail
    assert "sent an event id that is not one" in tail.stderr and "Traceback" not in tail.stderr
    assert "\x1b" not in tail.stderr  # shown escaped
    assert upstream.streams == 1  # not retried with it as Last-Event-ID
