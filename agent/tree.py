"""The agent's sans-I/O core: kernel inotify events in; changes to publish and watch commands out.

It keeps a model of the watched trees: a node per directory (its watch descriptor, its parent,
its name) holding its entries, subdirectories as nodes and files as ``(inode, mtime_ns, size)``.
A path is always computed from a node's current place, so moving a directory with 10,000
watched descendants is one re-link, and nothing is ever published under a directory's old path.

The same model is the snapshot a rescan compares against: after a kernel queue overflow, and
at start-up against the snapshot saved when the agent last stopped, the difference between the
model and a fresh listing is published as synthetic events, so the subscriber's picture of the
tree ends up exactly right.

The I/O shell (:mod:`.watcher`) adds the watches and lists the directories this class asks for
(:class:`WatchDir`), feeding the results back through :meth:`Tree.watched`.
"""

from __future__ import annotations

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
_MOVED_FROM, _MOVED_TO = int(Flag.MOVED_FROM), int(Flag.MOVED_TO)
_Q_OVERFLOW, _IGNORED, _ISDIR = int(Flag.Q_OVERFLOW), int(Flag.IGNORED), int(Flag.ISDIR)
_SELF_EVENTS = int(Flag.DELETE_SELF | Flag.MOVE_SELF | Flag.UNMOUNT)

FileStat = tuple[int, int, int]  # inode, mtime_ns, size
_UNWATCHABLE, _UNREACHED = -1, -2  # wd of a directory in the model that has no watch
UNKNOWN: FileStat = (0, 0, -1)  # changed since it was last listed; the shell stats it on saving
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


@dataclass(slots=True)
class WatchDir:
    """Add a watch on ``path`` (local), list it, and report both via :meth:`Tree.watched`
    (or :meth:`Tree.watch_failed`)."""

    path: str
    announce: bool  # publish what the listing finds (a new directory), or not (start-up)
    parent: _Dir | None = field(default=None, repr=False)
    name: str = ""
    root: _Root | None = field(default=None, repr=False)
    # What this directory held before, when the listing is to be compared with it (a rescan).
    old: _Dir | None = field(default=None, repr=False)
    ino: int = 0  # from the parent's listing; 0 when not known


@dataclass(slots=True)
class Unwatch:
    wd: int


@dataclass(slots=True)
class RescanDone:
    """Marks the end of a rescan's commands; the shell hands it back to :meth:`Tree.watched`'s
    sibling :meth:`Tree.finish_rescan`."""


Output = Change | WatchDir | Unwatch | RescanDone


@dataclass(slots=True)
class _Root:
    local: str
    prefix: str
    select: Selector | None = None
    node: _Dir | None = None
    gone: bool = False


class _Dir:
    __slots__ = ("cache", "entries", "ino", "name", "parent", "root", "scanned", "wd")

    def __init__(self, wd: int, ino: int, name: str, parent: _Dir | None,
                 root: _Root | None) -> None:
        self.wd = wd  # or _UNWATCHABLE / _UNREACHED
        self.ino = ino
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


@dataclass(slots=True)
class _PendingMove:
    path: str
    entry: _Dir | FileStat | None
    deadline: float


_EMPTY: dict[str, Any] = {}


def _writable(node: _Dir) -> dict[str, _Dir | FileStat]:
    if node.entries is _EMPTY:
        node.entries = {}
    return node.entries


def _join(base: str, rel: list[str]) -> str:
    if not rel:
        return base or "/"
    return base.rstrip("/") + "/" + "/".join(rel)


