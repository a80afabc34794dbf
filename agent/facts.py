"""What the agent says about an entry beside its event: one ``fstatat`` of its name in its
directory's own descriptor, never through a symlink.

The path an event names is where the model has the entry; a plain ``lstat`` of that path would
follow a symlink planted in place of one of the directories above it (while the agent is
behind a rename, say) and describe a file outside the tree. So the directory is opened beneath
its root with :func:`~.watcher.open_beneath` (no symlink followed, never leaving it), and its
descriptor is kept for the events that follow in it, until any directory of the model moves or
goes (the tree's generation changes): then all of them are closed, since a descriptor follows
its directory wherever it went.
"""

from __future__ import annotations

import os
import stat as st
from collections.abc import Callable
from typing import NamedTuple

from storage_events.wire import Flag

# The events after which the entry is there to describe.
STAT_FLAGS = int(Flag.CREATE | Flag.CLOSE_WRITE | Flag.MOVED_TO | Flag.ATTRIB)
_MAX_OPEN = 64  # directory descriptors kept
_U63 = 2**63 - 1


class Facts(NamedTuple):
    size: int
    mtime: int  # ns since the epoch
    mode: int
    uid: int
    gid: int
    ino: int | None  # (None beyond what the wire format takes)


class Stats:
    """``of(root local path, path under it)``: the entry's :class:`Facts`, or None when it
    cannot be described (gone already, not what the event says it is, unreadable)."""

    def __init__(
        self,
        open_beneath: Callable[[int, list[str]], int],
        generation: Callable[[], int],
    ) -> None:
        self._open_beneath = open_beneath
        self._generation = generation
        self._gen = -1
        self._roots: dict[str, int] = {}
        self._dirs: dict[tuple[str, str], int] = {}
        self.errors = 0  # descriptors that could not be opened (the events go without facts)

    def of(self, root: str, rel: str, is_dir: bool) -> Facts | None:
        gen = self._generation()
        if gen != self._gen:
            self.close()
            self._gen = gen
        parent, _, name = rel.rpartition("/")
        try:
            if not name:  # the root itself
                s = os.stat(self._root(root))
            else:
                fd = self._dirs.get((root, parent))
                if fd is None:
                    fd = self._open(root, parent)
                s = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            return None
        if st.S_ISDIR(s.st_mode) != is_dir:
            return None  # replaced since the event: these facts are another entry's
        ino = s.st_ino
        return Facts(
            s.st_size, s.st_mtime_ns, s.st_mode, s.st_uid, s.st_gid, ino if ino <= _U63 else None
        )

    def _root(self, root: str) -> int:
        fd = self._roots.get(root)
        if fd is None:
            fd = self._roots[root] = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return fd

    def _open(self, root: str, parent: str) -> int:
        top = self._root(root)
        try:
            fd = self._open_beneath(top, parent.split("/")) if parent else os.dup(top)
        except OSError:
            self.errors += 1
            raise
        if len(self._dirs) >= _MAX_OPEN:
            oldest = next(iter(self._dirs))
            os.close(self._dirs.pop(oldest))
        self._dirs[root, parent] = fd
        return fd

    def close(self) -> None:
        for fd in (*self._dirs.values(), *self._roots.values()):
            os.close(fd)
        self._dirs.clear()
        self._roots.clear()
