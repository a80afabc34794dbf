"""What dCache's own clients rely on beyond the API's shape, reproduced as they do it: sseclient
0.0.27 (which dCache's reference client and panoptes read channel streams with) taking every
blank-line-terminated block for an event and ``json.loads``-ing its data; SURF's ``ada`` finding a
new channel with a case-sensitive ``awk '/Location:/'``; channel listings built from the request,
as dCache's frontend builds them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time

import httpx
import sseclient
from conftest import Relay, agents_connected, command, start_agent, wait_for
from sseclient import SSEClient
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


def test_dcaches_clients_from_pypi_drive_a_channel_as_their_programs_do(tmp_path, procs):
    """dcacheclient (dcache-admin's library) makes the channel and its watch with a Basic
    login; sseclient 0.0.27 reads it exactly as the reference client's main loop does
    (``SSEClient(channel, session=s, last_id=...)``, ``json.loads(msg.data)`` of every message,
    ``last_id = msg.id``): a rename's halves with one cookie, resuming with Last-Event-ID,
    EVENT_LOSS after a backlog overrun, COMPETING_CLIENT, and an idle minute meanwhile."""
    import requests
    from dcacheclient.client import Client

    password = "a good long password"
    entry = subprocess.run(
        [command("storage-events-relay"), "user", "add", "alice", "--password-stdin"],
        input=password + "\n",
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    agent = subprocess.run(
        [
            command("storage-events-relay"),
            "token",
            "--name",
            "a",
            "--role",
            "agent",
            "--site",
            "test",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    agent_token = agent.split("\n", 1)[0].removeprefix("token: ")
    config = tmp_path / "relay.toml"
    config.write_text(
        "heartbeat = 0.5\nchannel_backlog = 6\n"
        + entry.split("\n", 1)[1]
        + agent.split("\n\n", 1)[1].split("\n", 1)[1]
    )
    relay = Relay(tmp_path, procs, extra=("--config", str(config)), token=agent_token)
    root = tmp_path / "w"
    inbox, outbox = root / "in", root / "out"
    inbox.mkdir(parents=True)
    outbox.mkdir()
    start_agent(tmp_path, procs, relay.url, root, extra=("--token", agent_token))
    wait_for(lambda: agents_connected(relay), 10, "agent connection")

    dcache = Client(relay.url, username="alice", password=password)
    s = requests.Session()  # the reference client's session: Basic, as its --user gives
    s.auth = ("alice", password)

    def channel_with(path) -> str:
        channel = dcache.events.register().headers["Location"]
        cid = channel.rsplit("/", 1)[1]
        made = dcache.events.subscribe(id=cid, type="inotify", body={"path": str(path)})
        assert made.status_code == 201
        return channel

    # An idle minute on a channel of its own, read the same way, beside all that follows.
    idle_channel = channel_with(outbox)
    idle: list = []

    def read_idle() -> None:
        for msg in SSEClient(idle_channel, session=s):
            idle.append((msg.event, json.loads(msg.data)))
            if idle[-1][0] == "inotify":
                return

    idle_reader = threading.Thread(target=read_idle, daemon=True)
    idle_reader.start()
    started = time.monotonic()

    channel = channel_with(inbox)
    got: list = []
    last = {"id": None}

    readers: list[SSEClient] = []
    done = threading.Event()
    crashed: list[Exception] = []  # what would have stopped the reference client

    def read(last_id=None, stop_after=None, into=got):
        client = (
            SSEClient(channel, session=s, last_id=last_id)
            if last_id
            else SSEClient(channel, session=s)
        )
        readers.append(client)
        try:
            for msg in client:
                # As the reference client does, for every message: an empty one would crash it.
                into.append((msg.event, json.loads(msg.data), msg.id))
                if msg.id:
                    last["id"] = msg.id
                if stop_after is not None and len(into) >= stop_after:
                    return
        except Exception as e:
            if not done.is_set():  # (not the end of the test closing it)
                crashed.append(e)
        finally:
            client.resp.close()

    first = threading.Thread(target=read, kwargs={"stop_after": 3}, daemon=True)
    first.start()
    time.sleep(1.0)
    write(inbox / "a.h5")
    os.rename(inbox / "a.h5", inbox / "b.h5")
    first.join(20)
    assert [d["event"]["mask"] for _, d, _ in got] == [
        ["IN_CREATE"],
        ["IN_CLOSE_WRITE"],
        ["IN_MOVED_FROM"],
    ]
    # The other half comes on resuming from the last id seen, with the same cookie.
    after: list = []
    resumed = threading.Thread(
        target=read, kwargs={"last_id": last["id"], "stop_after": 1, "into": after}, daemon=True
    )
    resumed.start()
    resumed.join(20)
    assert after[0][1]["event"]["mask"] == ["IN_MOVED_TO"]
    assert after[0][1]["event"]["cookie"] == got[2][1]["event"]["cookie"]
    assert after[0][1]["event"]["name"] == "b.h5"

    # Away while more than the backlog (6) arrives: EVENT_LOSS first on return.
    mark, head = last["id"], relay.healthy()["head"]
    for i in range(6):
        write(inbox / f"e{i}")
    wait_for(lambda: relay.healthy()["head"] >= head + 12, 20, "the writes stored")
    lost: list = []
    back = threading.Thread(
        target=read, kwargs={"last_id": mark, "stop_after": 2, "into": lost}, daemon=True
    )
    back.start()
    back.join(20)
    assert lost[0][0] == "SYSTEM" and lost[0][1]["type"] == "EVENT_LOSS"

    # The newest client wins: the one before is told COMPETING_CLIENT.
    older: list = []
    holder = threading.Thread(
        target=read, kwargs={"last_id": last["id"], "into": older}, daemon=True
    )
    holder.start()
    time.sleep(1.0)
    newer = threading.Thread(
        target=read, kwargs={"last_id": last["id"], "stop_after": 1, "into": []}, daemon=True
    )
    newer.start()
    wait_for(
        lambda: any(e == "SYSTEM" and d["type"] == "COMPETING_CLIENT" for e, d, _ in older),
        20,
        "COMPETING_CLIENT",
    )

    # The idle reader: a minute of keep-alives without a message, then the event.
    time.sleep(max(0.0, 60 - (time.monotonic() - started)))
    assert idle_reader.is_alive() and idle == []
    write(outbox / "after-a-minute")
    idle_reader.join(20)
    assert [(e, d["event"]["name"]) for e, d in idle] == [("inotify", "after-a-minute")]
    dcache.close()
    done.set()
    for client in readers:  # (the one told COMPETING_CLIENT reconnects, as it should)
        client.resp.close()
    holder.join(10)
    assert crashed == []
