"""What the agent says about an entry (size, mtime, mode, owner, inode): from one fstatat in
the directory's own descriptor, never through a symlink planted in the tree."""

from __future__ import annotations

import os
import stat

from storage_events.agent.facts import Stats
from storage_events.agent.watcher import open_path_beneath as open_beneath


def test_facts_describe_the_entry_in_its_directory(tmp_path):
    root = tmp_path / "w"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"12345")
    os.chmod(root / "d" / "f", 0o640)
    stats = Stats(open_beneath, lambda: 0)
    facts = stats.of(str(root), "d/f", False)
    s = os.lstat(root / "d" / "f")
    assert facts is not None
    assert (facts.size, facts.mtime, facts.mode, facts.uid, facts.gid, facts.ino) == (
        5,
        s.st_mtime_ns,
        s.st_mode,
        s.st_uid,
        s.st_gid,
        s.st_ino,
    )
    assert stats.of(str(root), "d", True).ino == os.lstat(root / "d").st_ino  # type: ignore[union-attr]
    assert stats.of(str(root), "d/f", True) is None  # not what the event says it is
    assert stats.of(str(root), "d/gone", False) is None
    stats.close()


def test_a_symlink_planted_for_a_directory_never_yields_facts_from_outside(tmp_path):
    root, outside = tmp_path / "w", tmp_path / "outside"
    (root / "d").mkdir(parents=True)
    outside.mkdir()
    (outside / "f").write_bytes(b"secret, and long: 1234567890")
    (root / "d" / "f").write_bytes(b"x")
    stats = Stats(open_beneath, lambda: 0)
    assert stats.of(str(root), "d/f", False).size == 1  # type: ignore[union-attr]
    # The directory moves away and a symlink to outside takes its name, while the agent's
    # model still has the old path.
    os.rename(root / "d", root / "moved")
    os.symlink(outside, root / "d")
    assert stats.of(str(root), "d/f", False) is None
    link = stats.of(str(root), "d", False)  # the symlink itself, never what it points to
    assert link is not None and stat.S_ISLNK(link.mode)
    stats.close()


def test_no_directory_is_held_open(tmp_path):
    """A descriptor kept on a directory would keep it alive after its removal, and the
    kernel's IN_DELETE_SELF with it."""
    root = tmp_path / "w"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"x")
    stats = Stats(open_beneath, lambda: 0)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(10):
        assert stats.of(str(root), "d/f", False) is not None
        assert stats.of(str(root), "d", True) is not None
    assert len(os.listdir("/proc/self/fd")) == before
    stats.close()
