"""Adversarial end-to-end tests of the agent: races a starved agent meets on a real node.

Each test runs a real agent (``start_agent``) and a real relay, reads the whole feed back with
``storage-events tail --since earliest`` and replays it into a catalogue
(:func:`test_model.replay`), which must equal the disk (:func:`test_model.on_disk`). SIGSTOP /
SIGCONT of the agent stands in for a starved CPU: everything queued meanwhile is handled late,
against a tree that has changed under it. Waits for what the agent does "within a few seconds"
(notice a mount, retry a watch, watch a recreated root) use generous timeouts; what is asserted
never depends on timing.

The trees live on a tmpfs of their own (``fs``), which also keeps the mounts these tests make
inside the tree away from everything else.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from conftest import Proc, Relay, Tail, agents_connected, command, start_agent, wait_for
from test_end_to_end import settled_head, write
from test_model import event_path, kernel_queue, on_disk, replay

pytestmark = pytest.mark.timeout(90)

WATCHES = Path("/proc/sys/fs/inotify/max_user_watches")
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


# -- fixtures and helpers ------------------------------------------------------------------------


def _umount(where: Path, *, recursive: bool = False) -> None:
    args = ["umount", *(["-R"] if recursive else []), str(where)]
    if subprocess.run(args, capture_output=True).returncode != 0:
        subprocess.run([*args[:-1], "-l", str(where)], capture_output=True)


@pytest.fixture
def fs(procs: list[Proc]) -> Iterator[Path]:
    """A private tmpfs in /tmp (world-searchable, for an unprivileged agent), unmounted with
    everything mounted inside it after the test's processes are stopped."""
    if os.geteuid() != 0:
        pytest.skip("these tests mount tmpfs and signal the agent as root")
    top = Path(tempfile.mkdtemp(prefix="se-races-", dir="/tmp"))
    os.chmod(top, 0o755)
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256m,mode=755", "se-races", str(top)],
            check=True,
            capture_output=True,
        )
        subprocess.run(["mount", "--make-private", str(top)], check=True, capture_output=True)
        yield top
    finally:
        for p in reversed(procs):  # nothing may hold the mounts
            with contextlib.suppress(Exception):
                p.stop(timeout=10)
        if os.path.ismount(top):
            _umount(top, recursive=True)
        with contextlib.suppress(OSError):
            top.rmdir()


class Feed:
    """The whole feed from its start, read by a live ``storage-events tail --since earliest``."""

    _names = itertools.count()

    def __init__(self, tmp: Path, procs: list[Proc], relay: Relay) -> None:
        self.relay = relay
        self.tail = Tail(
            tmp, procs, relay.url, "--since", "earliest", name=f"feed{next(self._names)}"
        )
        self._events: list[dict] = []
        self._pos = 0

    def events(self) -> list[dict]:
        with open(self.tail.out, "rb") as f:
            f.seek(self._pos)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._events += [json.loads(line) for line in data[:end].split(b"\n")[:-1]]
        self._pos += end
        return self._events

    def settled(self, quiet: float = 1.5) -> list[dict]:
        head = settled_head(self.relay, quiet=quiet)
        wait_for(
            lambda: len(self.events()) >= head,
            60,
            f"{head} events from tail; stderr: {self.tail.proc.output()[-2000:]}",
        )
        return list(self.events())

    def index(self, pred: Callable[[dict], bool], timeout: float, what: str, after: int = 0) -> int:
        """The position of the first event from ``after`` on that matches, waiting for it."""

        def find() -> int | None:
            for i, e in enumerate(self.events()[after:], after):
                if pred(e):
                    return i + 1  # 1-based, so that 0 is "not yet"
            return None

        return wait_for(find, timeout, what) - 1


def at(flag: str, path: Path | str) -> Callable[[dict], bool]:
    return lambda e: e["flags"][0] == flag and event_path(e) == str(path)


def wait_until(check: Callable[[], str | None], timeout: float) -> None:
    """``check`` returns None when satisfied, else what is still wrong (for the failure)."""
    deadline = time.monotonic() + timeout
    problem = check()
    while problem is not None and time.monotonic() < deadline:
        time.sleep(0.1)
        problem = check()
    if problem is not None:
        raise AssertionError(f"after {timeout} s: {problem}")


COMPLETE = "complete"  # IN_CLOSE_WRITE, or a file's synthetic IN_CREATE (README: its close
# happened before the agent could see it, so a pipeline takes it as "complete")


def _matches(e: dict, flag: str | None) -> bool:
    if flag == COMPLETE:
        return e["flags"][0] == "IN_CLOSE_WRITE" or (
            e["flags"][0] == "IN_CREATE" and e["synthetic"] and not e["is_dir"]
        )
    return flag in (None, e["flags"][0])


