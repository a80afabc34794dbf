"""The dCache channel core without sockets: selectors, routing into watches, resume points."""

from __future__ import annotations

import json

import pytest

from storage_events.relay.dcache.channels import (
    Channel,
    ChannelError,
    Limits,
    Registry,
    Selector,
    parse_selector,
    resume,
)
from storage_events.relay.feed.filters import Scope
from storage_events.relay.log.base import make_record
from storage_events.wire import Event, event_json, flags_mask

BASE = "https://relay.example:8808/api/v1/events/channels"


class Log:
    def __init__(self) -> None:
        self.next = 1

    def __call__(
        self,
        path: str,
        flag: str,
        *,
        site: str = "s",
        node: str = "n",
        is_dir: bool = False,
        cookie: int | None = None,
        old: str | None = None,
    ):
        ev = Event(
            id=self.next,
            site=site,
            node=node,
            path=path,
            flags=[flag],
            is_dir=is_dir,
            cookie=cookie,
            old_path=old,
            ts=1,
            stream="x",
            seq=self.next,
        )
        self.next += 1
        return make_record(ev.id, site, node, path, flags_mask(ev.flags), event_json(ev))


def received(reg: Registry, records) -> list[tuple[str, int, str, dict]]:
    """(channel, id, subscription sid, payload) for everything routed."""
    out = []
    for ch, i, data, _ in reg.route(records).events:
        env = json.loads(data)
        out.append((ch.id, i, env["subscription"].rsplit("/", 1)[1], env["event"]))
    return out


@pytest.fixture
def reg() -> Registry:
    return Registry(Limits(per_user=3, backlog=5))


def channel(reg: Registry, owner: str = "u", scope: Scope | None = None) -> Channel:
    return reg.create(owner, scope or Scope(), None, BASE, 0.0)


def test_directory_watch_sees_direct_children_only_with_child_names(reg):
    ch = channel(reg)
    w, new = reg.subscribe(ch, Selector("/data/in"))
    assert new and len(w.sid) == 24 and w.url == f"{ch.url}/subscriptions/inotify/{w.sid}"
    ev = Log()
    got = received(
        reg,
        [
            ev("/data/in/a.h5", "IN_CREATE"),
            ev("/data/in/a.h5", "IN_CLOSE_WRITE"),
            ev("/data/in/sub", "IN_CREATE", is_dir=True),
            ev("/data/in/sub/deep.h5", "IN_CLOSE_WRITE"),  # a grandchild: not recursive
            ev("/data/inbox/x", "IN_CREATE"),  # a sibling whose name shares the prefix
            ev("/data/in", "IN_ATTRIB", is_dir=True),  # the directory itself
        ],
    )
    assert got == [
        (ch.id, 0, w.sid, {"mask": ["IN_CREATE"], "name": "a.h5"}),
        (ch.id, 1, w.sid, {"mask": ["IN_CLOSE_WRITE"], "name": "a.h5"}),
        (ch.id, 2, w.sid, {"mask": ["IN_CREATE", "IN_ISDIR"], "name": "sub"}),
        (ch.id, 3, w.sid, {"mask": ["IN_ATTRIB", "IN_ISDIR"]}),
    ]


def test_flags_select_events_and_a_repeat_merges_or_adds(reg):
    ch = channel(reg)
    w, _ = reg.subscribe(ch, Selector("/d", ["IN_CLOSE"]))
    ev = Log()
    records = [ev("/d/f", "IN_CREATE"), ev("/d/f", "IN_CLOSE_WRITE"), ev("/d/f", "IN_DELETE")]
    assert [p["mask"] for *_, p in received(reg, records)] == [["IN_CLOSE_WRITE"]]
    same, new = reg.subscribe(ch, Selector("/d", ["IN_DELETE", "IN_MASK_ADD"]))
    assert same is w and not new
    assert [p["mask"] for *_, p in received(reg, records)] == [["IN_CLOSE_WRITE"], ["IN_DELETE"]]
    reg.subscribe(ch, Selector("/d", ["IN_CREATE"]))  # replaces
    assert [p["mask"] for *_, p in received(reg, records)] == [["IN_CREATE"]]


