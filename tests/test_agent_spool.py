"""The agent's spool and stream under strain: quota, full disk, refused events, crashes, SIGKILL.

Pure-class tests of the spool and the journal first, then real agents and relays.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Relay, Tail, agents_connected, command, start_agent, wait_for
from test_agent_durability import feed
from test_end_to_end import settled_head, write
from test_model import on_disk, replay

from storage_events.agent import journal
from storage_events.agent.spool import Spool
from storage_events.wire import MAX_PATH, Event


def ev(
    seq: int, path: str = "/d/f", flags: tuple[str, ...] = ("IN_CREATE",), stream: str = "a", **kw
) -> Event:
    return Event(
        site="s", node="n", path=path, flags=list(flags), ts=seq, stream=stream, seq=seq, **kw
    )


# -- the spool, on its own ----------------------------------------------------------------------


def test_spool_never_refuses_past_its_quota_and_finds_unwritten_rows(tmp_path):
    spool = Spool(tmp_path / "spool", quota=2000)
    for i in range(1, 101):
        spool.add(ev(i, path=f"/d/{i}"))
    assert spool.full  # the agent's cue to stop processing; nothing was refused
    assert [e.seq for e in spool.load("a", 40, 10)] == list(range(40, 50))  # not written yet
    spool.write(spool.take(), {})
    spool.add(ev(101))
    assert [e.seq for e in spool.load("a", 95, 100)] == list(range(95, 102))
    spool.flush({"a": 100})
    assert spool.streams() == [("a", 101, 101)] and not spool.full
    spool.close(clean=True)


def test_acknowledged_events_stay_as_the_journal_until_a_snapshot(tmp_path):
    spool = Spool(tmp_path / "spool", quota=1 << 20)
    for i in range(1, 11):
        spool.add(ev(i, path=f"/d/{i}"))
    spool.flush({"a": 10})
    assert spool.streams() == []  # nothing to resend...
    spool.close(clean=False)
    spool = Spool(tmp_path / "spool", quota=1 << 20)
    assert spool.unclean and spool.read_snapshot() is None
    assert [e.seq for e in spool.journal()] == list(range(1, 11))  # ...but all to replay
    assert spool.write_snapshot({"/d": [1, {}]}, {"a": 7})
    spool.flush({"a": 10})
    spool.close(clean=False)
    spool = Spool(tmp_path / "spool", quota=1 << 20)
    assert spool.read_snapshot() == {"/d": [1, {}]}
    assert [e.seq for e in spool.journal()] == [8, 9, 10]  # the rest went with the snapshot
    spool.close(clean=True)


# -- the journal --------------------------------------------------------------------------------


def test_journal_replays_what_was_published_onto_the_snapshot():
    snapshot = {
        "/r": [1, {"a": [2, 10, 5], "keep": [3, 10, 5], "d": [4, {"x": [5, 1, 1]}]}],
        "/s": [9, {"f": [10, 1, 1]}],
    }
    events = [
        ev(1, "/pub/new"),
        ev(2, "/pub/nd", is_dir=True),
        ev(3, "/pub/nd/f"),
        ev(4, "/pub/a", ("IN_DELETE",)),
        ev(5, "/pub/d", ("IN_MOVED_FROM",), is_dir=True, cookie=7),
        ev(6, "/pub/nd/d2", ("IN_MOVED_TO",), is_dir=True, cookie=7, old_path="/pub/d"),
        ev(7, "/pub/nd/d2/x", ("IN_CLOSE_WRITE",)),
        ev(8, "/pub/in", ("IN_MOVED_TO",), is_dir=True, cookie=9),  # moved in from outside
        ev(9, "/pub/nd/f", ("IN_MOVED_FROM",), cookie=11),  # moved out
        ev(10, "/pub", ("IN_Q_OVERFLOW",), is_dir=True),
        ev(11, "/pub/caf\ufffd", raw_path=b"/pub/caf\xe9"),
        ev(12, "/s", ("IN_DELETE_SELF",), is_dir=True),
        ev(13, "/elsewhere/x"),
        ev(14, "/pub/missing/x"),
    ]
    marks: journal.Marks = {}
    got = journal.apply(snapshot, events, [("/r", "/pub"), ("/s", "/s")], marks)
    assert got == {
        "/r": [
            1,
            {
                "keep": [3, 10, 5],
                "new": [0, 0, -1],
                "in": [0, {}],
                b"caf\xe9": [0, 0, -1],
                "nd": [0, {"d2": [4, {"x": [5, 0, -1]}]}],
            },
        ]
    }
    assert len(marks) == 4  # new, f, x, caf\xe9


def test_journal_settles_files_not_changed_since_their_last_event(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    write(root / "same")
    write(root / "later")
    now = time.time_ns()
    (root / "later").write_bytes(b"changed after the event was read")
    os.utime(root / "later", ns=(now + 10**9, now + 10**9))
    snapshot = {str(root): [1, {}]}
    marks: journal.Marks = {}
    journal.apply(
        snapshot,
        [ev(1, f"{root}/same"), ev(2, f"{root}/later"), ev(3, f"{root}/gone")],
        [(str(root), str(root))],
        marks,
    )
    journal.settle(snapshot, {k: (e, now) for k, (e, _) in marks.items()})
    st = os.lstat(root / "same")
    assert snapshot[str(root)][1] == {
        "same": [st.st_ino, st.st_mtime_ns, st.st_size],
        "later": [0, 0, -1],
        "gone": [0, 0, -1],
    }


# -- real agents --------------------------------------------------------------------------------


def agent_config(tmp_path: Path, text: str) -> tuple[str, ...]:
    config = tmp_path / "agent.toml"
    config.write_text(text)
    return ("--config", str(config), "--spool", str(tmp_path / "spool"))


def test_full_spool_pauses_processing_and_nothing_numbered_is_lost(tmp_path, procs, relay):
    root = tmp_path / "w"
    root.mkdir()
    initial = on_disk(root)
    agent = start_agent(
        tmp_path,
        procs,
        relay.url,
        root,
        extra=agent_config(tmp_path, "spool_quota = 100000\nmemory_events = 300\n"),
    )
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    relay.kill()
    for i in range(4000):
        write(root / f"f{i:04d}")
    for i in range(0, 4000, 4):
        (root / f"f{i:04d}").unlink()
    wait_for(lambda: "reached its quota" in agent.output(), 20, "the quota error")
    time.sleep(1)
    relay.start()
    events = feed(tmp_path, procs, relay)
    assert replay(initial, events) == on_disk(root)
    assert agent.popen.poll() is None, agent.output()[-3000:]
    assert "reading inotify again" in agent.output()
    assert "Traceback" not in agent.output()


@contextlib.contextmanager
def tiny_disk(path: Path, size: str) -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_pauses_processing_and_recovers(tmp_path, procs, relay):
    root = tmp_path / "w"
    root.mkdir()
    initial = on_disk(root)
    with tiny_disk(tmp_path / "spool", "2m"):
        agent = start_agent(
            tmp_path, procs, relay.url, root, extra=agent_config(tmp_path, "memory_events = 300\n")
        )
        wait_for(lambda: agents_connected(relay), 10, "agent connection")
        relay.kill()
        for i in range(6000):
            write(root / (f"f{i:05d}-" + "x" * 150))
        wait_for(lambda: "the disk is full" in agent.output(), 30, "the full-disk error")
        time.sleep(1)
        relay.start()
        events = feed(tmp_path, procs, relay)
        assert replay(initial, events) == on_disk(root)
        assert agent.popen.poll() is None, agent.output()[-3000:]
        assert "can be written again" in agent.output()
        assert agent.stop() == 0
    assert "Traceback" not in agent.output()


def test_an_internal_error_ends_the_agent_with_a_failure_status(tmp_path, procs, relay):
    root = tmp_path / "w"
    root.mkdir()
    agent = start_agent(tmp_path, procs, relay.url, root, extra=agent_config(tmp_path, ""))
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    with sqlite3.connect(tmp_path / "spool" / "outbox.sqlite3") as db:
        db.execute("DROP TABLE events")  # the spool broken under the running agent
    write(root / "f")
    wait_for(lambda: agent.popen.poll() is not None, 20, "the agent to stop")
    assert agent.popen.returncode != 0
    assert "internal error" in agent.output() and "non-zero status" in agent.output()


def deep_dirs(root: Path, total: int) -> int:
    """A chain of directories under ``root`` whose path is longer than ``total`` characters.
    Built in pieces short enough to be watched where they are made, each then moved under the
    last (through directory descriptors: the path is far past PATH_MAX); returns an fd of the
    deepest directory."""
    name = "d" * 250
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    bottom = os.dup(top)
    length, piece = len(str(root)), 0
    while length <= total:
        first = f"p{piece:02d}" + "p" * 246
        fd = os.dup(top)
        for part in [first] + [name] * 12:
            os.mkdir(part, dir_fd=fd)
            new = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = new
        time.sleep(0.3)  # watched, while its path is short
        if piece:
            os.rename(first, first, src_dir_fd=top, dst_dir_fd=bottom)
        os.close(bottom)
        bottom = fd
        length += 13 * 251
        piece += 1
    os.close(top)
    return bottom


def test_an_event_over_the_relays_limit_becomes_a_loss_notice(tmp_path, procs, relay):
    root = tmp_path / "w"
    root.mkdir()
    start_agent(tmp_path, procs, relay.url, root)
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    bottom = deep_dirs(root, MAX_PATH + 1000)
    os.close(os.open("deep-file", os.O_CREAT | os.O_WRONLY, dir_fd=bottom))
    os.close(bottom)
    time.sleep(0.5)
    write(root / "normal")
    tail = Tail(tmp_path, procs, relay.url, "--since", "earliest")
    wait_for(
        lambda: any(e["path"] == str(root / "normal") for e in tail.events()),
        30,
        "the normal file after the refused event",
    )
    notices = [e for e in tail.events() if e["flags"] == ["IN_Q_OVERFLOW"]]
    assert notices and all(len(e["path"]) <= MAX_PATH and e["is_dir"] for e in notices)
    assert all(
        str(root / "p00").startswith(e["path"]) or e["path"].startswith(str(root / "p00"))
        for e in notices
    )


def test_batches_too_big_for_the_relay_are_split_and_a_refused_event_replaced(tmp_path, procs):
    config = tmp_path / "relay.toml"
    config.write_text("max_frame = 65536\n")
    relay = Relay(tmp_path, procs, extra=("--config", str(config)))
    big, small = tmp_path / "big", tmp_path / "small"
    big.mkdir()
    small.mkdir()
    agent_toml = tmp_path / "agent.toml"
    # Every event of this root is over 65536 bytes: valid, but larger than the relay's frames.
    agent_toml.write_text(f'[[root]]\npath = "{big}"\nprefix = "/{"é" * 33_000}"\n')
    agent = start_agent(
        tmp_path,
        procs,
        relay.url,
        small,
        extra=("--config", str(agent_toml), "--spool", str(tmp_path / "spool")),
    )
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    relay.kill()
    for i in range(2000):  # a first batch after the outage far over 64 KiB
        write(small / (f"f{i:04d}-" + "x" * 100))
    write(big / "huge")
    write(small / "last")
    time.sleep(1)
    relay.start()
    events = feed(tmp_path, procs, relay)
    closed = {e["path"] for e in events if e["flags"] == ["IN_CLOSE_WRITE"]}
    assert {str(small / (f"f{i:04d}-" + "x" * 100)) for i in range(2000)} <= closed
    assert str(small / "last") in closed
    assert [e["path"] for e in events if e["flags"] == ["IN_Q_OVERFLOW"]] == ["/", "/"]
    assert "refuses event" in agent.output()


def test_after_sigkill_the_restart_compares_with_what_was_published(tmp_path, procs, relay):
    root = tmp_path / "w"
    root.mkdir()
    initial = on_disk(root)
    spool = ("--spool", str(tmp_path / "spool"))
    agent = start_agent(tmp_path, procs, relay.url, root, extra=spool)
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    # Published after the start's snapshot, and acknowledged:
    (root / "d" / "sub").mkdir(parents=True)
    write(root / "d" / "sub" / "x")
    write(root / "gone")
    write(root / "stays")
    assert settled_head(relay, quiet=1.0) >= 6  # published and acknowledged...
    time.sleep(1)  # ...and, several flush intervals later, in the spool
    agent.stop(signal.SIGKILL)
    # While the agent is down:
    (root / "gone").unlink()
    os.rename(root / "d", root / "renamed")
    start_agent(tmp_path, procs, relay.url, root, extra=spool, name="agent2")
    events = feed(tmp_path, procs, relay)
    assert replay(initial, events) == on_disk(root)
    closes = [e["path"] for e in events if e["flags"] == ["IN_CLOSE_WRITE"]]
    assert closes.count(str(root / "stays")) == 1  # not changed while down: not repeated


def test_overlapping_roots_are_refused(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for paths in ([tmp_path / "a", tmp_path / "a" / "b"], [tmp_path / "a", tmp_path / "a"]):
        r = subprocess.run(
            [command("storage-events-agent"), "run", *map(str, paths)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode != 0 and "roots overlap" in r.stderr, r.stderr
