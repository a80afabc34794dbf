"""``GET /events?since=snapshot`` and ``GET /state``: list-then-watch without a race, against
a real relay fed by a real agent while a writer keeps the tree changing."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from conftest import agents_connected, start_agent, wait_for
from test_model import on_disk

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
    moments = sorted(rng.sample(range(200, 90_000), 10))
    followers: list[subprocess.Popen] = []
    try:
        for moment in moments:
            wait_for(
                lambda m=moment: relay.healthy()["head"] >= m or writer.poll() is not None,
                300,
                f"event {moment}",
            )
            followers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(HERE / "snapshot_follower.py"),
                        relay.url,
                        str(root),
                        str(stop),
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
    assert ids == sorted(ids) and len(set(ids)) == len(ids), ids  # ten different moments
    assert any(r["states"] > 1000 for r in results)
    for r in results:
        assert r["out_of_order"] == [], f"snapshot at {r['snapshot']}: duplicates or disorder"
        assert _below(r["tree"], root) == disk, f"snapshot at {r['snapshot']}"