def test_rename_halves_share_a_cookie_and_a_moved_watch_follows_its_directory(reg):
    ch = channel(reg)
    src, _ = reg.subscribe(ch, Selector("/d/in"))
    dst, _ = reg.subscribe(ch, Selector("/d/out"))
    moved, _ = reg.subscribe(ch, Selector("/d/in/run"))
    ev = Log()
    got = received(
        reg,
        [
            ev("/d/in/run", "IN_MOVED_FROM", is_dir=True, cookie=9),
            ev("/d/out/run", "IN_MOVED_TO", is_dir=True, cookie=9, old="/d/in/run"),
            ev("/d/out/run/f", "IN_CLOSE_WRITE"),
        ],
    )
    cookie = got[0][3]["cookie"]
    assert got == [
        (
            ch.id,
            0,
            src.sid,
            {"mask": ["IN_MOVED_FROM", "IN_ISDIR"], "name": "run", "cookie": cookie},
        ),
        (ch.id, 1, moved.sid, {"mask": ["IN_MOVE_SELF"]}),
        (ch.id, 2, dst.sid, {"mask": ["IN_MOVED_TO", "IN_ISDIR"], "name": "run", "cookie": cookie}),
        (ch.id, 3, moved.sid, {"mask": ["IN_CLOSE_WRITE"], "name": "f"}),
    ]
    assert moved.path_on("s") == "/d/out/run"  # on the site where it moved
    # Another node's rename with the same kernel cookie is another rename.
    other = received(reg, [ev("/d/in/z", "IN_MOVED_FROM", node="n2", cookie=9)])
    assert other[0][3]["cookie"] != cookie


def test_deleted_directory_ends_its_watch_and_oneshot_ends_after_one_event(reg):
    ch = channel(reg)
    gone, _ = reg.subscribe(ch, Selector("/d/gone"))
    once, _ = reg.subscribe(ch, Selector("/d/once", ["IN_CLOSE_WRITE", "IN_ONESHOT"]))
    ev = Log()
    routed = reg.route(
        [
            ev("/d/gone", "IN_DELETE", is_dir=True),
            ev("/d/once/a", "IN_CLOSE_WRITE"),
            ev("/d/once/b", "IN_CLOSE_WRITE"),
        ]
    )
    payloads = [
        (json.loads(d)["subscription"].rsplit("/", 1)[1], json.loads(d)["event"])
        for _, _, d, _ in routed.events
    ]
    assert payloads == [
        (gone.sid, {"mask": ["IN_DELETE_SELF"]}),
        (gone.sid, {"mask": ["IN_IGNORED"]}),
        (once.sid, {"mask": ["IN_CLOSE_WRITE"], "name": "a"}),
        (once.sid, {"mask": ["IN_IGNORED"]}),
    ]
    assert routed.closed == [gone, once] and ch.watches == {}


def test_overflow_reaches_every_watch_it_may_concern(reg):
    ch = channel(reg)
    inside, _ = reg.subscribe(ch, Selector("/data/a/b", ["IN_CREATE"]))
    reg.subscribe(ch, Selector("/elsewhere"))
    reg.subscribe(ch, Selector("/data/c", site="t"))  # another site's loss only
    scoped = channel(reg, owner="v", scope=Scope(frozenset({"t"}), None))
    reg.subscribe(scoped, Selector("/data/a"))  # may read site t only
    ev = Log()
    got = received(reg, [ev("/data", "IN_Q_OVERFLOW")])  # site s lost events
    assert got == [(ch.id, 0, inside.sid, {"mask": ["IN_Q_OVERFLOW"]})]


def test_scope_limits_subscriptions_and_events(reg):
    ch = channel(reg, scope=Scope(frozenset({"a"}), ("/pub",)))
    with pytest.raises(ChannelError, match="Permission denied") as e:
        reg.subscribe(ch, Selector("/private"))
    assert e.value.status == 400
    with pytest.raises(ChannelError, match="Permission denied"):
        reg.subscribe(ch, Selector("/pub", site="b"))
    w, _ = reg.subscribe(ch, Selector("/pub"))
    ev = Log()
    got = received(
        reg,
        [
            ev("/pub/x", "IN_CREATE", site="b"),
            ev("/pub/y", "IN_CREATE", site="a"),
            ev("/pub/m", "IN_MOVED_TO", site="a", cookie=1, old="/private/m"),
        ],
    )
    assert got == [
        (ch.id, 0, w.sid, {"mask": ["IN_CREATE"], "name": "y"}),
        (ch.id, 1, w.sid, {"mask": ["IN_MOVED_TO"], "name": "m"}),
    ]  # no cookie


def test_site_selector_and_channels_are_independent(reg):
    one, two = channel(reg), channel(reg, owner="v")
    w1, _ = reg.subscribe(one, Selector("/d", site="a"))
    w2, _ = reg.subscribe(two, Selector("/d"))
    ev = Log()
    got = received(reg, [ev("/d/x", "IN_CREATE", site="b"), ev("/d/y", "IN_CREATE", site="a")])
    assert sorted((c, i, s, p["name"]) for c, i, s, p in got) == sorted(
        [(two.id, 0, w2.sid, "x"), (one.id, 0, w1.sid, "y"), (two.id, 1, w2.sid, "y")]
    )


