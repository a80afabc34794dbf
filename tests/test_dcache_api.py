"""The dCache-compatible channel API, driven the way dCache's own SSE clients drive it, against a
real relay fed by a real agent watching a real tree."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
from conftest import ChannelReader, Relay, agents_connected, start_agent, wait_for

CONFIG = "heartbeat = 0.5\nchannel_backlog = 6\n"


def write(path: Path) -> None:
    path.write_bytes(b"x" * 10)


def inotify(
    i: int, sub: str, mask: list[str], name: str | None = None, cookie: str | None = None
) -> tuple[str, str, dict]:
    event: dict = {"mask": mask}
    if name is not None:
        event["name"] = name
    if cookie is not None:
        event["cookie"] = cookie
    return ("inotify", str(i), {"event": event, "subscription": sub})


def SYSTEM(kind: str, sub: str | None = None) -> tuple[str, None, dict]:
    return ("SYSTEM", None, {"type": kind} | ({"subscription": sub} if sub else {}))


def test_a_dcache_client_works_unchanged(tmp_path, procs):
    config = tmp_path / "relay.toml"
    config.write_text(CONFIG)
    relay = Relay(tmp_path, procs, extra=("--config", str(config)))
    root = tmp_path / "w"
    inbox, outbox = root / "in", root / "out"
    inbox.mkdir(parents=True)
    outbox.mkdir()
    start_agent(tmp_path, procs, relay.url, root)
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    api = relay.url + "/api/v1/events"
    http = httpx.Client(timeout=10, follow_redirects=False)

    # Discovery, and a channel with a client id.
    assert http.get(api).json()["channels"]["lifetimeWhenDisconnected"]["default"] == 300
    assert http.get(api + "/eventTypes").json() == ["inotify"]
    assert http.get(api + "/eventTypes/inotify/selector").json()["required"] == ["path"]
    assert http.get(api + "/eventTypes/metronome").status_code == 404
    r = http.post(api + "/channels", json={"client-id": "ingest"})
    assert r.status_code == 201 and r.content == b""
    channel = r.headers["location"]
    assert channel.startswith(api + "/channels/") and len(channel.rsplit("/", 1)[1]) == 22
    assert http.get(api + "/channels", params={"client-id": "ingest"}).json() == [channel]
    assert http.get(api + "/channels", params={"client-id": "other"}).json() == []
    assert http.get(channel).json() == {"timeout": 300}

    def subscribe(path: Path, flags: list[str] | None = None) -> httpx.Response:
        body: dict = {"path": str(path)}
        if flags is not None:
            body["flags"] = flags
        return http.post(channel + "/subscriptions/inotify", json=body)

    r = subscribe(inbox, ["IN_CLOSE_WRITE", "IN_MOVE", "IN_DELETE"])
    assert r.status_code == 201
    sub_in = r.headers["location"]
    assert sub_in.startswith(channel + "/subscriptions/inotify/")
    r = subscribe(inbox, ["IN_CLOSE_WRITE", "IN_MOVE", "IN_DELETE"])
    assert r.status_code == 303 and r.headers["location"] == sub_in
    for bad in (
        {"path": "relative"},
        {"path": str(inbox) + "/"},
        {"path": str(inbox), "flags": ["IN_EXCL_UNLINK"]},
        {"path": str(inbox), "x": 1},
    ):
        r = http.post(channel + "/subscriptions/inotify", json=bad)
        assert r.status_code == 400 and r.json()["status"] == "400", bad
        assert r.json()["title"] == "Bad Request" and r.json()["detail"]
    assert http.post(channel + "/subscriptions/metronome", json={}).status_code == 400
    assert http.get(sub_in).json() == {
        "path": str(inbox),
        "flags": ["IN_CLOSE_WRITE", "IN_MOVE", "IN_DELETE"],
    }

    # Connected: a second subscription is announced; events arrive in the dCache envelope.
    reader = ChannelReader(channel)
    assert reader.status == 200
    r = subscribe(outbox)
    sub_out = r.headers["location"]
    (inbox / "sub").mkdir()
    write(inbox / "a.h5")
    write(inbox / "sub" / "deep.h5")  # a grandchild: watches are not recursive
    os.rename(inbox / "a.h5", outbox / "a.h5")
    os.unlink(outbox / "a.h5")
    got = reader.wait(5)
    cookie = got[2][2]["event"].get("cookie")
    assert cookie and got[3][2]["event"].get("cookie") == cookie
    assert got == [
        SYSTEM("NEW_SUBSCRIPTION", sub_out),
        inotify(0, sub_in, ["IN_CLOSE_WRITE"], "a.h5"),
        inotify(1, sub_in, ["IN_MOVED_FROM"], "a.h5", cookie),
        inotify(2, sub_out, ["IN_MOVED_TO"], "a.h5", cookie),
        inotify(3, sub_out, ["IN_DELETE"], "a.h5"),
    ]
    assert sorted(http.get(channel + "/subscriptions").json()) == sorted([sub_in, sub_out])

    metrics = http.get(relay.url + "/metrics").text
    assert "storage_events_relay_channels 1.0" in metrics
    assert "storage_events_relay_channel_clients 1.0" in metrics
    assert "storage_events_relay_channel_events_total 4.0" in metrics

    # Disconnected: the backlog fills; reconnecting with Last-Event-ID replays it.
    reader.stop()
    write(inbox / "b.h5")
    write(inbox / "c.h5")
    again = ChannelReader(channel, last_event_id="3")
    assert again.wait(2) == [
        inotify(4, sub_in, ["IN_CLOSE_WRITE"], "b.h5"),
        inotify(5, sub_in, ["IN_CLOSE_WRITE"], "c.h5"),
    ]

    # The newest client wins.
    newest = ChannelReader(channel, last_event_id="5")
    assert again.wait(3)[-1] == SYSTEM("COMPETING_CLIENT")
    assert again.ended.wait(5)

    # A restart keeps the channel, its subscriptions and its backlog, and tells the client.
    relay.proc.stop(signal.SIGTERM)
    assert newest.wait(1) == [SYSTEM("SHUTDOWN")]
    write(inbox / "d.h5")  # the agent keeps it until the relay is back
    relay.start()
    assert sorted(http.get(channel + "/subscriptions").json()) == sorted([sub_in, sub_out])
    back = ChannelReader(channel, last_event_id="5")
    assert back.wait(1) == [inotify(6, sub_in, ["IN_CLOSE_WRITE"], "d.h5")]

    # More than the backlog holds while away: EVENT_LOSS, then what is still held.
    back.stop()
    head = relay.healthy()["head"]
    for i in range(8):
        write(inbox / f"e{i}")
    wait_for(lambda: relay.healthy()["head"] >= head + 16, 20, "16 new events stored")
    late = ChannelReader(channel, last_event_id="6")
    assert late.wait(7) == [SYSTEM("EVENT_LOSS")] + [
        inotify(7 + i, sub_in, ["IN_CLOSE_WRITE"], f"e{i}") for i in range(2, 8)
    ]

    # Ending subscriptions: by DELETE, and by deleting the watched directory.
    assert http.delete(sub_out).status_code == 204
    assert late.wait(9)[7:] == [
        inotify(15, sub_out, ["IN_IGNORED"]),
        SYSTEM("SUBSCRIPTION_CLOSED", sub_out),
    ]
    r = http.get(sub_out)
    assert r.status_code == 404 and r.json()["status"] == "404"
    sub_sub = subscribe(inbox / "sub").headers["location"]
    (inbox / "sub" / "deep.h5").unlink()
    (inbox / "sub").rmdir()
    assert late.wait(15)[9:] == [
        SYSTEM("NEW_SUBSCRIPTION", sub_sub),
        inotify(16, sub_sub, ["IN_DELETE"], "deep.h5"),
        inotify(17, sub_in, ["IN_DELETE", "IN_ISDIR"], "sub"),
        inotify(18, sub_sub, ["IN_DELETE_SELF"]),
        inotify(19, sub_sub, ["IN_IGNORED"]),
        SYSTEM("SUBSCRIPTION_CLOSED", sub_sub),
    ]

    # Lifetime: a channel without a client expires after its timeout; DELETE ends one at once.
    assert http.patch(channel, json={"timeout": 0}).status_code == 400
    assert http.patch(channel, json={"timeout": 1}).status_code == 204
    assert http.get(channel).json() == {"timeout": 1}
    late.stop()
    wait_for(lambda: http.get(channel).status_code == 404, 10, "the channel to expire")
    other = http.post(api + "/channels").headers["location"]
    assert http.delete(other).status_code == 204
    assert http.get(other).status_code == 404
    assert http.get(api + "/channels").json() == []
