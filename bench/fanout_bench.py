"""SSE deliveries/s (events x subscribers): the relay beside nginx+nchan and a naive broadcaster.

    python bench/fanout_bench.py [--events 20000] [--subscribers 1,10,100,1000] [--runs 3]

Each run: K raw-socket subscribers in this process connect, then M events (the same ~230-byte
event JSON for every server) are published as fast as the server takes them: to the relay over
its ingest WebSocket in batches of 500 (as agents do), to the naive broadcaster by POSTs of 500
lines, to nchan by pipelined POSTs of one message each (nchan has no batch publish). Figure:
M*K / (last subscriber done - publishing started). nchan runs when nginx and
libnginx-mod-nchan are installed (`apt-get install nginx libnginx-mod-nchan`), one worker.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import websockets
from harness import BIN, free_port, stop, wait_http

from storage_events.wire import Batch, Event, Hello, encode_frame

HERE = Path(__file__).parent
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
NCHAN_CONF = """load_module {module};
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  client_body_temp_path {dir}/tmp;
  nchan_shared_memory_size 256M;
  server {{
    listen 127.0.0.1:{port};
    location = /sub {{ nchan_subscriber eventsource; nchan_channel_id $arg_c;
                      nchan_subscriber_first_message oldest; }}
    location = /pub {{ nchan_publisher; nchan_channel_id $arg_c;
                      nchan_message_buffer_length 100000; nchan_message_timeout 1h; }}
  }}
}}
"""


def event(i: int) -> Event:
    return Event(
        site="bench",
        node="pool-07",
        path=f"/data/run1/d{i % 100:03d}/f{i:07d}.h5",
        flags=["IN_CLOSE_WRITE"],
        ts=1764000000123456789,
        stream="pool-07:3f9c0a1b2c3d",
        seq=i,
    )


class Subscriber:
    def __init__(self, want: int) -> None:
        self.want, self.count, self.done = want, 0, 0.0

    async def connect(self, port: int, path: str) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.writer.write(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        await self.writer.drain()
        # The response head is not awaited here: nchan may hold it back until a message comes.

    async def run(self) -> None:
        carry = b""
        while self.count < self.want:
            chunk = await self.reader.read(1 << 18)
            if not chunk:
                break
            buf = carry + chunk
            self.count += buf.count(b"\ndata: ") + buf.startswith(b"data: ")
            carry = buf[-6:]
        self.done = time.perf_counter()
        self.writer.close()


async def publish_relay(port: int, m: int) -> None:
    async with websockets.connect(f"ws://127.0.0.1:{port}/ingest", max_size=None) as ws:
        stream = f"pool-07:{time.monotonic_ns()}"
        await ws.send(encode_frame(Hello(site="bench", node="pool-07", stream=stream)))
        await ws.recv()
        pending = 0
        for first in range(1, m + 1, 500):
            batch = [event(i) for i in range(first, min(first + 500, m + 1))]
            for e in batch:
                e.stream = stream
            await ws.send(encode_frame(Batch(batch)))
            pending += 1
            if pending >= 8:  # a window of batches in flight, as the agent keeps
                await ws.recv()
                pending -= 1
        for _ in range(pending):
            await ws.recv()


async def publish_naive(port: int, m: int) -> None:
    from storage_events.wire import event_json

    async with httpx.AsyncClient() as client:
        for first in range(1, m + 1, 500):
            body = b"\n".join(event_json(event(i)) for i in range(first, min(first + 500, m + 1)))
            await client.post(f"http://127.0.0.1:{port}/pub", content=body)


async def publish_nchan(port: int, m: int, channel: str = "c", rate: float | None = None) -> None:
    """``rate``: at most this many messages/s. nchan numbers a channel's messages
    ``<unix second>:<tag>`` with a 16-bit tag, so more than 32,767 in one second wrap the tag
    and break the order of its buffer (a later catch-up stalls); live delivery, measured here,
    does not look the ids up."""
    from storage_events.wire import event_json

    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def drain_responses() -> None:
        # A status line can be split across two reads: count with the tail of the previous read
        # (without it, a missed count leaves this waiting forever for responses already seen).
        seen, carry = 0, b""
        while seen < m:
            data = await reader.read(1 << 16)
            if not data:
                return
            both = carry + data
            seen += both.count(b"HTTP/1.1 ")
            carry = both[-8:]

    responses = asyncio.create_task(drain_responses())
    start = time.perf_counter()
    for i in range(1, m + 1):
        body = event_json(event(i))
        writer.write(
            b"POST /pub?c=%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
            % (channel.encode(), len(body), body)
        )
        if i % 200 == 0:
            await writer.drain()
            if rate and (ahead := start + i / rate - time.perf_counter()) > 0:
                await asyncio.sleep(ahead)
    await writer.drain()
    await responses
    writer.close()


async def measure(port: int, path: str, publish, m: int, k: int) -> float:
    subs = [Subscriber(m) for _ in range(k)]
    for i in range(0, k, 100):
        await asyncio.gather(*(s.connect(port, path) for s in subs[i : i + 100]))
    runs = [asyncio.create_task(s.run()) for s in subs]
    await asyncio.sleep(0.5)
    start = time.perf_counter()
    await asyncio.wait_for(publish(port, m), 120)
    await asyncio.wait_for(asyncio.gather(*runs), 120)
    assert all(s.count >= m for s in subs), [s.count for s in subs][:5]
    return m * k / (max(s.done for s in subs) - start)


def start(tool: str, base: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    log = open(base / f"{tool}.log", "ab")  # noqa: SIM115
    if tool == "storage-events":
        p = subprocess.Popen(
            [
                BIN / "storage-events-relay",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--data",
                base / f"data-{port}",
            ],
            stdout=log,
            stderr=log,
        )
        wait_http(f"http://127.0.0.1:{port}/healthz")
    elif tool == "naive":
        p = subprocess.Popen(
            [sys.executable, HERE / "naive_broadcaster.py", str(port)], stdout=log, stderr=log
        )
        time.sleep(1.0)
    else:
        d = base / f"nchan-{port}"
        (d / "tmp").mkdir(parents=True)
        (d / "nginx.conf").write_text(NCHAN_CONF.format(module=NCHAN_MODULE, dir=d, port=port))
        p = subprocess.Popen(
            ["nginx", "-g", "daemon off;", "-c", str(d / "nginx.conf"), "-p", str(d)],
            stdout=log,
            stderr=log,
        )
        time.sleep(1.0)
    return p, port


PATHS = {"storage-events": "/events", "naive": "/sub", "nchan": "/sub"}


def one(
    tool: str, base: Path, nchan: tuple[subprocess.Popen, int] | None, m: int, k: int, run: int
) -> dict | None:
    """One measurement; a fresh relay or broadcaster each time, nchan's own channel."""
    if tool == "nchan":
        assert nchan is not None
        port, channel = nchan[1], f"k{k}r{run}"
        path, publish = f"/sub?c={channel}", functools.partial(publish_nchan, channel=channel)
        p = None
    else:
        p, port = start(tool, base)
        path, publish = PATHS[tool], PUBLISHERS[tool]
    try:
        rate = asyncio.run(measure(port, path, publish, m, k))
    except (TimeoutError, AssertionError, OSError) as e:
        print(f"{tool} K={k} run {run} failed: {e!r}", flush=True)
        return None
    finally:
        if p is not None:
            stop(p)
    return {"tool": tool, "subscribers": k, "run": run, "deliveries_per_s": rate}