def wait_published(
    feed: Feed,
    paths: Iterable[Path | str],
    flag: str | None = COMPLETE,
    timeout: float = 15,
    after: int = 0,
) -> None:
    """Each of ``paths`` published (as ``flag``; None: any event) at exactly that path."""
    want = {str(p) for p in paths}

    def check() -> str | None:
        got = {event_path(e) for e in feed.events()[after:] if _matches(e, flag)}
        missing = sorted(want - got)
        if not missing:
            return None
        names = {m.rsplit("/", 1)[1] for m in missing[:5]}
        instead = [
            (e["flags"][0], event_path(e))
            for e in feed.events()
            if (event_path(e) or "").rsplit("/", 1)[-1] in names
        ]
        return (
            f"{len(missing)} of {len(want)} never published ({flag or 'any event'}): "
            f"{missing[:5]}; published with those names: {instead[:5]}"
        )

    wait_until(check, timeout)


def _diff(rebuilt: dict[str, bool], expected: dict[str, bool]) -> list:
    return sorted(set(rebuilt.items()) ^ set(expected.items()))[:20]


def wait_converged(
    feed: Feed,
    initial: dict[str, bool],
    root: Path,
    timeout: float = 15,
    extra: dict[str, bool] | None = None,
) -> None:
    """Until the replay of the feed so far equals the disk (a defect in the feed fails at
    once)."""

    def check() -> str | None:
        rebuilt = replay(initial, feed.events(), [root])
        expected = {**(extra or {}), **on_disk(root)}
        return (
            None
            if rebuilt == expected
            else f"the replay differs from the disk (model ^ disk): {_diff(rebuilt, expected)}"
        )

    wait_until(check, timeout)


def assert_replay(
    feed: Feed, initial: dict[str, bool], root: Path, extra: dict[str, bool] | None = None
) -> list[dict]:
    events = feed.settled()
    rebuilt = replay(initial, events, [root])
    expected = {**(extra or {}), **on_disk(root)}
    assert rebuilt == expected, f"model ^ disk: {_diff(rebuilt, expected)}"
    return events


def run_agent(
    tmp: Path,
    procs: list[Proc],
    relay: Relay,
    *roots: Path,
    extra: tuple[str, ...] = (),
    prefix: list[str] | None = None,
    name: str = "agent",
) -> Proc:
    agent = start_agent(tmp, procs, relay.url, *roots, extra=extra, netns=prefix, name=name)
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    return agent


@contextlib.contextmanager
def stopped(agent: Proc) -> Iterator[None]:
    """The agent gets no CPU inside the block: its events queue up in the kernel."""
    agent.send(signal.SIGSTOP)
    try:
        yield
    finally:
        agent.send(signal.SIGCONT)


@contextlib.contextmanager
def bursts(agent: Proc, stop_s: float = 0.005, run_s: float = 0.02) -> Iterator[None]:
    """The agent stopped in short bursts from a thread."""
    done = threading.Event()

    def loop() -> None:
        while not done.is_set():
            agent.send(signal.SIGSTOP)
            time.sleep(stop_s)
            agent.send(signal.SIGCONT)
            time.sleep(run_s)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        agent.send(signal.SIGCONT)


@contextlib.contextmanager
def starved_cpu(agent: Proc, procs: list[Proc], tmp: Path) -> Iterator[None]:
    """The agent (all its threads) pinned to core 0, beside a CPU hog pinned there too: it runs
    about half the time, late by a scheduler slice, while the test's writers have core 1."""
    hog = Proc(["taskset", "-c", "0", sys.executable, "-c", "while True: pass"], tmp / "hog.log")
    procs.append(hog)
    cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    subprocess.run(
        ["taskset", "-a", "-p", "-c", "0", str(agent.pid)], check=True, capture_output=True
    )
    try:
        yield
    finally:
        hog.stop()
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(agent.pid)], capture_output=True)


def run_threads(seconds: float, *bodies: Callable[[threading.Event], None]) -> None:
    """Run each ``body(done)`` on a thread for ``seconds``; re-raise the first error."""
    done = threading.Event()
    errors: list[BaseException] = []

    def guarded(body: Callable[[threading.Event], None]) -> None:
        try:
            body(done)
        except BaseException as e:  # handed to the test
            errors.append(e)
            done.set()

    threads = [threading.Thread(target=guarded, args=(b,), daemon=True) for b in bodies]
    for t in threads:
        t.start()
    done.wait(seconds)
    done.set()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]


def subdirs(top: Path) -> list[Path]:
    return [Path(p) for p, is_dir in on_disk(top).items() if is_dir]


