"""dCache channels against an attacker: moves on one site, a narrower token, a huge channel.

Pure tests drive the registry and the store directly; the service tests run the HTTP shell's
routing and storage in-process (with a real event log and channel store); one end-to-end test goes
through a real relay.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import jwt
import websockets
from conftest import ChannelReader, Relay
from starlette.requests import Request
from test_channels import BASE, Log, received

from storage_events.relay.auth import Authenticator, JWTConfig
from storage_events.relay.auth import hash_token as h
from storage_events.relay.dcache.api import ChannelService
from storage_events.relay.dcache.channels import Channel, Limits, Registry, Selector
from storage_events.relay.dcache.store import ChannelStore, snapshot
from storage_events.relay.feed.filters import Scope
from storage_events.relay.log.sqlite import SQLiteLog
from storage_events.wire import Batch, Error, Event, Hello, decode_to_agent, encode_frame

SECRET = "a-shared-secret-of-32-bytes-or-more"
WIDE, NARROW = Scope(None, ("/data",)), Scope(None, ("/data/public",))


# -- 1. a move on one site moves a site-less watch for that site only ---------------------------


def test_a_siteless_watch_follows_a_move_on_that_site_only():
    reg = Registry(Limits())
    ch = reg.create("u", Scope(), None, BASE, 0.0)
    run, _ = reg.subscribe(ch, Selector("/d/run"))
    inner, _ = reg.subscribe(ch, Selector("/d/run/sub"))
    on_b, _ = reg.subscribe(ch, Selector("/d/run", site="b"))
    ev = Log()
    got = received(
        reg,
        [
            ev("/d/run", "IN_MOVED_FROM", site="a", is_dir=True, cookie=1),
            ev("/d/run2", "IN_MOVED_TO", site="a", is_dir=True, cookie=1, old="/d/run"),
            ev("/d/run/b.h5", "IN_CLOSE_WRITE", site="b"),  # b's directory did not move
            ev("/d/run/sub/b.h5", "IN_CLOSE_WRITE", site="b"),
            ev("/d/run2/a.h5", "IN_CLOSE_WRITE", site="a"),  # a's did
            ev("/d/run2/sub/a.h5", "IN_CLOSE_WRITE", site="a"),
            ev("/d/run/new.h5", "IN_CLOSE_WRITE", site="a"),  # a's new /d/run is another directory
            ev("/d/run2/x.h5", "IN_CLOSE_WRITE", site="b"),  # b's /d/run2 is not watched
        ],
    )
    assert sorted((sid, p["mask"][0], p.get("name")) for _, _, sid, p in got) == sorted(
        [
            (run.sid, "IN_MOVE_SELF", None),
            (run.sid, "IN_CLOSE_WRITE", "b.h5"),
            (on_b.sid, "IN_CLOSE_WRITE", "b.h5"),
            (inner.sid, "IN_CLOSE_WRITE", "b.h5"),
            (run.sid, "IN_CLOSE_WRITE", "a.h5"),
            (inner.sid, "IN_CLOSE_WRITE", "a.h5"),
        ]
    )
    # The same directory moved on b too: now both sites' events come from the new path; moved
    # back on a, a's events come from the old one again.
    got = received(
        reg,
        [
            ev("/d/run2", "IN_MOVED_TO", site="b", is_dir=True, cookie=2, old="/d/run"),
            ev("/d/run", "IN_MOVED_TO", site="a", is_dir=True, cookie=3, old="/d/run2"),
            ev("/d/run2/b.h5", "IN_CLOSE_WRITE", site="b"),
            ev("/d/run/a.h5", "IN_CLOSE_WRITE", site="a"),
            ev("/d/run2/a.h5", "IN_CLOSE_WRITE", site="a"),
            ev("/d/run/b.h5", "IN_CLOSE_WRITE", site="b"),
        ],
    )
    assert sorted((sid, p.get("name")) for _, _, sid, p in got) == sorted(
        [(run.sid, "b.h5"), (on_b.sid, "b.h5"), (run.sid, "a.h5")]
    )
    assert (on_b.path, on_b.moved) == ("/d/run2", {})
    assert (run.path, run.moved) == ("/d/run", {"b": "/d/run2"})
    # A loss on one site concerns the watch where its object is on that site.
    got = received(
        reg,
        [ev("/d/run/sub", "IN_Q_OVERFLOW", site="a"), ev("/d/run/sub", "IN_Q_OVERFLOW", site="b")],
    )  # b's moved away
    assert sorted(sid for _, _, sid, _ in got) == sorted([run.sid, inner.sid])
    # Subscribing to /d/run again is a new watch: on b, another object has that path now.
    again, new = reg.subscribe(ch, Selector("/d/run"))
    assert new and again.sid != run.sid
    assert reg.subscribe(ch, Selector("/d/run")) == (again, False)
    # Deleting the watches leaves nothing behind in the path index.
    for w in (run, inner, on_b, again):
        reg.unsubscribe(w)
    assert not reg.has_watches and not reg._below


def test_a_move_of_a_siteless_watch_survives_a_restart(tmp_path):
    store, reg = ChannelStore(tmp_path), Registry(Limits())
    ch = reg.create("u", Scope(), None, BASE, 0.0)
    run, _ = reg.subscribe(ch, Selector("/d/run"))
    ev = Log()
    routed = reg.route(
        [ev("/d/run2", "IN_MOVED_TO", site="a", is_dir=True, cookie=1, old="/d/run")]
    )
    assert list(routed.followed.values()) == [ch]  # no event for it, but its watch moved
    store.save([snapshot(ch)], 1)
    store.close()
    store, loaded = ChannelStore(tmp_path), Registry(Limits())
    store.load(loaded, 1.0)
    back = loaded.channels[ch.id].watches[run.sid]
    assert (back.path, back.moved) == ("/d/run", {"a": "/d/run2"})
    assert [
        p.get("name")
        for *_, p in received(
            loaded,
            [
                ev("/d/run/b.h5", "IN_CLOSE_WRITE", site="b"),
                ev("/d/run2/a.h5", "IN_CLOSE_WRITE", site="a"),
                ev("/d/run/a.h5", "IN_CLOSE_WRITE", site="a"),
            ],
        )
    ] == ["b.h5", "a.h5"]
    store.close()


# -- the HTTP shell in-process: a real event log and channel store, no sockets -----------------


def service(tmp_path: Path, jwt_secret: str | None = None) -> ChannelService:
    auth = Authenticator([], JWTConfig(secret=jwt_secret) if jwt_secret else None)
    return ChannelService(
        Registry(Limits()),
        ChannelStore(tmp_path / "channels"),
        SQLiteLog(tmp_path / "log"),
        auth,
        heartbeat=60,
        buffer_bytes=1 << 20,
    )


def token(sub: str, paths: list[str]) -> str:
    return jwt.encode(
        {"sub": sub, "paths": paths, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256"
    )


def get_stream(cid: str, bearer: str) -> Request:
    """What a dCache client's (re)connection to its channel's stream looks like to the shell."""
    return Request(
        {
            "type": "http",
            "method": "GET",
            "path": f"/api/v1/events/channels/{cid}",
            "query_string": b"",
            "path_params": {"cid": cid},
            "headers": [
                (b"accept", b"text/event-stream"),
                (b"authorization", f"Bearer {bearer}".encode()),
            ],
        }
    )


def names(items: list[tuple[int, bytes]]) -> list[str]:
    out = []
    for _, chunk in items:
        data = next(line for line in chunk.decode().split("\n") if line.startswith("data: "))
        out.append(json.loads(data[6:])["event"].get("name"))
    return out


# -- 2. what was routed under a wider token is not delivered under a narrower one --------------


def carols_channel(tmp_path: Path) -> tuple[ChannelService, Channel, str, str]:
    """A service with carol's channel watching /data/secret and /data/public, and two tokens of
    hers: one for /data, one for /data/public only."""
    svc = service(tmp_path, SECRET)
    wide, narrow = token("carol", ["/data"]), token("carol", ["/data/public"])
    ch = svc.registry.create("jwt:carol", WIDE, None, BASE, 0.0)
    svc.registry.subscribe(ch, Selector("/data/secret"))
    svc.registry.subscribe(ch, Selector("/data/public"))
    return svc, ch, wide, narrow


def test_a_reconnect_with_a_narrower_token_gets_nothing_routed_under_the_wider_one(tmp_path):
    async def main() -> None:
        svc, ch, wide, narrow = carols_channel(tmp_path)
        await svc.get_channel(get_stream(ch.id, wide))
        # The routed batch's write is held up, so that the narrower client connects between the
        # routing (under the wide scope) and the delivery to the connected client.
        entered, go = threading.Event(), threading.Event()
        save = svc.store.save

        def held_save(*args: object) -> None:
            entered.set()
            go.wait(10)
            save(*args)

        svc.store.save = held_save  # type: ignore[method-assign]
        ev = Log()
        routed = svc.registry.route(
            [ev("/data/secret/f", "IN_CLOSE_WRITE"), ev("/data/public/g", "IN_CLOSE_WRITE")]
        )
        delivery = asyncio.create_task(svc._apply(routed, 2))
        assert await asyncio.to_thread(entered.wait, 10)
        await svc.get_channel(get_stream(ch.id, narrow))
        go.set()
        await delivery
        assert names(svc.streams[ch.id].take()) == ["g"]
        svc.store.close()

    asyncio.run(main())


def test_the_backlog_is_replayed_as_the_owners_current_token_allows(tmp_path):
    async def main() -> None:
        svc, ch, wide, narrow = carols_channel(tmp_path)
        ev = Log()
        await svc._apply(
            svc.registry.route(
                [
                    ev("/data/secret/f", "IN_CLOSE_WRITE"),
                    ev("/data/public/g", "IN_CLOSE_WRITE"),
                    ev("/data/public/m", "IN_MOVED_TO", cookie=3, old="/data/secret/m"),
                    ev("/data", "IN_Q_OVERFLOW"),
                ]
            ),
            4,
        )

        async def replay(bearer: str) -> list[tuple[int, dict]]:
            svc._channel(get_stream(ch.id, bearer))  # a reconnecting client's request
            out = []
            async for chunk, _ in svc._replay(ch, -1):
                for block in chunk.decode().split("\n\n")[:-1]:
                    fields = dict(line.split(": ", 1) for line in block.split("\n"))
                    out.append((int(fields["id"]), json.loads(fields["data"])["event"]))
            return out

        assert [(i, e.get("cookie") is not None) for i, e in await replay(wide)] == [
            (0, False),
            (1, False),
            (2, True),
            (3, False),
            (4, False),
        ]  # m has its cookie
        assert await replay(narrow) == [
            (1, {"mask": ["IN_CLOSE_WRITE"], "name": "g"}),
            (2, {"mask": ["IN_MOVED_TO"], "name": "m"}),  # its source is no longer in scope
            # A loss at /data concerns /data/public too: both watches' notices.
            (3, {"mask": ["IN_Q_OVERFLOW"]}),
            (4, {"mask": ["IN_Q_OVERFLOW"]}),
        ]
        svc.store.close()

    asyncio.run(main())


OLD_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE channels (id TEXT PRIMARY KEY, owner TEXT NOT NULL, sites TEXT, prefixes TEXT,
    client_id TEXT, url TEXT NOT NULL, timeout INTEGER NOT NULL, next_id INTEGER NOT NULL,
    first_id INTEGER NOT NULL, connected INTEGER NOT NULL, disconnected_at REAL NOT NULL);
CREATE TABLE watches (channel TEXT NOT NULL, sid TEXT NOT NULL, site TEXT, path TEXT NOT NULL,
    mask INTEGER NOT NULL, oneshot INTEGER NOT NULL, selector BLOB NOT NULL,
    PRIMARY KEY (channel, sid)) WITHOUT ROWID;
CREATE TABLE backlog (channel TEXT NOT NULL, id INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (channel, id)) WITHOUT ROWID;
INSERT INTO meta VALUES ('cursor', 7);
INSERT INTO channels VALUES ('c', 'jwt:carol', NULL, '["/data"]', NULL, 'https://r/c', 300,
    2, 0, 0, 1.0);
INSERT INTO watches VALUES ('c', 'w', NULL, '/data/secret', 4095, 0,
    CAST('{"path":"/data/secret"}' AS BLOB));
INSERT INTO backlog VALUES
    ('c', 0, CAST('{"event":{"mask":["IN_CREATE"],"name":"f"},"subscription":"https://r/c/w"}'
                 AS BLOB)),
    ('c', 1, CAST('{"event":{"mask":["IN_CREATE"],"name":"g"},"subscription":"https://r/c/w"}'
                 AS BLOB));
"""


