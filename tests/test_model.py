"""Model-based test of the agent: replaying what it published must rebuild the tree exactly.

A seeded random walk creates, writes, renames, moves in and out of the root, deletes and removes
files and whole directories, swaps and rotates directories and plants symlinks to the outside
at the names of directories renamed away, on a real tree while a real agent and relay run (also
a starved agent: stopped in short bursts, beside a CPU hog). Then the feed is
read from the start and replayed into a model (path → is_dir), which must equal the tree on
disk. With a tiny kernel queue the agent overflows constantly, and its rescans must still make
the replay come out right.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from conftest import Proc, Tail, agents_connected, start_agent, wait_for
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


class FeedDefect(AssertionError):
    """The feed says something no correct agent could: the replay cannot go on."""


def event_path(e: dict, key: str = "path") -> str | None:
    """An event's path in ``os.fsdecode`` form: the exact bytes when the name is not UTF-8
    (``raw_path``, base64 in JSON), so comparisons with the disk are on bytes."""
    raw = e.get("raw_" + key)
    if raw:
        return os.fsdecode(base64.b64decode(raw))
    return e.get(key)


_SELF = ("IN_DELETE_SELF", "IN_MOVE_SELF", "IN_UNMOUNT")


def replay(
    initial: dict[str, bool], events: list[dict], roots: Iterable[str | Path] | None = None
) -> dict[str, bool]:
    """Apply the feed to the tree as the agent found it, as a subscriber keeping a catalogue
    would. Raises :class:`FeedDefect` for what a catalogue cannot apply.

    - IN_CREATE adds; IN_DELETE removes the path and everything below it.
    - IN_MOVED_FROM / IN_MOVED_TO pair by cookie (IN_MOVED_TO carries ``old_path``); the move
      replaces whatever was at the target (rename over an existing path); an unpaired
      IN_MOVED_TO is a new entry (its contents follow as synthetic IN_CREATE).
    - IN_Q_OVERFLOW changes nothing: it is a loss notice, the repairs follow as events.
    - IN_DELETE_SELF / IN_MOVE_SELF / IN_UNMOUNT at a path remove it and everything below (a
      watched root gone); a root is back once its own IN_CREATE is published.
    - Defects: IN_CLOSE_WRITE / IN_ATTRIB for a path not in the catalogue, an event naming a
      child of a directory the catalogue does not hold, a path outside the roots (``roots``
      given), an IN_MOVED_TO whose ``old_path`` is not where its IN_MOVED_FROM was.
    """
    model = dict(initial)
    moving: dict[int, tuple[str, dict[str, bool]]] = {}
    root_list = [str(r).rstrip("/") for r in roots or ()]
    live = set(root_list)  # roots that exist as far as the feed says

    def take(path: str) -> dict[str, bool]:
        if model.get(path) is False:  # a file: nothing below it
            return {path: model.pop(path)}
        sub = {p: d for p, d in model.items() if p == path or p.startswith(path + "/")}
        for p in sub:
            del model[p]
        return sub

    def inside(path: str) -> bool:
        return any(path == r or path.startswith(r + "/") for r in root_list)

    def held(path: str) -> bool:
        return path in model or path in live

    for e in events:
        flag, path = e["flags"][0], event_path(e)
        old = event_path(e, "old_path")
        if root_list:
            for p in (path, old):
                if p is not None and (not inside(p) or "/../" in p + "/" or "/./" in p + "/"):
                    raise FeedDefect(f"a published path outside the watched root: {e}")
        if flag == "IN_Q_OVERFLOW":
            continue
        if flag in _SELF:
            take(path)
            live.discard(path)
            continue
        if (
            root_list
            and flag in ("IN_CREATE", "IN_MOVED_TO", "IN_CLOSE_WRITE", "IN_ATTRIB")
            and path not in root_list
            and not held(path.rsplit("/", 1)[0])
        ):
            raise FeedDefect(f"an event under a directory the feed does not hold: {e}")
        if flag == "IN_CREATE":
            model[path] = e["is_dir"]
            if path in root_list:
                live.add(path)
        elif flag == "IN_DELETE":
            take(path)
            live.discard(path)
        elif flag == "IN_MOVED_FROM":
            moving[e["cookie"]] = (path, take(path))
            live.discard(path)
        elif flag == "IN_MOVED_TO":
            take(path)  # a rename replaces what was at the target
            source, moved = moving.pop(e["cookie"], (None, {})) if old else (None, {})
            if source is not None and source != old:
                raise FeedDefect(
                    f"IN_MOVED_TO's old_path is not where its IN_MOVED_FROM was ({source}): {e}"
                )
            for p, d in moved.items():
                model[path + p[len(old) :]] = d
            model[path] = e["is_dir"]
        elif flag in ("IN_CLOSE_WRITE", "IN_ATTRIB") and not held(path):
            raise FeedDefect(f"an event for a path the feed never created: {e}")
    return model


def on_disk(root: Path | str) -> dict[str, bool]:
    """path → is_dir of everything below ``root`` (not itself), in ``os.fsdecode`` form, as
    lstat sees it (a symlink is an entry, never followed), through directory descriptors so that
    trees deeper than PATH_MAX are walked too, and across mount points."""
    found: dict[str, bool] = {}
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    top = str(root).rstrip("/")
    stack = [(top, os.open(top, flags), None)]
    try:
        while stack:
            path, fd, pending = stack[-1]
            if pending is None:  # first visit: list it
                pending = []
                with os.scandir(fd) as it:
                    for entry in it:
                        is_dir = entry.is_dir(follow_symlinks=False)
                        found[path + "/" + entry.name] = is_dir
                        if is_dir:
                            pending.append(entry.name)
                stack[-1] = (path, fd, pending)
            if not pending:
                os.close(fd)
                stack.pop()
                continue
            name = pending.pop()
            stack.append((path + "/" + name, os.open(name, flags, dir_fd=fd), None))
    finally:
        for _, fd, _ in stack:
            os.close(fd)
    return found


SECRET = "SECRET"  # in every name behind a planted symlink: none may ever be published


def plant_target(outside: Path, k: int, names: list[str]) -> Path:
    """A directory outside the root holding, under each of ``names``, distinctive entries."""
    target = outside / f"{SECRET}-zone{k}"
    for name in names:
        (target / name / f"{SECRET}-dir").mkdir(parents=True, exist_ok=True)
        (target / name / f"{SECRET}-file").write_bytes(b"s")
    (target / f"{SECRET}-top").write_bytes(b"s")
    return target


def published_secrets(events: list[dict]) -> list[dict]:
    return [
        e for e in events if any(SECRET in (event_path(e, k) or "") for k in ("path", "old_path"))
    ]


def random_walk(
    rng: random.Random, root: Path, outside: Path, steps: int, names: Iterator[int]
) -> None:
    def fresh(parent: Path) -> Path:
        return parent / f"n{next(names)}"

    def entries(base: Path) -> tuple[list[Path], list[Path], list[Path]]:
        """Regular files, symlinks, directories (a symlink to a directory is no directory)."""
        files, links, dirs = [], [], []
        for dirpath, dirnames, filenames in os.walk(base):
            for d in dirnames:
                (links if os.path.islink(os.path.join(dirpath, d)) else dirs).append(
                    Path(dirpath, d)
                )
            for f in filenames:
                p = Path(dirpath, f)
                (links if p.is_symlink() else files).append(p)
        return files, links, dirs

    for _ in range(steps):
        files, links, dirs = entries(root)
        parents = [root, *dirs]
        op = rng.choice(
            [
                "create",
                "create",
                "write",
                "mkdir",
                "mkdirp",
                "rename_file",
                "rename_dir",
                "move_in",
                "move_out",
                "delete",
                "rmdir",
                "rmtree",
                "swap",
                "rotate",
                "symlink_plant",
            ]
        )
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
            os.rename(rng.choice(files + links), fresh(rng.choice(parents)))
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
        elif op == "move_out" and (files or links or dirs):
            src = rng.choice(files + links + dirs)
            dst = fresh(outside)
            os.rename(src, dst)
            if dst.is_dir() and not dst.is_symlink():  # never under the old path
                (dst / "late").write_bytes(b"x")
        elif op == "delete":
            os.unlink(rng.choice(files + links))
        elif op == "rmdir" and dirs:
            empty = [d for d in dirs if not any(d.iterdir())]
            if empty:
                rng.choice(empty).rmdir()
        elif op == "rmtree" and dirs:
            shutil.rmtree(rng.choice(dirs))
        elif op == "swap" and len(dirs) >= 2:  # two directories trade names via a temp name
            a = rng.choice(dirs)
            others = [b for b in dirs if b != a and a not in b.parents and b not in a.parents]
            if not others:
                continue
            b = rng.choice(others)
            tmp = fresh(root)
            os.rename(a, tmp)
            os.rename(b, a)
            os.rename(tmp, b)
        elif op == "rotate" and dirs:  # log rotation: mv d d.old; mkdir -p d/sub; write
            d = rng.choice(dirs)
            old = d.with_name(d.name + ".old")
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            elif old.exists() or old.is_symlink():
                old.unlink()
            os.rename(d, old)
            (d / "sub").mkdir(parents=True)
            (d / "sub" / "f").write_bytes(b"x")
        elif op == "symlink_plant" and dirs:
            # A directory renamed away, a symlink to the outside at its old name, and new
            # entries in it whose names exist behind the link: a path-based watch or listing of
            # a queued IN_CREATE would follow the link out of the root.
            d = rng.choice(dirs)
            k = next(names)
            made = [f"p{k}a", f"p{k}b"]
            for name in made:
                (d / name).mkdir()
            targets = [p for p in parents if p != d and d not in p.parents]
            os.rename(d, fresh(rng.choice(targets)))
            os.symlink(plant_target(outside, k, made), d)


@contextlib.contextmanager
def starved(agent: Proc, procs: list[Proc], tmp: Path) -> Iterator[None]:
    """A starved agent: stopped in short bursts (5 ms stopped, 5 ms running) from a thread, with
    a CPU hog pinned to one of the two cores."""
    hog = Proc(["taskset", "-c", "0", sys.executable, "-c", "while True: pass"], tmp / "hog.log")
    procs.append(hog)
    done = threading.Event()

    def bursts() -> None:
        while not done.is_set():
            agent.send(signal.SIGSTOP)
            time.sleep(0.005)
            agent.send(signal.SIGCONT)
            time.sleep(0.005)

    thread = threading.Thread(target=bursts, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        agent.send(signal.SIGCONT)
        hog.stop()


@pytest.mark.parametrize(
    ("seed", "queue", "starve"),
    [
        (1, None, False),
        (2, None, False),
        (3, 64, False),
        (4, 16, False),
        (5, None, True),
        (6, 256, True),
    ],
)
def test_replaying_the_feed_rebuilds_the_tree(tmp_path, procs, relay, seed, queue, starve):
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
    with starved(agent, procs, tmp_path) if starve else contextlib.nullcontext():
        for chunk in range(6):
            # With the small queue, freeze the agent for every other chunk: the kernel queue
            # overflows while it cannot read, as on a node whose agent is starved of CPU.
            frozen = queue is not None and not starve and chunk % 2 == 1
            if frozen:
                agent.send(signal.SIGSTOP)
            try:
                random_walk(rng, root, outside, 250, names)
            finally:
                if frozen:
                    agent.send(signal.SIGCONT)

    head = settled_head(relay, quiet=2.0)
    events = Tail(
        tmp_path, procs, relay.url, "--since", "earliest", "--count", str(head)
    ).wait_count(head)
    assert not published_secrets(events), published_secrets(events)[:5]
    rebuilt = replay(initial, events, [root])
    expected = on_disk(root)
    assert rebuilt == expected, sorted(set(rebuilt.items()) ^ set(expected.items()))[:20]
    overflows = sum(e["flags"] == ["IN_Q_OVERFLOW"] for e in events)
    if queue is not None and not starve:
        assert overflows > 0, "the tiny queue never overflowed: the test did not test rescans"
        assert "rescan" in agent.output()