def write_late(feed: Feed, dirs: Iterable[Path], name: str = "late") -> None:
    """Files written in ``dirs`` now, after the race, must be published where they are."""
    files = [d / name for d in dirs]
    for f in files:
        write(f)
    wait_published(feed, files)


# -- 1. swapped directories ----------------------------------------------------------------------


def test_swap_while_stopped(fs, tmp_path, procs, relay):
    root = fs / "w"
    for side in ("A", "B"):
        (root / side / "s").mkdir(parents=True)
    initial = on_disk(root)
    agent = run_agent(tmp_path, procs, relay, root)
    feed = Feed(tmp_path, procs, relay)
    for r in range(3):
        n = f"n{r}"
        with stopped(agent):
            (root / "A" / "s" / n).mkdir()
            (root / "B" / "s" / n).mkdir()
            write(root / "A" / "s" / n / "fa")
            write(root / "B" / "s" / n / "fb")
            os.rename(root / "A", root / "T")
            os.rename(root / "B", root / "A")
            os.rename(root / "T", root / "B")
        # fa is now under B, fb under A: what is written next to them is published there
        late = [
            root / ("B" if r % 2 == 0 else "A") / "s" / n / f"late_a{r}",
            root / ("A" if r % 2 == 0 else "B") / "s" / n / f"late_b{r}",
        ]
        for f in late:
            write(f)
        wait_published(feed, late)
    assert_replay(feed, initial, root)


_RENAME_EXCHANGE = 2  # renameat2 flag: both names must exist; they trade places atomically


def exchange(a: Path, b: Path) -> None:
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), f"renameat2({a}, {b}, RENAME_EXCHANGE)")


def test_directories_exchanged_atomically(fs, tmp_path, procs, relay):
    # `mv --exchange`, an atomic deploy swap: the kernel queues the same events as two renames
    # over each other, yet both directories are still there, with each other's names.
    root = fs / "w"
    for side in ("A", "B"):
        (root / side / "sub").mkdir(parents=True)
        write(root / side / f"f{side}")
    initial = on_disk(root)
    run_agent(tmp_path, procs, relay, root)
    feed = Feed(tmp_path, procs, relay)
    for _ in range(3):
        exchange(root / "A", root / "B")
    wait_converged(feed, initial, root)
    write_late(feed, [root / "A", root / "B", root / "A" / "sub", root / "B" / "sub"])
    assert_replay(feed, initial, root)


def test_swap_under_concurrent_creation(fs, tmp_path, procs, relay):
    root = fs / "w"
    for side in ("X", "Y"):
        (root / side).mkdir(parents=True)
    initial = on_disk(root)
    agent = run_agent(tmp_path, procs, relay, root)
    feed = Feed(tmp_path, procs, relay)

    def swapper(done: threading.Event) -> None:
        while not done.is_set():  # 10 swaps a second
            os.rename(root / "X", root / "T")
            os.rename(root / "Y", root / "X")
            os.rename(root / "T", root / "Y")
            time.sleep(0.1)

    def creator(done: threading.Event) -> None:
        for i in itertools.count():  # the same names in both: a late watch by path of X/dI
            if done.is_set():  # is a watch of the other one
                return
            for side in ("X", "Y"):
                d = root / side / f"d{i}"
                # in the middle of a swap, or after one put the other dI here
                with contextlib.suppress(FileNotFoundError, FileExistsError):
                    d.mkdir()
                    (d / "sub").mkdir()
                    write(d / f"f{side}")
                    write(d / "sub" / f"g{side}")
            time.sleep(0.002)

    with starved_cpu(agent, procs, tmp_path):  # no SIGSTOP: just too little CPU
        run_threads(3.0, swapper, creator)
    write_late(feed, subdirs(root))
    assert_replay(feed, initial, root)


# -- 2. log rotation -----------------------------------------------------------------------------


def test_rotation_with_stopped_bursts(fs, tmp_path, procs, relay):
    root = fs / "w"
    logs = root / "logs"
    (logs / "current" / "2026").mkdir(parents=True)
    write(logs / "current" / "2026" / "x")
    initial = on_disk(root)
    agent = run_agent(tmp_path, procs, relay, root)
    feed = Feed(tmp_path, procs, relay)
    for i in range(12):
        with stopped(agent) if i % 2 else contextlib.nullcontext():
            if (logs / "old.2").exists():
                shutil.rmtree(logs / "old.2")
            if (logs / "old.1").exists():
                os.rename(logs / "old.1", logs / "old.2")
            os.rename(logs / "current", logs / "old.1")
            (logs / "current" / "2026").mkdir(parents=True)
            write(logs / "current" / "2026" / f"x{i}")
        write(logs / "old.1" / "2026" / f"after{i}")  # a writer still busy in the old one
    write_late(feed, [logs / "old.2" / "2026", logs / "old.1" / "2026", logs / "current" / "2026"])
    assert_replay(feed, initial, root)


