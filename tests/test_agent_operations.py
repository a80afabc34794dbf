"""What an operator configures and meets: selection per root, watch limits, `check`."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Tail, agents_connected, command, start_agent, wait_for
from test_end_to_end import settled_head, write

WATCHES = Path("/proc/sys/fs/inotify/max_user_watches")


def test_roots_with_prefix_globs_and_types(tmp_path, procs, relay):
    data, scratch = tmp_path / "data", tmp_path / "scratch-root"
    (data / "scratch").mkdir(parents=True)
    scratch.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[[root]]
path = "{data}"
prefix = "/pub/data"
exclude = ["*.tmp", "scratch"]
types = ["IN_CLOSE_WRITE", "IN_MOVED_TO"]

[[root]]
path = "{scratch}"
include = ["*.h5"]
""")
    start_agent(tmp_path, procs, relay.url, extra=("--config", str(config)))
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    write(data / "a.h5")
    write(data / "b.tmp")
    write(data / "scratch" / "x")
    write(data / "c.tmp")
    os.rename(data / "c.tmp", data / "c.h5")  # write-then-rename, as many writers do
    write(scratch / "keep.h5")
    write(scratch / "skip.log")
    head = settled_head(relay)
    events = Tail(
        tmp_path, procs, relay.url, "--since", "earliest", "--count", str(head)
    ).wait_count(head)
    got = sorted((e["path"], e["flags"][0], e["old_path"]) for e in events)
    assert got == sorted(
        [
            ("/pub/data/a.h5", "IN_CLOSE_WRITE", None),
            ("/pub/data/c.h5", "IN_MOVED_TO", None),  # its source was excluded
            (f"{scratch}/keep.h5", "IN_CREATE", None),
            (f"{scratch}/keep.h5", "IN_CLOSE_WRITE", None),
        ]
    )


def test_bad_type_in_a_root_is_a_config_error(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text(f'[[root]]\npath = "{tmp_path}"\ntypes = ["IN_CLOSED"]\n')
    r = subprocess.run(
        [command("storage-events-agent"), "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0 and "unknown inotify flag 'IN_CLOSED'" in r.stderr


@contextlib.contextmanager
def watch_limit(extra: int) -> Iterator[int]:
    """Leave only ``extra`` more inotify watches for this user; restore the limit after."""
    if os.geteuid() != 0:
        pytest.skip("changing fs.inotify.max_user_watches needs root")
    from storage_events.agent.check import watches_in_use

    saved = WATCHES.read_text()
    limit = watches_in_use(os.geteuid())[0] + extra
    WATCHES.write_text(str(limit))
    try:
        yield limit
    finally:
        WATCHES.write_text(saved)


def test_watch_limit_names_the_directory_and_the_remedy_and_the_rest_works(tmp_path, procs, relay):
    root = tmp_path / "w"
    for i in range(40):
        (root / f"d{i:02d}").mkdir(parents=True)
    with watch_limit(25):
        check = subprocess.run(
            [command("storage-events-agent"), "check", "--relay", relay.url, str(root)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 1
        assert "41 directories to watch" in check.stdout
        assert "sysctl -w fs.inotify.max_user_watches=" in check.stdout
        agent = start_agent(tmp_path, procs, relay.url, root)
        wait_for(lambda: agents_connected(relay), 10, "agent connection")
    log = agent.output()
    assert "inotify watch limit reached at " + str(root) in log
    assert "sysctl -w fs.inotify.max_user_watches=" in log
    write(root / "still-watched")  # the root is watched first, then as many as fit
    wait_for(lambda: relay.healthy()["head"] >= 2, 10, "events from the watched part")


def test_check_passes_on_a_healthy_node(tmp_path, relay):
    (tmp_path / "w" / "a").mkdir(parents=True)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'relay = "{relay.url}"\nspool = "{tmp_path / "spool"}"\n'
        f'[[root]]\npath = "{tmp_path / "w"}"\n'
    )
    r = subprocess.run(
        [command("storage-events-agent"), "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "reachable" in r.stdout and "2 directories to watch" in r.stdout
    assert r.stdout.strip().endswith("ok")


def test_metrics_and_one_agent_per_spool(tmp_path, procs, relay):
    from conftest import free_port

    root = tmp_path / "w"
    root.mkdir()
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(f'metrics = "127.0.0.1:{port}"\nspool = "{tmp_path / "spool"}"\n')
    start_agent(tmp_path, procs, relay.url, root, extra=("--config", str(config)))
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    write(root / "f")
    wait_for(lambda: relay.healthy()["head"] >= 2, 10, "events stored")

    def metric(name: str) -> float:
        import httpx

        for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
            if line.startswith(f"storage_events_agent_{name} "):
                return float(line.split()[1])
        raise AssertionError(f"no metric {name}")

    wait_for(lambda: metric("events_acked_total") == 2, 10, "acked metric")
    assert metric("events_published_total") == 2
    assert metric("watches") == 1 and metric("relay_connected") == 1
    assert metric("paused") == 0 and metric("spool_quota_bytes") == 1 << 30

    second = subprocess.run(
        [
            command("storage-events-agent"),
            "run",
            "--relay",
            relay.url,
            "--spool",
            str(tmp_path / "spool"),
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode != 0 and "in use by another agent" in second.stderr
