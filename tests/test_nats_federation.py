"""A central relay scaled out on JetStream: two replicas on one stream of a real three-server
cluster pull a site relay's feed. One replica and one NATS server are SIGKILLed mid-stream; the
subscriber moves to the other replica with ``Last-Event-ID`` and gets every event once."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import nats
import pytest
from conftest import (
    NatsCluster,
    Proc,
    Relay,
    agents_connected,
    free_port,
    start_agent,
    wait_for,
)
from test_end_to_end import write

from storage_events.relay.auth import hash_token
from storage_events.sse import SSEParser
from storage_events.wire import event_from_json


@pytest.fixture
def cluster(tmp_path: Path, procs: list[Proc]) -> NatsCluster:
    return NatsCluster(tmp_path, procs)


def central(tmp: Path, procs: list[Proc], cluster: NatsCluster, name: str, site: Relay) -> Relay:
    config = tmp / f"{name}.toml"
    config.write_text(
        f'name = "{name}"\nstore = "{cluster.store}"\nheartbeat = 1.0\n'
        f'[[upstream]]\nurl = "{site.url}"\nname = "site1"\nidle_timeout = 4.0\n'
    )
    return Relay(tmp, procs, name=name, extra=("--config", str(config)))


class Follower(threading.Thread):
    """A subscriber given several replicas' URLs: when one drops, it goes on at the next with
    ``Last-Event-ID`` (what a load balancer in front of the replicas does for a browser)."""

    def __init__(self, urls: list[str], token: str | None = None) -> None:
        super().__init__(daemon=True)
        self.urls = urls
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.events: list[dict] = []
        self.last: str | None = None
        self.switches: list[str] = []
        self.stopped = False

    def run(self) -> None:
        i = 0
        while not self.stopped:
            url = self.urls[i % len(self.urls)]
            headers = {**self.auth, **({"Last-Event-ID": self.last} if self.last else {})}
            params = {} if self.last else {"since": "earliest"}
            try:
                with httpx.stream(
                    "GET", url + "/events", params=params, headers=headers, timeout=5
                ) as r:
                    parser = SSEParser()
                    for chunk in r.iter_bytes():
                        for m in parser.feed(chunk):
                            if m.id is not None:
                                self.last = m.id
                            if m.event == "inotify":
                                self.events.append(event_from_json(m.data))
                        if self.stopped:
                            return
            except httpx.HTTPError:
                pass
            i += 1
            self.switches.append(self.urls[i % len(self.urls)])
            time.sleep(0.2)


def stream_leader(cluster: NatsCluster, stream: str) -> int:
    async def ask() -> str:
        nc = await nats.connect(cluster.urls)
        try:
            return (await nc.jetstream().stream_info(stream)).cluster.leader
        finally:
            await nc.close()

    return int(asyncio.run(ask()).lstrip("n"))  # servers are named n0, n1, n2


def test_two_central_replicas_on_jetstream_survive_a_replica_and_a_server(tmp_path, procs, cluster):
    site_config = tmp_path / "site1.toml"
    site_config.write_text('name = "site1"\nheartbeat = 1.0\n')
    site = Relay(tmp_path, procs, name="site1", extra=("--config", str(site_config)))
    root = tmp_path / "w"
    root.mkdir()
    start_agent(tmp_path, procs, site.url, root, site="site1")
    wait_for(lambda: agents_connected(site), 10, "agent connection")
    a = central(tmp_path, procs, cluster, "central-a", site)
    b = central(tmp_path, procs, cluster, "central-b", site)
    follower = Follower([a.url, b.url])
    follower.start()
    try:
        for i in range(200):
            write(root / f"f{i:03d}")
        wait_for(lambda: len(follower.events) >= 100, 60, "the first events at central-a")
        # Mid-stream: the replica the subscriber reads dies, and so does the stream's leader.
        a.proc.stop(signal.SIGKILL)
        cluster.procs[stream_leader(cluster, "STORAGE_EVENTS")].stop(signal.SIGKILL)
        for i in range(200):
            write(root / f"g{i:03d}")
        site_events = 800  # each file: IN_CREATE and IN_CLOSE_WRITE
        wait_for(
            lambda: len(follower.events) >= site_events,
            120,
            f"all {site_events} events (have {len(follower.events)}, switches {follower.switches})",
        )
        time.sleep(2)  # nothing more (no copy) arrives
    finally:
        follower.stopped = True
    events = follower.events
    assert follower.switches and follower.switches[0] == b.url  # it moved to the other replica
    keys = Counter((e.stream, e.seq) for e in events)
    assert max(keys.values()) == 1, "doubled: " + repr([k for k, n in keys.items() if n > 1][:5])
    assert [e.seq for e in events] == list(range(1, site_events + 1))  # none lost, in order
    ids = [e.id for e in events]
    assert ids == sorted(set(ids))
    assert {p.rsplit("/", 1)[1] for e in events for p in [e.path]} == {
        *(f"f{i:03d}" for i in range(200)),
        *(f"g{i:03d}" for i in range(200)),
    }
    # Where each came from: the site's id kept, then the replica that stored it.
    assert all(e.origin_id is not None and e.via[0] == "site1" for e in events)
    assert {e.via[-1] for e in events} <= {"central-a", "central-b"}
    assert {e.via[-1] for e in events[-100:]} == {"central-b"}  # (a was dead by then)
    # The surviving replica serves the same log from its start.
    again = Follower([b.url])
    again.start()
    wait_for(lambda: len(again.events) >= site_events, 60, "catch-up from central-b")
    again.stopped = True
    assert [(e.id, e.stream, e.seq) for e in again.events[:site_events]] == [
        (e.id, e.stream, e.seq) for e in events
    ]
    health = httpx.get(b.url + "/healthz", timeout=5).json()
    assert health["head"] >= events[-1].id


def test_a_site_pushing_to_a_jetstream_replica_resumes_from_the_shared_checkpoint(
    tmp_path, procs, cluster
):
    """The checkpoint of a pushing relay lives in JetStream: when the replica it pushes to dies
    and another takes its address, the push resumes after the last event stored there."""
    secret, reader = "secret-push-0123456789abcdef", "secret-read-0123456789abcdef"
    port = free_port()
    site_config = tmp_path / "site1.toml"
    site_config.write_text(
        f'name = "site1"\nheartbeat = 1.0\n[[push]]\nurl = "http://127.0.0.1:{port}"\n'
        f'token = "{secret}"\n'
    )
    site = Relay(tmp_path, procs, name="site1", extra=("--config", str(site_config)))
    root = tmp_path / "w"
    root.mkdir()
    start_agent(tmp_path, procs, site.url, root, site="site1")

    def replica(name: str) -> Relay:
        config = tmp_path / f"{name}.toml"
        config.write_text(
            f'name = "{name}"\nstore = "{cluster.store}"\nheartbeat = 1.0\n'
            f'[[token]]\nname = "site1-push"\nrole = "relay"\nsite = "site1"\n'
            f'hash = "{hash_token(secret)}"\n'
            f'[[token]]\nname = "tester"\nrole = "reader"\nhash = "{hash_token(reader)}"\n'
        )
        return Relay(
            tmp_path, procs, name=name, extra=("--config", str(config)), port=port, token=reader
        )

    a = replica("central-a")
    for i in range(150):
        write(root / f"f{i:03d}")
    wait_for(lambda: a.healthy()["head"] >= 300, 60, "the site's first 300 events at central-a")
    a.proc.stop(signal.SIGKILL)
    for i in range(150):
        write(root / f"g{i:03d}")
    b = replica("central-b")
    follower = Follower([b.url], token=reader)
    follower.start()
    try:
        wait_for(lambda: len(follower.events) >= 600, 60, "all 600 events at central-b")
        time.sleep(2)  # (a copy would come by now)
    finally:
        follower.stopped = True
    events = follower.events
    assert [e.seq for e in events] == list(range(1, 601))  # none lost, none twice, in order
    assert {e.via[-1] for e in events[:300]} == {"central-a"}
    assert {e.via[-1] for e in events[300:]} == {"central-b"}
    assert all(e.via[0] == "site1" and e.origin_id is not None for e in events)
