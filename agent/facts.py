"""What the agent says about an entry beside its event: one ``fstatat`` of its name in its
directory's own descriptor, never through a symlink.

The path an event names is where the model has the entry; a plain ``lstat`` of that path would
follow a symlink planted in place of one of the directories above it (while the agent is
behind a rename, say) and describe a file outside the tree. So the directory is opened with
:func:`~.watcher.open_path_beneath` from ``/`` along the root's real path (no symlink followed),
and closed at once: a descriptor held on a directory would keep it alive after its removal,
and with it the kernel's ``IN_DELETE_SELF`` and ``IN_IGNORED``, which the agent's model waits
for.
"""

from __future__ import annotations

import os
import stat as st
from collections.abc import Callable
from typing import NamedTuple

from storage_events.wire import Flag

# The events after which the entry is there to describe.
STAT_FLAGS = int(Flag.CREATE | Flag.CLOSE_WRITE | Flag.MOVED_TO | Flag.ATTRIB)
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
        open_beneath: Callable[[int, bytes], int],
        generation: Callable[[], int],
    ) -> None:
        self._open_beneath = open_beneath  # (a directory fd, a relative path) → a new fd
        self._generation = generation
        self._gen = -1
        self._top = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._real: dict[str, bytes] = {}  # a root → its real path, without the leading /
        self.errors = 0  # directories that could not be opened (the events go without facts)

    def of(self, root: str, rel: str, is_dir: bool) -> Facts | None:
        gen = self._generation()
        if gen != self._gen:  # (a root may have gone and come back elsewhere)
            self._real.clear()
            self._gen = gen
        real = self._real.get(root)
        if real is None:
            real = self._real[root] = os.fsencode(os.path.realpath(root)).strip(b"/")
        parent, _, name = os.fsencode(rel).rpartition(b"/")
        where = real + b"/" + parent if parent else real
        try:
            fd = self._open_beneath(self._top, where) if where else os.dup(self._top)
        except OSError:
            self.errors += 1
            return None
        try:
            s = os.stat(name or b".", dir_fd=fd, follow_symlinks=False)
        except OSError:
            return None
        finally:
            os.close(fd)
        if st.S_ISDIR(s.st_mode) != is_dir:
            return None  # replaced since the event: these facts are another entry's
        ino = s.st_ino
        return Facts(
            s.st_size, s.st_mtime_ns, s.st_mode, s.st_uid, s.st_gid, ino if ino <= _U63 else None
        )

    def close(self) -> None:
        os.close(self._top)