# -- 3. symlink planted at a renamed directory's name --------------------------------------------


def test_symlink_planted_at_renamed_directory_never_leaks_outside(fs, tmp_path, procs, relay):
    root, elsewhere = fs / "w", fs / "elsewhere"
    for sub in ("sub", "sub2"):
        (elsewhere / sub / "SECRET-dir").mkdir(parents=True)
        write(elsewhere / sub / "SECRET-file")
    write(elsewhere / "SECRET-top")
    loops = 100
    for i in range(loops):
        (root / f"A{i}").mkdir(parents=True)
    initial = on_disk(root)
    agent = run_agent(tmp_path, procs, relay, root)
    feed = Feed(tmp_path, procs, relay)
    for i in range(loops):
        a = root / f"A{i}"
        with stopped(agent):
            (a / "sub").mkdir()
            (a / "sub2").mkdir()
            os.rename(a, root / f"A{i}.moved")
            os.symlink(elsewhere, a)
        time.sleep(0.005)
    # Were anything out there watched, this would be published now.
    for sub in ("sub", "sub2"):
        write(elsewhere / sub / "SECRET-late")
        (elsewhere / sub / "SECRET-dir" / "SECRET-deeper").mkdir()
    write(elsewhere / "SECRET-late-top")
    events = feed.settled()
    leaked = [
        e for e in events if any("SECRET" in (event_path(e, k) or "") for k in ("path", "old_path"))
    ]
    assert not leaked, f"{len(leaked)} events name what lies outside the root: {leaked[:3]}"
    write_late(
        feed, [root / f"A{i}.moved" / sub for i in range(0, loops, 10) for sub in ("sub", "sub2")]
    )
    assert_replay(feed, initial, root)


# -- 4. events queued between the two halves of a rename -----------------------------------------


CREATOR = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)  # the directory, wherever it is moved
print("ready", flush=True)
for i in range(int(sys.argv[2])):
    os.mkdir(f"c{i}", dir_fd=fd)
    for name in (f"c{i}/f", f"top{i}"):
        out = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, b"x" * 100)
        os.close(out)
