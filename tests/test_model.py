"""Model-based test of the agent: replaying what it published must rebuild the tree exactly.

A seeded random walk creates, writes, renames, moves in and out of the root, deletes and removes
files and whole directories on a real tree while a real agent and relay run. Then the feed is
read from the start and replayed into a model (path → is_dir), which must equal the tree on
disk. With a tiny kernel queue the agent overflows constantly, and its rescans must still make
the replay come out right.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Tail, agents_connected, start_agent, wait_for
from test_end_to_end import settled_head

QUEUE_SYSCTL = Path("/proc/sys/fs/inotify/max_queued_events")


@contextlib.contextmanager
def kernel_queue(size: int | None) -> Iterator[None]:
    """Lower the inotify queue for the instances created inside the block (the limit is taken
    when an instance is created), then put the machine's value back."""
    if size is None:
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("lowering fs.inotify.max_queued_events needs root")
    saved = QUEUE_SYSCTL.read_text()
    QUEUE_SYSCTL.write_text(str(size))
    try:
        yield
    finally:
        QUEUE_SYSCTL.write_text(saved)


def replay(initial: dict[str, bool], events: list[dict]) -> dict[str, bool]:
    """Apply the feed to the tree as the agent found it, as a subscriber keeping a catalogue
    would."""
    model = dict(initial)
    moving: dict[int, dict[str, bool]] = {}

    def take(path: str) -> dict[str, bool]:
        sub = {p: d for p, d in model.items() if p == path or p.startswith(path + "/")}
        for p in sub:
            del model[p]
        return sub

    for e in events:
        flag, path = e["flags"][0], e["path"]
        if flag == "IN_Q_OVERFLOW":
            continue
        if flag == "IN_CREATE":
            model[path] = e["is_dir"]
        elif flag == "IN_DELETE":
            take(path)
        elif flag == "IN_MOVED_FROM":
            moving[e["cookie"]] = take(path)
        elif flag == "IN_MOVED_TO":
            moved = moving.pop(e["cookie"], {}) if e["old_path"] else {}
            old = e["old_path"] or ""
            for p, d in moved.items():
                model[path + p[len(old):]] = d
            model[path] = e["is_dir"]
    return model


def on_disk(root: Path) -> dict[str, bool]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            found[os.path.join(dirpath, d)] = True
        for f in filenames:
            found[os.path.join(dirpath, f)] = False
    return found


def random_walk(rng: random.Random, root: Path, outside: Path, steps: int,
                names: Iterator[int]) -> None:
    def fresh(parent: Path) -> Path:
        return parent / f"n{next(names)}"

    def entries(base: Path) -> tuple[list[Path], list[Path]]:
        files, dirs = [], []
        for dirpath, dirnames, filenames in os.walk(base):
            dirs += [Path(dirpath, d) for d in dirnames]
            files += [Path(dirpath, f) for f in filenames]
        return files, dirs

    for _ in range(steps):
        files, dirs = entries(root)
        parents = [root, *dirs]
        op = rng.choice(["create", "create", "write", "mkdir", "mkdirp", "rename_file",
                         "rename_dir", "move_in", "move_out", "delete", "rmdir", "rmtree"])
        if op == "create" or (op in ("write", "delete", "rename_file") and not files):
            fresh(rng.choice(parents)).write_bytes(b"x")
        elif op == "write":
            with open(rng.choice(files), "ab") as f:
                f.write(b"more")
        elif op == "mkdir":
            fresh(rng.choice(parents)).mkdir()
        elif op == "mkdirp":  # a directory filled the moment it exists
            d = fresh(fresh(rng.choice(parents)))
            d.mkdir(parents=True)
            (d / "f").write_bytes(b"x")
        elif op == "rename_file":
            os.rename(rng.choice(files), fresh(rng.choice(parents)))
        elif op == "rename_dir" and dirs:
            src = rng.choice(dirs)
            targets = [p for p in parents if p != src and src not in p.parents]
            os.rename(src, fresh(rng.choice(targets)))
        elif op == "move_in":
            src = fresh(outside)
            if rng.random() < 0.5:
                src.write_bytes(b"x")
            else:
                (src / "sub").mkdir(parents=True)
                (src / "sub" / "inner").write_bytes(b"x")
            os.rename(src, fresh(rng.choice(parents)))
        elif op == "move_out" and (files or dirs):
            src = rng.choice(files + dirs)
            dst = fresh(outside)
            os.rename(src, dst)
            if dst.is_dir():  # writes out there must never show up under the old path
                (dst / "late").write_bytes(b"x")
        elif op == "delete":
            os.unlink(rng.choice(files))
        elif op == "rmdir" and dirs:
            empty = [d for d in dirs if not any(d.iterdir())]
            if empty:
                rng.choice(empty).rmdir()
        elif op == "rmtree" and dirs:
            shutil.rmtree(rng.choice(dirs))


@pytest.mark.parametrize(("seed", "queue"), [(1, None), (2, None), (3, 64), (4, 16)])
def test_replaying_the_feed_rebuilds_the_tree(tmp_path, procs, relay, seed, queue):
    root, outside = tmp_path / "w", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    for i in range(5):  # something there before the agent starts
        (root / f"pre{i}").mkdir()
        (root / f"pre{i}" / "f").write_bytes(b"x")
    initial = on_disk(root)
    with kernel_queue(queue):
        agent = start_agent(tmp_path, procs, relay.url, root)
    wait_for(lambda: agents_connected(relay), 10, "agent connection")

    rng, names = random.Random(seed), itertools.count()
    for chunk in range(6):
        # With the small queue, freeze the agent for every other chunk: the kernel queue
        # overflows while it cannot read, as on a node whose agent is starved of CPU.
        frozen = queue is not None and chunk % 2 == 1
        if frozen:
            agent.send(signal.SIGSTOP)
        try:
            random_walk(rng, root, outside, 250, names)
        finally:
            if frozen:
                agent.send(signal.SIGCONT)

    head = settled_head(relay, quiet=2.0)
    events = Tail(tmp_path, procs, relay.url, "--since", "earliest", "--count",
                  str(head)).wait_count(head)
    rebuilt = replay(initial, events)
    expected = on_disk(root)
    assert rebuilt == expected, sorted(set(rebuilt.items()) ^ set(expected.items()))[:20]
    overflows = sum(e["flags"] == ["IN_Q_OVERFLOW"] for e in events)
    if queue is not None:
        assert overflows > 0, "the tiny queue never overflowed: the test did not test rescans"
        assert "rescan" in agent.output()