def test_a_database_of_the_first_release_is_migrated_and_its_backlog_does_not_leak(tmp_path):
    (tmp_path / "channels").mkdir()
    old = sqlite3.connect(tmp_path / "channels" / "channels.sqlite3")
    old.executescript(OLD_SCHEMA)
    old.close()

    async def main() -> None:
        svc = service(tmp_path)
        assert svc.cursor == 7
        ch = svc.registry.channels["c"]
        assert ch.watches["w"].moved == {}

        async def replay(scope: Scope) -> list[str]:
            ch.scope = scope
            return [chunk.decode() async for chunk, _ in svc._replay(ch, -1)]

        # Where these events came from was not stored: no narrower scope can be checked.
        narrow = "".join(await replay(NARROW))
        assert "EVENT_LOSS" in narrow and '"name"' not in narrow
        assert "EVENT_LOSS" in "".join(await replay(WIDE))
        everything = "".join(await replay(Scope()))
        assert '"name":"f"' in everything and '"name":"g"' in everything
        assert "EVENT_LOSS" not in everything
        # New rows and watches use the added columns.
        ev = Log()
        ch.scope = WIDE
        await svc._apply(
            svc.registry.route(
                [
                    ev(
                        "/data/secret2",
                        "IN_MOVED_TO",
                        is_dir=True,
                        site="a",
                        cookie=1,
                        old="/data/secret",
                    ),
                    ev("/data/secret2/h", "IN_CREATE", site="a"),
                ]
            ),
            9,
        )
        assert [(i, o.site, o.path) for i, _, o in svc.store.read("c", 1, 10)] == [
            (2, "a", "/data/secret2/h")
        ]
        svc.store.close()
        loaded = Registry(Limits())
        ChannelStore(tmp_path / "channels").load(loaded, 2.0)
        assert loaded.channels["c"].watches["w"].moved == {"a": "/data/secret2"}

    asyncio.run(main())


