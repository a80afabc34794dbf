"""What dCache's own clients rely on beyond the API's shape, reproduced as they do it: sseclient
0.0.27 (which dCache's reference client and panoptes read channel streams with) taking every
blank-line-terminated block for an event and ``json.loads``-ing its data; SURF's ``ada`` finding a
new channel with a case-sensitive ``awk '/Location:/'``; channel listings built from the request,
as dCache's frontend builds them."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import sseclient
from conftest import Relay, agents_connected, start_agent, wait_for
from test_dcache_api import write

CONFIG = "heartbeat = 0.3\n"


def test_sseclient_on_an_idle_channel_sees_only_events(tmp_path, procs):
    config = tmp_path / "relay.toml"
    config.write_text(CONFIG)
    relay = Relay(tmp_path, procs, extra=("--config", str(config)))
    root = tmp_path / "w"
    root.mkdir()
    start_agent(tmp_path, procs, relay.url, root)
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    api = relay.url + "/api/v1/events"
    channel = httpx.post(api + "/channels").headers["location"]
    httpx.post(channel + "/subscriptions/inotify", json={"path": str(root)})

    got: list = []
    client = sseclient.SSEClient(channel)  # (its own session: requests, as the clients use it)

    def read() -> None:
        for msg in client:  # as the reference client does: every message's data is JSON
            got.append((msg.event, json.loads(msg.data)))
            if len(got) == 2:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(2.0)  # idle for several heartbeats
    write(root / "a")
    reader.join(20)
    assert not reader.is_alive(), f"sseclient saw: {got}"
    assert [event for event, _ in got] == ["inotify", "inotify"]
    assert [data["event"]["mask"] for _, data in got] == [["IN_CREATE"], ["IN_CLOSE_WRITE"]]
    client.resp.close()


def raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        out = b""
        while b"\r\n\r\n" not in out:
            out += s.recv(65536)
        return out


def test_location_is_written_as_dcache_writes_it_and_listings_follow_the_request(tmp_path, procs):
    relay = Relay(tmp_path, procs)
    head = raw(
        relay.port,
        b"POST /api/v1/events/channels HTTP/1.1\r\nHost: localhost:%d\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n" % relay.port,
    )
    assert head.startswith(b"HTTP/1.1 201")
    lines = head.decode().split("\r\n")
    located = [line for line in lines if "Location:" in line]  # ada's awk '/Location:/'
    assert len(located) == 1, lines
    channel = located[0].split(": ", 1)[1]
    assert channel.startswith(f"http://localhost:{relay.port}/api/v1/events/channels/")
    cid = channel.rsplit("/", 1)[1]

    # Listed through another name of the relay, as that name (dCache builds them per request).
    other = f"http://127.0.0.1:{relay.port}/api/v1/events/channels"
    assert httpx.get(other).json() == [f"{other}/{cid}"]
    # A subscription keeps the URL it was given: the events it routes name it, and clients
    # (the reference client) look their watch up by it.
    r = httpx.post(f"{other}/{cid}/subscriptions/inotify", json={"path": "/data"})
    assert r.headers["location"].startswith(f"{channel}/subscriptions/inotify/")
    assert httpx.get(f"{other}/{cid}/subscriptions").json() == [r.headers["location"]]
