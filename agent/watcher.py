"""The agent's I/O shell around :class:`~.tree.Tree`: the inotify fd, watches and listings."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inotify_simple import INotify

from storage_events.wire import Event, Flag, display_path, flag_names

from .select import Selector
from .tree import WATCH_MASK, Change, Listing, Output, RescanDone, Tree, Unwatch, WatchDir

log = logging.getLogger("storage_events.agent")

_IN_ONLYDIR, _IN_DONT_FOLLOW, _IN_EXCL_UNLINK = 0x01000000, 0x02000000, 0x04000000
# IN_DONT_FOLLOW only for paths: through /proc/self/fd/N the link to follow is the point.
_ADD_FLAGS = WATCH_MASK | _IN_ONLYDIR | _IN_EXCL_UNLINK
_DIR_OPEN_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_Q_OVERFLOW = int(Flag.Q_OVERFLOW)
_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name
_PROGRESS_EVERY = 5.0  # seconds between progress lines during a long initial watch set-up


@dataclass(frozen=True, slots=True)
class Root:
    path: str  # local directory
    prefix: str  # published in its place
    select: Selector | None = None
    types: int = 0  # inotify flags to publish; 0: all


def _sysctl(name: str) -> str:
    try:
        with open(f"/proc/sys/fs/inotify/{name}") as f:
            return f.read().strip()
    except OSError:
        return "?"


# By its soname: ctypes.util.find_library would run ldconfig, at a cost the start-up feels.
_LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
_LIBC.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_LIBC.inotify_add_watch.restype = ctypes.c_int


def _list(where: int | str) -> Listing:
    entries: Listing = []
    with os.scandir(where) as it:
        for entry in it:
            try:
                if entry.is_dir(follow_symlinks=False):
                    # Interned: big trees repeat directory names (run001, raw, ...).
                    entries.append((sys.intern(entry.name), True, entry.inode(), 0, 0))
                else:
                    st = entry.stat(follow_symlinks=False)
                    entries.append((entry.name, False, st.st_ino, st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                pass  # removed while listing: its IN_DELETE follows
    return entries


class Watcher:
    """Reads kernel events, keeps the watches in step, and hands changes to ``sink``."""

    def __init__(self, roots: list[Root], *, site: str, node: str,
                 sink: Callable[[Event], None]) -> None:
        self.roots = roots
        self.site = site
        self.node = node
        self.sink = sink  # takes every event to publish, in order
        self.tree = Tree()
        # Longest prefix first, so a root published inside another's prefix wins.
        self._typed = sorted(((r.prefix.rstrip("/"), r.types) for r in roots if r.types),
                             key=lambda t: -len(t[0]))
        self.inotify = INotify()
        self.fd = self.inotify.fileno()
        # The libc call itself: inotify_simple's wrapper costs more than the system call, and
        # the start-up adds one watch per directory.
        self._add_watch = _LIBC.inotify_add_watch
        self.watch_errors = 0
        self._flags: dict[int, list[str]] = {}
        self._ts = time.time_ns()
        self._limit_reported = False

    def fileno(self) -> int:
        return self.inotify.fileno()

    def close(self) -> None:
        self.inotify.close()

    def start(self, previous: dict[str, Any] | None = None, *, unclean: bool = False) -> int:
        """Watch every root recursively; returns how many roots could be watched at all.

        ``previous``: the snapshot saved when the agent last stopped; what changed since is
        published. ``unclean``: the last run did not stop cleanly, so events may be missing
        between its last flush and the snapshot: announced as an overflow before the diff."""
        started = time.monotonic()
        self._ts = time.time_ns()
        self._next_progress = started + _PROGRESS_EVERY
        watched = 0
        for root in self.roots:
            before = self.tree.watch_count
            if unclean:
                self._publish(Change(root.prefix, int(Flag.Q_OVERFLOW), True))
            old = previous.get(root.path) if previous else None
            if old is not None:
                log.info("publishing what changed under %s since the agent last stopped",
                         root.path)
            for cmd in self.tree.add_root(root.path, root.prefix, old, root.select):
                if isinstance(cmd, WatchDir) and cmd.old is None:
                    self._build(cmd)
                else:
                    self._run([cmd])
            if self.tree.watch_count > before:
                watched += 1
        log.info(
            "watching %d directories under %s in %.2f s",
            self.tree.watch_count,
            ", ".join(r.path for r in self.roots),
            time.monotonic() - started,
        )
        return watched

    def read(self) -> None:
        """Handle whatever the kernel has queued (never blocks)."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while poller.poll(0):
            self.handle_raw([os.read(self.fd, 1 << 20)])

    def handle_raw(self, chunks: list[bytes]) -> None:
        """Handle raw bytes read from the inotify fd (see :mod:`.kernel_reader`)."""
        handle, publish, run = self.tree.handle, self._publish, self._run
        unpack = _HEADER.unpack_from
        for data in chunks:
            now = time.monotonic()
            self._ts = time.time_ns()  # the time the agent read them, for every event here
            pos, end = 0, len(data)
            while pos < end:
                wd, mask, cookie, length = unpack(data, pos)
                pos += 16
                name = ""
                if length:
                    name = data[pos:pos + length].rstrip(b"\0").decode("utf-8",
                                                                         "surrogateescape")
                    pos += length
                outs = handle(wd, mask, cookie, name, now)
                if len(outs) == 1 and type(outs[0]) is Change:
                    publish(outs[0])  # the common case, without the general machinery
                elif outs:
                    run(outs)

    def expire(self) -> None:
        self._ts = time.time_ns()
        self._run(self.tree.expire(time.monotonic()))

    def snapshot(self) -> dict[str, Any]:
        """The tree model for the spool, with the stats of files changed since listed."""
        for path, node, name in list(self.tree.unknown_files()):
            try:
                st = os.lstat(path)
            except OSError:
                self.tree.set_stat(node, name, None)
                continue
            self.tree.set_stat(node, name, (st.st_ino, st.st_mtime_ns, st.st_size))
        return self.tree.snapshot()

    def _run(self, outputs: list[Output]) -> None:
        # Depth first, so a new directory's own event precedes those of its contents.
        todo: deque[Output] = deque(outputs)
        while todo:
            out = todo.popleft()
            if isinstance(out, Change):
                self._publish(out)
            elif isinstance(out, WatchDir):
                todo.extendleft(reversed(self._watch(out)))
            elif isinstance(out, Unwatch):
                with contextlib.suppress(OSError):  # already gone with its directory
                    self.inotify.rm_watch(out.wd)
            elif isinstance(out, RescanDone):
                todo.extend(self.tree.finish_rescan())
                log.warning("rescan %d done: %d directories watched", self.tree.rescans,
                            self.tree.watch_count)

    def _watch(self, cmd: WatchDir) -> list[Output]:
        # Watch and list through one open descriptor, so both are of the same directory even if
        # it is renamed meanwhile (the rename's events, still queued, re-link it afterwards).
        try:
            fd = os.open(cmd.path, _DIR_OPEN_FLAGS)
        except OSError as e:
            self.tree.watch_failed(cmd, reached=self._watch_failed(cmd.path, e))
            return []
        try:
            wd = self.inotify.add_watch(f"/proc/self/fd/{fd}", _ADD_FLAGS)
            cmd.ino = os.fstat(fd).st_ino
            entries = _list(fd)
        except OSError as e:
            self.tree.watch_failed(cmd, reached=self._watch_failed(cmd.path, e))
            return []
        finally:
            os.close(fd)
        return self.tree.watched(wd, cmd, entries, self._progress())

    def _build(self, top: WatchDir) -> None:
        """Watch a whole tree at start-up, publishing nothing: a plain loop, since with 100,000
        directories every microsecond per directory is a tenth of a second."""
        tree, add, fd, flags = self.tree, self._add_watch, self.fd, _ADD_FLAGS | _IN_DONT_FOLLOW
        root = top.root
        select = root.select if root is not None else None
        stack: list[tuple[str, Any, str, int, list[str]]] = [(top.path, None, "", 0, [])]
        while stack:
            path, parent, name, ino, parts = stack.pop()
            wd = add(fd, os.fsencode(path), flags)
            if wd < 0:
                err = ctypes.get_errno()
                if self._watch_failed(path, OSError(err, os.strerror(err), path)):
                    tree.watch_failed(WatchDir(path, False, parent, name,
                                               root if parent is None else None, ino=ino),
                                      reached=True)
                continue
            node = tree.attach(wd, parent, name, ino, root if parent is None else None)
            if node is None:
                continue
            base = path.rstrip("/") + "/"
            try:
                with os.scandir(path) as it:
                    for e in it:
                        try:
                            if e.is_dir(follow_symlinks=False):
                                n = sys.intern(e.name)
                                if select is None:
                                    stack.append((base + n, node, n, e.inode(), parts))
                                elif not select.excluded(parts, n, True):
                                    stack.append((base + n, node, n, e.inode(), [*parts, n]))
                            elif select is None or not select.excluded(parts, e.name, False):
                                st = e.stat(follow_symlinks=False)
                                tree.attach_file(node, e.name,
                                                 (st.st_ino, st.st_mtime_ns, st.st_size))
                        except FileNotFoundError:
                            pass  # removed while listing: its IN_DELETE follows
            except OSError as e:
                self._watch_failed(path, e)
            self._progress()

    def _progress(self) -> float:
        now = time.monotonic()
        if now >= self._next_progress:
            self._next_progress = now + _PROGRESS_EVERY
            log.info("still adding watches: %d directories so far", self.tree.watch_count)
        return now

    def _watch_failed(self, path: str, e: OSError) -> bool:
        """Log why ``path`` cannot be watched; False when it is not there (any more)."""
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            # Removed before we got to it (its parent's events say so), or a directory above it
            # was renamed and its events are still queued (the tree retries then).
            return False
        self.watch_errors += 1
        if e.errno == errno.ENOSPC:
            if not self._limit_reported:
                self._limit_reported = True
                limit = _sysctl("max_user_watches")
                log.error(
                    "inotify watch limit reached at %s (%d watches, fs.inotify.max_user_watches="
                    "%s): directories from here on are NOT watched. Raise the limit, e.g. "
                    "`sysctl -w fs.inotify.max_user_watches=%d`, and restart the agent.",
                    path, self.tree.watch_count, limit, max(2 * self.tree.watch_count, 1048576),
                )
        elif e.errno in (errno.EACCES, errno.EPERM):
            log.error("permission denied watching %s: it is not watched; run the agent as a "
                      "user that can read it", path)
        else:
            log.error("cannot watch %s: %s", path, e.strerror or e)
        return True

    def _wanted(self, change: Change) -> bool:
        if change.flags & _Q_OVERFLOW:
            return True  # loss is always announced
        for prefix, types in self._typed:
            if change.path == prefix or change.path.startswith(prefix + "/"):
                return bool(change.flags & types)
        return True

    def _publish(self, change: Change) -> None:
        if self._typed and not self._wanted(change):
            return
        path, raw = display_path(change.path)
        old_path, raw_old = (None, None)
        if change.old_path is not None:
            old_path, raw_old = display_path(change.old_path)
        flags = self._flags.get(change.flags)
        if flags is None:  # one list per mask, shared by every event (nothing changes them)
            flags = self._flags[change.flags] = flag_names(change.flags)
        self.sink(
            Event(
                site=self.site,
                node=self.node,
                path=path,
                flags=flags,
                is_dir=change.is_dir,
                cookie=change.cookie,
                old_path=old_path,
                ts=self._ts,
                stream="",
                seq=0,
                synthetic=change.synthetic,
                raw_path=raw,
                raw_old_path=raw_old,
            )
        )