"""


def test_events_between_rename_halves(fs, tmp_path, procs, relay):
    """A rename's IN_MOVED_FROM and IN_MOVED_TO are queued by two calls in the kernel: events
    of a writer on the other core inside the renamed directory land between them."""
    root = fs / "w"
    (root / "P" / "L").mkdir(parents=True)
    (root / "Q").mkdir()
    initial = on_disk(root)
    agent = run_agent(tmp_path, procs, relay, root)
    feed = Feed(tmp_path, procs, relay)
    creator = Proc(
        [sys.executable, "-c", CREATOR, str(root / "P" / "L"), "1500"], tmp_path / "creator.log"
    )
    procs.append(creator)
    wait_for(lambda: "ready" in creator.output(), 20, "the creator")

    def renamer(done: threading.Event) -> None:
        for i in itertools.count():
            if done.is_set() or creator.popen.poll() is not None:
                return
            away = root / "Q" / "L" if i % 2 else root / "P" / "L2"  # other parent, same parent
            os.rename(root / "P" / "L", away)
            os.rename(away, root / "P" / "L")

    with bursts(agent):
        run_threads(10.0, renamer)
    assert creator.popen.wait(30) == 0, creator.output()
    write_late(feed, subdirs(root / "P" / "L"))
    assert_replay(feed, initial, root)


# -- 5, 6. moves in from outside -----------------------------------------------------------------


def test_move_in_over_an_empty_directory(fs, tmp_path, procs, relay):
    root, outside = fs / "w", fs / "outside"
    root.mkdir()
    (outside / "d" / "sub" / "deeper").mkdir(parents=True)
    for f in ("d/f1", "d/f2", "d/sub/g", "d/sub/deeper/h"):
        write(outside / f)
    initial = on_disk(root)
    run_agent(tmp_path, procs, relay, root)
    feed = Feed(tmp_path, procs, relay)
    (root / "dst").mkdir()
    feed.index(at("IN_CREATE", root / "dst"), 10, "the agent seeing dst")
    os.rename(outside / "d", root / "dst")  # over the empty directory, replacing it
    wait_converged(feed, initial, root)
    write_late(feed, [root / "dst", root / "dst" / "sub", root / "dst" / "sub" / "deeper"])
    assert_replay(feed, initial, root)


def test_out_and_back_within_the_pairing_window(fs, tmp_path, procs, relay):
    root, outside = fs / "w", fs / "outside"
    outside.mkdir()
    for i in range(6):
        (root / f"d{i}").mkdir(parents=True)
        write(root / f"d{i}" / "f1")
    initial = on_disk(root)
    agent = run_agent(tmp_path, procs, relay, root)
    feed = Feed(tmp_path, procs, relay)
    for i in range(6):
        d = root / f"d{i}"
        with stopped(agent) if i % 2 else contextlib.nullcontext():
            os.rename(d, outside / d.name)  # out, changed out there, and back within 0.2 s
            os.unlink(outside / d.name / "f1")
            write(outside / d.name / "f2")
            os.rename(outside / d.name, d)
    wait_converged(feed, initial, root)
    write_late(feed, [root / f"d{i}" for i in range(6)])
    assert_replay(feed, initial, root)


# -- 7. the root itself --------------------------------------------------------------------------


def _root_comes_back(feed: Feed, initial: dict[str, bool], root: Path, gone_at: int) -> None:
    """After the root went (event at ``gone_at``): its new incarnation is announced, its contents
    published, and it is watched (later writes published)."""
    feed.index(
        at("IN_CREATE", root), 15, f"{root} watched again (its IN_CREATE)", after=gone_at + 1
    )
    wait_converged(feed, initial, root, extra={str(root): True})
    write_late(feed, [root, root / "sub"])
    assert_replay(feed, initial, root, extra={str(root): True})


def _fill(root: Path, files: int = 3) -> None:
    (root / "a" / "b").mkdir(parents=True)
    for i in range(files):
        write(root / "a" / "b" / f"f{i}")
    write(root / "g")


def _new_root(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    write(root / "x")
    write(root / "sub" / "y")


def test_root_deleted_and_recreated(fs, tmp_path, procs, relay):
    root = fs / "w"
    _fill(root)
    initial = on_disk(root)
    run_agent(tmp_path, procs, relay, root)
    feed = Feed(tmp_path, procs, relay)
    shutil.rmtree(root)
    gone = feed.index(at("IN_DELETE_SELF", root), 10, "IN_DELETE_SELF of the root")
    _new_root(root)
    _root_comes_back(feed, initial, root, gone)


def test_root_moved_away_and_recreated(fs, tmp_path, procs, relay):
    root = fs / "w"
    _fill(root)
    initial = on_disk(root)
    run_agent(tmp_path, procs, relay, root)
    feed = Feed(tmp_path, procs, relay)
    os.rename(root, fs / "w.old")
    gone = feed.index(at("IN_MOVE_SELF", root), 10, "IN_MOVE_SELF of the root")
    _new_root(root)
    write(fs / "w.old" / "late-old")  # no longer watched: publishing it is a defect
    (fs / "w.old" / "a" / "b" / "new-old").mkdir()
    _root_comes_back(feed, initial, root, gone)


def test_root_deleted_while_stopped_with_an_overflow_pending(fs, tmp_path, procs, relay):
    root = fs / "w"
    _fill(root, files=40)
    initial = on_disk(root)
    with kernel_queue(16):
        agent = run_agent(tmp_path, procs, relay, root)
    feed = Feed(tmp_path, procs, relay)
    with stopped(agent):
        shutil.rmtree(root)  # more events than the queue holds: an overflow is pending
        _new_root(root)
    gone = feed.index(
        lambda e: (
            e["flags"][0] in ("IN_DELETE_SELF", "IN_MOVE_SELF") and event_path(e) == str(root)
        ),
        15,
        "IN_DELETE_SELF / IN_MOVE_SELF of the replaced root",
    )
    _root_comes_back(feed, initial, root, gone)
    assert any(e["flags"] == ["IN_Q_OVERFLOW"] for e in feed.events()), (
        "the loss was never announced (no IN_Q_OVERFLOW)"
    )


# -- 8, 9. directories that cannot be watched at first -------------------------------------------


def watches_in_use(uid: int) -> int:
    """inotify watches held by ``uid``'s processes (the limit is per user)."""
    n = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    n += f.read().count("inotify wd:")
        except OSError:
            continue
    return n


@contextlib.contextmanager
def watch_limit(extra: int) -> Iterator[None]:
    """Leave only ``extra`` more watches for this user inside the block."""
    saved = WATCHES.read_text()
    WATCHES.write_text(str(watches_in_use(os.geteuid()) + extra))
    try:
        yield
    finally:
        WATCHES.write_text(saved)


def _limited_tree(root: Path) -> list[Path]:
    dirs = [root / f"d{i:02d}" for i in range(40)]
    for d in dirs:
        d.mkdir(parents=True)
        write(d / "pre")
    return dirs


