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


@pytest.fixture
def cluster(tmp_path: Path, procs: list[Proc]) -> NatsCluster:
    return NatsCluster(tmp_path, procs)


def relay_on(tmp: Path, procs: list[Proc], cluster: NatsCluster, name: str) -> Relay:
    config = tmp / f"{name}.toml"
    config.write_text(
        f'name = "{name}"\nstore = "{cluster.store}"\nnats_replicas = 3\nheartbeat = 1.0\n'
    )
    return Relay(tmp, procs, name=name, extra=("--config", str(config)))


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
