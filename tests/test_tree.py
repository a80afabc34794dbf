"""The agent's tree tracker, driven with kernel-shaped events and no inotify at all."""

from __future__ import annotations

from storage_events.agent.tree import Change, RescanDone, Tree, Unwatch, WatchDir
from storage_events.wire import Flag

CREATE, DELETE, CLOSE_WRITE = Flag.CREATE, Flag.DELETE, Flag.CLOSE_WRITE
MOVED_FROM, MOVED_TO, ISDIR = Flag.MOVED_FROM, Flag.MOVED_TO, Flag.ISDIR


class FakeKernel:
    """Hands out watch descriptors and plays the shell's part of the protocol."""

    def __init__(self, tree: Tree, listings: dict[str, list[tuple[str, bool]]] | None = None):
        self.tree = tree
        self.listings = listings or {}
        self.next_wd = 1
        self.wds: dict[str, int] = {}
        self.published: list[Change] = []
        self.unwatched: list[int] = []

    def run(self, outputs, now: float = 0.0) -> None:
        todo = list(outputs)
        while todo:
            out = todo.pop(0)
            if isinstance(out, Change):
                self.published.append(out)
            elif isinstance(out, WatchDir):
                wd = self.wds.setdefault(out.path, self.next_wd)
                self.next_wd = max(self.next_wd, wd + 1)
                listing = [(name, is_dir, 1000 + len(name), 1, 1)
                           for name, is_dir in self.listings.get(out.path, [])]
                todo[:0] = self.tree.watched(wd, out, listing, now)
            elif isinstance(out, Unwatch):
                self.unwatched.append(out.wd)
            elif isinstance(out, RescanDone):
                todo.extend(self.tree.finish_rescan())

    def event(self, dir_path: str, mask: int, name: str = "", cookie: int = 0, now: float = 0.0):
        self.run(self.tree.handle(self.wds[dir_path], mask, cookie, name, now), now)

    def paths(self) -> list[tuple[str, str]]:
        out = [(c.path, Flag(c.flags).name) for c in self.published]
        self.published.clear()
        return out


def make(listings=None, prefix=None) -> FakeKernel:
    tree = Tree(move_window=0.5, scan_memory=5.0)
    k = FakeKernel(tree, listings)
    k.run(tree.add_root("/r", prefix))
    return k


def test_start_up_watches_existing_tree_without_announcing_it():
    k = make({"/r": [("a", True), ("f", False)], "/r/a": [("b", True)]})
    assert set(k.wds) == {"/r", "/r/a", "/r/a/b"}
    assert k.published == []


def test_new_directory_is_watched_and_its_early_contents_announced_once():
    k = make()
    k.listings["/r/d"] = [("sub", True), ("early.txt", False)]
    k.listings["/r/d/sub"] = [("deep.txt", False)]
    k.event("/r", CREATE | ISDIR, "d")
    assert k.paths() == [
        ("/r/d", "CREATE"),
        ("/r/d/sub", "CREATE"),
        ("/r/d/sub/deep.txt", "CREATE"),
        ("/r/d/early.txt", "CREATE"),
    ]
    # The kernel also reports what was created between add_watch and the listing: not twice.
    k.event("/r/d", CREATE, "early.txt")
    k.event("/r/d", CREATE | ISDIR, "sub")
    assert k.paths() == []
    # ...but a later re-creation after a delete is a new event.
    k.event("/r/d", DELETE, "early.txt")
    k.event("/r/d", CREATE, "early.txt")
    k.event("/r/d/sub", CLOSE_WRITE, "deep.txt")
    assert k.paths() == [("/r/d/early.txt", "DELETE"), ("/r/d/early.txt", "CREATE"),
                         ("/r/d/sub/deep.txt", "CLOSE_WRITE")]


def test_scan_memory_expires():
    k = make()
    k.listings["/r/d"] = [("f", False)]
    k.event("/r", CREATE | ISDIR, "d")
    k.paths()
    k.run(k.tree.expire(10.0))
    k.event("/r/d", CREATE, "f", now=10.0)
    assert k.paths() == [("/r/d/f", "CREATE")]


def test_rename_pairs_halves_and_carries_old_path():
    k = make()
    k.event("/r", MOVED_FROM, "x", cookie=7)
    k.event("/r", MOVED_TO, "y", cookie=7)
    moved_from, moved_to = k.published
    assert (moved_from.path, moved_from.cookie, moved_from.old_path) == ("/r/x", 7, None)
    assert (moved_to.path, moved_to.cookie, moved_to.old_path) == ("/r/y", 7, "/r/x")


def test_directory_move_inside_tree_relinks_the_whole_subtree():
    k = make({"/r": [("a", True)], "/r/a": [("b", True)], "/r/a/b": []})
    b_wd = k.wds["/r/a/b"]
    k.event("/r", MOVED_FROM | ISDIR, "a", cookie=3)
    k.event("/r", MOVED_TO | ISDIR, "z", cookie=3)
    k.paths()
    k.run(k.tree.handle(b_wd, CLOSE_WRITE, 0, "f", 1.0))
    assert k.paths() == [("/r/z/b/f", "CLOSE_WRITE")]  # never under the old path
    k.run(k.tree.expire(5.0))
    assert k.unwatched == []