# -- 3. one channel's 10,000 watches cost nobody else anything -----------------------------------


def test_a_subscription_writes_its_own_rows_not_all_the_channels(tmp_path):
    async def main() -> None:
        svc = service(tmp_path)
        reg, db = svc.registry, svc.store._db
        ch = reg.create("u", Scope(), None, BASE, 0.0)
        for i in range(9_000):
            reg.subscribe(ch, Selector(f"/big/{i}"))
        for i in range(995):
            reg.subscribe(ch, Selector(f"/tree/{i}"))
        await svc._save(ch)

        async def writes() -> int:
            before = db.total_changes
            await svc._save(ch)
            return db.total_changes - before

        # The channel's row, the cursor, and the one watch.
        for sel in (
            Selector("/new/a"),
            Selector("/big/7", ["IN_CREATE"]),
            Selector("/big/8", ["IN_DELETE", "IN_MASK_ADD"]),
            Selector("/new/b", site="s"),
        ):
            reg.subscribe(ch, sel)
            assert await writes() <= 3
        reg.unsubscribe(reg.watch(ch, reg.subscribe(ch, Selector("/big/9"))[0].sid))
        assert await writes() <= 3
        assert await writes() <= 2  # nothing changed: the channel's row and the cursor

        # A directory move writes the watches that moved, and only them.
        assert len(ch.watches) == 9_996
        ev = Log()
        before = db.total_changes
        await svc._apply(
            reg.route([ev("/tree2", "IN_MOVED_TO", is_dir=True, cookie=1, old="/tree")]), 1
        )
        assert db.total_changes - before == 995 + 2  # the watches, the channel, the cursor
        svc.store.close()

    asyncio.run(main())