PUBLISHERS = {"storage-events": publish_relay, "naive": publish_naive, "nchan": publish_nchan}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--subscribers", default="1,10,100,1000")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tools = ["storage-events", "naive"]
    if NCHAN_MODULE.exists() and shutil.which("nginx"):
        tools.insert(0, "nchan")
    results = []
    base = Path(tempfile.mkdtemp(prefix="se-fanout-"))
    # One nginx for the whole bench, a fresh channel per measurement. (A stall first blamed on
    # restarting nginx was publish_nchan losing count of responses split across two reads.)
    nchan = start("nchan", base) if "nchan" in tools else None
    try:
        for k in map(int, args.subscribers.split(",")):
            for run in range(args.runs):
                for tool in tools:
                    r = one(tool, base, nchan, args.events, k, run)
                    if r is not None:
                        results.append(r)
                        print(json.dumps(r), flush=True)
    finally:
        if nchan is not None:
            stop(nchan[0])
    shutil.rmtree(base, ignore_errors=True)
    print(f"\n{args.events} events; deliveries/s, median of {args.runs}; ratios in the same run")
    for k in map(int, args.subscribers.split(",")):
        row = {t: [r for r in results if r["tool"] == t and r["subscribers"] == k] for t in tools}
        cells = [f"K={k:<5}"]
        for t in tools:
            rates = [r["deliveries_per_s"] for r in row[t]] or [0.0]
            cells.append(f"{t} {statistics.median(rates):>10,.0f}")
        ours = {r["run"]: r["deliveries_per_s"] for r in row["storage-events"]}
        for t in tools:
            if t != "storage-events":
                ratios = [
                    ours[r["run"]] / r["deliveries_per_s"] for r in row[t] if r["run"] in ours
                ]
                cells.append(f"ours/{t} {statistics.median(ratios):.2f}")
        print("  ".join(cells))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
