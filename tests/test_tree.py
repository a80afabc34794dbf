"""The agent's tree tracker, driven with kernel-shaped events and no inotify at all."""

from __future__ import annotations

from storage_events.agent.tree import Change, Tree, Unwatch, WatchDir
from storage_events.wire import Flag

CREATE, DELETE, CLOSE_WRITE = Flag.CREATE, Flag.DELETE, Flag.CLOSE_WRITE
MOVED_FROM, MOVED_TO, ISDIR = Flag.MOVED_FROM, Flag.MOVED_TO, Flag.ISDIR


class FakeKernel:
    """Hands out watch descriptors and plays the shell's part of the protocol: a watch lands on
    the directory at the node's current place in the model, listed from ``listings``."""

    def __init__(self, tree: Tree, listings: dict[str, list[tuple[str, bool]]] | None = None):
        self.tree = tree
        self.listings = listings or {}
        self.next_wd = 1
        self.wds: dict[str, int] = {}
        self.published: list[Change] = []
        self.unwatched: list[int] = []

    def path_of(self, node) -> str:
        root, parts = self.tree.place(node)
        return "/".join([root.local.rstrip("/"), *parts]) if parts else root.local

    def run(self, outputs, now: float = 0.0) -> None:
        todo = list(outputs)
        while todo:
            out = todo.pop(0)
            if isinstance(out, Change):
                self.published.append(out)
            elif isinstance(out, WatchDir):
                if self.tree.place(out.node) is None:
                    continue
                path = self.path_of(out.node)
                wd = self.wds.setdefault(path, self.next_wd)
                self.next_wd = max(self.next_wd, wd + 1)
                listing = [
                    (name, is_dir, 1000 + len(name), 1, 1)
                    for name, is_dir in self.listings.get(path, [])
                ]
                todo.extend(self.tree.watched(out.node, wd, 1, 100 + wd, listing, now))
            elif isinstance(out, Unwatch):
                self.unwatched.append(out.wd)

    def event(self, dir_path: str, mask: int, name: str = "", cookie: int = 0, now: float = 0.0):
        self.run(self.tree.handle(self.wds[dir_path], mask, cookie, name, now), now)

    def paths(self) -> list[tuple[str, str]]:
        out = [(c.path, Flag(c.flags).name) for c in self.published]
        self.published.clear()
        return out


def add_root(k: FakeKernel, local: str, prefix=None, previous=None) -> None:
    root, cmds = k.tree.add_root(local, prefix, previous)
    if cmds:
        k.run(cmds)  # diffed against the snapshot
        return
    # A fresh start: the shell walks the tree, publishing nothing.
    stack = [(local, None, "")]
    while stack:
        path, parent, name = stack.pop()
        wd = k.wds[path] = k.next_wd
        k.next_wd += 1
        node = k.tree.attach(wd, parent, name, 100 + wd, 1, root if parent is None else None)
        for child, is_dir in k.listings.get(path, []):
            if is_dir:
                stack.append((f"{path}/{child}", node, child))
            else:
                k.tree.attach_file(node, child, (1000 + len(child), 1, 1))


def make(listings=None, prefix=None) -> FakeKernel:
    tree = Tree(move_window=0.5, scan_memory=5.0)
    k = FakeKernel(tree, listings)
    add_root(k, "/r", prefix)
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
    # Each directory before what it holds.
    assert k.paths() == [
        ("/r/d", "CREATE"),
        ("/r/d/sub", "CREATE"),
        ("/r/d/early.txt", "CREATE"),
        ("/r/d/sub/deep.txt", "CREATE"),
    ]
    # The kernel also reports what was created between add_watch and the listing: not twice.
    k.event("/r/d", CREATE, "early.txt")
    k.event("/r/d", CREATE | ISDIR, "sub")
    assert k.paths() == []
    # ...but a later re-creation after a delete is a new event.
    k.event("/r/d", DELETE, "early.txt")
    k.event("/r/d", CREATE, "early.txt")
    k.event("/r/d/sub", CLOSE_WRITE, "deep.txt")
    assert k.paths() == [
        ("/r/d/early.txt", "DELETE"),
        ("/r/d/early.txt", "CREATE"),
        ("/r/d/sub/deep.txt", "CLOSE_WRITE"),
    ]


def test_scan_memory_expires():
    k = make()
    k.listings["/r/d"] = [("f", False)]
    k.event("/r", CREATE | ISDIR, "d")
    k.paths()
    k.run(k.tree.expire(10.0))
    k.event("/r/d", CREATE, "f", now=10.0)
    assert k.paths() == [("/r/d/f", "CREATE")]


def test_rename_pairs_halves_and_carries_old_path():
    k = make({"/r": [("x", False)]})
    k.event("/r", MOVED_FROM, "x", cookie=7)
    k.event("/r", MOVED_TO, "y", cookie=7)
    moved_from, moved_to = k.published
    assert (moved_from.path, moved_from.cookie, moved_from.old_path) == ("/r/x", 7, None)
    assert (moved_to.path, moved_to.cookie, moved_to.old_path) == ("/r/y", 7, "/r/x")