def watch_state(reg: Registry) -> dict[str, dict[str, tuple]]:
    return {
        cid: {
            sid: (w.site, w.path, w.moved, w.mask, w.oneshot, w.selector)
            for sid, w in ch.watches.items()
        }
        for cid, ch in reg.channels.items()
    }


def test_what_is_stored_is_the_registrys_watches_after_any_mix_of_changes(tmp_path):
    async def main() -> None:
        svc = service(tmp_path)
        reg = svc.registry
        one = reg.create("u", Scope(), None, BASE, 0.0)
        two = reg.create("v", Scope(), None, BASE, 0.0)
        for i in range(20):
            reg.subscribe(one, Selector(f"/t/{i}"))
            reg.subscribe(two, Selector(f"/t/{i}", ["IN_CLOSE_WRITE"], site="a"))
        await svc._save(one)
        await svc._save(two)
        reg.subscribe(one, Selector("/t/3", ["IN_CREATE"]))
        reg.unsubscribe(reg.watch(one, reg.subscribe(one, Selector("/t/4"))[0].sid))
        reg.subscribe(one, Selector("/t/4"))  # again, after the removal
        await svc._save(one)
        reg.unsubscribe(reg.watch(one, reg.subscribe(one, Selector("/t/5"))[0].sid))
        ev = Log()  # `two` sees no event of the move (its mask), yet its watches moved
        await svc._apply(
            reg.route([ev("/u", "IN_MOVED_TO", site="a", is_dir=True, cookie=1, old="/t")]), 1
        )
        assert [w.moved for w in one.watches.values() if w.path == "/t/6"] == [{"a": "/u/6"}]
        await svc._save(one)
        svc.store.close()
        loaded = Registry(Limits())
        ChannelStore(tmp_path / "channels").load(loaded, 1.0)
        assert watch_state(loaded) == watch_state(reg)

    asyncio.run(main())


