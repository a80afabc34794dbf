"""The agent's sans-I/O core: kernel inotify events in; changes to publish and watch commands out.

It keeps a model of the watched trees: a node per directory (its watch descriptor, its device and
inode, its parent, its name) holding its entries, subdirectories as nodes and files as
``(inode, mtime_ns, size)``. A path is always computed from a node's current place, so moving a
directory with 10,000 watched descendants is one re-link, and nothing is ever published under a
directory's old path.

A directory is identified by what it is, never by a path remembered from before. The kernel's
queue lags behind the disk: when an event says ``n`` was created in ``X``, ``X`` may have been
renamed since, and a path built from the model would reach another directory. So the tree only
asks for watches by node (:class:`WatchDir`); the I/O shell (:mod:`.watcher`) reaches the node's
parent by its recorded device and inode, opens the child beneath it without following symlinks,
and hands back what it found (:meth:`Tree.watched`), or defers the command until the queue has
caught up with the disk.

The model is also what subscribers were told. A listing is compared with it and only the
differences are published (new directories, rescans after an overflow, directories that come
back, restarts against the snapshot of the last run), so replaying the feed reproduces the tree.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from storage_events.wire import Flag

from .select import Selector

# What the agent asks the kernel for. MODIFY is left out on purpose: it would cost one event per
# write() and CLOSE_WRITE already says "this file is complete".
WATCH_MASK = int(
    Flag.CREATE
    | Flag.CLOSE_WRITE
    | Flag.DELETE
    | Flag.ATTRIB
    | Flag.MOVED_FROM
    | Flag.MOVED_TO
    | Flag.DELETE_SELF
    | Flag.MOVE_SELF
)
# Plain ints: enum arithmetic on the per-event path costs more than the rest of the handling.
_CREATE, _DELETE, _CLOSE_WRITE = int(Flag.CREATE), int(Flag.DELETE), int(Flag.CLOSE_WRITE)
_MOVED_FROM, _MOVED_TO, _ATTRIB = int(Flag.MOVED_FROM), int(Flag.MOVED_TO), int(Flag.ATTRIB)
_Q_OVERFLOW, _IGNORED, _ISDIR = int(Flag.Q_OVERFLOW), int(Flag.IGNORED), int(Flag.ISDIR)
_UNMOUNT = int(Flag.UNMOUNT)
_ROOT_GONE = int(Flag.DELETE_SELF | Flag.MOVE_SELF | Flag.UNMOUNT)
# Events that change which directory entry a name in a watched directory stands for.
NAME_EVENTS = _CREATE | _DELETE | _MOVED_FROM | _MOVED_TO

# A file: inode, mtime_ns, size. Size -1: changed since it was listed, and mtime is then the
# wall-clock time the agent read that change (see _changed).
FileStat = tuple[int, int, int]
_UNWATCHED = -1  # wd of a directory in the model without a watch (yet, or for good)
# File times come from a clock that ticks in jiffies: a change made just after a moment can
# carry an mtime up to one tick before it.
_CLOCK_SLACK_NS = 20_000_000
# One listed directory entry: name, is_dir, inode, mtime_ns, size (the last two 0 for dirs).
Listing = list[tuple[str, bool, int, int, int]]


@dataclass(slots=True)
class Change:
    """Something to publish. ``path`` is the published path, in ``os.fsdecode`` form."""

    path: str
    flags: int
    is_dir: bool
    cookie: int | None = None
    old_path: str | None = None
    synthetic: bool = False


@dataclass(slots=True, eq=False)
class WatchDir:
    """Watch the directory ``node`` stands for, where the model has it when the shell gets to
    it, list it, and report to :meth:`Tree.watched` (or :meth:`Tree.watch_failed`)."""

    node: _Dir
    tries: int = field(default=0, compare=False)  # deferrals so far (the shell counts)
    # List every subdirectory again too (a rescan: events may be lost anywhere below), or only
    # those that are not the directory the model has there (same inode, watched).
    deep: bool = True


@dataclass(slots=True)
class Unwatch:
    wd: int


Output = Change | WatchDir | Unwatch


@dataclass(slots=True, eq=False)
class _Root:
    local: str
    prefix: str
    select: Selector | None = None
    node: _Dir | None = None
    gone: bool = False

    @property
    def published(self) -> str:
        return join_path(self.prefix, [])


class _Dir:
    # As few slots as will do: a node per directory, 100,000s of them. Its device is kept by
    # the tree where it differs from its parent's (Tree.dev_of), why it is unwatched in
    # Tree._failed.
    __slots__ = ("cache", "entries", "ino", "name", "parent", "root", "scanned", "wd")

    def __init__(
        self, wd: int, ino: int, name: str, parent: _Dir | None, root: _Root | None
    ) -> None:
        self.wd = wd  # or _UNWATCHED
        self.ino = ino  # 0: not known yet (a directory only seen in an event)
        self.name = name
        self.parent = parent
        self.root = root  # set on root nodes only
        # Shared and empty until something is added (most directories of big trees are leaves).
        self.entries: dict[str, _Dir | FileStat] = _EMPTY
        # Names a listing just announced; a real IN_CREATE for one of them that follows is the
        # same file seen twice (created between inotify_add_watch and the listing).
        self.scanned: dict[str, float] | None = None
        # (generation, root, published path + "/", parts): valid while nothing was re-linked.
        self.cache: tuple[int, _Root, str, list[str]] | None = None


@dataclass(slots=True, eq=False)
class _PendingMove:
    path: str
    entry: _Dir | FileStat | None
    deadline: float
    # Events of the moving directory's subtree read between the two halves of its rename: the
    # kernel can queue another CPU's events there. Handled once the directory has its new place.
    stash: list[tuple[int, int, int, str]] = field(default_factory=list)


_EMPTY: dict[str, Any] = {}


def _writable(node: _Dir) -> dict[str, _Dir | FileStat]:
    if node.entries is _EMPTY:
        node.entries = {}
    return node.entries


def join_path(base: str, rel: list[str]) -> str:
    """``base`` and the names under it as one path (``base`` alone: never empty)."""
    if not rel:
        return base or "/"
    return base.rstrip("/") + "/" + "/".join(rel)


class Tree:
    """Tracks every watched directory under one or more roots.

    ``move_window``: how long an ``IN_MOVED_FROM`` waits for its ``IN_MOVED_TO`` before the
    directory counts as moved out of the tree. ``scan_memory``: how long a listed name suppresses
    a duplicate ``IN_CREATE``. ``clock_ns``: wall-clock time of the events being handled, set by
    the shell for each read.
    """

    def __init__(self, *, move_window: float = 0.5, scan_memory: float = 5.0) -> None:
        self.move_window = move_window
        self.scan_memory = scan_memory
        self._clock_ns = 0
        self._changed_now: FileStat = (0, 0, -1)  # a file created at clock_ns (one shared)
        self._wds: dict[int, _Dir] = {}
        self._roots: list[_Root] = []
        self._moves: dict[int, _PendingMove] = {}
        self._limbo: dict[_Dir, _PendingMove] = {}  # the top of a moving subtree → its move
        self._scanned_nodes: dict[_Dir, float] = {}
        # Directories without a watch, and why: "permission", "limit" (retried), "alias" (its
        # directory is watched at another place, a bind mount).
        self._failed: dict[_Dir, str] = {}
        self._devs: dict[_Dir, int] = {}  # device of a root, or of a node unlike its parent
        self._selective = False  # some root leaves names out
        self._gen = 0  # bumped whenever a directory is re-linked or detached: paths change
        # Files changed at or after this time may have lost a later change in an overflow.
        self._suspect_ns = 0
        self._quiet_ns = 0
        self.rescans = 0

    @property
    def clock_ns(self) -> int:
        return self._clock_ns

    @clock_ns.setter
    def clock_ns(self, ns: int) -> None:
        self._clock_ns = ns
        self._changed_now = (0, ns, -1)

    @property
    def generation(self) -> int:
        """Changes whenever a directory is re-linked or detached (paths of the model change)."""
        return self._gen

    @property
    def watch_count(self) -> int:
        return len(self._wds)

    @property
    def roots(self) -> list[_Root]:
        return self._roots

    @property
    def unwatched_count(self) -> int:
        return len(self._failed)

    def add_root(
        self,
        local: str,
        prefix: str | None = None,
        previous: dict[str, Any] | list[Any] | None = None,
        select: Selector | None = None,
    ) -> tuple[_Root, list[Output]]:
        """Watch a root. With ``previous`` (from :meth:`snapshot` of an earlier run), what
        changed since is published: the root comes with a :class:`WatchDir` to diff against it.
        Without, the shell walks the tree (:meth:`attach`) and the tree as found is the starting
        point. ``select``: names to leave out (neither watched nor published)."""
        root = _Root(
            local.rstrip("/") or "/",
            prefix if prefix is not None else local,
            select if select is not None and select.active else None,
        )
        self._selective = self._selective or root.select is not None
        self._roots.append(root)
        old = _load(previous) if previous is not None else None
        if old is None:
            return root, []
        old.root = root
        root.node = old
        return root, [WatchDir(old)]

    def announce(self, root: _Root) -> Iterator[Change]:
        """What a root watched for the first time holds, as synthetic ``IN_CREATE`` events
        (directories before what they hold), from the model the start-up walk built."""
        if root.node is None:
            return
        stack: list[tuple[_Dir, str]] = [(root.node, root.published)]
        while stack:
            node, path = stack.pop()
            for name, entry in node.entries.items():
                child = join_path(path, [name])
                is_dir = isinstance(entry, _Dir)
                yield Change(child, _CREATE, is_dir, synthetic=True)
                if is_dir:
                    stack.append((entry, child))  # type: ignore[arg-type]

    # -- start-up, where nothing is published ---------------------------------------------------

    def attach(
        self, wd: int, parent: _Dir | None, name: str, ino: int, dev: int | None, root: _Root | None
    ) -> _Dir | None:
        """The shell walks the tree itself at start-up (the cheapest loop for 100,000
        directories) and records each watch and file here. None: that directory is watched
        already at another place (a bind mount): see :meth:`attach_failed`. ``dev``: None when
        it is its parent's (the shell knows when it differs: a mount point)."""
        if wd in self._wds:
            return None
        node = self._new_node(wd, parent, name, ino, dev, root)
        self._wds[wd] = node
        return node

    @staticmethod
    def attach_file(node: _Dir, name: str, stat: FileStat) -> None:
        _writable(node)[name] = stat

    def attach_failed(
        self,
        parent: _Dir | None,
        name: str,
        ino: int,
        dev: int | None,
        root: _Root | None,
        reason: str,
    ) -> _Dir:
        """A directory found at start-up that could not be watched: in the model, unwatched,
        retried later (:meth:`retry`). Loss notices are the shell's to publish here."""
        node = self._new_node(_UNWATCHED, parent, name, ino, dev, root)
        self._failed[node] = reason
        return node

    def _new_node(
        self, wd: int, parent: _Dir | None, name: str, ino: int, dev: int | None, root: _Root | None
    ) -> _Dir:
        node = _Dir(wd, ino, name, parent, root)
        if dev is not None:
            self._devs[node] = dev
        if parent is not None:
            _writable(parent)[name] = node
        elif root is not None:
            root.node = node
        return node

    # -- what the shell found --------------------------------------------------------------------

    def place(self, node: _Dir) -> tuple[_Root, list[str]] | None:
        """Where ``node`` is in the model now: its root and the names leading to it; None once
        it is no longer in the tree."""
        return self._parts(node)

    def node_of(self, wd: int) -> _Dir | None:
        return self._wds.get(wd)

    def dev_of(self, node: _Dir) -> int:
        """The device ``node``'s directory was on when listed (0: not known yet)."""
        n: _Dir | None = node
        while n is not None:
            dev = self._devs.get(n)
            if dev is not None:
                return dev
            n = n.parent
        return 0

    def failed(self, node: _Dir) -> str | None:
        """Why ``node`` has no watch, if it has none for good."""
        return self._failed.get(node)

    def _set_dev(self, node: _Dir, dev: int) -> None:
        if node.parent is not None and self.dev_of(node.parent) == dev:
            self._devs.pop(node, None)
        else:
            self._devs[node] = dev

    def in_limbo(self, node: _Dir) -> bool:
        """Inside a directory between the two halves of a rename (its place is coming)."""
        while node.parent is not None:
            node = node.parent
        return node in self._limbo

    def settled(self, node: _Dir) -> bool:
        """Nothing more to do for ``node``: it is gone from the tree for good."""
        return self._parts(node) is None and not self.in_limbo(node)

    def watched(
        self,
        node: _Dir,
        wd: int,
        dev: int,
        ino: int,
        entries: Listing,
        now: float,
        *,
        deep: bool = True,
    ) -> list[Output]:
        """The directory ``node`` stands for is watched as ``wd`` and held ``entries`` just
        after the watch was added. Publishes how that differs from what subscribers know."""
        out: list[Output] = []
        if node.wd >= 0 and node.wd != wd and self._wds.get(node.wd) is node:
            del self._wds[node.wd]  # another directory at this place now (a mount, say)
            out.append(Unwatch(node.wd))
        node.wd, node.ino = wd, ino
        self._set_dev(node, dev)
        self._wds[wd] = node
        self._failed.pop(node, None)
        out.extend(self._diff(node, entries, now, deep))
        return out

    def _diff(self, node: _Dir, entries: Listing, now: float, deep: bool = True) -> list[Output]:
        """Publish how a fresh listing of ``node`` differs from what subscribers know of it,
        and make the model hold the listing."""
        out: list[Output] = []
        found = self._parts(node)
        if found is None:
            return out
        root, parts = found
        select, pub = root.select, join_path(root.prefix, parts)
        old = node.entries
        mine: dict[str, _Dir | FileStat] = {}
        announced: list[str] = []
        for name, is_dir, eino, mtime, size in entries:
            if select is not None and select.excluded(parts, name, is_dir):
                continue
            path = join_path(pub, [name])
            prev = old.get(name)
            if prev is not None and _replaced(prev, is_dir, eino):
                out.extend(self._vanished(prev, path))  # another file or directory now
                if isinstance(prev, _Dir):
                    out.extend(Unwatch(w) for w in self._drop_subtree(prev))
                prev = None
            if isinstance(prev, _Dir):
                mine[name] = prev
                if deep or prev.wd < 0 or prev.ino != eino or prev in self._devs:
                    # Listed again too: it may have changed as well (a mount point lists as
                    # the inode it covers, so it is always checked).
                    out.append(WatchDir(prev, deep=deep))
                continue
            stat = (eino, mtime, size)
            if prev is not None:
                mine[name] = stat
                if _changed(prev, stat, self._suspect_ns):
                    out.append(Change(path, _CLOSE_WRITE, False, synthetic=True))
                continue
            moved = self._scan_paired(path, is_dir, eino)
            if moved is not None:
                cookie, move = moved
                out.append(
                    Change(
                        path, _MOVED_TO, is_dir, cookie=cookie, old_path=move.path, synthetic=True
                    )
                )
                entry = move.entry
                if isinstance(entry, _Dir):
                    self._limbo.pop(entry, None)
                    entry.parent, entry.name = node, name
                    self._gen += 1
                    mine[name] = entry
                    node.entries = mine  # the stashed events below need it in place
                    out.extend(self._replay(move, now))
                    if entry.wd < 0:
                        out.append(WatchDir(entry))
                else:
                    mine[name] = stat
                continue
            out.append(Change(path, _CREATE, is_dir, synthetic=True))
            announced.append(name)
            if is_dir:
                # In the model at once: it was published, so even if it is gone before its
                # watch lands, a later rescan must know to report it removed.
                child = _Dir(_UNWATCHED, eino, name, node, None)
                mine[name] = child
                out.append(WatchDir(child))
            else:
                mine[name] = stat
        node.entries = mine or _EMPTY
        for name, prev in old.items():
            if name not in mine:
                out.extend(self._vanished(prev, join_path(pub, [name])))
                if isinstance(prev, _Dir):
                    out.extend(Unwatch(w) for w in self._drop_subtree(prev))
        if announced:
            until = now + self.scan_memory
            scanned = node.scanned if node.scanned is not None else {}
            scanned.update(dict.fromkeys(announced, until))
            node.scanned = scanned
            self._scanned_nodes[node] = until
        return out

    def watch_failed(
        self,
        node: _Dir,
        reason: str,
        entries: Listing | None = None,
        now: float = 0.0,
        dev: int = 0,
        ino: int = 0,
    ) -> list[Output]:
        """``node`` cannot be watched (``reason``: "permission", "limit", or "alias": its
        directory is watched at another place already, a bind mount, and one inotify watch
        serves one place); it stays in the model, unwatched, and is retried (:meth:`retry`).
        Subscribers get a loss notice for it. ``entries``: its listing, when it could be read
        nonetheless; what it holds is then published and kept as for a watched directory, so
        the retry publishes the difference."""
        first = node not in self._failed
        self._failed[node] = reason
        out: list[Output] = []
        if node.wd >= 0 and self._wds.get(node.wd) is node:
            del self._wds[node.wd]
            out.append(Unwatch(node.wd))
        node.wd = _UNWATCHED
        if ino:
            node.ino = ino
            self._set_dev(node, dev)
        found = self._parts(node)
        if found is None:
            return out
        if first and (node.parent is None or node.parent not in self._failed):
            out.append(Change(join_path(found[0].prefix, found[1]), _Q_OVERFLOW, True))
        if entries is not None:
            out.extend(self._diff(node, entries, now))
        return out

    def take_over(self, old: _Dir, node: _Dir) -> list[Output]:
        """The directory the model has as ``old`` turned up at ``node``'s place: moved out of
        the tree and back (another rename) before its move expired, or moved while events were
        lost. What the model holds for it is stale: it is published as gone from where the
        model had it, forgotten, and the fresh listing of ``node`` announces what it holds."""
        out: list[Output] = []
        move = self._limbo.pop(self._top(old), None)
        if move is not None:
            move.entry = None
            move.stash.clear()
        found = self._parts(old)
        if found is not None and old.parent is not None:
            out.extend(self._vanished(old, join_path(found[0].prefix, found[1])))
            # Whatever is at that name now (if anything) is listed with its parent.
            out.append(WatchDir(old.parent, deep=False))
        keep = old.wd
        out.extend(Unwatch(w) for w in self._drop_subtree(old) if w != keep)
        return out

    # -- kernel events ---------------------------------------------------------------------------

    def handle(self, wd: int, mask: int, cookie: int, name: str, now: float) -> list[Output]:
        if mask & _Q_OVERFLOW:
            out: list[Output] = [
                Change(r.published, _Q_OVERFLOW, True) for r in self._roots if not r.gone
            ]
            return out + self.rescan()
        node = self._wds.get(wd)
        if node is None:
            return []  # late event of a watch we already dropped
        is_dir = bool(mask & _ISDIR)
        kind = mask & ~_ISDIR
        if not name:
            return self._about_itself(node, kind)
        cached = node.cache
        if cached is None or cached[0] != self._gen:
            cached = self._locate(node)
            if cached is None:
                move = self._limbo.get(self._top(node))
                if move is not None:
                    move.stash.append((wd, mask, cookie, name))
                return []  # else: inside a directory that is no longer in the tree
        _, root, base, parts = cached
        if root.select is not None and root.select.excluded(parts, name, is_dir):
            return []
        path = base + name
        entries = node.entries
        if kind == _CLOSE_WRITE:  # the most common event, first and in few steps
            entry = entries.get(name)
            if type(entry) is tuple:
                if node.scanned is not None:
                    node.scanned.pop(name, None)
                if entry[1] != self._clock_ns or entry[2] != -1:
                    entries[name] = (entry[0], self._clock_ns, -1)
                return [Change(path, _CLOSE_WRITE, False)]
        elif kind & _CREATE:
            if node.scanned is not None and self._take_scanned(node, name, now):
                return []
            prev = entries.get(name)
            if prev is None and not is_dir:
                _writable(node)[name] = self._changed_now
                return [Change(path, _CREATE, False)]
            if prev is not None and isinstance(prev, _Dir) == is_dir:
                # Known already (listed before this event was read): the same entry.
                if is_dir:
                    return [Change(path, _CREATE, True), WatchDir(prev)]
                entries[name] = self._changed_now
                return [Change(path, _CREATE, False)]
            out = list(self._vanished(prev, path)) if prev is not None else []
            out.append(Change(path, _CREATE, is_dir))
            if is_dir:
                child = _Dir(_UNWATCHED, 0, name, node, None)
                if isinstance(prev, _Dir):
                    out.extend(Unwatch(w) for w in self._drop_subtree(prev))
                _writable(node)[name] = child
                out.append(WatchDir(child))
            else:
                _writable(node)[name] = self._changed_now
            return out
        if kind & _MOVED_TO:
            return self._moved_to(node, name, path, is_dir, cookie, now)
        if node.scanned is not None:
            node.scanned.pop(name, None)
        entry = entries.get(name)
        if kind & _MOVED_FROM:
            if entry is not None:
                del entries[name]
            move = _PendingMove(path, entry, now + self.move_window)
            self._moves[cookie] = move
            if isinstance(entry, _Dir):
                entry.parent = None  # in limbo until its IN_MOVED_TO, or out of the tree
                self._limbo[entry] = move
                self._gen += 1
            if entry is None:
                return []  # never published: nothing for subscribers to move
            return [Change(path, _MOVED_FROM, is_dir, cookie=cookie)]
        if entry is None:
            # Never published (removed before a listing saw it, or seen twice): subscribers do
            # not hold it, and an event for it would name a path the feed never created.
            return []
        if kind & _DELETE:
            del entries[name]
            if isinstance(entry, _Dir):
                # Out of the model with all below it (unwatched ones get no IN_IGNORED to
                # clean them up); the kernel ends the watches of a deleted directory itself.
                self._drop_subtree(entry)
        elif isinstance(entry, _Dir):
            # ATTRIB of a subdirectory: a chmod may have made one we could not read readable.
            if self._failed.get(entry) == "permission":
                return [Change(path, kind, True), WatchDir(entry)]
        else:  # CLOSE_WRITE, ATTRIB: contents or metadata changed
            entries[name] = (entry[0], self._clock_ns, -1)
        return [Change(path, kind, is_dir, cookie=cookie or None)]

    def _moved_to(
        self, node: _Dir, name: str, path: str, is_dir: bool, cookie: int, now: float
    ) -> list[Output]:
        pending = self._moves.pop(cookie, None)
        entries = _writable(node)
        here = entries.get(name)
        if pending is None and node.scanned is not None and self._take_scanned(node, name, now):
            return []  # a listing after the rename announced it already
        out: list[Output] = []
        if here is not None:
            # A rename over an existing entry replaces it: say so, as the kernel does not.
            out.extend(self._vanished(here, path))
            if isinstance(here, _Dir):
                out.extend(Unwatch(w) for w in self._drop_subtree(here))
                # renameat2(RENAME_EXCHANGE) of two directories queues the same events as two
                # renames over each other: the parent's listing says which it was.
                out.append(WatchDir(node, deep=False))
        if node.scanned is not None:
            node.scanned.pop(name, None)
        moved = pending.entry if pending is not None else None
        known = pending is not None and moved is not None
        out.append(
            Change(
                path,
                _MOVED_TO,
                is_dir,
                cookie=cookie,
                old_path=pending.path if known and pending else None,
            )
        )
        if isinstance(moved, _Dir) and pending is not None:
            self._limbo.pop(moved, None)
            moved.parent, moved.name = node, name
            self._gen += 1
            entries[name] = moved
            out.extend(self._replay(pending, now))
            if moved.wd < 0 and moved not in self._failed:
                out.append(WatchDir(moved))
        elif is_dir:
            child = _Dir(_UNWATCHED, 0, name, node, None)  # moved in from outside: list it
            entries[name] = child
            out.append(WatchDir(child))
        else:
            entries[name] = moved if isinstance(moved, tuple) else self._changed_now
        return out

    def _about_itself(self, node: _Dir, kind: int) -> list[Output]:
        """An event with no name: about the watched directory itself. Its parent reports a
        deletion or a move, unless it is a root; what needs doing is a watch that ended."""
        if node.root is not None and kind & _ROOT_GONE:
            return self._root_gone(node.root, kind & _ROOT_GONE)
        if kind & (_UNMOUNT | _IGNORED):
            if self._wds.get(node.wd) is node:
                del self._wds[node.wd]
            node.wd = _UNWATCHED
            self._gen += 1
            if self._parts(node) is not None:
                # Still in the tree: a file system was unmounted from it, or its watch ended
                # some other way. What is there now is listed and compared.
                return [WatchDir(node)]
            if not self.in_limbo(node):
                self._forget(node)
            # else: its parent is between the halves of a rename; the parent's events about it
            # (stashed there) still need the entry.
        return []

    def _replay(self, move: _PendingMove, now: float) -> list[Output]:
        out: list[Output] = []
        stash, move.stash = move.stash, []
        for wd, mask, cookie, name in stash:
            out.extend(self.handle(wd, mask, cookie, name, now))
        return out

    def _scan_paired(self, path: str, is_dir: bool, ino: int) -> tuple[int, _PendingMove] | None:
        """The pending ``IN_MOVED_FROM`` whose target a listing found at ``path`` (the kernel
        reports no ``IN_MOVED_TO`` into a directory it did not watch yet), so the pair stays a
        pair. By inode where the model knows the file's; a file known only from its events
        (inode unknown) is taken by name, and of several such, the one that left the nearest
        directory above ``path`` (``mv x run1/x`` in several directories at once must pair each
        with its own)."""
        parent, _, name = path.rpartition("/")
        by_name: tuple[int, int, _PendingMove] | None = None  # (nearness, cookie, move)
        for cookie, move in self._moves.items():
            entry = move.entry
            if is_dir:
                if isinstance(entry, _Dir) and entry.ino and entry.ino == ino:
                    del self._moves[cookie]
                    return cookie, move
                continue
            if not isinstance(entry, tuple):
                continue
            if entry[0] == ino:
                del self._moves[cookie]
                return cookie, move
            left, _, was = move.path.rpartition("/")
            if entry[0] == 0 and was == name:
                above = parent == left or parent.startswith(left + "/")
                nearness = len(left) if above else -1
                if by_name is None or nearness > by_name[0]:
                    by_name = (nearness, cookie, move)
        if by_name is None:
            return None
        del self._moves[by_name[1]]
        return by_name[1], by_name[2]

    def _root_gone(self, root: _Root, kind: int) -> list[Output]:
        """The root itself was deleted, moved or unmounted: say so and stop watching it (its
        events would otherwise come under a path that no longer holds them). The shell watches
        it again when a directory is there again (:meth:`root_back`)."""
        out: list[Output] = [Change(root.published, kind, True)]
        root.gone = True
        if root.node is not None:
            out.extend(Unwatch(wd) for wd in self._drop_subtree(root.node))
            root.node = None
        return out

    def root_gone(self, root: _Root) -> list[Output]:
        """The shell found no directory, or another one, where the root should be."""
        return self._root_gone(root, int(Flag.DELETE_SELF)) if not root.gone else []

    def root_back(self, root: _Root) -> list[Output]:
        """A directory is at a gone root's path again: announce it, then what it holds."""
        root.gone = False
        node = _Dir(_UNWATCHED, 0, "", None, root)
        root.node = node
        self._gen += 1
        return [Change(root.published, _CREATE, True, synthetic=True), WatchDir(node)]

    def rescan(self) -> list[Output]:
        """Compare the model with the trees as they are now (after an overflow lost events):
        the shell re-lists everything and what differs is published."""
        self.rescans += 1
        self._suspect_ns = self._quiet_ns
        out: list[Output] = []
        for move in self._moves.values():
            # Halves whose partners were lost are resolved by the listing; what was in limbo
            # is out of the tree (if it is back, the listing finds it as new).
            if isinstance(move.entry, _Dir):
                self._limbo.pop(move.entry, None)
                out.extend(Unwatch(w) for w in self._drop_subtree(move.entry))
        self._moves.clear()
        self._gen += 1
        return out + [WatchDir(r.node) for r in self._roots if r.node is not None and not r.gone]

    def mark_quiet(self, clock_ns: int) -> None:
        """The kernel queue was empty at ``clock_ns``: a later overflow can only have lost
        changes made after it."""
        self._quiet_ns = clock_ns

    def expire(self, now: float) -> list[Output]:
        """Resolve what has waited long enough: unpaired moves and old scan memories."""
        out: list[Output] = []
        for cookie, move in list(self._moves.items()):
            if move.deadline <= now:
                del self._moves[cookie]
                if isinstance(move.entry, _Dir):
                    self._limbo.pop(move.entry, None)
                    out.extend(Unwatch(wd) for wd in self._drop_subtree(move.entry))
        for node, until in list(self._scanned_nodes.items()):
            if until <= now:
                node.scanned = None
                del self._scanned_nodes[node]
        return out

    def retry(self) -> list[Output]:
        """Try again the directories that could not be watched (permission, watch limit)."""
        return [WatchDir(n) for n in list(self._failed) if self._parts(n) is not None]

    def find(self, root: _Root, parts: list[str]) -> _Dir | None:
        """The directory node at ``parts`` under ``root``, if the model has one there."""
        node = root.node
        for part in parts:
            if node is None:
                return None
            entry = node.entries.get(part)
            node = entry if isinstance(entry, _Dir) else None
        return node

    # -- the snapshot --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The model as plain data, per root local path: a directory is ``[inode, {name:
        entry}]``, a file ``[inode, mtime_ns, size]``. Names are ``str``, or ``bytes`` when
        they are not valid UTF-8 (msgpack strings must be). Resolve :meth:`unknown_files`
        first."""
        return {r.local: _dump(r.node) for r in self._roots if r.node is not None}

    def unknown_files(self) -> Iterator[tuple[_Dir, list[str], str]]:
        """(directory, its names under the root, name) of every file whose stat the model does
        not know (changed since it was listed)."""
        for root in self._roots:
            if root.node is None:
                continue
            stack: list[tuple[_Dir, list[str]]] = [(root.node, [])]
            while stack:
                node, parts = stack.pop()
                for name, entry in node.entries.items():
                    if isinstance(entry, _Dir):
                        stack.append((entry, [*parts, name]))
                    elif entry[2] == -1:
                        yield node, parts, name

    @staticmethod
    def set_stat(node: _Dir, name: str, stat: FileStat | None) -> None:
        if stat is None:
            if name in node.entries:
                del node.entries[name]
        elif name in node.entries:
            _writable(node)[name] = stat

    # -- internals -------------------------------------------------------------------------------

    def _vanished(self, entry: _Dir | FileStat, path: str) -> Iterator[Change]:
        """Synthetic deletes for an entry that is gone: contents first, as the kernel does."""
        if isinstance(entry, _Dir):
            for name, child in entry.entries.items():
                yield from self._vanished(child, join_path(path, [name]))
            yield Change(path, _DELETE, True, synthetic=True)
        else:
            yield Change(path, _DELETE, False, synthetic=True)

    def _take_scanned(self, node: _Dir, name: str, now: float) -> bool:
        assert node.scanned is not None
        until = node.scanned.pop(name, None)
        return until is not None and until >= now

    @staticmethod
    def _top(node: _Dir) -> _Dir:
        while node.parent is not None:
            node = node.parent
        return node

    def _forget(self, node: _Dir) -> None:
        self._gen += 1
        if node.wd >= 0 and self._wds.get(node.wd) is node:
            del self._wds[node.wd]
        self._scanned_nodes.pop(node, None)
        self._failed.pop(node, None)
        self._devs.pop(node, None)
        parent = node.parent
        if parent is not None and parent.entries.get(node.name) is node:
            del parent.entries[node.name]
        node.parent = None

    def _drop_subtree(self, node: _Dir) -> list[int]:
        wds, stack = [], [node]
        while stack:
            n = stack.pop()
            stack.extend(e for e in n.entries.values() if isinstance(e, _Dir))
            if n.wd >= 0 and self._wds.get(n.wd) is n:
                wds.append(n.wd)
            self._forget(n)
        return wds

    def _locate(self, node: _Dir) -> tuple[int, _Root, str, list[str]] | None:
        found = self._parts(node)
        if found is None:
            return None
        root, parts = found
        node.cache = (self._gen, root, join_path(root.prefix, parts).rstrip("/") + "/", parts)
        return node.cache

    def _parts(self, node: _Dir) -> tuple[_Root, list[str]] | None:
        parts: list[str] = []
        while node.parent is not None:
            if node.parent.entries.get(node.name) is not node:
                return None  # replaced at that name: no longer in the tree
            parts.append(node.name)
            node = node.parent
        root = node.root
        if root is None or root.node is not node or root.gone:
            return None
        parts.reverse()
        return root, parts


def _replaced(prev: _Dir | FileStat, is_dir: bool, ino: int) -> bool:
    if isinstance(prev, _Dir):
        # Not by inode: a mount point lists as the inode it covers. Whether the directory at
        # this place is still the one watched is checked when it is listed itself.
        return not is_dir
    return is_dir or (prev[0] != 0 and prev[0] != ino)  # 0: created by an event, same file


def _changed(prev: FileStat, now: FileStat, suspect_ns: int) -> bool:
    """Did a file change after subscribers last heard of it? ``prev`` with size -1 was last
    published by an event read at time ``prev[1]``. The events an overflow lost were all made
    after the last moment the kernel queue was known empty (``suspect_ns``): so the file may
    have changed unseen if that read came later, or if it was written after that moment."""
    if prev[2] == -1:
        return prev[1] >= suspect_ns or now[1] > suspect_ns - _CLOCK_SLACK_NS
    return prev != now


def _key(name: str) -> str | bytes:
    if name.isascii():
        return name
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name)
    return name


def _dump(node: _Dir) -> list[Any]:
    return [
        node.ino,
        {
            _key(name): _dump(e) if isinstance(e, _Dir) else list(e)
            for name, e in node.entries.items()
        },
    ]


def _load(data: Any) -> _Dir | None:
    """A snapshot's directory back into unwatched nodes to compare a listing against."""
    if not (isinstance(data, list) and len(data) == 2 and isinstance(data[1], dict)):
        return None

    def build(item: list[Any], name: str, parent: _Dir | None) -> _Dir:
        node = _Dir(_UNWATCHED, int(item[0]), name, parent, None)
        entries = _writable(node)
        for key, entry in item[1].items():
            child = os.fsdecode(key) if isinstance(key, bytes) else str(key)
            if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], dict):
                entries[child] = build(entry, child, node)
            elif isinstance(entry, list) and len(entry) == 3:
                entries[child] = (int(entry[0]), int(entry[1]), int(entry[2]))
        return node

    return build(data, "", None)
