"""The agent on a node nobody watches: relay outages, restarts, a full spool, mkdir races."""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter

from conftest import Relay, Tail, agents_connected, start_agent, wait_for
from test_end_to_end import assert_stream_order, settled_head, write
from test_model import kernel_queue, on_disk, replay


def feed(tmp_path, procs, relay: Relay, name: str = "feed") -> list[dict]:
    # After an outage the agent reconnects within its backoff (at most 10 s): wait for it
    # before waiting for the feed to settle.
    wait_for(lambda: agents_connected(relay), 30, "the agent to reconnect")
    head = settled_head(relay, quiet=2.0)
    return Tail(
        tmp_path, procs, relay.url, "--since", "earliest", "--count", str(head), name=name
    ).wait_count(head)


def test_mkdir_p_then_touch_a_thousand_times(tmp_path, procs, relay):
    root = tmp_path / "w"
    root.mkdir()
    start_agent(tmp_path, procs, relay.url, root)
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    subprocess.run(
        [
            "bash",
            "-c",
            'for i in $(seq 1000); do mkdir -p "$1/d$i/a/b/c" && touch "$1/d$i/a/b/c/f"; done',
            "-",
            str(root),
        ],
        check=True,
        timeout=120,
    )
    events = feed(tmp_path, procs, relay)
    created = Counter(e["path"] for e in events if e["flags"] == ["IN_CREATE"])
    for i in range(1, 1001):
        for rel in ("", "/a", "/a/b", "/a/b/c", "/a/b/c/f"):
            assert created[f"{root}/d{i}{rel}"] == 1, f"d{i}{rel}"


def test_relay_down_for_a_minute_while_50000_files_are_written(tmp_path, procs, relay):
    root = tmp_path / "w"
    root.mkdir()
    config = tmp_path / "agent.toml"
    # A small memory share, so most of the backlog lives in the spool and is read back.
    config.write_text("memory_events = 5000\n")
    start_agent(
        tmp_path,
        procs,
        relay.url,
        root,
        extra=("--config", str(config), "--spool", str(tmp_path / "spool")),
    )
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    relay.kill()
    down_at = time.monotonic()
    for i in range(50_000):
        write(root / f"f{i:05d}", b"x")
    time.sleep(max(0.0, 60 - (time.monotonic() - down_at)))
    relay.start()
    events = feed(tmp_path, procs, relay)
    assert len(events) == 100_000
    assert_stream_order(events)
    kinds = Counter((e["path"], e["flags"][0]) for e in events)
    assert set(kinds.values()) == {1}
    assert {p for p, _ in kinds} == {str(root / f"f{i:05d}") for i in range(50_000)}


def test_agent_restart_publishes_what_changed_while_it_was_down(tmp_path, procs, relay):
    root = tmp_path / "w"
    (root / "keep").mkdir(parents=True)
    write(root / "keep" / "same")
    write(root / "keep" / "edited")
    write(root / "gone")
    (root / "olddir" / "sub").mkdir(parents=True)
    write(root / "olddir" / "sub" / "x")
    spool = ("--spool", str(tmp_path / "spool"))
    initial = on_disk(root)
    agent = start_agent(tmp_path, procs, relay.url, root, extra=spool)
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    write(root / "live")  # seen live
    wait_for(lambda: relay.healthy()["head"] >= 2, 10, "live events")
    assert agent.stop(signal.SIGTERM) == 0

    # While the agent is down:
    write(root / "keep" / "edited", b"changed content")
    (root / "gone").unlink()
    (root / "olddir" / "sub" / "x").unlink()
    (root / "olddir" / "sub").rmdir()
    (root / "olddir").rmdir()
    (root / "newdir" / "deep").mkdir(parents=True)
    write(root / "newdir" / "deep" / "y")

    start_agent(tmp_path, procs, relay.url, root, extra=spool, name="agent2")
    events = feed(tmp_path, procs, relay)
    first = next(e["stream"] for e in events if e["path"] == str(root / "live"))
    # The first start announced what the root held (for the relay's namespace view) ...
    announced = {e["path"]: e["is_dir"] for e in events if e["stream"] == first and e["synthetic"]}
    assert announced == initial
    # ... and the restart publishes only what changed while it was down.
    after = [e for e in events if e["synthetic"] and e["stream"] != first]
    got = sorted((e["path"][len(str(root)) :], e["flags"][0]) for e in after)
    assert got == sorted(
        [
            ("/keep/edited", "IN_CLOSE_WRITE"),
            ("/gone", "IN_DELETE"),
            ("/olddir/sub/x", "IN_DELETE"),
            ("/olddir/sub", "IN_DELETE"),
            ("/olddir", "IN_DELETE"),
            ("/newdir", "IN_CREATE"),
            ("/newdir/deep", "IN_CREATE"),
            ("/newdir/deep/y", "IN_CREATE"),
        ]
    )
    assert not any(e["flags"] == ["IN_Q_OVERFLOW"] for e in events)  # it stopped cleanly
    assert replay(initial, events) == on_disk(root)


def test_sigkill_restart_resends_the_spool_and_announces_possible_loss(tmp_path, procs, relay):
    root = tmp_path / "w"
    root.mkdir()
    spool = ("--spool", str(tmp_path / "spool"))
    agent = start_agent(tmp_path, procs, relay.url, root, extra=spool)
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    relay.kill()
    for i in range(3000):
        write(root / f"f{i}")
    time.sleep(1.0)  # several flush intervals: the events are in the spool
    agent.stop(signal.SIGKILL)
    relay.start()
    write(root / "after")
    start_agent(tmp_path, procs, relay.url, root, extra=spool, name="agent2")
    events = feed(tmp_path, procs, relay)
    assert_stream_order(events)
    closed = Counter(e["path"] for e in events if e["flags"] == ["IN_CLOSE_WRITE"])
    assert all(closed[str(root / f"f{i}")] == 1 for i in range(3000))
    assert sum(e["flags"] == ["IN_Q_OVERFLOW"] for e in events) == 1
    assert (str(root / "after"), ["IN_CREATE"]) in [(e["path"], e["flags"]) for e in events]
    assert len({e["stream"] for e in events}) == 2  # the old stream, resent; the new one


def test_full_spool_is_announced_and_recovered_by_a_rescan(tmp_path, procs, relay):
    root = tmp_path / "w"
    root.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text("spool_quota = 200000\n")
    initial = on_disk(root)
    with kernel_queue(512):  # so the paused kernel queue overflows quickly
        agent = start_agent(
            tmp_path,
            procs,
            relay.url,
            root,
            extra=("--config", str(config), "--spool", str(tmp_path / "spool")),
        )
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    relay.kill()
    for i in range(3000):
        write(root / f"f{i}")
    for i in range(0, 3000, 3):
        (root / f"f{i}").unlink()
    wait_for(lambda: "reached its quota" in agent.output(), 10, "the quota error")
    relay.start()
    events = feed(tmp_path, procs, relay)
    assert any(e["flags"] == ["IN_Q_OVERFLOW"] for e in events)
    assert replay(initial, events) == on_disk(root)
    assert "reading inotify again" in agent.output() and "rescan 1 done" in agent.output()
