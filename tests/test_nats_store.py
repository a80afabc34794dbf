"""The NATS JetStream store with a real three-server JetStream cluster: two relays on one
stream serve the same feed, whichever relay the agent publishes through, and a server can die."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest
from conftest import (
    NatsCluster,
    Proc,
    Relay,
    Tail,
    agents_connected,
    command,
    free_port,
    start_agent,
    wait_for,
)
from test_end_to_end import assert_stream_order, write
from test_model import on_disk


@pytest.fixture
def cluster(tmp_path: Path, procs: list[Proc]) -> NatsCluster:
    return NatsCluster(tmp_path, procs)


def relay_on(
    tmp: Path, procs: list[Proc], cluster: NatsCluster, name: str, port: int | None = None
) -> Relay:
    config = tmp / f"{name}.toml"
    config.write_text(f'name = "{name}"\nstore = "{cluster.store}"\nheartbeat = 1.0\n')
    return Relay(tmp, procs, name=name, extra=("--config", str(config)), port=port)


def test_two_relays_on_one_stream_serve_one_feed(tmp_path, procs, cluster):
    a = relay_on(tmp_path, procs, cluster, "a")
    b = relay_on(tmp_path, procs, cluster, "b")
    root = tmp_path / "w"
    root.mkdir()
    start_agent(tmp_path, procs, a.url, root)
    wait_for(lambda: agents_connected(a), 10, "agent connection")
    live_b = Tail(tmp_path, procs, b.url, name="live-b")  # from now on, on the other relay
    time.sleep(1)

    for i in range(200):
        write(root / f"f{i:03d}")
    events = live_b.wait_count(400)
    assert [e["id"] for e in events] == list(range(1, 401))  # global ids: stream sequence
    assert_stream_order(events)
    assert {tuple(e["via"]) for e in events} == {("a",)}

    # One of the three servers dies: the replicated stream carries on.
    cluster.procs[0].stop(signal.SIGKILL)
    for i in range(100):
        write(root / f"g{i:03d}")
    events = live_b.wait_count(600, timeout=60)
    assert_stream_order(events)
    assert [e["id"] for e in events] == list(range(1, 601))

    # Catch-up from either relay gives the same 600 events.
    for relay in (a, b):
        again = Tail(tmp_path, procs, relay.url, "--since", "earliest", name=f"again-{relay.name}")
        assert [e["id"] for e in again.wait_count(600)] == list(range(1, 601))
        assert httpx.get(relay.url + "/healthz", timeout=5).json()["head"] == 600


def test_an_unreachable_store_is_a_clear_error(tmp_path):
    port = free_port()
    proc = Proc(
        [
            command("storage-events-relay"),
            "serve",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--store",
            f"nats://127.0.0.1:{port}",
        ],
        tmp_path / "relay.log",
    )
    assert proc.popen.wait(60) == 1
    assert f"cannot start: cannot connect to NATS at nats://127.0.0.1:{port}" in proc.output()


def test_a_batch_jetstream_failed_part_way_is_resent_through_another_relay(
    tmp_path, procs, cluster
):
    """JetStream loses its quorum while relay a holds an agent's batch; a dies before the
    quorum is back. The agent reconnects to another relay at the same address (as behind a
    load balancer): it is told what the stream holds with everything before it, resends the
    rest, and the feed has every event once, in order."""
    a = relay_on(tmp_path, procs, cluster, "a")
    root = tmp_path / "w"
    root.mkdir()
    start_agent(tmp_path, procs, a.url, root)
    wait_for(lambda: agents_connected(a), 10, "agent connection")
    for i in range(100):
        write(root / f"f{i:03d}")
    wait_for(lambda: a.healthy()["head"] >= 200, 30, "the first 200 events stored")
    followers = [p for i, p in enumerate(cluster.procs) if i != 0]
    for server in followers:  # two of three gone: nothing can be stored
        server.send(signal.SIGSTOP)
    try:
        for i in range(100):
            write(root / f"g{i:03d}")
        time.sleep(3)  # a has the batch and waits for JetStream
        a.proc.stop(signal.SIGKILL)
    finally:
        for server in followers:
            server.send(signal.SIGCONT)
    b = relay_on(tmp_path, procs, cluster, "b", port=a.port)
    tail = Tail(tmp_path, procs, b.url, "--since", "earliest", name="all")
    tail.wait_count(400, 90)
    time.sleep(2)  # (a copy would come by now)
    events = tail.events()
    assert len(events) == 400  # none twice
    assert_stream_order(events)
    assert {e["path"].rsplit("/", 1)[1] for e in events} == {
        *(f"f{i:03d}" for i in range(100)),
        *(f"g{i:03d}" for i in range(100)),
    }
    assert all(e["origin_id"] == e["id"] for e in events)


def test_each_replica_keeps_its_own_namespace_view_and_catches_up_after_a_restart(
    tmp_path, procs, cluster
):
    """With a shared log each relay keeps a view of its own: a snapshot from the relay the
    agent does not publish to lists what exists, and a replica that was down catches up."""
    root = tmp_path / "w"
    (root / "d").mkdir(parents=True)
    (root / "d" / "old").write_bytes(b"x")
    a = relay_on(tmp_path, procs, cluster, "a")
    b = relay_on(tmp_path, procs, cluster, "b")
    start_agent(tmp_path, procs, a.url, root)
    wait_for(lambda: agents_connected(a), 10, "agent connection")

    def listed(relay: Relay) -> dict[str, bool]:
        page = httpx.get(relay.url + "/state", params={"path": str(root)}).json()
        return {e["path"]: e["is_dir"] for e in page["entries"]}

    wait_for(lambda: listed(b) == on_disk(root), 20, "b's view")
    b.kill()
    (root / "d" / "old").rename(root / "d" / "new")
    (root / "e").mkdir()
    (root / "e" / "f").write_bytes(b"y")
    wait_for(lambda: listed(a) == on_disk(root), 20, "a's view")
    b.start()
    assert listed(b) == on_disk(root)  # caught up before it served

    tail = Tail(tmp_path, procs, b.url, "--since", "snapshot", "--path", str(root), name="tb")
    got = tail.wait_count(5)
    assert {e["path"] for e in got[:4]} == set(on_disk(root))
    assert got[4]["entries"] == 4