def _unwatchable_announced(feed: Feed, candidates: Iterable[Path]) -> None:
    names = {str(d) for d in candidates}
    feed.index(
        lambda e: e["flags"] == ["IN_Q_OVERFLOW"] and event_path(e) in names,
        10,
        f"an IN_Q_OVERFLOW naming a directory that could not be watched (one of "
        f"{sorted(names)[:3]}…)",
    )


def _probe(dirs: list[Path]) -> list[Path]:
    """Files written into the unwatched directories once they can be watched: published when
    the agent lists the retried directory (or as they happen)."""
    probes = [d / "probe" for d in dirs]
    for p in probes:
        write(p)
    return probes


def _check_retried(
    feed: Feed, initial: dict[str, bool], root: Path, probes: list[Path], timeout: float = 15
) -> None:
    """The probes published, then what is written there afterwards, and the replay right."""
    wait_published(feed, probes, flag=None, timeout=timeout)
    write_late(feed, [p.parent for p in probes])
    assert_replay(feed, initial, root)


def test_watch_limit_then_sighup(fs, tmp_path, procs, relay):
    root = fs / "w"
    dirs = _limited_tree(root)
    initial = on_disk(root)
    with watch_limit(25):  # the root and 24 of the 40
        agent = run_agent(tmp_path, procs, relay, root)
        feed = Feed(tmp_path, procs, relay)
        _unwatchable_announced(feed, dirs)
    assert "max_user_watches" in agent.output()
    probes = _probe(dirs)
    agent.send(signal.SIGHUP)  # the limit is raised: retry now
    _check_retried(feed, initial, root, probes)
    assert agent.popen.poll() is None, agent.output()[-2000:]


def test_watch_limit_periodic_retry(fs, tmp_path, procs, relay):
    root = fs / "w"
    dirs = _limited_tree(root)
    initial = on_disk(root)
    config = tmp_path / "agent.toml"
    config.write_text("retry_interval = 1.0\n")
    with watch_limit(25):
        agent = run_agent(tmp_path, procs, relay, root, extra=("--config", str(config)))
        feed = Feed(tmp_path, procs, relay)
        _unwatchable_announced(feed, dirs)
    assert "max_user_watches" in agent.output()
    probes = _probe(dirs)
    _check_retried(feed, initial, root, probes)


def _unprivileged() -> list[str]:
    """A command prefix running the agent without root's power over file permissions: as
    nobody when nobody can run this virtualenv's interpreter, else as uid 0 without the
    capabilities that bypass permissions (the interpreter may live in a 0700 /root)."""
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    probe = subprocess.run(
        [*nobody, command("storage-events-agent"), "--help"], capture_output=True, timeout=60
    )
    if probe.returncode == 0:
        return nobody
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--"]


def test_unreadable_directory_watched_once_readable(fs, tmp_path, procs, relay):
    root = fs / "w"
    locked = root / "locked"
    (locked / "inner").mkdir(parents=True)
    write(locked / "pre")
    write(root / "open")
    initial = on_disk(root)
    os.chmod(locked, 0)
    try:
        run_agent(tmp_path, procs, relay, root, prefix=_unprivileged())
        feed = Feed(tmp_path, procs, relay)
        _unwatchable_announced(feed, [locked])
    finally:
        os.chmod(locked, 0o755)  # an IN_ATTRIB on it: the agent can try again
    write(locked / "new")
    write(locked / "inner" / "new")
    wait_published(feed, [locked / "new", locked / "inner" / "new"], flag=None)
    write_late(feed, [locked, locked / "inner"])
    assert_replay(feed, initial, root)


def test_readable_but_unsearchable_directory_is_a_notice_not_a_crash(fs, tmp_path, procs, relay):
    # Mode 644 on a directory: it opens and lists, but cannot be entered (fchdir, lookups).
    root = fs / "w"
    odd = root / "odd"
    (odd / "inner").mkdir(parents=True)
    write(root / "open")
    initial = on_disk(root)
    os.chmod(odd, 0o644)
    try:
        agent = run_agent(tmp_path, procs, relay, root, prefix=_unprivileged())
        feed = Feed(tmp_path, procs, relay)
        _unwatchable_announced(feed, [odd])
        late = root / "late-dir"
        late.mkdir()
        os.chmod(late, 0o644)  # the same, seen at run time
        _unwatchable_announced(feed, [late])
        assert agent.popen.poll() is None, agent.output()[-2000:]
    finally:
        os.chmod(odd, 0o755)
        os.chmod(root / "late-dir", 0o755)
    write(odd / "new")
    wait_published(feed, [odd / "new"], flag=None)
    write_late(feed, [odd, odd / "inner", root / "late-dir"])
    assert_replay(feed, initial, root)


# -- 10. mounts inside the tree ------------------------------------------------------------------


