"""The watcher in this process, fed a seeded random walk in bursts between its reads.

Stands in for an agent starved of CPU, but deterministically: the walk makes up to ``burst``
changes (swaps, rotations, symlink plants, moves in and out, removals of whole trees) while the
watcher reads nothing, so the disk is far ahead of the kernel queue every time it reads; with a
small queue it also overflows and rescans. Replaying what it published must give the tree on
disk, and nothing from behind a planted symlink may ever be published. Reproducible: a failing
seed fails the same way again.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import time
from pathlib import Path

import pytest
from test_model import kernel_queue, on_disk, published_secrets, random_walk, replay

from storage_events.agent.watcher import Root, Watcher
from storage_events.wire import Event


def _as_feed(e: Event) -> dict:
    return {
        "path": e.path,
        "flags": e.flags,
        "is_dir": e.is_dir,
        "cookie": e.cookie,
        "old_path": e.old_path,
        "synthetic": e.synthetic,
        "raw_path": None,
        "raw_old_path": None,
    }


@pytest.mark.parametrize(
    ("seed", "burst", "queue"),
    [
        (15, 80, None),
        (17, 80, None),
        (22, 80, None),
        (3, 20, None),
        (69, 60, 64),
        (72, 60, 64),
        (76, 60, 64),
        (53, 200, 64),
    ],
)
def test_the_watcher_far_behind_the_disk_still_publishes_the_tree(
    tmp_path: Path, seed: int, burst: int, queue: int | None
) -> None:
    root, outside = tmp_path / "w", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    for i in range(5):
        (root / f"pre{i}").mkdir()
        (root / f"pre{i}" / "f").write_bytes(b"x")
    initial = on_disk(root)
    events: list[dict] = []
    with kernel_queue(queue):  # taken when the inotify instance is made
        watcher = Watcher(
            [Root(str(root), str(root))],
            site="s",
            node="n",
            sink=lambda e: events.append(_as_feed(e)),
        )
    with contextlib.closing(watcher):
        watcher.start()
        rng, names = random.Random(seed), itertools.count()
        done = 0
        while done < 600:
            steps = rng.randint(1, burst)
            random_walk(rng, root, outside, steps, names)
            done += steps
            watcher.read()
            watcher.tick()
        deadline = time.monotonic() + 1.0  # past the 0.5 s pairing window of moves
        while time.monotonic() < deadline:
            watcher.read()
            watcher.tick()
            time.sleep(0.05)
    assert not published_secrets(events), published_secrets(events)[:5]
    rebuilt = replay(initial, events, [root])
    expected = on_disk(root)
    assert rebuilt == expected, (
        sorted(set(rebuilt.items()) - set(expected.items()))[:10],
        sorted(set(expected.items()) - set(rebuilt.items()))[:10],
    )
