"""The Kafka sink in a 100,000-file burst: the relay's ingest with the sink on beside the same
burst with it off, and the sink's delivery rate beside the ingest rate of its own run.

    python bench/kafka_bench.py [--files 100000] [--runs 3] [--json FILE]

Per run, twice (sink off, then on; everything fresh each time, on a private tmpfs): a relay
(its SQLite log on the tmpfs) and an agent watching a tree of 100 directories; one process
writes N files (create + write + close: 2 events each) as fast as it can. With the sink on, the
relay runs with ``--kafka`` to a fresh Tansu broker (the Kafka-protocol broker of the test
extra, memory-only) on loopback. The bench polls the relay every 20 ms (``/sites``, in both
modes) for its head (events stored) and the sink's checkpoint (events known delivered), and
reports:

* ingest events/s: 2N ÷ (time the head reached 2N − time the first event was stored);
* sink events/s: 2N ÷ (time the checkpoint reached 2N − time it first moved);
* ingest on ÷ off (target ≥ 0.9) and sink ÷ ingest in the same run (target ≥ 1);
* CPU seconds of relay, agent and broker (utime + stime from /proc, over the run), and that
  every message reached the topic (a consumer counts them after the run).

Needs root (the tmpfs mount).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from harness import Stack, burst, burst_options, cpu_seconds, free_port, make_root, stop, tmpfs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from kafka_broker import broker_command  # the tests' broker, shared rather than copied

TOPIC = "storage-events"


def count_topic(address: str, want: int, timeout: float = 120) -> int:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": address, "group.id": "b", "enable.auto.commit": False}
    )
    try:
        md = consumer.list_topics(TOPIC, timeout=10)
        consumer.assign([TopicPartition(TOPIC, p, 0) for p in md.topics[TOPIC].partitions])
        got, deadline, quiet = 0, time.monotonic() + timeout, time.monotonic() + 3
        while time.monotonic() < deadline and (got < want or time.monotonic() < quiet):
            for msg in consumer.consume(10_000, 0.2):
                if not msg.error():
                    got += 1
                    quiet = time.monotonic() + 3
        return got
    finally:
        consumer.close()


def one(base: Path, n: int, dirs: int, sink: bool) -> dict:
    root = make_root(base, "tree", dirs)
    broker = address = None
    extra: tuple[str, ...] = ()
    if sink:
        address = f"127.0.0.1:{free_port()}"
        broker = subprocess.Popen(
            broker_command(address, base), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(0.5)
        extra = ("--kafka", address)
    stack = Stack(base, root, relay_args=extra)
    want = 2 * n
    try:
        cpu0 = {
            "relay": cpu_seconds(stack.relay.pid),
            "agent": cpu_seconds(stack.agent.pid),
            "broker": cpu_seconds(broker.pid) if broker else 0.0,
        }
        samples: list[tuple[float, int, int]] = []
        times: list[tuple[float, float]] = []
        writer = threading.Thread(target=lambda: times.append(burst(root, n, dirs)))
        writer.start()
        deadline = time.monotonic() + 600
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                status = client.get(stack.url + "/sites").json()
                head = client.get(stack.url + "/healthz").json()["head"]
                delivered = status["kafka"]["checkpoint"] if sink else head
                samples.append((time.monotonic(), head, delivered))
                if head >= want and delivered >= want:
                    break
                time.sleep(0.02)
        writer.join()
        ((start, end),) = times
        cpu = {
            "relay": cpu_seconds(stack.relay.pid) - cpu0["relay"],
            "agent": cpu_seconds(stack.agent.pid) - cpu0["agent"],
            "broker": (cpu_seconds(broker.pid) - cpu0["broker"]) if broker else 0.0,
        }

        def span(column: int) -> float:
            first = next(t for t, *v in samples if v[column - 1] > 0)
            last = next(t for t, *v in samples if v[column - 1] >= want)
            return last - first

        result = {
            "sink": sink,
            "files": n,
            "events": want,
            "stored": samples[-1][1],
            "write_seconds": end - start,
            "ingest_seconds": span(1),
            "cpu_seconds": cpu,
        }
        result["ingest_events_per_s"] = want / result["ingest_seconds"]
        if sink:
            result["sink_seconds"] = span(2)
            result["sink_events_per_s"] = want / result["sink_seconds"]
            result["on_topic"] = count_topic(address, want)
        return result
    finally:
        stack.close()
        if broker:
            stop(broker)


def main() -> None:
    args = burst_options(__doc__)
    results: list[dict] = []
    with tmpfs() as base:
        for run in range(args.runs):
            pair = {}
            for sink in (False, True):
                r = one(base, args.files, args.dirs, sink) | {"run": run}
                results.append(r)
                pair[sink] = r
                print(json.dumps(r), flush=True)
            pair[True]["ingest_on_over_off"] = (
                pair[True]["ingest_events_per_s"] / pair[False]["ingest_events_per_s"]
            )
            pair[True]["sink_over_ingest"] = (
                pair[True]["sink_events_per_s"] / pair[True]["ingest_events_per_s"]
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    on = [r for r in results if r["sink"]]
    off = [r for r in results if not r["sink"]]

    def med(rows: list[dict], key: str) -> str:
        values = [r[key] for r in rows]
        return f"{statistics.median(values):,.2f} [{min(values):,.2f}–{max(values):,.2f}]"

    print(
        f"\n{args.files:,} files × {args.runs} runs, {os.cpu_count()} CPUs, tmpfs; median [min–max]"
    )
    print(f"ingest events/s, sink off: {med(off, 'ingest_events_per_s')}")
    print(f"ingest events/s, sink on:  {med(on, 'ingest_events_per_s')}")
    print(f"sink events/s:             {med(on, 'sink_events_per_s')}")
    print(f"ingest on ÷ off:           {med(on, 'ingest_on_over_off')}  (target ≥ 0.9)")
    print(f"sink ÷ ingest, same run:   {med(on, 'sink_over_ingest')}  (target ≥ 1)")
    print(f"on the topic: {min(r['on_topic'] for r in on):,} of {on[0]['events']:,} (fewest)")
    for who in ("relay", "agent", "broker"):
        print(
            f"CPU s {who:6}: off {statistics.median(r['cpu_seconds'][who] for r in off):.1f}, "
            f"on {statistics.median(r['cpu_seconds'][who] for r in on):.1f}"
        )


if __name__ == "__main__":
    main()