def test_tmpfs_mounted_and_unmounted_on_a_watched_directory(fs, tmp_path, procs, relay):
    root = fs / "w"
    m = root / "m"
    m.mkdir(parents=True)
    write(m / "c1")
    write(m / "c2")
    initial = on_disk(root)
    run_agent(tmp_path, procs, relay, root)
    feed = Feed(tmp_path, procs, relay)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "inner", str(m)], check=True)
    try:
        (m / "held2" / "sub").mkdir(parents=True)
        write(m / "held1")
        write(m / "held2" / "sub" / "f")
        # c1, c2 reported deleted, the mounted fs's contents created
        wait_converged(feed, initial, root)
        write_late(feed, [m, m / "held2" / "sub"])
    finally:
        _umount(m)
    # the mounted fs's contents reported deleted, c1 and c2 back
    wait_converged(feed, initial, root)
    write_late(feed, [m], name="after-umount")
    assert_replay(feed, initial, root)


def test_bind_mount_does_not_steal_the_source_watch(fs, tmp_path, procs, relay):
    root = fs / "w"
    x, y = root / "X", root / "Y"
    x.mkdir(parents=True)
    y.mkdir()
    write(x / "fx")
    write(y / "fy")
    initial = on_disk(root)
    run_agent(tmp_path, procs, relay, root)
    feed = Feed(tmp_path, procs, relay)
    mounted_at = len(feed.events())
    subprocess.run(["mount", "--bind", str(x), str(y)], check=True)
    try:
        # The agent notices the mount and says something about Y: its contents replaced, or
        # a loss notice (the same directory seen at two places can be watched at one only).
        feed.index(
            lambda e: (event_path(e) or "").startswith(str(y)),
            15,
            "an event about the bind-mounted Y",
            after=mounted_at,
        )
        write(x / "after")
        wait_published(feed, [x / "after"])  # under X's path: Y's mount took no watch of X's
    finally:
        _umount(y)
    # Y shows its own contents again. (X/after existed under Y too while mounted: a write into
    # one inode seen at two places is published once, at the watched directory's own path.)
    wait_converged(feed, initial, root)
    write_late(feed, [x, y])
    assert_replay(feed, initial, root)


# -- 11. a rescan publishes only real differences ------------------------------------------------


def test_overflow_rescan_publishes_only_real_changes(fs, tmp_path, procs, relay):
    root = fs / "w"
    (root / "churn").mkdir(parents=True)
    initial = on_disk(root)
    with kernel_queue(2048):
        agent = run_agent(tmp_path, procs, relay, root)
    feed = Feed(tmp_path, procs, relay)
    files = []
    for k in range(32):  # 8,192 files, paced so that the queue never overflows here
        d = root / f"d{k:02d}"
        d.mkdir()
        batch = [d / f"f{j:03d}" for j in range(256)]
        for f in batch:
            write(f)
        files += batch
        wait_published(feed, batch, timeout=30)
    before = len(feed.events())
    assert not any(e["flags"] == ["IN_Q_OVERFLOW"] for e in feed.events()), (
        "the set-up overflowed already"
    )
    changed = random.Random(11).sample(files, 20)
    with stopped(agent):
        for i in range(1500):  # 4,500 events: the queue of 2,048 overflows
            write(root / "churn" / f"t{i}")
            os.unlink(root / "churn" / f"t{i}")
        for f in changed:  # lost in the overflow: only the rescan can report them
            with open(f, "ab") as fh:
                fh.write(b"changed")
    overflow = feed.index(
        lambda e: e["flags"] == ["IN_Q_OVERFLOW"], 20, "the overflow", after=before
    )
    events = assert_replay(feed, initial, root)
    after = events[overflow:]
    repeated = [e for e in after if e["flags"] == ["IN_CLOSE_WRITE"] and e["synthetic"]]
    assert len(repeated) <= 2 * len(changed), (
        f"the rescan published {len(repeated)} synthetic IN_CLOSE_WRITE for "
        f"{len(changed)} files really changed: e.g. {[event_path(e) for e in repeated[:5]]}"
    )
    closed = {event_path(e) for e in after if e["flags"] == ["IN_CLOSE_WRITE"]}
    assert {str(f) for f in changed} <= closed, "a changed file was not reported"


# -- 12. deeper than PATH_MAX --------------------------------------------------------------------


