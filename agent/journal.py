"""What subscribers were told, after an unclean stop: the last snapshot with the journal applied.

The snapshot is written now and then (and at a clean stop); the events published after it are
kept in the spool (the journal). After a SIGKILL, a crash or a power cut, the tree on disk must
be compared with what was *published*, not with the older snapshot: otherwise a file created
after the snapshot and deleted while the agent was down would never be reported gone. This
module applies the journal's events onto the snapshot, with no I/O.

The snapshot format is :meth:`Tree.snapshot`'s: ``{root local path: dir}``, a directory is
``[inode, {name: entry}]`` and a file ``[inode, mtime_ns, size]``; names are ``str``, or ``bytes``
where the name is not valid UTF-8. What this module does not know exactly it marks so that the
restart's comparison reports it: a new directory is ``[0, {}]`` (its listing announces all it
holds), a new or changed file ``[inode or 0, 0, -1]`` (it differs from any real stat).

That alone would report every file written since the snapshot as changed again. :func:`settle`
(the one function here that looks at the disk, through the ``stat`` it is given) puts back the
real stat of each such file that was not modified after its last event was read: its mtime and
ctime are not later than that event's time.
"""

from __future__ import annotations

import os
import stat as stat_mode
from collections.abc import Callable, Iterable
from typing import Any

from storage_events.wire import Event

_SELF = frozenset({"IN_DELETE_SELF", "IN_MOVE_SELF", "IN_UNMOUNT"})
_CHANGED = frozenset({"IN_CLOSE_WRITE", "IN_ATTRIB"})
# id(file entry) → (that entry, time of its last event), for settle(); holding the entry keeps
# its id unique.
Marks = dict[int, tuple[list[Any], int]]


def _is_dir(entry: Any) -> bool:
    return isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], dict)


def _new(is_dir: bool, ts: int, marks: Marks | None, ino: int = 0) -> list[Any]:
    if is_dir:
        return [0, {}]
    entry = [ino, 0, -1]
    if marks is not None:
        marks[id(entry)] = (entry, ts)
    return entry


def _key(entries: dict[Any, Any], raw: bytes) -> str | bytes:
    """The key ``raw`` has in ``entries``: its str when valid UTF-8, else its bytes (or, as an
    older snapshot may hold it, its ``os.fsdecode`` form)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    if raw not in entries:
        old = os.fsdecode(raw)
        if old in entries:
            return old
    return raw


def apply(
    snapshot: dict[str, Any],
    events: Iterable[Event],
    roots: Iterable[tuple[str, str]],
    marks: Marks | None = None,
) -> dict[str, Any]:
    """Apply ``events`` (published after ``snapshot`` was taken, in order) onto it; returns it
    (changed in place). ``roots``: (local path, published prefix) of each root. ``marks``, if
    given, collects the files marked changed, for :func:`settle`."""
    # Published prefix → local path, longest first: a root published inside another's prefix
    # wins, as in the watcher.
    prefixes = sorted(
        ((os.fsencode(prefix).rstrip(b"/"), local.rstrip("/") or "/") for local, prefix in roots),
        key=lambda t: -len(t[0]),
    )
    moving: dict[int, Any] = {}  # cookie → entry moved away, until its IN_MOVED_TO

    def locate(ev: Event) -> tuple[str, list[bytes]] | None:
        path = ev.raw_path if ev.raw_path is not None else ev.path.encode("utf-8")
        for prefix, local in prefixes:
            if path == prefix or path.startswith(prefix + b"/"):
                return local, [p for p in path[len(prefix) :].split(b"/") if p]
        return None

    for ev in events:
        flags = ev.flags
        if not flags or "IN_Q_OVERFLOW" in flags:
            # A kernel overflow is followed by the rescan's differences, which are in the
            # journal too; a loss notice in place of a refused event is covered by the overflow
            # an unclean start announces anyway.
            continue
        found = locate(ev)
        if found is None:
            continue
        local, parts = found
        if not parts:
            if _SELF.intersection(flags):
                snapshot.pop(local, None)  # the root itself is gone: no longer watched
            continue
        node = snapshot.get(local)
        for part in parts[:-1]:
            if not _is_dir(node):
                break
            node = node[1].get(_key(node[1], part))
        if not _is_dir(node):
            if "IN_MOVED_FROM" in flags and ev.cookie is not None:
                moving[ev.cookie] = None  # its partner is a move in from outside, then
            continue  # under a directory the model does not have: nothing to change
        entries: dict[Any, Any] = node[1]
        name = _key(entries, parts[-1])
        if "IN_CREATE" in flags:
            entries[name] = _new(ev.is_dir, ev.ts, marks)
        elif "IN_DELETE" in flags:
            entries.pop(name, None)
        elif "IN_MOVED_FROM" in flags:
            entry = entries.pop(name, None)
            if ev.cookie is not None:
                moving[ev.cookie] = entry
        elif "IN_MOVED_TO" in flags:
            entry = moving.pop(ev.cookie, None) if ev.cookie is not None else None
            if entry is None or _is_dir(entry) != ev.is_dir:
                entry = _new(ev.is_dir, ev.ts, marks)
            elif marks is not None and id(entry) in marks:
                marks[id(entry)] = (entry, ev.ts)  # a rename changes its ctime
            entries[name] = entry
        elif _CHANGED.intersection(flags) and not ev.is_dir:
            entry = entries.get(name)
            ino = entry[0] if isinstance(entry, list) and len(entry) == 3 else 0
            entries[name] = _new(False, ev.ts, marks, ino)
    return snapshot


def settle(
    snapshot: dict[str, Any], marks: Marks, stat: Callable[[str | bytes], os.stat_result] = os.lstat
) -> int:
    """Give each file :func:`apply` marked changed its real stat again when it has not been
    modified since its last event (so the restart does not report it twice); returns how many.
    A change within the same clock tick as the event's reading can pass for none: the unclean
    start's overflow notice covers that."""
    settled = 0
    for local, top in snapshot.items():
        if not _is_dir(top):
            continue
        stack: list[tuple[bytes, Any]] = [(os.fsencode(local).rstrip(b"/"), top)]
        while stack:
            base, node = stack.pop()
            for name, entry in node[1].items():
                path = base + b"/" + (name if isinstance(name, bytes) else os.fsencode(name))
                if _is_dir(entry):
                    stack.append((path, entry))
                    continue
                mark = marks.get(id(entry))
                if mark is None or mark[0] is not entry:
                    continue
                try:
                    st = stat(path)
                except OSError:
                    continue  # gone: the comparison reports it
                if (
                    not stat_mode.S_ISDIR(st.st_mode)
                    and st.st_mtime_ns <= mark[1]
                    and st.st_ctime_ns <= mark[1]
                ):
                    entry[:] = [st.st_ino, st.st_mtime_ns, st.st_size]
                    settled += 1
    return settled
