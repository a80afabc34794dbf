"""``GET /events?since=snapshot`` and ``GET /state``: list-then-watch without a race, against
a real relay fed by a real agent while a writer keeps the tree changing."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import msgspec
from conftest import Tail, agents_connected, start_agent, wait_for
from test_end_to_end import settled_head
from test_model import kernel_queue, on_disk

from storage_events.namespace import Mirror
from storage_events.wire import Event

HERE = Path(__file__).parent


def _below(tree: dict[str, bool], root: Path) -> dict[str, bool]:
    return {p: d for p, d in tree.items() if p.startswith(f"{root}/")}


def test_snapshots_taken_at_random_moments_of_a_churning_tree_end_as_the_tree_on_disk(
    tmp_path, procs, relay
):
    root = tmp_path / "w"
    root.mkdir()
    start_agent(tmp_path, procs, relay.url, root)
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    writer = subprocess.Popen(
        [sys.executable, str(HERE / "churn.py"), str(root), "100000", "7"],
        stdout=subprocess.DEVNULL,
    )
    stop = root / "STOP"
    rng = random.Random()
    # Ten moments, random but apart: the head moves a batch (up to 2,000 events) at a time.
    moments = [200 + i * 8_800 + rng.randrange(4_000) for i in range(10)]
    followers: list[subprocess.Popen] = []
    try:
        for i, moment in enumerate(moments):
            # (100,000 operations make far more events than the last moment)
            wait_for(lambda m=moment: relay.healthy()["head"] >= m, 300, f"event {moment}")
            said = tmp_path / f"snapshot-{i}.id"
            followers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(HERE / "snapshot_follower.py"),
                        relay.url,
                        str(root),
                        str(stop),
                        str(said),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            )
        assert writer.wait(300) == 0
        stop.write_bytes(b"done")
        disk = on_disk(root)
        results = []
        for f in followers:
            out, err = f.communicate(timeout=300)
            assert f.returncode == 0, err.decode()[-3000:]
            results.append(json.loads(out))
    finally:
        for p in (writer, *followers):
            if p.poll() is None:
                p.kill()
                p.wait()
    ids = [r["snapshot"]["id"] for r in results]
    # Ten moments apart (two may still fall in one of the agent's batches, whose events the
    # relay stores at once: their snapshots have the same id).
    assert ids == sorted(ids) and len(set(ids)) >= 7, ids
    assert any(r["states"] > 1000 for r in results)
    for r in results:
        assert r["out_of_order"] == [], f"snapshot at {r['snapshot']}: duplicates or disorder"
        assert _below(r["tree"], root) == disk, f"snapshot at {r['snapshot']}"


def test_the_view_stays_exact_through_a_kernel_queue_overflow_and_its_rescan(
    tmp_path, procs, relay
):
    """An agent stopped while the tree changes far beyond its kernel queue loses events: it
    announces the loss and rescans; the view follows the rescan's events back to the tree."""
    root = tmp_path / "w"
    (root / "keep").mkdir(parents=True)
    for i in range(200):
        (root / "keep" / f"old{i}").write_bytes(b"x")
    with kernel_queue(64):
        agent = start_agent(tmp_path, procs, relay.url, root)
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    wait_for(lambda: relay.healthy()["head"] >= 201, 10, "the announcement")
    snapshot = Tail(tmp_path, procs, relay.url, "--since", "snapshot", name="snap")
    wait_for(lambda: any("entries" in e for e in snapshot.events()), 20, "the snapshot")
    agent.send(signal.SIGSTOP)
    try:
        for i in range(100):
            (root / "keep" / f"old{i}").unlink()
        for i in range(100, 150):
            os.rename(root / "keep" / f"old{i}", root / f"moved{i}")
        (root / "new" / "deep").mkdir(parents=True)
        for i in range(500):
            (root / "new" / "deep" / f"n{i}").write_bytes(b"y")
    finally:
        agent.send(signal.SIGCONT)
    settled_head(relay)
    page = httpx.get(relay.url + "/state", params={"path": str(root), "limit": 10000}).json()
    assert page["next"] is None
    assert {e["path"]: e["is_dir"] for e in page["entries"]} == on_disk(root)
    # And a subscriber that took its snapshot before it all ends with the same tree.
    lines = snapshot.events()
    (marker,) = [i for i, e in enumerate(lines) if "entries" in e]
    assert lines[marker]["entries"] == marker == 201  # (keep and its files, announced)
    mirror = Mirror()
    for e in lines[:marker]:
        mirror.apply_state(msgspec.convert(e, Event))
    for e in lines[marker + 1 :]:
        mirror.apply(msgspec.convert(e, Event))
    assert any(e["flags"] == ["IN_Q_OVERFLOW"] for e in lines[marker + 1 :])  # loss was told
    assert _below(mirror.paths(), root) == on_disk(root)