def test_directory_move_inside_tree_relinks_the_whole_subtree():
    k = make({"/r": [("a", True)], "/r/a": [("b", True)], "/r/a/b": [("f", False)]})
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
    k = FakeKernel(tree, {"/local/one": [("f", False)]})
    add_root(k, "/local/one", "/pub/one")
    add_root(k, "/local/two")
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
    k = make(
        {
            "/r": [("keep", False), ("gone", False), ("d", True), ("old", True)],
            "/r/d": [("x", False)],
            "/r/old": [("y", False)],
        }
    )
    old_wd = k.wds["/r/old"]
    # While the queue overflowed: gone deleted, keep rewritten, old/ removed, new/ created.
    k.listings = {
        "/r": [("keep", False), ("d", True), ("new", True)],
        "/r/d": [("x", False)],
        "/r/new": [("z", False)],
    }
    k.tree.set_stat(k.tree._wds[k.wds["/r"]], "keep", (1004, 2, 2))  # not what is on disk now
    k.run(k.tree.handle(-1, Flag.Q_OVERFLOW, 0, "", 0))
    assert sorted(k.paths()) == sorted(
        [
            ("/r", "Q_OVERFLOW"),
            ("/r/keep", "CLOSE_WRITE"),
            ("/r/gone", "DELETE"),
            ("/r/old/y", "DELETE"),
            ("/r/old", "DELETE"),
            ("/r/new", "CREATE"),
            ("/r/new/z", "CREATE"),
        ]
    )
    assert old_wd in k.unwatched
    # A real IN_CREATE for what the rescan announced is not published twice.
    k.event("/r", CREATE | ISDIR, "new")
    assert k.paths() == []


def test_snapshot_round_trip_publishes_what_changed_while_the_agent_was_down():
    k = make({"/r": [("a", False), ("d", True)], "/r/d": [("b", False)]})
    saved = k.tree.snapshot()
    fresh = Tree()
    k2 = FakeKernel(fresh, {"/r": [("a", False), ("d", True), ("c", False)], "/r/d": []})
    add_root(k2, "/r", None, previous=saved["/r"])
    assert sorted(k2.paths()) == [("/r/c", "CREATE"), ("/r/d/b", "DELETE")]
    assert all(c.synthetic for c in k2.published)


def test_events_between_the_halves_of_a_directory_rename_land_under_its_new_name():
    k = make({"/r": [("a", True)], "/r/a": []})
    a_wd = k.wds["/r/a"]
    k.event("/r", MOVED_FROM | ISDIR, "a", cookie=5)
    # Another CPU's event, queued between the two halves.
    k.run(k.tree.handle(a_wd, CREATE | ISDIR, 0, "sub", 0.0))
    k.event("/r", MOVED_TO | ISDIR, "b", cookie=5)
    assert k.paths() == [("/r/a", "MOVED_FROM"), ("/r/b", "MOVED_TO"), ("/r/b/sub", "CREATE")]
    assert "/r/b/sub" in k.wds  # and it is watched there


def test_a_listing_that_finds_a_rename_target_pairs_it():
    k = make({"/r": [("hello.txt", False)]})
    k.event("/r", CREATE | ISDIR, "run1")
    k.listings["/r/run1"] = [("hello.txt", False)]
    # The rename happened before run1 was watched: the kernel only reports its first half.
    k.published.clear()
    k.run(k.tree.handle(k.wds["/r"], MOVED_FROM, 9, "hello.txt", 0.0))
    k.run(k.tree.handle(k.wds["/r/run1"], CREATE, 0, "x", 0.0))  # run1 watched now
    node = k.tree.node_of(k.wds["/r/run1"])
    k.run([WatchDir(node)])
    pairs = [
        (c.path, Flag(c.flags).name, c.cookie, c.old_path)
        for c in k.published
        if c.flags & MOVED_TO
    ]
    assert pairs == [("/r/run1/hello.txt", "MOVED_TO", 9, "/r/hello.txt")]


