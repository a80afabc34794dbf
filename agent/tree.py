"""The agent's sans-I/O core: kernel inotify events in; changes to publish and watch commands out.

It owns the watch-descriptor → directory map as a tree of directory nodes (each knows its parent
and its name), so moving a directory with 10,000 watched descendants is one re-link, and a path
is always computed from the node's current place. The I/O shell (:mod:`.watcher`) adds the
watches and scans the directories this class asks for, and feeds the results back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from storage_events.wire import Flag

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
_CREATE, _DELETE = int(Flag.CREATE), int(Flag.DELETE)
_MOVED_FROM, _MOVED_TO = int(Flag.MOVED_FROM), int(Flag.MOVED_TO)
_Q_OVERFLOW, _IGNORED, _ISDIR = int(Flag.Q_OVERFLOW), int(Flag.IGNORED), int(Flag.ISDIR)
_SELF_EVENTS = int(Flag.DELETE_SELF | Flag.MOVE_SELF | Flag.UNMOUNT)


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
    """Add a watch on ``path`` (local), list it, and report both via :meth:`Tree.watched`."""

    path: str
    announce: bool  # publish what the listing finds (a new directory), or not (start-up)
    parent: _Dir | None = field(default=None, repr=False)
    name: str = ""
    root: _Root | None = field(default=None, repr=False)


@dataclass(slots=True)
class Unwatch:
    wd: int


Output = Change | WatchDir | Unwatch


@dataclass(slots=True)
class _Root:
    local: str
    prefix: str


class _Dir:
    __slots__ = ("children", "name", "parent", "root", "scanned", "wd")

    def __init__(self, wd: int, name: str, parent: _Dir | None, root: _Root | None) -> None:
        self.wd = wd
        self.name = name
        self.parent = parent
        self.root = root  # set on root nodes only
        self.children: dict[str, _Dir] = {}
        # Names a scan just announced; a real IN_CREATE for one of them that follows is the same
        # file seen twice (created between inotify_add_watch and the listing), not a new one.
        self.scanned: dict[str, float] = {}


@dataclass(slots=True)
class _PendingMove:
    path: str
    node: _Dir | None
    deadline: float


def _join(base: str, rel: list[str]) -> str:
    if not rel:
        return base or "/"
    return base.rstrip("/") + "/" + "/".join(rel)


class Tree:
    """Tracks every watched directory under one or more roots.

    ``move_window``: how long an ``IN_MOVED_FROM`` waits for its ``IN_MOVED_TO`` before the
    directory counts as moved out of the tree. ``scan_memory``: how long a scanned name suppresses
    a duplicate ``IN_CREATE``.
    """

    def __init__(self, *, move_window: float = 0.5, scan_memory: float = 5.0) -> None:
        self.move_window = move_window
        self.scan_memory = scan_memory
        self._wds: dict[int, _Dir] = {}
        self._roots: list[_Root] = []
        self._moves: dict[int, _PendingMove] = {}
        self._scanned_nodes: dict[_Dir, float] = {}

    @property
    def watch_count(self) -> int:
        return len(self._wds)

    def add_root(self, local: str, prefix: str | None = None) -> list[Output]:
        root = _Root(local.rstrip("/") or "/", (prefix if prefix is not None else local))
        self._roots.append(root)
        return [WatchDir(root.local, announce=False, root=root)]

    # -- feedback from the shell ---------------------------------------------------------------

    def watched(
        self, wd: int, cmd: WatchDir, entries: list[tuple[str, bool]], now: float
    ) -> list[Output]:
        """The watch asked for by ``cmd`` landed as ``wd``; ``entries`` are (name, is_dir) found
        in the directory after the watch was in place."""
        node = self._wds.get(wd)
        if node is not None and self._local(node) not in (None, cmd.path):
            return []  # same directory reachable twice (bind mount): watch it once
        if node is None:
            node = _Dir(wd, cmd.name, None, cmd.root)
            self._wds[wd] = node
        if cmd.parent is not None:
            self._link(node, cmd.parent, cmd.name)
        out: list[Output] = []
        for name, is_dir in entries:
            if cmd.announce:
                out.append(
                    Change(self._published(node, name) or "", _CREATE, is_dir, synthetic=True)
                )
                node.scanned[name] = now + self.scan_memory
            if is_dir and name not in node.children:
                out.append(WatchDir(_join(cmd.path, [name]), cmd.announce, node, name))
        if cmd.announce and entries:
            self._scanned_nodes[node] = now + self.scan_memory
        return out

    # -- kernel events ---------------------------------------------------------------------------

    def handle(self, wd: int, mask: int, cookie: int, name: str, now: float) -> list[Output]:
        if mask & _Q_OVERFLOW:
            return [Change(r.prefix, _Q_OVERFLOW, True) for r in self._roots]
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
                return [Change(node.root.prefix, kind & _SELF_EVENTS, True)]
            return []
        path = self._published(node, name)
        if path is None:
            return []  # inside a directory that is no longer in the tree
        if kind & _CREATE:
            if self._take_scanned(node, name, now):
                return []
            out: list[Output] = [Change(path, _CREATE, is_dir)]
            if is_dir:
                out.append(self._watch_child(node, name))
            return out
        node.scanned.pop(name, None)
        if kind & _MOVED_FROM:
            child = node.children.pop(name, None) if is_dir else None
            if child is not None:
                child.parent = None  # in limbo until its IN_MOVED_TO, or out of the tree
            self._moves[cookie] = _PendingMove(path, child, now + self.move_window)
            return [Change(path, _MOVED_FROM, is_dir, cookie=cookie)]
        if kind & _MOVED_TO:
            pending = self._moves.pop(cookie, None)
            out = [Change(path, _MOVED_TO, is_dir, cookie=cookie,
                          old_path=pending.path if pending else None)]
            if pending is not None and pending.node is not None:
                self._link(pending.node, node, name)
            elif is_dir:
                out.append(self._watch_child(node, name))  # moved in from outside: scan it
            return out
        if kind & _DELETE and is_dir:
            child = node.children.pop(name, None)
            if child is not None:
                child.parent = None
        return [Change(path, kind, is_dir, cookie=cookie or None)]

    def expire(self, now: float) -> list[Output]:
        """Resolve what has waited long enough: unpaired moves and old scan memories."""
        out: list[Output] = []
        for cookie, move in list(self._moves.items()):
            if move.deadline <= now:
                del self._moves[cookie]
                if move.node is not None:
                    out.extend(Unwatch(wd) for wd in self._drop_subtree(move.node))
        for node, until in list(self._scanned_nodes.items()):
            if until <= now:
                node.scanned.clear()
                del self._scanned_nodes[node]
        return out

    @property
    def next_deadline(self) -> float | None:
        deadlines = [m.deadline for m in self._moves.values()]
        deadlines.extend(self._scanned_nodes.values())
        return min(deadlines, default=None)

    # -- internals -------------------------------------------------------------------------------

    def _watch_child(self, node: _Dir, name: str) -> WatchDir:
        return WatchDir(_join(self._local(node) or "", [name]), True, node, name)

    def _take_scanned(self, node: _Dir, name: str, now: float) -> bool:
        until = node.scanned.pop(name, None)
        return until is not None and until >= now

    def _link(self, node: _Dir, parent: _Dir, name: str) -> None:
        if node.parent is not None and node.parent.children.get(node.name) is node:
            del node.parent.children[node.name]
        node.parent, node.name = parent, name
        parent.children[name] = node

    def _forget(self, node: _Dir) -> None:
        self._wds.pop(node.wd, None)
        self._scanned_nodes.pop(node, None)
        parent = node.parent
        if parent is not None and parent.children.get(node.name) is node:
            del parent.children[node.name]
        node.parent = None

    def _drop_subtree(self, node: _Dir) -> list[int]:
        wds, stack = [], [node]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            if self._wds.get(n.wd) is n:
                wds.append(n.wd)
                self._forget(n)
        return wds

    def _parts(self, node: _Dir) -> tuple[_Root, list[str]] | None:
        parts: list[str] = []
        while node.parent is not None:
            parts.append(node.name)
            node = node.parent
        if node.root is None:
            return None
        parts.reverse()
        return node.root, parts

    def _local(self, node: _Dir) -> str | None:
        found = self._parts(node)
        return None if found is None else _join(found[0].local, found[1])

    def _published(self, node: _Dir, name: str) -> str | None:
        found = self._parts(node)
        return None if found is None else _join(found[0].prefix, [*found[1], name])
