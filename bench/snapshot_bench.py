"""The namespace view: what it costs per stored event, and how fast a large snapshot is served.

1. The same events are stored by the relay's log in-process twice, with the view and without
   it (``namespace = false``): CPU per event of each, and the ratio.
2. A log of N events creating N files (in directories of 1,000) is served by a real relay
   process: ``GET /events?since=snapshot`` read by a plain streaming HTTP client until the
   ``snapshot`` message (entries/s, relay CPU per entry), and, as the peer in the same run, the
   same relay's catch-up of those N events (``since=earliest``, events/s).

    sudo .venv/bin/python bench/snapshot_bench.py --entries 1000000 --json docs/bench/snapshot.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import time
from pathlib import Path

import httpx
from harness import cpu_seconds, free_port, relay_command, stop, tmpfs, wait_http

from storage_events.relay.log.sqlite import SQLiteLog
from storage_events.wire import Event

BATCH = 5000


def events(n: int, stream: str, offset: int = 0) -> list[Event]:
    return [
        Event(
            site="bench",
            node="n1",
            path=f"/data/d{(offset + i) // 1000}/f{offset + i}",
            flags=["IN_CREATE"],
            ts=1_700_000_000_000_000_000 + i,
            stream=stream,
            seq=offset + i + 1,
            size=i,
        )
        for i in range(n)
    ]


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def store(data: Path, n: int, namespace: bool) -> float:
    """CPU seconds the log took to store ``n`` events, in batches as agents send them."""
    log = SQLiteLog(data, namespace=namespace)
    batches = [events(min(BATCH, n - i), "n1:bench", i) for i in range(0, n, BATCH)]
    started = cpu()
    for batch in batches:
        await log.append(batch)
    spent = cpu() - started
    await log.close()
    return spent


def read_until(url: str, end: bytes, count: bytes) -> tuple[float, int]:
    """Seconds until the stream holds ``end``, and how many ``count`` markers came before."""
    seen, tail = 0, b""
    started = time.perf_counter()
    with httpx.stream("GET", url, timeout=httpx.Timeout(30.0, read=120.0)) as r:
        for chunk in r.iter_bytes():
            # (a marker cut between two chunks is counted once: the overlap is one byte short)
            seen += (tail[-(len(count) - 1) :] + chunk).count(count)
            tail = (tail + chunk)[-4096:]
            if end in tail:
                return time.perf_counter() - started, seen
    raise RuntimeError(f"{url}: the stream ended before {end!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--cost-events", type=int, default=200_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out: dict[str, object] = {"entries": args.entries}
    with tmpfs("8g") as base:
        off = asyncio.run(store(base / "off", args.cost_events, False))
        on = asyncio.run(store(base / "on", args.cost_events, True))
        out["store_us_per_event"] = {
            "without_view": round(off / args.cost_events * 1e6, 2),
            "with_view": round(on / args.cost_events * 1e6, 2),
            "ratio": round(on / off, 2),
        }
        print(f"storing: {out['store_us_per_event']}", flush=True)

        data = base / "big"
        print(f"storing {args.entries:,} events for the snapshot …", flush=True)
        asyncio.run(store(data, args.entries, True))
        port = free_port()
        relay = subprocess.Popen(
            relay_command(port, data),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/healthz", 120)
            for what, query, end, marker in (
                ("snapshot", "since=snapshot", b"event: snapshot\n", b"event: state\n"),
                ("catch_up", "since=earliest", b'"seq":%d,' % args.entries, b"event: inotify\n"),
            ):
                before = cpu_seconds(relay.pid)
                seconds, n = read_until(f"{url}/events?{query}", end, marker)
                spent = cpu_seconds(relay.pid) - before
                out[what] = {
                    "items": n,
                    "seconds": round(seconds, 2),
                    "per_second": round(n / seconds),
                    "relay_cpu_us_per_item": round(spent / n * 1e6, 2),
                }
                print(f"{what}: {out[what]}", flush=True)
        finally:
            stop(relay)
    snap, catch = out["snapshot"], out["catch_up"]
    assert isinstance(snap, dict) and isinstance(catch, dict)
    out["snapshot_over_catch_up"] = round(snap["per_second"] / catch["per_second"], 2)
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
