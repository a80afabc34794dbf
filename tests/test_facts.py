"""What the agent says about an entry (size, mtime, mode, owner, inode): from one fstatat in
the directory's own descriptor, never through a symlink planted in the tree."""

from __future__ import annotations

import os

from storage_events.agent.facts import Stats
from storage_events.agent.watcher import open_beneath


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
    generation = [0]
    stats = Stats(open_beneath, lambda: generation[0])
    assert stats.of(str(root), "d/f", False).size == 1  # type: ignore[union-attr]
    # The directory moves away and a symlink to outside takes its name, while the agent's
    # model still has the old path.
    os.rename(root / "d", root / "moved")
    os.symlink(outside, root / "d")
    warm = stats.of(str(root), "d/f", False)  # the descriptor followed its directory
    assert warm is not None and warm.size == 1
    generation[0] += 1  # the model saw a directory move: descriptors are opened again
    assert stats.of(str(root), "d/f", False) is None  # through the symlink: refused
    stats.close()