def test_an_older_snapshot_written_late_does_not_undo_a_newer_one(tmp_path):
    """The stream's synchronous save when its client goes can overtake a routed batch that is
    waiting on the worker thread: the late, older write must not put back older rows."""
    store, reg = ChannelStore(tmp_path), Registry(Limits())
    ch = reg.create("u", Scope(), None, BASE, 0.0)
    reg.subscribe(ch, Selector("/a"))
    older = snapshot(ch)
    reg.subscribe(ch, Selector("/a", ["IN_CREATE"]))
    reg.subscribe(ch, Selector("/b"))
    ch.next_id = 5
    newer = snapshot(ch)
    store.save([newer], None)
    store.save([older], 3)
    store.close()
    loaded = Registry(Limits())
    assert ChannelStore(tmp_path).load(loaded, 1.0) == 3  # the rest of the older write counts
    assert watch_state(loaded) == watch_state(reg) and loaded.channels[ch.id].next_id == 5


# -- end to end: one relay, two sites, one reader with two tokens ------------------------------

RELAY_CONFIG = f"""heartbeat = 0.5

[[token]]
name = "agent-a"
role = "agent"
site = "a"
hash = "{h("secret-agent-a-0123456789")}"

[[token]]
name = "agent-b"
role = "agent"
site = "b"
hash = "{h("secret-agent-b-0123456789")}"

[jwt]
secret = "{SECRET}"
"""


async def publish(relay: Relay, site: str, events: list[Event]) -> None:
    async with websockets.connect(relay.url.replace("http", "ws") + "/ingest") as ws:
        await ws.send(
            encode_frame(
                Hello(
                    site=site,
                    node=f"node-{site}",
                    stream=f"node-{site}:1",
                    token=f"secret-agent-{site}-0123456789",
                )
            )
        )
        assert not isinstance(decode_to_agent(await ws.recv()), Error)
        await ws.send(encode_frame(Batch(events)))
        reply = decode_to_agent(await ws.recv())
        assert not isinstance(reply, Error), reply.message


def event(site: str, seq: int, path: str, flag: str, **kw: object) -> Event:
    return Event(
        site=site,
        node=f"node-{site}",
        path=path,
        flags=[flag],
        ts=1,
        stream=f"node-{site}:1",
        seq=seq,
        **kw,
    )