def test_listed_rename_targets_pair_with_their_own_sources():
    # `mv hello.txt run1/` in two directories while the agent was stopped: neither file's
    # inode is known (seen only in events), so each must pair by where it left.
    k = make({"/r": [("demo0", True), ("demo1", True)], "/r/demo0": [], "/r/demo1": []})
    for d in ("demo0", "demo1"):
        k.event(f"/r/{d}", CREATE, "hello.txt")
        k.event(f"/r/{d}", CREATE | ISDIR, "run1")
        k.listings[f"/r/{d}/run1"] = [("hello.txt", False)]
    k.published.clear()
    k.run(k.tree.handle(k.wds["/r/demo0"], MOVED_FROM, 7, "hello.txt", 0.0))
    k.run(k.tree.handle(k.wds["/r/demo1"], MOVED_FROM, 8, "hello.txt", 0.0))
    for d in ("demo1", "demo0"):  # demo1's listing first: demo0's move is pending too
        k.run([WatchDir(k.tree.node_of(k.wds[f"/r/{d}/run1"]))])
    pairs = sorted((c.path, c.cookie, c.old_path) for c in k.published if c.flags & MOVED_TO)
    assert pairs == [
        ("/r/demo0/run1/hello.txt", 7, "/r/demo0/hello.txt"),
        ("/r/demo1/run1/hello.txt", 8, "/r/demo1/hello.txt"),
    ]


def test_a_rename_over_an_existing_entry_deletes_it_first():
    k = make({"/r": [("a", False), ("b", False), ("dst", True)], "/r/dst": []})
    k.event("/r", MOVED_FROM, "a", cookie=1)
    k.event("/r", MOVED_TO, "b", cookie=1)
    assert k.paths() == [("/r/a", "MOVED_FROM"), ("/r/b", "DELETE"), ("/r/b", "MOVED_TO")]
    k.listings["/r/dst"] = [("inside", False)]
    k.listings["/r"] = [("b", False), ("dst", True)]  # the parent is listed again too
    del k.wds["/r/dst"]  # replaced: another directory (inode) at that name
    k.event("/r", MOVED_TO | ISDIR, "dst", cookie=2)
    assert k.paths() == [("/r/dst", "DELETE"), ("/r/dst", "MOVED_TO"), ("/r/dst/inside", "CREATE")]


def test_a_directory_moved_out_and_back_is_listed_afresh():
    k = make({"/r": [("d", True)], "/r/d": [("f1", False)]})
    k.event("/r", MOVED_FROM | ISDIR, "d", cookie=3)
    k.listings["/r/d"] = [("f2", False)]  # changed while outside
    k.event("/r", MOVED_TO | ISDIR, "d", cookie=4)  # another rename brings it back
    assert k.paths() == [("/r/d", "MOVED_FROM"), ("/r/d", "MOVED_TO"), ("/r/d/f2", "CREATE")]
    k.run(k.tree.expire(5.0))
    assert k.tree.watch_count == 2  # the pending move did not take its watch away


def test_an_overflow_republishes_only_files_changed_after_the_queue_was_last_empty():
    k = make({"/r": [("old", False), ("new", False)]})
    k.tree.clock_ns = 1_000_000_000
    k.event("/r", CLOSE_WRITE, "old")
    k.tree.mark_quiet(2_000_000_000)  # the queue was read empty after that
    k.tree.clock_ns = 3_000_000_000
    k.event("/r", CLOSE_WRITE, "new")
    k.paths()
    # Listed with an mtime before either read: only "new" may have lost a later change.
    k.run(k.tree.handle(-1, Flag.Q_OVERFLOW, 0, "", 0))
    assert k.paths() == [("/r", "Q_OVERFLOW"), ("/r/new", "CLOSE_WRITE")]


def test_snapshot_keeps_names_that_are_not_utf8_as_bytes():
    import msgspec

    bad = b"bad\xff\xfe".decode("utf-8", "surrogateescape")
    k = make({"/r": [(bad, False), ("ok", True)]})
    data = msgspec.msgpack.decode(msgspec.msgpack.encode(k.tree.snapshot()))
    assert set(data["/r"][1]) == {b"bad\xff\xfe", "ok"}
    fresh = FakeKernel(Tree(), {"/r": [(bad, False), ("ok", True)]})
    add_root(fresh, "/r", None, previous=data["/r"])
    assert fresh.paths() == []  # the same names: nothing changed


def test_a_root_that_comes_back_is_announced_with_what_it_holds():
    k = make({"/r": [("a", False)]})
    k.event("/r", Flag.DELETE_SELF)
    assert k.paths() == [("/r", "DELETE_SELF")]
    k.listings["/r"] = [("b", False)]
    del k.wds["/r"]
    k.run(k.tree.root_back(k.tree.roots[0]))
    assert k.paths() == [("/r", "CREATE"), ("/r/b", "CREATE")]


def test_a_directory_that_cannot_be_watched_is_a_loss_notice_and_retried():
    k = make({"/r": []})
    k.event("/r", CREATE | ISDIR, "locked")
    k.paths()
    node = k.tree.roots[0].node.entries["locked"]
    k.run(k.tree.watch_failed(node, "permission"))
    assert k.paths() == [("/r/locked", "Q_OVERFLOW")]
    k.listings["/r/locked"] = [("f", False)]
    k.event("/r", Flag.ATTRIB | ISDIR, "locked")  # chmod: tried again at once
    assert k.paths() == [("/r/locked", "ATTRIB"), ("/r/locked/f", "CREATE")]
    assert k.tree.retry() == []