def test_directory_moved_out_is_unwatched_and_silent():
    k = make({"/r": [("a", True)], "/r/a": [("b", True)], "/r/a/b": []})
    a_wd, b_wd = k.wds["/r/a"], k.wds["/r/a/b"]
    k.event("/r", MOVED_FROM | ISDIR, "a", cookie=9)
    assert k.paths() == [("/r/a", "MOVED_FROM")]
    # Writes out there must not be published under the old path, even before the window closes.
    k.run(k.tree.handle(b_wd, CLOSE_WRITE, 0, "late", 0.1))
    assert k.paths() == []
    k.run(k.tree.expire(1.0))
    assert sorted(k.unwatched) == sorted([a_wd, b_wd])
    assert k.tree.watch_count == 1


def test_directory_moved_in_is_scanned_and_watched():
    k = make()
    k.listings["/r/in"] = [("x.h5", False)]
    k.event("/r", MOVED_TO | ISDIR, "in", cookie=4)
    assert k.paths() == [("/r/in", "MOVED_TO"), ("/r/in/x.h5", "CREATE")]
    assert "/r/in" in k.wds


def test_ignored_forgets_the_watch_and_late_events_are_dropped():
    k = make({"/r": [("a", True)], "/r/a": []})
    a_wd = k.wds["/r/a"]
    k.event("/r", DELETE | ISDIR, "a")
    k.run(k.tree.handle(a_wd, Flag.DELETE_SELF, 0, "", 0))
    k.run(k.tree.handle(a_wd, Flag.IGNORED, 0, "", 0))
    k.run(k.tree.handle(a_wd, CREATE, 0, "ghost", 0))
    assert k.paths() == [("/r/a", "DELETE")]
    assert k.tree.watch_count == 1


def test_overflow_is_announced_for_every_root_and_publish_prefix_applies():
    tree = Tree()
    k = FakeKernel(tree)
    k.run(tree.add_root("/local/one", "/pub/one"))
    k.run(tree.add_root("/local/two"))
    k.run(tree.handle(-1, Flag.Q_OVERFLOW, 0, "", 0))
    assert k.paths() == [("/pub/one", "Q_OVERFLOW"), ("/local/two", "Q_OVERFLOW")]
    assert tree.rescans == 1
    k.event("/local/one", CLOSE_WRITE, "f")
    assert k.paths() == [("/pub/one/f", "CLOSE_WRITE")]


def test_root_deletion_is_published_and_its_watches_dropped():
    k = make({"/r": [("a", True)], "/r/a": []})
    k.event("/r", Flag.DELETE_SELF)
    assert k.paths() == [("/r", "DELETE_SELF")]
    assert sorted(k.unwatched) == [1, 2]


def test_rescan_publishes_exactly_what_changed_while_events_were_lost():
    k = make({"/r": [("keep", False), ("gone", False), ("d", True), ("old", True)],
              "/r/d": [("x", False)], "/r/old": [("y", False)]})
    old_wd = k.wds["/r/old"]
    # While the queue overflowed: gone deleted, keep rewritten, old/ removed, new/ created.
    k.listings = {"/r": [("keep", False), ("d", True), ("new", True)],
                  "/r/d": [("x", False)], "/r/new": [("z", False)]}
    k.tree.set_stat(k.tree._wds[k.wds["/r"]], "keep", (1004, 2, 2))  # not what is on disk now
    k.run(k.tree.handle(-1, Flag.Q_OVERFLOW, 0, "", 0))
    assert sorted(k.paths()) == sorted([
        ("/r", "Q_OVERFLOW"),
        ("/r/keep", "CLOSE_WRITE"),
        ("/r/gone", "DELETE"),
        ("/r/old/y", "DELETE"),
        ("/r/old", "DELETE"),
        ("/r/new", "CREATE"),
        ("/r/new/z", "CREATE"),
    ])
    assert old_wd in k.unwatched
    # A real IN_CREATE for what the rescan announced is not published twice.
    k.event("/r", CREATE | ISDIR, "new")
    assert k.paths() == []


def test_snapshot_round_trip_publishes_what_changed_while_the_agent_was_down():
    k = make({"/r": [("a", False), ("d", True)], "/r/d": [("b", False)]})
    saved = k.tree.snapshot()
    fresh = Tree()
    k2 = FakeKernel(fresh, {"/r": [("a", False), ("d", True), ("c", False)], "/r/d": []})
    k2.run(fresh.add_root("/r", None, previous=saved["/r"]))
    assert sorted(k2.paths()) == [("/r/c", "CREATE"), ("/r/d/b", "DELETE")]
    assert all(c.synthetic for c in k2.published)