class Tree:
    """Tracks every watched directory under one or more roots.

    ``move_window``: how long an ``IN_MOVED_FROM`` waits for its ``IN_MOVED_TO`` before the
    directory counts as moved out of the tree. ``scan_memory``: how long a listed name suppresses
    a duplicate ``IN_CREATE``.
    """

    def __init__(self, *, move_window: float = 0.5, scan_memory: float = 5.0) -> None:
        self.move_window = move_window
        self.scan_memory = scan_memory
        self._wds: dict[int, _Dir] = {}
        self._roots: list[_Root] = []
        self._moves: dict[int, _PendingMove] = {}
        self._scanned_nodes: dict[_Dir, float] = {}
        self._stale: dict[int, _Dir] = {}  # the watches of the model a rescan is replacing
        self._unreached = 0  # directories whose watch found nothing at their path (so far)
        self._selective = False  # some root leaves names out
        self._gen = 0  # bumped whenever a directory is re-linked or detached: paths change
        self.rescans = 0

    @property
    def watch_count(self) -> int:
        return len(self._wds)

    def add_root(self, local: str, prefix: str | None = None,
                 previous: dict[str, Any] | None = None,
                 select: Selector | None = None) -> list[Output]:
        """Watch a root. With ``previous`` (from :meth:`snapshot` of an earlier run), what
        changed since is published; without, the tree as found is the starting point.
        ``select``: names to leave out (neither watched nor published)."""
        root = _Root(local.rstrip("/") or "/", prefix if prefix is not None else local,
                     select if select is not None and select.active else None)
        self._selective = self._selective or root.select is not None
        self._roots.append(root)
        old = _load(previous, root) if previous is not None else None
        return [WatchDir(root.local, announce=False, root=root, old=old)]

    # -- feedback from the shell ---------------------------------------------------------------

    def attach(self, wd: int, parent: _Dir | None, name: str, ino: int,
               root: _Root | None) -> _Dir | None:
        """Start-up, where nothing is published: the shell walks the tree itself (the cheapest
        loop for 100,000 directories) and records each watch and file here. None: that
        directory is watched already (reachable twice, through a bind mount)."""
        if wd in self._wds:
            return None
        node = _Dir(wd, ino, name, parent, root)
        self._wds[wd] = node
        if parent is not None:
            _writable(parent)[name] = node
        elif root is not None:
            root.node = node
        return node

    @staticmethod
    def attach_file(node: _Dir, name: str, stat: FileStat) -> None:
        _writable(node)[name] = stat

    def watched(self, wd: int, cmd: WatchDir, entries: Listing, now: float) -> list[Output]:
        """The watch asked for by ``cmd`` landed as ``wd``; ``entries`` were listed after the
        watch was in place."""
        existing = self._wds.get(wd)
        if existing is not None:
            if self._local(existing) == cmd.path:
                return []  # already watched right here (a listing got to it first)
            return self._moved_here(existing, cmd)
        node = _Dir(wd, cmd.ino, cmd.name, None, cmd.root)
        self._wds[wd] = node
        self._place(node, cmd)
        return self._listed(node, cmd, entries, now)

    def _moved_here(self, node: _Dir, cmd: WatchDir) -> list[Output]:
        """A directory we watch turned up at ``cmd.path``: it was moved, and the events of the
        move are still queued, or were never made (its new parent had no watch yet). Re-link it
        here, and announce what it holds under its new path."""
        for move in self._moves.values():
            if move.entry is node:
                move.entry = None  # it is in the tree after all: never drop its watches
        if cmd.parent is None:
            return []
        self._link(node, cmd.parent, cmd.name)
        if not cmd.announce:
            return []
        out: list[Output] = []
        stack = [(node, self._published(cmd.parent, cmd.name) or "")]
        while stack:
            n, path = stack.pop()
            for name, e in n.entries.items():
                child = _join(path, [name])
                out.append(Change(child, _CREATE, isinstance(e, _Dir), synthetic=True))
                if isinstance(e, _Dir):
                    stack.append((e, child))
        return out

    def watch_failed(self, cmd: WatchDir, *, reached: bool) -> None:
        """The watch could not be added. ``reached``: the directory is there but cannot be
        watched (the shell logged why); else nothing was at ``cmd.path``, either because the
        directory is gone (its removal is queued) or because a directory above it was renamed
        (that rename, when handled, retries the watch). Either way it stays in the model,
        unwatched, so its parent's events and later rescans make sense."""
        node = _Dir(_UNWATCHABLE if reached else _UNREACHED, cmd.ino, cmd.name, None, cmd.root)
        if cmd.old is not None:
            node.entries = cmd.old.entries  # what the subscriber was told it holds
        self._place(node, cmd)
        if not reached:
            self._unreached += 1

    def _place(self, node: _Dir, cmd: WatchDir) -> None:
        if cmd.parent is not None:
            self._link(node, cmd.parent, cmd.name)
        elif cmd.root is not None:
            cmd.root.node = node

    def _listed(self, node: _Dir, cmd: WatchDir, entries: Listing, now: float) -> list[Output]:
        out: list[Output] = []
        base = cmd.path.rstrip("/") + "/"
        found = self._parts(node)
        if found is None:
            return out
        select, parts = found[0].select, found[1]
        pub = _join(found[0].prefix, parts)
        old = dict(cmd.old.entries) if cmd.old is not None else None
        announced: list[str] = []
        mine = _writable(node)
        for name, is_dir, ino, mtime, size in entries:
            if select is not None and select.excluded(parts, name, is_dir):
                continue
            prev = old.pop(name, None) if old is not None else None
            path = _join(pub, [name])
            new = cmd.announce or (old is not None and prev is None)
            if prev is not None and _replaced(prev, is_dir, ino):
                out.extend(self._vanished(prev, path))  # another file or directory now
                prev, new = None, True
            if new:
                out.append(Change(path, _CREATE, is_dir, synthetic=True))
                announced.append(name)
            if is_dir:
                # In the model at once: it was published, so even if it is gone before its
                # watch lands, a later rescan must know to report it removed.
                mine[name] = _Dir(_UNWATCHABLE, ino, name, node, None)
                out.append(WatchDir(base + name, new, node, name,
                                    old=prev if isinstance(prev, _Dir) else None, ino=ino))
            else:
                stat = (ino, mtime, size)
                mine[name] = stat
                if prev is not None and prev != stat:
                    out.append(Change(path, _CLOSE_WRITE, False, synthetic=True))
        if old:
            for name, prev in old.items():
                out.extend(self._vanished(prev, _join(pub, [name])))
        if announced:
            until = now + self.scan_memory
            scanned = node.scanned if node.scanned is not None else {}
            scanned.update(dict.fromkeys(announced, until))
            node.scanned = scanned
            self._scanned_nodes[node] = until
        return out

    def _vanished(self, entry: _Dir | FileStat, path: str) -> Iterator[Change]:
        """Synthetic deletes for an entry that is gone: contents first, as the kernel does."""
        if isinstance(entry, _Dir):
            for name, child in entry.entries.items():
                yield from self._vanished(child, _join(path, [name]))
            yield Change(path, _DELETE, True, synthetic=True)
        else:
            yield Change(path, _DELETE, False, synthetic=True)

    # -- kernel events ---------------------------------------------------------------------------

    def handle(self, wd: int, mask: int, cookie: int, name: str, now: float) -> list[Output]:
        if mask & _Q_OVERFLOW:
            out: list[Output] = [Change(r.prefix, _Q_OVERFLOW, True) for r in self._roots
                                 if not r.gone]
            return out + self.rescan()
        node = self._wds.get(wd)
        if node is None:
            return []  # late event of a watch we already dropped
        if mask & _IGNORED:
            self._forget(node)
            return []
        is_dir = bool(mask & _ISDIR)
        kind = mask & ~_ISDIR
        if not name:
            # About the watched directory itself: its parent reports it, unless it is a root.
            if node.root is not None and kind & _SELF_EVENTS:
                return self._root_gone(node.root, kind & _SELF_EVENTS)
            return []
        cached = node.cache
        if cached is None or cached[0] != self._gen:
            cached = self._locate(node)
            if cached is None:
                return []  # inside a directory that is no longer in the tree
        _, root, base, parts = cached
        if root.select is not None and root.select.excluded(parts, name, is_dir):
            return []
        path = base + name
        entries = _writable(node)
        if kind & _CREATE:
            if node.scanned is not None and self._take_scanned(node, name, now):
                return []
            if is_dir:
                return [Change(path, _CREATE, True), self._watch_child(node, name)]
            entries[name] = UNKNOWN
            return [Change(path, _CREATE, False)]
        if node.scanned is not None:
            node.scanned.pop(name, None)
        if kind & _MOVED_FROM:
            entry = entries.pop(name, None)
            if isinstance(entry, _Dir):
                entry.parent = None  # in limbo until its IN_MOVED_TO, or out of the tree
                self._gen += 1
            self._moves[cookie] = _PendingMove(path, entry, now + self.move_window)
            return [Change(path, _MOVED_FROM, is_dir, cookie=cookie)]
        if kind & _MOVED_TO:
            pending = self._moves.pop(cookie, None)
            out = [Change(path, _MOVED_TO, is_dir, cookie=cookie,
                          old_path=pending.path if pending else None)]
            moved = pending.entry if pending is not None else None
            if isinstance(moved, _Dir):
                self._link(moved, node, name)
                if self._unreached:
                    out.extend(self._retry_unreached(moved))
            elif is_dir:
                here = entries.get(name)
                if not (isinstance(here, _Dir) and here.wd >= 0):
                    out.append(self._watch_child(node, name))  # moved in from outside: list it
                # else: a listing that ran after the move already watched and announced it
            else:
                entries[name] = moved if moved is not None else UNKNOWN
            return out
        if kind & _DELETE:
            entry = entries.pop(name, None)
            if isinstance(entry, _Dir):
                entry.parent = None
                self._gen += 1
        elif not is_dir:  # CLOSE_WRITE, ATTRIB: contents or metadata changed
            entries[name] = UNKNOWN
        return [Change(path, kind, is_dir, cookie=cookie or None)]

    def _retry_unreached(self, top: _Dir) -> list[Output]:
        """A directory was renamed: its descendants that could not be reached under their old
        path can be now."""
        out: list[Output] = []
        stack = [top]
        while stack:
            n = stack.pop()
            if n.wd != _UNREACHED:
                stack.extend(e for e in n.entries.values() if isinstance(e, _Dir))
            elif n.parent is not None:
                self._unreached -= 1
                out.append(WatchDir(_join(self._local(n.parent) or "", [n.name]), False,
                                    n.parent, n.name, old=n, ino=n.ino))
        return out

    def _root_gone(self, root: _Root, kind: int) -> list[Output]:
        """The root itself was deleted, moved or unmounted: say so and stop watching it (its
        events would otherwise come under a path that no longer holds them)."""
        out: list[Output] = [Change(root.prefix, kind, True)]
        root.gone = True
        if root.node is not None:
            out.extend(Unwatch(wd) for wd in self._drop_subtree(root.node))
            root.node = None
        return out

    def rescan(self) -> list[Output]:
        """Compare the model with the trees as they are now (after an overflow lost events):
        the shell re-lists everything and what differs is published."""
        self.rescans += 1
        self._moves.clear()  # halves whose partners were lost are resolved by the listing
        self._stale = {**self._stale, **self._wds}
        self._wds = {}
        out: list[Output] = []
        self._gen += 1
        for root in self._roots:
            if root.gone:
                continue
            old, root.node = root.node, None
            out.append(WatchDir(root.local, announce=False, root=root, old=old))
        out.append(RescanDone())
        return out

    def finish_rescan(self) -> list[Output]:
        stale = [wd for wd in self._stale if wd not in self._wds]
        self._stale = {}
        return [Unwatch(wd) for wd in stale]

    def expire(self, now: float) -> list[Output]:
        """Resolve what has waited long enough: unpaired moves and old scan memories."""
        out: list[Output] = []
        for cookie, move in list(self._moves.items()):
            if move.deadline <= now:
                del self._moves[cookie]
                if isinstance(move.entry, _Dir):
                    out.extend(Unwatch(wd) for wd in self._drop_subtree(move.entry))
        for node, until in list(self._scanned_nodes.items()):
            if until <= now:
                node.scanned = None
                del self._scanned_nodes[node]
        return out

    # -- the snapshot --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The model as plain data, per root local path: a directory is ``[inode, {name:
        entry}]``, a file ``[inode, mtime_ns, size]`` (``UNKNOWN`` where it changed since it was
        listed: see :meth:`unknown_files`)."""
        return {r.local: _dump(r.node) for r in self._roots if r.node is not None}

    def unknown_files(self) -> Iterator[tuple[str, _Dir, str]]:
        """(local path, directory, name) of every file whose stat the model does not know."""
        for root in self._roots:
            if root.node is None:
                continue
            stack = [(root.node, root.local)]
            while stack:
                node, path = stack.pop()
                for name, entry in node.entries.items():
                    if isinstance(entry, _Dir):
                        stack.append((entry, _join(path, [name])))
                    elif entry == UNKNOWN:
                        yield _join(path, [name]), node, name

    @staticmethod
    def set_stat(node: _Dir, name: str, stat: FileStat | None) -> None:
        if stat is None:
            node.entries.pop(name, None)
        elif name in node.entries:
            _writable(node)[name] = stat

    # -- internals -------------------------------------------------------------------------------

    def _watch_child(self, node: _Dir, name: str) -> WatchDir:
        # Published as existing, so in the model from now on, even if it is gone before its
        # watch can be added: a later rescan must see it to report it removed.
        _writable(node)[name] = _Dir(_UNWATCHABLE, 0, name, node, None)
        return WatchDir(_join(self._local(node) or "", [name]), True, node, name)

    def _take_scanned(self, node: _Dir, name: str, now: float) -> bool:
        assert node.scanned is not None
        until = node.scanned.pop(name, None)
        return until is not None and until >= now

    def _link(self, node: _Dir, parent: _Dir, name: str) -> None:
        """Put ``node`` at ``parent/name``. Cached paths only go stale when a directory that
        was somewhere moves, or a watched one is displaced: not when a new one is added."""
        if node.parent is not None:
            self._gen += 1
            if node.parent.entries.get(node.name) is node:
                del node.parent.entries[node.name]
        here = parent.entries.get(name)
        if isinstance(here, _Dir) and here is not node:
            here.parent = None  # a placeholder, or a directory that was replaced
            if here.wd >= 0:
                self._gen += 1
        node.parent, node.name = parent, name
        _writable(parent)[name] = node

    def _forget(self, node: _Dir) -> None:
        self._gen += 1
        if self._wds.get(node.wd) is node:
            del self._wds[node.wd]
        self._scanned_nodes.pop(node, None)
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
        node.cache = (self._gen, root, _join(root.prefix, parts).rstrip("/") + "/", parts)
        return node.cache

    def _parts(self, node: _Dir) -> tuple[_Root, list[str]] | None:
        parts: list[str] = []
        while node.parent is not None:
            parts.append(node.name)
            node = node.parent
        root = node.root
        if root is None or root.node is not node:
            return None
        parts.reverse()
        return root, parts

    def _local(self, node: _Dir) -> str | None:
        found = self._parts(node)
        return None if found is None else _join(found[0].local, found[1])

    def _published(self, node: _Dir, name: str) -> str | None:
        found = self._parts(node)
        return None if found is None else _join(found[0].prefix, [*found[1], name])


def _replaced(prev: _Dir | FileStat, is_dir: bool, ino: int) -> bool:
    if isinstance(prev, _Dir):
        return not is_dir or bool(prev.ino and ino and prev.ino != ino)
    return is_dir or (prev[0] != 0 and prev[0] != ino)  # 0: changed since listed, same file


def _dump(node: _Dir) -> list[Any]:
    return [node.ino, {name: _dump(e) if isinstance(e, _Dir) else list(e)
                       for name, e in node.entries.items()}]


def _load(data: Any, root: _Root) -> _Dir | None:
    """A snapshot's directory back into (unwatched, detached) nodes to compare against."""
    if not (isinstance(data, list) and len(data) == 2 and isinstance(data[1], dict)):
        return None

    def build(item: list[Any], name: str) -> _Dir:
        node = _Dir(_UNWATCHABLE, int(item[0]), name, None, None)
        entries = _writable(node)
        for child, entry in item[1].items():
            if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], dict):
                entries[child] = build(entry, child)
            elif isinstance(entry, list) and len(entry) == 3:
                entries[child] = (int(entry[0]), int(entry[1]), int(entry[2]))
        return node

    return build(data, "")