@pytest.mark.parametrize(
    "body, message",
    [
        (b"", "needs a JSON selector"),
        (b"{", "not valid JSON"),
        (b'{"path": 7}', "Expected `str`"),
        (b'{"flags": ["IN_CREATE"]}', "missing required field `path`"),
        (b'{"path": "/d", "recursive": true}', "unknown field `recursive`"),
        (b'{"path": "d"}', "must be absolute"),
        (b'{"path": "/d/"}', "must be absolute"),
        (b'{"path": "/d/../e"}', "must be absolute"),
        (b'{"path": "/d//e"}', "must be absolute"),
        (b'{"path": "/d", "flags": ["IN_DONT_FOLLOW"]}', "IN_DONT_FOLLOW is not supported"),
        (b'{"path": "/d", "flags": ["IN_MOVE_FROM"]}', "unknown flag 'IN_MOVE_FROM'"),
        (b'{"path": "/d", "flags": "IN_CREATE"}', "Expected `array"),
        (b'{"path": "/d", "flags": ["IN_ONESHOT"]}', "no event to watch"),
    ],
)
def test_bad_selectors_are_400_with_the_reason(reg, body, message):
    with pytest.raises(ChannelError, match=message) as e:
        reg.subscribe(channel(reg), parse_selector(body))
    assert e.value.status == 400


def test_channel_ownership_limits_and_timeouts(reg):
    mine = channel(reg)
    with pytest.raises(ChannelError) as e:
        reg.get(mine.id, "someone-else")
    assert e.value.status == 403
    with pytest.raises(ChannelError) as e:
        reg.get("nope", "u")
    assert e.value.status == 404
    channel(reg), channel(reg)
    with pytest.raises(ChannelError) as e:
        channel(reg)
    assert e.value.status == 429
    for bad in (0, 86401, "5", True, 1.5):
        with pytest.raises(ChannelError):
            reg.set_timeout(mine, bad)
    reg.set_timeout(mine, 10)
    reg.connect(mine)
    assert mine not in reg.expired(1000.0)
    reg.disconnect(mine, 1000.0)
    assert mine not in reg.expired(1009.0) and mine in reg.expired(1010.0)


def test_resume_points():
    ch = Channel("c", "u", Scope(), None, BASE + "/c", 300, next_id=10, first_id=5)
    assert resume(ch, None) == (None, False)  # live only, as in dCache
    assert resume(ch, "abc") == (None, False)
    assert resume(ch, "--1") == (None, False)
    assert resume(ch, "9" * 40) == (None, False)
    assert resume(ch, "7") == (7, False)
    assert resume(ch, "4") == (4, False)  # everything after 4 is still held
    assert resume(ch, "9") == (9, False)
    assert resume(ch, "3") == (4, True)  # 4 is gone: EVENT_LOSS, then what is held
    assert resume(ch, "12") == (4, True)  # not an id this channel gave
    fresh = Channel("c", "u", Scope(), None, BASE + "/c", 300)
    assert resume(fresh, "-1") == (-1, False)


def test_backlog_keeps_the_newest(reg):
    ch = channel(reg)
    reg.subscribe(ch, Selector("/d"))
    ev = Log()
    reg.route([ev(f"/d/{i}", "IN_CREATE") for i in range(8)])
    reg.trimmed(ch)
    assert (ch.first_id, ch.next_id) == (3, 8)


def test_the_store_keeps_channels_watches_and_backlog_across_a_restart(tmp_path):
    from storage_events.relay.dcache.store import ChannelStore, saved, snapshot

    store, reg = ChannelStore(tmp_path), Registry(Limits())
    ch = reg.create("u", Scope(frozenset({"s"}), ("/d",)), "client", BASE, 5.0)
    w, _ = reg.subscribe(ch, Selector("/d/in", ["IN_CREATE"]))
    ev = Log()
    routed = reg.route([ev("/d/in/a", "IN_CREATE"), ev("/d/in/b", "IN_CREATE")])
    first = snapshot(ch)
    store.save([first], 2, [(c.id, i, data, o) for c, i, data, o in routed.events])
    saved(ch, first)
    again = snapshot(ch)
    assert again.watches == again.removed == []  # unchanged watches are not written again
    store.save([again], 2)
    store.close()

    store, loaded = ChannelStore(tmp_path), Registry(Limits())
    assert store.load(loaded, 9.0) == 2
    back = loaded.channels[ch.id]
    assert (back.owner, back.client_id, back.scope, back.next_id) == ("u", "client", ch.scope, 2)
    assert list(back.watches) == [w.sid] and back.watches[w.sid].selector.flags == ["IN_CREATE"]
    assert [i for i, *_ in store.read(ch.id, -1, 10)] == [0, 1]
    assert received(loaded, [ev("/d/in/c", "IN_CREATE")])[0][1] == 2  # ids carry on
    store.close()
