"""One subscriber that stops reading must cost the others nothing and lose nothing itself."""

from __future__ import annotations

import asyncio
import socket

import h11
import httpx
import websockets
from conftest import Relay

from storage_events.sse import SSEParser
from storage_events.wire import Batch, Event, Hello, encode_frame

FAST, RATE, SECONDS, BATCH = 100, 5000, 4, 250


async def publish(relay: Relay, total: int) -> None:
    """``total`` events at ``RATE`` per second, in batches, as an agent would."""
    async with websockets.connect(relay.url.replace("http", "ws") + "/ingest") as ws:
        await ws.send(encode_frame(Hello(site="s", node="n", stream="n:fanout")))
        await ws.recv()
        loop = asyncio.get_running_loop()
        start = loop.time()
        for first in range(1, total + 1, BATCH):
            events = [
                Event(
                    site="s",
                    node="n",
                    path=f"/data/run/f{i:06d}",
                    flags=["IN_CLOSE_WRITE"],
                    ts=0,
                    stream="n:fanout",
                    seq=i,
                )
                for i in range(first, min(first + BATCH, total + 1))
            ]
            await ws.send(encode_frame(Batch(events)))
            await ws.recv()
            await asyncio.sleep(max(0.0, start + first / RATE - loop.time()))


async def read_all(client: httpx.AsyncClient, url: str, total: int) -> list[int]:
    ids: list[int] = []
    parser = SSEParser()
    async with client.stream("GET", url + "/events", params={"since": "0"}) as r:
        async for chunk in r.aiter_bytes():
            ids += [int(m.id) for m in parser.feed(chunk) if m.event == "inotify" and m.id]
            if len(ids) >= total:
                return ids
    return ids


def test_a_stalled_subscriber_neither_slows_nor_loses(tmp_path, procs):
    config = tmp_path / "relay.toml"
    config.write_text("subscriber_buffer = 65536\n")  # so the stalled one surely overflows
    relay = Relay(tmp_path, procs, extra=("--config", str(config)))
    total = RATE * SECONDS
    # A subscriber that stops reading: a tiny receive buffer, and nobody calling recv().
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", relay.port))
    http = h11.Connection(h11.CLIENT)
    stalled.sendall(
        http.send(
            h11.Request(method="GET", target="/events?since=0", headers=[("Host", "127.0.0.1")])
        )
    )
    stalled.sendall(http.send(h11.EndOfMessage()))

    async def run() -> list[list[int]]:
        limits = httpx.Limits(max_connections=FAST + 5)
        async with httpx.AsyncClient(timeout=httpx.Timeout(30), limits=limits) as client:
            readers = [asyncio.create_task(read_all(client, relay.url, total)) for _ in range(FAST)]
            await asyncio.sleep(1.0)
            await publish(relay, total)
            return await asyncio.wait_for(asyncio.gather(*readers), 60)

    results = asyncio.run(run())
    expected = list(range(1, total + 1))
    assert all(ids == expected for ids in results), "a fast subscriber missed or repeated"
    assert relay.healthy()["subscribers"] >= 1  # the stalled one is still there
    metrics = httpx.get(relay.url + "/metrics").text
    assert "storage_events_relay_subscriber_overflows_total 0.0" not in metrics  # it overflowed

    # Now the stalled one reads: it gets everything, in order, once (from the log, since its
    # live buffer overflowed long ago).
    stalled.settimeout(10)
    parser, ids = SSEParser(), []
    while len(ids) < total:
        data = stalled.recv(1 << 20)
        assert data, "the relay closed the stalled subscriber"
        http.receive_data(data)
        while (event := http.next_event()) is not h11.NEED_DATA:
            if isinstance(event, h11.Data):
                ids += [int(m.id) for m in parser.feed(event.data) if m.event == "inotify"]
    stalled.close()
    assert ids == expected
