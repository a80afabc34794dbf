"""The namespace view without sockets: what events do to a tree (storage_events.namespace), in
memory (Mirror) and in the relay's SQLite tables, checked against a model file system that
random operations change as a real one would report them."""

from __future__ import annotations

import random
import sqlite3

import msgspec
import pytest

from storage_events.namespace import MOVE_WAIT_NS, Mirror, as_event, as_moving, path_of
from storage_events.relay.state import tables
from storage_events.relay.state.tables import Tables, decode_entry
from storage_events.wire import Event

ROOT = "/data"


class Model:
    """A file system under ROOT, and the events an agent publishes for each change."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.tree: dict[str, bool] = {ROOT: True}  # path → is a directory
        self.events: list[Event] = []
        self.seq = 0
        self.ts = 10**18
        self.cookie = 0

    def _emit(self, path: str, flag: str, is_dir: bool, **kw: object) -> None:
        self.seq += 1
        self.ts += 1000
        self.events.append(
            Event(
                id=self.seq,
                site="s",
                node="n",
                path=path,
                flags=[flag],
                is_dir=is_dir,
                ts=self.ts,
                stream="n:1",
                seq=self.seq,
                size=self.seq if not is_dir else None,
                **kw,  # type: ignore[arg-type]
            )
        )

    def dirs(self) -> list[str]:
        return [p for p, d in self.tree.items() if d]

    def below(self, path: str) -> list[str]:
        return [p for p in self.tree if p.startswith(path + "/")]

    def step(self) -> None:
        rng = self.rng
        kind = rng.choice(["file", "file", "dir", "write", "rename", "rename", "delete", "out"])
        parent = rng.choice(self.dirs())
        name = f"{parent}/{rng.choice('abcdefg')}{rng.randrange(4)}"
        others = [p for p in self.tree if p != ROOT]
        if kind in ("file", "dir") and name not in self.tree:
            self.tree[name] = kind == "dir"
            self._emit(name, "IN_CREATE", kind == "dir")
            if kind == "file":
                self._emit(name, "IN_CLOSE_WRITE", False)
        elif kind == "write" and others:
            path = rng.choice(others)
            if not self.tree[path]:
                self._emit(path, "IN_CLOSE_WRITE", False)
        elif kind == "delete" and others:
            path = rng.choice(others)
            for p in [*sorted(self.below(path), key=len, reverse=True), path]:
                self._emit(p, "IN_DELETE", self.tree.pop(p))
        elif kind in ("rename", "out") and others:
            path = rng.choice(others)
            if name == path or name.startswith(path + "/"):
                return
            is_dir = self.tree[path]
            self.cookie += 1
            self._emit(path, "IN_MOVED_FROM", is_dir, cookie=self.cookie)
            moved = {p: self.tree.pop(p) for p in [path, *self.below(path)]}
            if kind == "out":  # out of the watched tree: no second half
                return
            if name in self.tree:  # onto an existing name: the agent reports what goes
                for p in [*sorted(self.below(name), key=len, reverse=True), name]:
                    self._emit(p, "IN_DELETE", self.tree.pop(p))
            for p, d in moved.items():
                self.tree[name + p[len(path) :]] = d
            self._emit(name, "IN_MOVED_TO", is_dir, cookie=self.cookie, old_path=path)

    def final(self) -> dict[str, bool]:
        return {p: d for p, d in self.tree.items() if p != ROOT}


def _db() -> tuple[sqlite3.Connection, Tables]:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    return conn, Tables(conn)


def _view(conn: sqlite3.Connection) -> dict[str, bool]:
    out = {}
    for site in tables.sites(conn):
        for key, blob in tables.walk(conn, site, b"/"):
            if blob is not None:
                out[path_of(key)[0]] = decode_entry(blob).is_dir
    return out


def _apply(conn: sqlite3.Connection, t: Tables, events: list[Event], now: int = 0) -> None:
    conn.execute("BEGIN")
    t.apply(conn, events, now)
    conn.execute("COMMIT")


@pytest.mark.parametrize("seed", range(30))
def test_view_and_mirror_end_as_the_tree_is(seed: int) -> None:
    rng = random.Random(seed)
    model = Model(rng)
    for _ in range(400):
        model.step()
    conn, t = _db()
    events = model.events
    i = 0
    while i < len(events):  # in batches of every size, as commits group them
        n = rng.randint(1, 40)
        _apply(conn, t, events[i : i + n])
        i += n
    mirror = Mirror()
    for ev in events:
        mirror.apply(ev)
    assert _view(conn) == model.final()
    assert mirror.paths() == model.final()
    assert t.applied == events[-1].id


def _snapshot(conn: sqlite3.Connection) -> list[Event]:
    """What a snapshot sends as ``state``: every entry, and what waits for a rename's second
    half as that first half."""
    out = [
        as_event(site, key, decode_entry(blob))
        for site in tables.sites(conn)
        for key, blob in tables.walk(conn, site, b"/")
        if blob is not None
    ]
    for cookie, half, site, key, blob in tables.moving(conn):
        if blob is not None:
            out.append(as_moving(site, key, decode_entry(blob), decode_entry(half), cookie))
    return out


@pytest.mark.parametrize("seed", range(30))
def test_a_snapshot_at_any_point_then_the_events_after_it_make_the_tree(seed: int) -> None:
    """Between the halves of a rename too: what was set aside comes with the snapshot."""
    rng = random.Random(1000 + seed)
    model = Model(rng)
    for _ in range(300):
        model.step()
    events = model.events
    # Cut between the halves of a directory's rename where there is one.
    halves = [
        i
        for i, ev in enumerate(events)
        if ev.flags == ["IN_MOVED_FROM"] and ev.is_dir and i + 1 < len(events)
    ]
    cut = rng.choice(halves) + 1 if halves and seed % 2 else rng.randrange(len(events))
    conn, t = _db()
    _apply(conn, t, events[:cut])
    mirror = Mirror()
    for ev in _snapshot(conn):
        mirror.apply_state(ev)
    for ev in events[cut:]:
        mirror.apply(ev)
    assert mirror.paths() == model.final()


def test_a_directory_moved_out_of_the_tree_is_forgotten_once_its_stream_moves_on() -> None:
    conn, t = _db()
    ev = dict(site="s", node="n", stream="n:1", is_dir=True)
    first = [
        Event(id=1, path="/d", flags=["IN_CREATE"], ts=1, seq=1, **ev),  # type: ignore[arg-type]
        Event(id=2, path="/d/f", flags=["IN_CREATE"], ts=2, seq=2, **ev),  # type: ignore[arg-type]
        Event(id=3, path="/d", flags=["IN_MOVED_FROM"], cookie=7, ts=3, seq=3, **ev),  # type: ignore[arg-type]
    ]
    _apply(conn, t, first)
    assert _view(conn) == {}
    assert len(list(tables.moving(conn))) == 2  # set aside: its second half may come
    later = Event(id=4, path="/e", flags=["IN_CREATE"], ts=3 + MOVE_WAIT_NS + 1, seq=4, **ev)  # type: ignore[arg-type]
    _apply(conn, t, [later])
    assert list(tables.moving(conn)) == []
    assert _view(conn) == {"/e": True}
    # Reloaded from the tables, as a restarted relay would: nothing waits any more.
    assert len(Tables(conn)._waiting) == 0


def test_what_waits_for_a_second_half_survives_a_restart() -> None:
    conn, t = _db()
    ev = dict(site="s", node="n", stream="n:1", is_dir=True)
    _apply(
        conn,
        t,
        [
            Event(id=1, path="/d", flags=["IN_CREATE"], ts=1, seq=1, **ev),  # type: ignore[arg-type]
            Event(id=2, path="/d/x", flags=["IN_CREATE"], ts=2, seq=2, **ev),  # type: ignore[arg-type]
            Event(id=3, path="/d", flags=["IN_MOVED_FROM"], cookie=9, ts=3, seq=3, **ev),  # type: ignore[arg-type]
        ],
    )
    again = Tables(conn)
    to = Event(id=4, path="/e", flags=["IN_MOVED_TO"], cookie=9, old_path="/d", ts=4, seq=4, **ev)  # type: ignore[arg-type]
    _apply(conn, again, [to])
    assert _view(conn) == {"/e": True, "/e/x": True}


def test_names_that_are_not_utf8_stay_apart() -> None:
    conn, t = _db()
    evs = [
        Event(
            id=i,
            site="s",
            node="n",
            path="/d/\ufffd",
            raw_path=raw,
            flags=["IN_CREATE"],
            ts=i,
            stream="n:1",
            seq=i,
        )
        for i, raw in ((1, b"/d/\xff"), (2, b"/d/\xfe"))
    ]
    _apply(conn, t, evs)
    keys = [key for key, _ in tables.walk(conn, "s", b"/d")]
    assert keys == [b"/d", b"/d/\xfe", b"/d/\xff"]  # (/d: known from what is below it)
    shown = [as_event("s", k, decode_entry(b)) for k, b in tables.walk(conn, "s", b"/d") if b]
    assert [e.raw_path for e in shown] == [b"/d/\xfe", b"/d/\xff"]


def test_a_failed_commit_leaves_no_rename_waiting_in_memory() -> None:
    conn, t = _db()
    ev = dict(site="s", node="n", stream="n:1", is_dir=True)
    _apply(conn, t, [Event(id=1, path="/d", flags=["IN_CREATE"], ts=1, seq=1, **ev)])  # type: ignore[arg-type]
    conn.execute("BEGIN")
    t.apply(conn, [Event(id=2, path="/d", flags=["IN_MOVED_FROM"], cookie=5, ts=2, seq=2, **ev)])  # type: ignore[arg-type]
    conn.execute("ROLLBACK")
    t.rolled_back(conn)
    assert len(t._waiting) == 0 and t.applied == 1
    assert _view(conn) == {"/d": True}


def _files(paths: list[str]) -> list[Event]:
    return [
        Event(
            id=i + 1, site="s", node="n", path=p, flags=["IN_CREATE"], ts=1, stream="n:1", seq=i + 1
        )
        for i, p in enumerate(paths)
    ]


def test_directories_above_the_roots_are_known_from_what_is_below_them_until_it_goes() -> None:
    conn, t = _db()
    _apply(conn, t, _files(["/data/run1/a", "/data/run1-x/d", "/other/e"]))
    top = tables.find(conn, "s", b"/data")
    assert top is not None and top[1] is None  # a directory without an entry of its own
    assert [n for n, _ in tables.children(conn, "s", top[0])] == [b"run1", b"run1-x"]
    rm = Event(
        id=9,
        site="s",
        node="n",
        path="/data/run1-x/d",
        flags=["IN_DELETE"],
        ts=2,
        stream="n:1",
        seq=9,
    )
    _apply(conn, t, [rm])
    assert [n for n, _ in tables.children(conn, "s", top[0])] == [b"run1"]
    assert tables.find(conn, "s", b"/data/run1-x") is None  # nothing below it any more


def test_a_listing_resumes_after_its_last_key_whatever_changed_meanwhile() -> None:
    conn, t = _db()
    paths = [f"/r/d{i}/f{j}" for i in range(5) for j in range(5)]
    _apply(conn, t, _files(paths))
    every = [k for k, b in tables.walk(conn, "s", b"/r") if b]
    pages, after = [], None
    while True:
        page = []
        for k, b in tables.walk(conn, "s", b"/r", after):
            if b:
                page.append(k)
                if len(page) == 4:
                    break
        if not page:
            break
        pages.append(page)
        after = page[-1]
        if len(pages) == 2:  # the entry a page ended at is deleted before the next page
            gone = Event(
                id=99,
                site="s",
                node="n",
                path=after.decode(),
                flags=["IN_DELETE"],
                ts=2,
                stream="n:1",
                seq=99,
            )
            _apply(conn, t, [gone])
    assert [k for page in pages for k in page] == every


def test_renaming_a_directory_changes_a_few_rows_whatever_it_holds() -> None:
    """A writer renaming a large directory back and forth must not cost the relay a row per
    file it holds (that would stall every agent's commits)."""
    conn, t = _db()
    _apply(conn, t, _files([f"/big/d/f{i}" for i in range(5000)]))
    before = conn.total_changes
    ev = dict(site="s", node="n", stream="n:1", is_dir=True)
    for i in range(10):
        old, new = ("/big/d", "/big/e") if i % 2 == 0 else ("/big/e", "/big/d")
        _apply(
            conn,
            t,
            [
                Event(
                    id=10_000 + 2 * i,
                    path=old,
                    flags=["IN_MOVED_FROM"],
                    cookie=i + 1,
                    ts=5,
                    seq=10_000 + 2 * i,
                    **ev,
                ),  # type: ignore[arg-type]
                Event(
                    id=10_001 + 2 * i,
                    path=new,
                    flags=["IN_MOVED_TO"],
                    cookie=i + 1,
                    old_path=old,
                    ts=5,
                    seq=10_001 + 2 * i,
                    **ev,
                ),  # type: ignore[arg-type]
            ],
        )
    assert conn.total_changes - before < 10 * 12
    assert len([k for k, b in tables.walk(conn, "s", b"/big/d") if b]) == 5001  # d and its files


def test_removing_one_sites_root_leaves_the_other_sites_alone() -> None:
    """Every site's "/" is node 0: an IN_DELETE_SELF of "/" (a hostile agent's, say) must
    remove only its own site's tree."""
    conn, t = _db()
    a = _files(["/data/x", "/data/y"])
    b = [msgspec.structs.replace(e, site="other", stream="n:2", id=e.id + 10) for e in a]
    _apply(conn, t, a + b)
    gone = Event(
        id=30,
        site="s",
        node="n",
        path="/",
        flags=["IN_DELETE_SELF"],
        is_dir=True,
        ts=3,
        stream="n:1",
        seq=30,
    )
    _apply(conn, t, [gone])
    assert [k for k, blob in tables.walk(conn, "s", b"/") if blob] == []
    assert [k for k, blob in tables.walk(conn, "other", b"/") if blob] == [b"/data/x", b"/data/y"]


def test_a_view_that_cannot_apply_an_event_stops_there_and_the_events_are_stored(
    tmp_path, monkeypatch
) -> None:
    """Whatever goes wrong in the view (a bug, an event no agent should send) must not fail the
    commit that stores every connection's events: the view stays as of its last id."""
    import asyncio

    from storage_events.relay.log.sqlite import SQLiteLog

    real = tables.effect

    def effect(ev: Event):  # type: ignore[no-untyped-def]
        if ev.path == "/boom":
            raise ValueError("a bug")
        return real(ev)

    monkeypatch.setattr(tables, "effect", effect)

    async def run() -> tuple[int, int, bool, int]:
        log = SQLiteLog(tmp_path / "data")
        ev = dict(site="s", node="n", stream="n:1", flags=["IN_CREATE"], ts=1)
        await log.append([Event(path="/a", seq=1, **ev)])  # type: ignore[arg-type]
        stored = await log.append([Event(path="/boom", seq=2, **ev), Event(path="/c", seq=3, **ev)])  # type: ignore[arg-type]
        await log.append([Event(path="/d", seq=4, **ev)])  # type: ignore[arg-type]
        assert log.namespace is not None
        result = (len(stored), log.head, log.namespace.stalled, log.namespace.applied)
        await log.close()
        return result

    assert asyncio.run(run()) == (2, 4, True, 1)