def test_deeper_than_path_max(fs, tmp_path, procs, relay):
    root = fs / "w"
    root.mkdir()
    initial = on_disk(root)
    run_agent(tmp_path, procs, relay, root)
    feed = Feed(tmp_path, procs, relay)
    name, path = "d" * 200, str(root)
    fd = os.open(root, DIR_FLAGS)
    try:
        while len(path) < 6000:  # well past PATH_MAX (4,096 bytes), far below 65,536
            os.mkdir(name, dir_fd=fd)
            deeper = os.open(name, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd, path = deeper, path + "/" + name
        for f in ("bottom", "late"):
            out = os.open(f, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
            os.write(out, b"x" * 100)
            os.close(out)
            wait_published(feed, [path + "/" + f])
    finally:
        os.close(fd)
    assert_replay(feed, initial, root)


# -- 13. a name that is not UTF-8, with a spool --------------------------------------------------


def test_non_utf8_name_with_spool_snapshot_and_restart(fs, tmp_path, procs, relay):
    root = fs / "w"
    root.mkdir()
    initial = on_disk(root)
    config = tmp_path / "agent.toml"
    config.write_text("snapshot_interval = 1.0\n")
    extra = ("--spool", str(tmp_path / "spool"), "--config", str(config))
    agent = run_agent(tmp_path, procs, relay, root, extra=extra)
    feed = Feed(tmp_path, procs, relay)
    bad = os.fsencode(root) + b"/bad\xff\xfename"
    fd = os.open(bad, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"x")
    os.close(fd)
    wait_published(feed, [os.fsdecode(bad)])
    raw = {base64.b64decode(e["raw_path"]) for e in feed.events() if e["raw_path"]}
    assert raw == {bad}, raw
    time.sleep(2.5)  # past the next snapshot (snapshot_interval = 1 s)
    assert agent.popen.poll() is None, f"the agent died:\n{agent.output()[-3000:]}"
    write(root / "after-snapshot")
    wait_published(feed, [root / "after-snapshot"])
    assert agent.stop() == 0, agent.output()[-3000:]
    again = run_agent(tmp_path, procs, relay, root, extra=extra, name="agent2")
    write(root / "after-restart")
    wait_published(feed, [root / "after-restart"])
    time.sleep(1.5)  # and past a snapshot of the restarted agent
    assert again.popen.poll() is None, f"the agent died:\n{again.output()[-3000:]}"
    assert_replay(feed, initial, root)


# -- 14. the demo's rename -----------------------------------------------------------------------


def test_demo_rename_pairs(fs, tmp_path, procs, relay):
    root = fs / "w"
    for i in range(6):
        (root / f"demo{i}").mkdir(parents=True)
    initial = on_disk(root)
    agent = run_agent(tmp_path, procs, relay, root)
    feed = Feed(tmp_path, procs, relay)
    for i in range(6):
        base = root / f"demo{i}"
        with stopped(agent) if i % 3 else contextlib.nullcontext():
            (base / "hello.txt").write_text("hello from storage-events\n")  # what demo.py does
            (base / "run1").mkdir()
            (base / "run1" / "data.h5").write_bytes(b"\0" * 1024)
            (base / "hello.txt").rename(base / "run1" / "hello.txt")
    events = assert_replay(feed, initial, root)
    for i in range(6):
        base = root / f"demo{i}"
        src = [j for j, e in enumerate(events) if at("IN_MOVED_FROM", base / "hello.txt")(e)]
        assert len(src) == 1, f"{base}: IN_MOVED_FROM of hello.txt published {len(src)} times"
        cookie = events[src[0]]["cookie"]
        dst = [
            e
            for e in events[src[0] + 1 :]
            if e["flags"] == ["IN_MOVED_TO"] and e["cookie"] == cookie
        ]
        assert (
            dst
            and event_path(dst[0]) == str(base / "run1" / "hello.txt")
            and event_path(dst[0], "old_path") == str(base / "hello.txt")
        ), (
            f"{base}: no IN_MOVED_TO run1/hello.txt paired with cookie {cookie}: "
            f"{[e for e in events if 'hello' in e['path']]}"
        )


# -- 15. overlapping roots -----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["arguments", "config"])
def test_overlapping_roots_refused(tmp_path, procs, relay, how):
    root = tmp_path / "w"
    inner = root / "inner"
    inner.mkdir(parents=True)
    if how == "arguments":
        args = [str(root), str(inner)]
    else:
        config = tmp_path / "agent.toml"
        config.write_text(
            f'[[root]]\npath = "{root}"\n\n[[root]]\npath = "{inner}"\nprefix = "/elsewhere"\n'
        )
        args = ["--config", str(config)]
    agent = Proc(
        [command("storage-events-agent"), "run", "--relay", relay.url, *args],
        tmp_path / "agent.log",
    )
    procs.append(agent)
    try:
        rc = agent.popen.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the agent accepted overlapping roots {root} and {inner} and runs")
    assert rc != 0
    assert str(inner) in agent.output(), agent.output()[-2000:]