def test_moves_per_site_and_replay_under_the_current_token_through_the_api(tmp_path, procs):
    config = tmp_path / "relay.toml"
    config.write_text(RELAY_CONFIG)
    relay = Relay(tmp_path, procs, extra=("--config", str(config)))
    wide = {"Authorization": "Bearer " + token("carol", ["/data"])}
    narrow = {"Authorization": "Bearer " + token("carol", ["/data/public"])}
    api = relay.url + "/api/v1/events"
    http = httpx.Client(timeout=10, headers=wide)
    channel = http.post(api + "/channels").headers["location"]

    def subscribe(path: str) -> str:
        r = http.post(channel + "/subscriptions/inotify", json={"path": path})
        assert r.status_code == 201, r.text
        return r.headers["location"]

    secret, public, run = (
        subscribe(p) for p in ("/data/secret", "/data/public", "/data/public/run")
    )
    asyncio.run(
        publish(
            relay,
            "a",
            [
                event("a", 1, "/data/secret/f", "IN_CLOSE_WRITE"),
                event("a", 2, "/data/public/g", "IN_CLOSE_WRITE"),
                event("a", 3, "/data/secret/m", "IN_MOVED_FROM", cookie=7),
                event("a", 4, "/data/public/m", "IN_MOVED_TO", cookie=7, old_path="/data/secret/m"),
                event("a", 5, "/data/public/run", "IN_MOVED_FROM", cookie=8, is_dir=True),
                event(
                    "a",
                    6,
                    "/data/public/run2",
                    "IN_MOVED_TO",
                    cookie=8,
                    is_dir=True,
                    old_path="/data/public/run",
                ),
                event("a", 7, "/data/public/run2/a.h5", "IN_CLOSE_WRITE"),
                event("a", 8, "/data/public/run/new.h5", "IN_CLOSE_WRITE"),  # another directory
            ],
        )
    )
    asyncio.run(publish(relay, "b", [event("b", 1, "/data/public/run/b.h5", "IN_CLOSE_WRITE")]))

    everything = ChannelReader(channel, last_event_id="-1", headers=wide)
    got = everything.wait(9)
    assert [
        (d["subscription"], d["event"]["mask"][0], d["event"].get("name")) for _, _, d in got
    ] == [
        (secret, "IN_CLOSE_WRITE", "f"),
        (public, "IN_CLOSE_WRITE", "g"),
        (secret, "IN_MOVED_FROM", "m"),
        (public, "IN_MOVED_TO", "m"),
        (public, "IN_MOVED_FROM", "run"),
        (run, "IN_MOVE_SELF", None),
        (public, "IN_MOVED_TO", "run2"),
        (run, "IN_CLOSE_WRITE", "a.h5"),
        (run, "IN_CLOSE_WRITE", "b.h5"),  # site b's run did not move
    ]
    assert got[3][2]["event"]["cookie"] == got[2][2]["event"]["cookie"]

    # The same owner with a narrower token: the stored backlog is replayed as it now may see it,
    # and a move from where it may no longer look comes without its cookie.
    limited = ChannelReader(channel, last_event_id="-1", headers=narrow)
    assert everything.wait(10)[-1][2] == {"type": "COMPETING_CLIENT"}
    asyncio.run(
        publish(
            relay,
            "a",
            [
                event("a", 9, "/data/secret/f2", "IN_CLOSE_WRITE"),
                event("a", 10, "/data/public/h", "IN_CLOSE_WRITE"),
            ],
        )
    )
    got = limited.wait(8)
    assert [(i, d["event"].get("name"), "cookie" in d["event"]) for _, i, d in got] == [
        ("1", "g", False),
        ("3", "m", False),
        ("4", "run", True),
        ("5", None, False),
        ("6", "run2", True),
        ("7", "a.h5", False),
        ("8", "b.h5", False),
        ("9", "h", False),
    ]
    limited.stop()
    http.close()


# -- loss notices, once per place and window: a sender looping on them is not multiplied ------


def test_loss_notices_of_one_place_are_coalesced_never_dropped(tmp_path):
    reg = Registry(Limits())
    channels = [reg.create(f"u{i}", Scope(), None, BASE, 0.0) for i in range(3)]
    for ch in channels:
        for k in range(100):
            reg.subscribe(ch, Selector(f"/d/w{k}"))
    ev = Log()
    notices = [ev("/", "IN_Q_OVERFLOW", site="evil", is_dir=True) for _ in range(50)]
    # The first goes out at once, to all 300 watches; the 49 after it in the window are held.
    assert len(reg.route(notices, now=10.0).events) == 300
    assert reg.deferred == {("evil", "/")}
    assert not reg.flush(10.5).events  # still in the window
    # A loss at another place is not held back by this one.
    assert len(reg.route([ev("/d/w1", "IN_Q_OVERFLOW", site="evil")], now=10.6).events) == 3
    # At the window's end the held ones become one more notice: nothing is dropped, so a
    # client that rescanned after the first one learns of what was lost since.
    again = reg.flush(11.0).events
    assert len(again) == 300 and not reg.deferred
    assert {json.loads(d)["event"]["mask"][0] for _, _, d, _ in again} == {"IN_Q_OVERFLOW"}
    # A later one, after a quiet window, goes out at once again.
    reg.flush(12.5)
    assert len(reg.route([ev("/", "IN_Q_OVERFLOW", site="evil")], now=12.6).events) == 300

    # Held notices are stored with the routing cursor that passed them, and come back.
    store = ChannelStore(tmp_path)
    reg.route([ev("/", "IN_Q_OVERFLOW", site="evil")], now=12.7)
    store.save([snapshot(ch) for ch in channels], 99, None, None, sorted(reg.deferred))
    loaded = Registry(Limits())
    assert ChannelStore(tmp_path).load(loaded, 20.0) == 99
    assert loaded.deferred == {("evil", "/")}
    assert len(loaded.flush(time.monotonic()).events) == 300
