"""The agent's I/O shell around :class:`~.tree.Tree`: the inotify fd, watches and listings.

Every directory is opened beneath its parent, never by a path from before: the parent is reached
from the root with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` and must be the device and
inode the model recorded for it; the child is opened in it with ``O_NOFOLLOW``; the watch is
added on that open directory and the listing read through it. So a planted symlink is never
followed, and a directory renamed meanwhile is never mistaken for another.

A watch is only bound to the model's directory once the kernel queue, read up to just after the
watch was added, holds no event that changed what that name stands for in its parent; otherwise
the watch is dropped and retried after those events are applied (the disk was ahead of the
queue). A read batch is applied whole before any watch is added.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import resource
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

from .facts import STAT_FLAGS, Facts, Stats
from .kernel_reader import read_available
from .select import Selector
from .tree import (
    NAME_EVENTS,
    WATCH_MASK,
    Change,
    Listing,
    Output,
    Tree,
    Unwatch,
    WatchDir,
    _Dir,
    _Root,
    _writable,
    join_path,
)

log = logging.getLogger("storage_events.agent")

_IN_ONLYDIR, _IN_DONT_FOLLOW, _IN_EXCL_UNLINK = 0x01000000, 0x02000000, 0x04000000
# Watches are added on "." after fchdir to the open directory: exactly the directory listed.
_ADD_FLAGS = WATCH_MASK | _IN_ONLYDIR | _IN_DONT_FOLLOW | _IN_EXCL_UNLINK
_DIR_OPEN_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ROOT_OPEN_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC  # the operator's path, as given
_Q_OVERFLOW = int(Flag.Q_OVERFLOW)
_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name
_QUIET = -2  # a queue entry that marks "the kernel queue was empty here"
_PROGRESS_EVERY = 5.0  # seconds between progress lines during a long initial watch set-up
_ATTEMPTS_PER_SETTLE = 2000  # watch attempts per call: the event loop must get to the relay
_DEFER_LIMIT = 25  # deferrals of one directory before its parent is listed again instead
_OPENAT2_CHUNK = 3000  # bytes of relative path per openat2 call (PATH_MAX is 4096)
_RESOLVE_NO_MAGICLINKS, _RESOLVE_NO_SYMLINKS, _RESOLVE_BENEATH = 0x02, 0x04, 0x08
_SYS_OPENAT2 = 437  # the same number on every architecture (added after the tables merged)


@dataclass(frozen=True, slots=True)
class Root:
    path: str  # local directory
    prefix: str  # published in its place
    select: Selector | None = None
    types: int = 0  # inotify flags to publish; 0: all


def _sysctl(path: str) -> str:
    try:
        with open(f"/proc/sys/{path}") as f:
            return f.read().strip()
    except OSError:
        return "?"


# By its soname: ctypes.util.find_library would run ldconfig, at a cost the start-up feels.
_LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
_LIBC.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_LIBC.inotify_add_watch.restype = ctypes.c_int
_LIBC.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_HOW = _OpenHow(
    _DIR_OPEN_FLAGS & ~os.O_NOFOLLOW,
    0,
    _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS,
)
_openat2_works = True


_HOW_REF, _HOW_SIZE = ctypes.byref(_HOW), ctypes.sizeof(_HOW)


def open_path_beneath(dirfd: int, path: bytes) -> int:
    """:func:`open_beneath` for a relative path given whole (``b"a/b/c"``): one system call
    where the kernel has openat2 and the path is short enough for it."""
    if _openat2_works and len(path) < _OPENAT2_CHUNK:
        fd = _LIBC.syscall(_SYS_OPENAT2, dirfd, path, _HOW_REF, _HOW_SIZE)
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EPERM):
            raise OSError(err, os.strerror(err), os.fsdecode(path))
    return open_beneath(dirfd, os.fsdecode(path).split("/"))


def open_beneath(dirfd: int, parts: list[str]) -> int:
    """Open the directory ``parts`` beneath ``dirfd`` without following any symlink or leaving
    it; no limit on depth. Raises OSError."""
    global _openat2_works
    fd = dirfd
    try:
        i = 0
        while i < len(parts):
            j, size = i, 0
            while j < len(parts) and (j == i or size + len(parts[j]) < _OPENAT2_CHUNK):
                size += len(parts[j]) + 1
                j += 1
            nxt = -1
            if _openat2_works:
                path = os.fsencode("/".join(parts[i:j]))
                nxt = _LIBC.syscall(_SYS_OPENAT2, fd, path, ctypes.byref(_HOW), ctypes.sizeof(_HOW))
                if nxt < 0:
                    err = ctypes.get_errno()
                    if err in (errno.ENOSYS, errno.EPERM) and fd == dirfd and i == 0:
                        _openat2_works = False  # an old kernel, or a seccomp filter
                    else:
                        raise OSError(err, os.strerror(err), "/".join(parts[i:j]))
            if not _openat2_works:
                nxt = fd
                for part in parts[i:j]:  # one component at a time, none of them a symlink
                    try:
                        step = os.open(part, _DIR_OPEN_FLAGS, dir_fd=nxt)
                    finally:
                        if nxt != fd:
                            os.close(nxt)
                    nxt = step
            if fd != dirfd:
                os.close(fd)
            fd, i = nxt, j
        return os.dup(fd) if fd == dirfd else fd
    except BaseException:
        if fd != dirfd:
            os.close(fd)
        raise


def _list(fd: int) -> Listing:
    entries: Listing = []
    with os.scandir(fd) as it:
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
            except OSError:
                # It is there, its stat could not be read (NFS, FUSE): keep it, stat unknown,
                # rather than report it gone.
                entries.append((entry.name, False, entry.inode(), 0, -1))
    return entries


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    if "\\" not in field:
        return field
    return os.fsdecode(field.encode("latin-1").decode("unicode_escape").encode("latin-1"))


class MountTable:
    """The mounts this process sees, as (mount id, mount point); ``changed()`` is cheap: the
    kernel flags the open mountinfo file (POLLPRI) when the table changes, and only then is it
    read again."""

    def __init__(self) -> None:
        self._poll = select.poll()
        try:
            self._file: Any = open("/proc/self/mountinfo", encoding="latin-1")  # noqa: SIM115
            self._poll.register(self._file.fileno(), select.POLLPRI | select.POLLERR)
        except OSError:
            self._file = None
        self.mounts = self._read()

    def _read(self) -> frozenset[tuple[str, str]]:
        if self._file is None:
            return frozenset()
        self._file.seek(0)
        lines = self._file.read().splitlines()
        return frozenset(
            (fields[0], _unescape(fields[4]))
            for fields in (line.split(" ") for line in lines)
            if len(fields) > 4
        )

    def changed(self) -> set[str]:
        """Mount points mounted or unmounted since the last call."""
        if self._file is None or not self._poll.poll(0):
            return set()
        mounts = self._read()
        points = {p for _, p in mounts ^ self.mounts}
        self.mounts = mounts
        return points

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _raise_fd_limit() -> None:
    # The start-up walk holds one descriptor per level of the tree it is in.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class Watcher:
    """Reads kernel events, keeps the watches in step, and hands changes to ``sink``."""

    def __init__(
        self,
        roots: list[Root],
        *,
        site: str,
        node: str,
        sink: Callable[[Event], None],
        retry_interval: float = 30.0,
        announce: bool = False,
        stat: bool = False,
    ) -> None:
        self.roots = roots
        self.announce = announce  # a root watched for the first time: publish what it holds
        self.site = site
        self.node = node
        self.sink = sink  # takes every event to publish, in order
        self.retry_interval = retry_interval
        self.tree = Tree()
        # size, mtime, mode, owner and inode of what events name (see agent/facts.py)
        self.stats = Stats(open_path_beneath, lambda: self.tree.generation) if stat else None
        # (published prefix, local path) of each root, longest prefix first: where a published
        # path is on disk
        self._places = sorted(
            ((r.prefix.rstrip("/"), r.path.rstrip("/") or "/") for r in roots),
            key=lambda t: -len(t[0]),
        )
        # Longest prefix first, so a root published inside another's prefix wins.
        self._typed = sorted(
            ((r.prefix.rstrip("/"), r.types) for r in roots if r.types), key=lambda t: -len(t[0])
        )
        self.inotify = INotify()
        self.fd = self.inotify.fileno()
        os.set_blocking(self.fd, False)  # read here and by the reader thread, never blocking
        # What reads the kernel queue now, after what was handed to handle_raw: the runner
        # gives the KernelReader's (which also holds what it read meanwhile, in order).
        self.drain: Callable[[], list[bytes | int]] = self._read_now
        # The libc call itself: inotify_simple's wrapper costs more than the system call, and
        # the start-up adds one watch per directory.
        self._add_watch = _LIBC.inotify_add_watch
        self.watch_errors = 0
        self._flags: dict[int, list[str]] = {}
        self._ts = time.time_ns()
        self._limit_reported = False
        # Events read to check a new watch, not yet handled: (wd, mask, cookie, name, ts).
        self._queue: deque[tuple[int, int, int, str, int]] = deque()
        self._touched: dict[tuple[int, str], int] = {}  # (wd, name) of name events in _queue
        self._overflows_queued = 0
        self._pending: dict[_Dir, WatchDir] = {}  # watches to add, in order
        self._deferred: dict[_Dir, WatchDir] = {}  # waiting for the queue to catch up
        self._mounts = MountTable()
        self._next_retry = time.monotonic() + retry_interval
        self._next_progress = 0.0
        self._rescans_logged = 0
        _raise_fd_limit()

    def fileno(self) -> int:
        return self.inotify.fileno()

    def close(self) -> None:
        self.inotify.close()
        self._mounts.close()
        if self.stats is not None:
            self.stats.close()

    # -- start-up ----------------------------------------------------------------------------

    def start(self, previous: dict[str, Any] | None = None, *, unclean: bool = False) -> int:
        """Watch every root recursively; returns how many roots could be watched at all.

        ``previous``: the snapshot saved when the agent last stopped; what changed since is
        published. ``unclean``: the last run did not stop cleanly, so events may be missing
        between its last flush and the snapshot: announced as an overflow before the diff."""
        started = time.monotonic()
        self._stamp()
        self._next_progress = started + _PROGRESS_EVERY
        watched = 0
        for root in self.roots:
            if unclean:
                self._publish(Change(join_path(root.prefix, []), _Q_OVERFLOW, True))
            old = previous.get(root.path) if previous else None
            if old is not None:
                log.info("publishing what changed under %s since the agent last stopped", root.path)
            troot, cmds = self.tree.add_root(root.path, root.prefix, old, root.select)
            if cmds:
                self._run(cmds)
                self._settle(limit=None)
            else:
                self._build(troot)
                if self.announce:
                    log.info("publishing what %s holds (watched for the first time)", root.path)
                    for change in self.tree.announce(troot):
                        self._publish(change)
            if troot.node is not None and troot.node.wd >= 0:
                watched += 1
        log.info(
            "watching %d directories under %s in %.2f s",
            self.tree.watch_count,
            ", ".join(r.path for r in self.roots),
            time.monotonic() - started,
        )
        return watched

    def _build(self, root: _Root) -> None:
        """Watch a whole tree at start-up, publishing nothing: a plain loop, since with 100,000
        directories every microsecond per directory is a tenth of a second. Each directory is
        opened in its parent's open descriptor (O_NOFOLLOW) and watched as the working
        directory, so nothing is reached through a symlink or a renamed path."""
        tree, add, ifd, flags = self.tree, self._add_watch, self.fd, _ADD_FLAGS
        select = root.select
        try:
            rfd = os.open(root.local, _ROOT_OPEN_FLAGS)
        except OSError as e:
            log.error("cannot watch root %s: %s", root.local, e.strerror or e)
            return
        inner = self._mount_names(root)
        # (parent's descriptor and how many children still need it, name, parent node, inode
        # from the parent's listing, names under the root when a selector needs them)
        stack: list[tuple[list[int] | None, str, _Dir | None, int, list[str]]] = [
            (None, "", None, 0, [])
        ]
        # Bound to locals: with 100,000 directories the attribute lookups would show.
        pop, push, opn, fch, scan, close, intern = (
            stack.pop,
            stack.append,
            os.open,
            os.fchdir,
            os.scandir,
            os.close,
            sys.intern,
        )
        attach, count = tree.attach, 0
        try:
            while stack:
                holder, name, parent, ino, parts = pop()
                if holder is None:
                    fd = rfd
                else:
                    try:
                        fd = opn(name, _DIR_OPEN_FLAGS, dir_fd=holder[0])
                    except OSError as e:
                        fd = -1
                        error = e
                    holder[1] -= 1
                    if holder[1] == 0:
                        close(holder[0])
                    if fd < 0:
                        if error.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                            self._attach_failed(parent, name, ino, None, error.errno)
                        continue  # else: gone or replaced meanwhile; its events follow
                try:
                    fch(fd)
                except OSError as e:  # readable, not searchable: no watch, no listing
                    close(fd)
                    if holder is None:
                        self._attach_failed(None, "", ino, None, e.errno or 0, root)
                    else:
                        self._attach_failed(parent, name, ino, None, e.errno or 0)
                    continue
                wd = add(ifd, b".", flags)
                dev = None  # its parent's
                if holder is None or name in inner:
                    st = os.fstat(fd)
                    ino, dev = st.st_ino, st.st_dev
                node = (
                    attach(wd, parent, name, ino, dev, root if parent is None else None)
                    if wd >= 0
                    else None
                )
                if node is None:  # not watched, or watched already at another place
                    node = self._attach_failed(
                        parent,
                        name,
                        ino,
                        dev,
                        ctypes.get_errno(),
                        root if parent is None else None,
                        alias=wd >= 0,
                    )
                mine = [fd, 0]  # this descriptor, and how many children still need it
                files = None
                try:
                    with scan(fd) as it:
                        for e in it:
                            try:
                                if e.is_dir(follow_symlinks=False):
                                    n = intern(e.name)
                                    if select is None:
                                        push((mine, n, node, e.inode(), parts))
                                    elif not select.excluded(parts, n, True):
                                        push((mine, n, node, e.inode(), [*parts, n]))
                                    else:
                                        continue
                                    mine[1] += 1
                                elif select is None or not select.excluded(parts, e.name, False):
                                    st = e.stat(follow_symlinks=False)
                                    if files is None:
                                        files = _writable(node)
                                    files[e.name] = (st.st_ino, st.st_mtime_ns, st.st_size)
                            except FileNotFoundError:
                                pass  # removed while listing: its IN_DELETE follows
                except OSError as e:
                    self._log_watch_error(self._local(node), e.errno or 0)
                if not mine[1]:
                    close(fd)
                count += 1
                if not count & 1023:
                    self._progress()
        finally:
            os.chdir("/")
            for holder, *_ in stack:
                if holder is not None and holder[1] > 0:
                    holder[1] = 0
                    with contextlib.suppress(OSError):
                        os.close(holder[0])

    def _attach_failed(
        self,
        parent: _Dir | None,
        name: str,
        ino: int,
        dev: int | None,
        err: int,
        root: _Root | None = None,
        *,
        alias: bool = False,
    ) -> _Dir:
        node = self.tree.attach_failed(
            parent, name, ino, dev, root, "alias" if alias else _reason(err)
        )
        if alias:
            log.warning(
                "%s is watched at another place already (a bind mount?): changes are "
                "published under that path only",
                self._local(node),
            )
        else:
            self._log_watch_error(self._local(node), err)
        if parent is None or self.tree.failed(parent) is None:
            found = self.tree.place(node)
            if found is not None:
                self._publish(Change(join_path(found[0].prefix, found[1]), _Q_OVERFLOW, True))
        return node

    def _mount_names(self, root: _Root) -> set[str]:
        # Names of directories that are mount points somewhere under the root: only those need
        # an fstat at start-up (a mount point's listed inode is the one it covers).
        base = root.local.rstrip("/") + "/"
        return {os.path.basename(p) for _, p in self._mounts.mounts if p.startswith(base)}

    # -- kernel events -----------------------------------------------------------------------

    def read(self) -> None:
        """Handle whatever the kernel has queued (never blocks)."""
        self.handle_raw(self._read_now())

    def _read_now(self) -> list[bytes | int]:
        return read_available(self.fd)

    def handle_raw(self, chunks: list[bytes | int]) -> None:
        """Handle raw bytes read from the inotify fd (see :mod:`.kernel_reader`), then add the
        watches they call for."""
        if self._queue:
            self._process_queue()  # read earlier, and before these
        tree = self.tree
        handle, publish, run = tree.handle, self._publish, self._run
        unpack = _HEADER.unpack_from
        for data in chunks:
            if type(data) is int:
                tree.mark_quiet(data)
                continue
            now = time.monotonic()
            self._stamp()  # the time the agent read them, for every event here
            pos, end = 0, len(data)
            while pos < end:
                wd, mask, cookie, length = unpack(data, pos)
                pos += 16
                name = ""
                if length:
                    name = data[pos : pos + length].rstrip(b"\0").decode("utf-8", "surrogateescape")
                    pos += length
                outs = handle(wd, mask, cookie, name, now)
                if len(outs) == 1 and type(outs[0]) is Change:
                    publish(outs[0])  # the common case, without the general machinery
                elif outs:
                    run(outs)
        if self._pending:
            self._settle()

    def _pull(self) -> None:
        """Read what the kernel queued since, into the queue of events not yet handled."""
        queue, touched = self._queue, self._touched
        unpack = _HEADER.unpack_from
        for data in self.drain():
            if type(data) is int:
                queue.append((_QUIET, 0, 0, "", data))
                continue
            ts = time.time_ns()
            pos, end = 0, len(data)
            while pos < end:
                wd, mask, cookie, length = unpack(data, pos)
                pos += 16
                name = ""
                if length:
                    name = data[pos : pos + length].rstrip(b"\0").decode("utf-8", "surrogateescape")
                    pos += length
                if mask & NAME_EVENTS:
                    key = (wd, name)
                    touched[key] = touched.get(key, 0) + 1
                elif mask & _Q_OVERFLOW:
                    self._overflows_queued += 1
                queue.append((wd, mask, cookie, name, ts))

    def _process_queue(self) -> int:
        queue, touched, tree = self._queue, self._touched, self.tree
        count = 0
        while queue:
            wd, mask, cookie, name, ts = queue.popleft()
            self._ts = tree.clock_ns = ts
            if wd == _QUIET:
                tree.mark_quiet(ts)
                continue
            count += 1
            if mask & NAME_EVENTS:
                key = (wd, name)
                left = touched[key] - 1
                if left:
                    touched[key] = left
                else:
                    del touched[key]
            elif mask & _Q_OVERFLOW:
                self._overflows_queued -= 1
            outs = tree.handle(wd, mask, cookie, name, time.monotonic())
            if outs:
                self._run(outs)
        return count

    def tick(self) -> None:
        """Every flush interval: resolve pending moves, watch roots that came back, notice
        mounts, retry what could not be watched, and what waited for the queue."""
        now = time.monotonic()
        self._stamp()
        self._run(self.tree.expire(now))
        for root in self.tree.roots:
            if root.gone and os.path.isdir(root.local):
                log.warning("root %s is back: watching it again", root.local)
                self._run(self.tree.root_back(root))
        changed = self._mounts.changed()
        if changed:
            self._remount(changed)
        if now >= self._next_retry:
            self._next_retry = now + self.retry_interval
            self._run(self.tree.retry())
        self._pending.update(self._deferred)
        self._deferred.clear()
        if self._pending or self._queue:
            self._settle()

    def retry(self) -> None:
        """Retry the directories that could not be watched, now (SIGHUP)."""
        self._limit_reported = False
        self._run(self.tree.retry())
        self._settle()

    def _remount(self, points: set[str]) -> None:
        """A file system was mounted or unmounted at ``points``: what is there now is listed
        and compared with what subscribers were told."""
        for root in self.tree.roots:
            base = root.local.rstrip("/")
            for point in points:
                if point == base or point.startswith(base + "/"):
                    rel = point[len(base) :].strip("/")
                    node = self.tree.find(root, rel.split("/") if rel else [])
                    if node is not None:
                        log.info("mount table changed at %s: listing it again", point)
                        self._pending[node] = WatchDir(node)

    # -- watches -----------------------------------------------------------------------------

    def _run(self, outputs: list[Output]) -> None:
        for out in outputs:
            if type(out) is Change:
                self._publish(out)
            elif isinstance(out, WatchDir):
                known = self._pending.get(out.node) or self._deferred.pop(out.node, None)
                if known is None:
                    self._pending[out.node] = out
                else:
                    known.deep = known.deep or out.deep
                    self._pending[out.node] = known
            elif isinstance(out, Unwatch):
                with contextlib.suppress(OSError):  # already gone with its directory
                    self.inotify.rm_watch(out.wd)

    def _settle(self, limit: int | None = _ATTEMPTS_PER_SETTLE) -> None:
        """Add the watches asked for, each once the queue read so far holds nothing that
        changes what its name stands for; what must wait is retried after more events (and at
        the next tick)."""
        pending, deferred = self._pending, self._deferred
        attempts = 0
        while pending and (limit is None or attempts < limit):
            node, cmd = next(iter(pending.items()))
            del pending[node]
            attempts += 1
            if not self._attempt(cmd):
                cmd.tries += 1
                if (
                    cmd.tries > _DEFER_LIMIT
                    and node.parent is not None
                    and self.tree.place(node) is not None
                ):
                    # The queue never explained why: list the parent again instead.
                    pending[node.parent] = WatchDir(node.parent, deep=False)
                else:
                    deferred[node] = cmd
            if self._queue and self._process_queue():
                pending.update(deferred)  # events arrived: what waited may be ready now
                deferred.clear()
        if self._queue:
            self._process_queue()
        if not pending and self._rescans_logged != self.tree.rescans:
            self._rescans_logged = self.tree.rescans
            log.warning(
                "rescan %d done: %d directories watched", self.tree.rescans, self.tree.watch_count
            )

    def _attempt(self, cmd: WatchDir) -> bool:
        """Watch and list ``cmd.node``; False: not now (the disk is ahead of the queue)."""
        node, tree = cmd.node, self.tree
        found = tree.place(node)
        if found is None:
            return not tree.in_limbo(node)  # gone for good, or its move is still pending
        root, parts = found
        try:
            if node.parent is None:
                fd = os.open(root.local, _ROOT_OPEN_FLAGS)
            else:
                pfd = self._open_node(node.parent, root, parts[:-1])
                if pfd is None:
                    return False
                try:
                    fd = os.open(node.name, _DIR_OPEN_FLAGS, dir_fd=pfd)
                finally:
                    os.close(pfd)
        except OSError as e:
            if node.parent is None:
                if e.errno in (errno.ENOENT, errno.ENOTDIR):
                    self._run(tree.root_gone(root))
                    return True
            elif e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return False  # renamed or removed (its events are coming), or a symlink now
            self._run(tree.watch_failed(node, _reason(e.errno or 0)))
            self._log_watch_error(self._local(node), e.errno or 0)
            return True
        entries: Listing | None = None
        try:
            try:
                os.fchdir(fd)  # EACCES: readable, not searchable (mode 644)
            except OSError as e:
                wd, err = -1, e.errno or 0
            else:
                wd = self._add_watch(self.fd, b".", _ADD_FLAGS)
                err = ctypes.get_errno() if wd < 0 else 0
                os.chdir("/")  # a working directory would keep a file system from unmounting
            st = os.fstat(fd)
            with contextlib.suppress(OSError):
                entries = _list(fd)
        finally:
            os.close(fd)
        if entries is None and wd >= 0:
            # Watched, but not listable: not an empty directory. Say so, retry later.
            if tree.node_of(wd) is None:
                with contextlib.suppress(OSError):
                    self.inotify.rm_watch(wd)
            wd, err = -1, errno.EIO
        if node.parent is None and node.wd >= 0 and wd != node.wd:
            # Another directory where the root was (replaced while events were lost).
            if wd >= 0 and tree.node_of(wd) is None:
                with contextlib.suppress(OSError):
                    self.inotify.rm_watch(wd)
            self._run(tree.root_gone(root))
            return True
        if node.parent is not None:
            self._pull()
            if self._overflows_queued or self._touched.get((node.parent.wd, node.name)):
                if wd >= 0 and tree.node_of(wd) is None:
                    with contextlib.suppress(OSError):
                        self.inotify.rm_watch(wd)
                return False
        now = time.monotonic()
        if wd < 0:
            self._log_watch_error(self._local(node), err)
            self._run(tree.watch_failed(node, _reason(err), entries, now, st.st_dev, st.st_ino))
            return True
        other = tree.node_of(wd)
        outs: list[Output] = []
        if other is not None and other is not node:
            if self._still_there(other):
                log.warning(
                    "%s is %s again (a bind mount?): it is watched there only; "
                    "changes are published under that path",
                    self._local(node),
                    self._local(other),
                )
                self._run(tree.watch_failed(node, "alias", entries, now, st.st_dev, st.st_ino))
                return True
            outs = tree.take_over(other, node)  # moved out and back: listed afresh
        outs += tree.watched(node, wd, st.st_dev, st.st_ino, entries or [], now, deep=cmd.deep)
        self._run(outs)
        self._progress()
        return True

    def _still_there(self, node: _Dir) -> bool:
        """Is ``node``'s directory at its place in the model (then a second place that holds it
        is another view of it, a bind mount), or has it moved away unseen?"""
        found = self.tree.place(node)
        fd = self._open_node(node, *found) if found is not None else None
        if fd is None:
            return False
        os.close(fd)
        return True

    def _open_node(self, node: _Dir, root: _Root, parts: list[str]) -> int | None:
        """An open descriptor of the directory ``node`` is (by device and inode), reached from
        the root without symlinks; None when the model's place for it does not hold it now."""
        rnode = root.node
        if rnode is None:
            return None
        try:
            rfd = os.open(root.local, _ROOT_OPEN_FLAGS)
        except OSError:
            return None
        try:
            st = os.fstat(rfd)
            if (st.st_dev, st.st_ino) != (self.tree.dev_of(rnode), rnode.ino):
                return None
            if not parts:
                return os.dup(rfd)
            fd = open_beneath(rfd, parts)
        except OSError:
            return None
        finally:
            os.close(rfd)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (self.tree.dev_of(node), node.ino):
            os.close(fd)
            return None
        return fd

    def _local(self, node: _Dir) -> str:
        found = self.tree.place(node)
        if found is None:
            return f"(a directory no longer in the tree, {node.name!r})"
        return join_path(found[0].local, found[1])

    def _progress(self) -> None:
        if self._next_progress and time.monotonic() >= self._next_progress:
            self._next_progress = time.monotonic() + _PROGRESS_EVERY
            log.info("still adding watches: %d directories so far", self.tree.watch_count)

    def _log_watch_error(self, path: str, err: int) -> None:
        """Log why ``path`` cannot be watched, with what to do about it."""
        self.watch_errors += 1
        if err == errno.ENOSPC:
            if not self._limit_reported:
                self._limit_reported = True
                log.error(
                    "inotify watch limit reached at %s: this agent holds %d watches; the "
                    "limits are fs.inotify.max_user_watches=%s and, in this user namespace, "
                    "user.max_inotify_watches=%s (other processes of this user count too). "
                    "Directories from here on are NOT watched and subscribers got a loss "
                    "notice for them. Raise the limit, e.g. `sysctl -w "
                    "fs.inotify.max_user_watches=%d`, then send SIGHUP to the agent (it also "
                    "retries every %.0f s).",
                    path,
                    self.tree.watch_count,
                    _sysctl("fs/inotify/max_user_watches"),
                    _sysctl("user/max_inotify_watches"),
                    max(2 * self.tree.watch_count, 1048576),
                    self.retry_interval,
                )
        elif err in (errno.EACCES, errno.EPERM):
            log.error(
                "permission denied watching %s: it is not watched (subscribers got a "
                "loss notice); it is retried when its permissions change, every %.0f s "
                "and on SIGHUP. Run the agent as a user that can read it.",
                path,
                self.retry_interval,
            )
        else:
            log.error("cannot watch %s: %s", path, os.strerror(err) if err else "unknown error")

    def snapshot(self) -> dict[str, Any]:
        """The tree model for the spool, with the stats of files changed since listed."""
        opened: tuple[_Dir | None, int | None] = (None, None)
        try:
            for node, parts, name in list(self.tree.unknown_files()):
                if opened[0] is not node:  # the names of one directory come together
                    if opened[1] is not None:
                        os.close(opened[1])
                    found = self.tree.place(node)
                    opened = (node, self._open_node(node, found[0], parts) if found else None)
                fd = opened[1]
                if fd is None:
                    continue  # the directory is not where the model has it: keep the entry
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    continue  # gone: its IN_DELETE is coming, and removes the entry then
                else:
                    self.tree.set_stat(node, name, (st.st_ino, st.st_mtime_ns, st.st_size))
        finally:
            if opened[1] is not None:
                os.close(opened[1])
        return self.tree.snapshot()

    # -- publishing --------------------------------------------------------------------------

    def _stamp(self) -> int:
        self._ts = self.tree.clock_ns = time.time_ns()
        return self._ts

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
        facts = None
        if self.stats is not None and change.flags & STAT_FLAGS:
            facts = self._facts(change)
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
                **(facts._asdict() if facts is not None else {}),
            )
        )

    def _facts(self, change: Change) -> Facts | None:
        assert self.stats is not None
        path = change.path
        for prefix, local in self._places:
            if path == prefix or path.startswith(prefix + "/") or prefix == "":
                return self.stats.of(local, path[len(prefix) :].strip("/"), change.is_dir)
        return None


def _reason(err: int) -> str:
    return (
        "limit"
        if err == errno.ENOSPC
        else "permission"
        if err in (errno.EACCES, errno.EPERM)
        else "error"
    )
