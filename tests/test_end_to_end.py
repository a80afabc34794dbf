"""Agent → relay → SSE subscriber, as real processes on a real temporary tree."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
from conftest import Proc, Relay, Tail, agents_connected, start_agent, wait_for


def settled_head(relay: Relay, quiet: float = 1.5, timeout: float = 120) -> int:
    """The relay's newest id once it has stopped moving for ``quiet`` seconds with the agent
    connected (an agent waiting to reconnect after a relay restart still holds events)."""
    last, since = -1, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = relay.healthy()
        head = health["head"] if health else last
        if head != last or not (health and health["agents"]):
            last, since = head, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return head
        time.sleep(0.1)
    raise AssertionError("relay head never settled")


def write(path: Path, data: bytes = b"x" * 100) -> None:
    with open(path, "wb") as f:
        f.write(data)


def assert_stream_order(events: list[dict]) -> None:
    """Global ids strictly increase; each stream's seq numbers are 1, 2, 3, … with no repeat."""
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids)), "ids repeat or go backwards"
    by_stream: dict[str, list[int]] = defaultdict(list)
    for e in events:
        by_stream[e["stream"]].append(e["seq"])
    for stream, seqs in by_stream.items():
        assert seqs == list(range(1, len(seqs) + 1)), f"stream {stream} has gaps or repeats"


def test_files_renames_deletes_and_nested_dirs_arrive_exactly_once(tmp_path, procs, relay):
    root = tmp_path / "w"
    root.mkdir()
    start_agent(tmp_path, procs, relay.url, root)
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    tail = Tail(tmp_path, procs, relay.url, "--since", "earliest")

    for i in range(1000):
        write(root / f"f{i:04d}")
    for i in range(100):
        os.rename(root / f"f{i:04d}", root / f"r{i:04d}")
    for i in range(100, 200):
        os.unlink(root / f"f{i:04d}")
    for i in range(50):
        deep = root / f"n{i:02d}" / "a" / "b" / "c"
        os.makedirs(deep)  # mkdir -p, immediately followed by a file
        write(deep / "file")

    head = settled_head(relay)
    events = tail.wait_count(head)
    assert len(events) == head
    assert_stream_order(events)
    assert {e["site"] for e in events} == {"test"} and {e["node"] for e in events} == {"node1"}

    seen = Counter((e["path"], tuple(e["flags"])) for e in events)
    expected: Counter = Counter()
    for i in range(1000):
        p = str(root / f"f{i:04d}")
        expected[(p, ("IN_CREATE",))] = 1
        expected[(p, ("IN_CLOSE_WRITE",))] = 1
    for i in range(100):
        expected[(str(root / f"f{i:04d}"), ("IN_MOVED_FROM",))] = 1
        expected[(str(root / f"r{i:04d}"), ("IN_MOVED_TO",))] = 1
    for i in range(100, 200):
        expected[(str(root / f"f{i:04d}"), ("IN_DELETE",))] = 1
    nested_files = set()
    for i in range(50):
        d = root / f"n{i:02d}"
        for p in (d, d / "a", d / "a" / "b", d / "a" / "b" / "c", d / "a" / "b" / "c" / "file"):
            expected[(str(p), ("IN_CREATE",))] = 1
        nested_files.add(str(d / "a" / "b" / "c" / "file"))
    # A file written before its new directory's watch landed is found by the scan (a synthetic
    # IN_CREATE) and its close cannot be seen; one written after it has a real IN_CLOSE_WRITE.
    for path in nested_files:
        closes = seen.pop((path, ("IN_CLOSE_WRITE",)), 0)
        assert closes <= 1, f"{path} closed {closes} times"
    assert seen == expected

    by_path = {(e["path"], e["flags"][0]): e for e in events}
    for i in range(100):
        moved_from = by_path[(str(root / f"f{i:04d}"), "IN_MOVED_FROM")]
        moved_to = by_path[(str(root / f"r{i:04d}"), "IN_MOVED_TO")]
        assert moved_from["cookie"] == moved_to["cookie"] and moved_to["cookie"]
        assert moved_to["old_path"] == str(root / f"f{i:04d}")
        assert moved_from["id"] < moved_to["id"]
    for e in events:
        if (
            e["path"].startswith(str(root / "n"))
            and e["path"].count("/") - str(root).count("/") < 5
        ):
            assert e["is_dir"], e
    # per file: create before close before move/delete
    order = {}
    for e in events:
        order.setdefault(e["path"], []).append(e["flags"][0])
    assert order[str(root / "f0005")] == ["IN_CREATE", "IN_CLOSE_WRITE", "IN_MOVED_FROM"]
    assert order[str(root / "f0150")] == ["IN_CREATE", "IN_CLOSE_WRITE", "IN_DELETE"]


def test_relay_killed_mid_burst_loses_nothing_and_duplicates_nothing(tmp_path, procs, relay):
    root = tmp_path / "w"
    root.mkdir()
    start_agent(tmp_path, procs, relay.url, root)
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    live = Tail(tmp_path, procs, relay.url, "--since", "earliest", name="live")

    n = 3000
    done = threading.Event()

    def writer() -> None:
        for i in range(n):
            write(root / f"f{i:05d}")
            if i % 100 == 0:
                time.sleep(0.02)  # ~ a few thousand files per second, across the kill
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    wait_for(lambda: (relay.healthy() or {}).get("head", 0) > 1000, 30, "first events stored")
    relay.kill()
    time.sleep(1.0)  # the agent keeps reading and queueing while the relay is down
    relay.start()
    t.join()
    assert done.is_set()

    head = settled_head(relay)
    assert head == 2 * n
    for name, tail in (
        ("live", live),
        (
            "catch-up",
            Tail(
                tmp_path,
                procs,
                relay.url,
                "--since",
                "earliest",
                "--count",
                str(head),
                name="catchup",
            ),
        ),
    ):
        events = tail.wait_count(head)
        assert len(events) == 2 * n, name
        assert_stream_order(events)
        kinds = Counter((e["path"], e["flags"][0]) for e in events)
        assert set(kinds.values()) == {1}, f"{name}: an event arrived twice"
        assert {p for p, _ in kinds} == {str(root / f"f{i:05d}") for i in range(n)}


def test_subscriber_resumes_with_since_without_gap_or_duplicate(tmp_path, procs, relay):
    root = tmp_path / "w"
    root.mkdir()
    start_agent(tmp_path, procs, relay.url, root)
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    first = Tail(tmp_path, procs, relay.url, "--since", "earliest", name="first")

    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set() and i < 4000:
            write(root / f"f{i:05d}")
            i += 1
            if i % 50 == 0:
                time.sleep(0.01)

    t = threading.Thread(target=writer)
    t.start()
    first.wait_count(500)
    first.proc.stop(signal.SIGKILL)  # the subscriber dies while events keep coming
    got = first.events()
    second = Tail(tmp_path, procs, relay.url, "--since", str(got[-1]["id"]), name="second")
    t.join()
    head = settled_head(relay)
    rest = second.wait_count(head - got[-1]["id"])
    combined = [e["id"] for e in got + rest]
    assert combined == list(range(1, head + 1))


def test_bad_last_event_id_and_hostile_filters_get_400_with_a_message(relay):
    cases = [
        ({"Last-Event-ID": "abc"}, {}, "not an event id"),
        ({"Last-Event-ID": "99999999"}, {}, "beyond the newest event"),
        ({}, {"since": "-5"}, "not an event id"),
        ({}, {"since": "1e9"}, "not an event id"),
        ({}, {"path": "../etc"}, "must be absolute"),
        ({}, {"path": "/data/../etc"}, "must not contain '..'"),
        ({}, {"type": "IN_BOGUS"}, "unknown inotify flag"),
        ({}, {"site": "x\n"}, "not a valid site"),
    ]
    for headers, params, message in cases:
        r = httpx.get(relay.url + "/events", headers=headers, params=params, timeout=5)
        assert r.status_code == 400, (headers, params, r.text)
        assert message in r.text, (headers, params, r.text)
    assert relay.healthy()


def test_tail_exits_with_the_relays_message_on_a_bad_request(tmp_path, relay):
    import subprocess

    from conftest import command

    r = subprocess.run(
        [command("storage-events"), "tail", relay.url, "--since", "bogus"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1
    assert "400" in r.stderr and "not an event id" in r.stderr


def test_non_utf8_and_odd_names_round_trip_exactly(tmp_path, procs, relay):
    root = tmp_path / "w"
    root.mkdir()
    start_agent(tmp_path, procs, relay.url, root)
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    tail = Tail(tmp_path, procs, relay.url, "--since", "earliest")
    names = [b"caf\xe9.dat", b"new\nline", "ünï 😀".encode(), b"x" * 255]
    for name in names:
        write(os.path.join(os.fsencode(root), name))
    events = tail.wait_count(2 * len(names))
    import base64

    got = set()
    for e in events:
        raw = base64.b64decode(e["raw_path"]) if e["raw_path"] else e["path"].encode()
        got.add(raw)
    assert got == {os.path.join(os.fsencode(root), n) for n in names}
    latin = next(e for e in events if e["raw_path"])
    assert "\ufffd" in latin["path"]  # displayable, and the exact bytes are in raw_path


def test_agent_sigterm_flushes_and_exits_cleanly(tmp_path, procs, relay):
    root = tmp_path / "w"
    root.mkdir()
    agent: Proc = start_agent(tmp_path, procs, relay.url, root)
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    for i in range(200):
        write(root / f"f{i}")
    assert agent.stop(signal.SIGTERM) == 0
    assert "the relay acknowledged every event" in agent.output()
    assert relay.healthy()["head"] == 400
