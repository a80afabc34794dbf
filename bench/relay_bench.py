"""Catch-up replay rate and RSS per idle subscriber, the relay beside nginx+nchan.

    python bench/relay_bench.py [--events 1000000] [--idle 10000]

replay: the relay stores N events (published over its ingest, as agents do), then one SSE
  subscriber asks for `since=earliest` and reads until the last: events/s. nchan keeps at most
  its message buffer (100,000 here), so it replays those, from memory, with no filter.
idle: K subscribers connect and stay idle; server RSS growth / K.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from fanout_bench import NCHAN_MODULE, PATHS, publish_nchan, publish_relay, start
from harness import rss_mib, stop


async def replay(port: int, path: str, want: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    # nchan replays its buffer to a new subscriber (first_message oldest); the relay is asked.
    query = "?since=earliest" if path == "/events" else "?c=replay"
    writer.write(f"GET {path}{query} HTTP/1.1\r\nHost: x\r\n"
                 f"Accept: text/event-stream\r\n\r\n".encode())
    start_t = time.perf_counter()
    count, carry = 0, b""
    while count < want:
        chunk = await reader.read(1 << 20)
        if not chunk:
            break
        buf = carry + chunk
        count += buf.count(b"\ndata: ")
        carry = buf[-6:]
    writer.close()
    return count / (time.perf_counter() - start_t)


async def idle(port: int, path: str, k: int) -> list[asyncio.StreamWriter]:
    writers = []
    for i in range(0, k, 200):
        conns = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port)
                                       for _ in range(min(200, k - i))))
        for _, writer in conns:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
                         .encode())
            writers.append(writer)
        await asyncio.sleep(0.05)
    await asyncio.sleep(2.0)
    return writers


async def hold(tool: str, p: subprocess.Popen, port: int, k: int) -> float:
    """Server RSS with ``k`` idle subscribers connected."""
    writers = await idle(port, PATHS[tool] + ("?c=idle" if tool == "nchan" else ""), k)
    after = server_rss(tool, p)
    for w in writers:
        w.close()
    return after


def server_rss(tool: str, p: subprocess.Popen) -> float:
    if tool != "nchan":
        return rss_mib(p.pid)
    out = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout
    return rss_mib(p.pid) + sum(rss_mib(int(pid)) for pid in out.split())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--idle", type=int, default=10_000)
    ap.add_argument("--no-nchan", action="store_true", help="measure the relay alone")
    args = ap.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the servers inherit it
    if args.idle + 100 > hard:
        args.idle = hard - 100
        print(f"open-file limit {hard}: measuring {args.idle} idle subscribers")
    base = Path(tempfile.mkdtemp(prefix="se-relay-bench-"))
    nchan = NCHAN_MODULE.exists() and shutil.which("nginx") and not args.no_nchan
    tools = ["nchan"] if nchan else []
    tools.append("storage-events")
    for tool in tools:
        p, port = start(tool, base)
        try:
            n = args.events if tool == "storage-events" else min(args.events, 100_000)
            t = time.perf_counter()
            if tool == "storage-events":
                asyncio.run(publish_relay(port, n))
            else:
                asyncio.run(publish_nchan(port, n, channel="replay"))
            if tool == "storage-events":
                while httpx.get(f"http://127.0.0.1:{port}/healthz").json()["head"] < n:
                    time.sleep(0.1)
            stored = n / (time.perf_counter() - t)
            rate = asyncio.run(replay(port, PATHS[tool], n))
            print(f"replay  {tool:15} {n:>9,} events stored at {stored:>9,.0f}/s, "
                  f"replayed at {rate:>10,.0f} events/s")
        finally:
            stop(p)
        p, port = start(tool, base)
        try:
            before = server_rss(tool, p)
            after = asyncio.run(hold(tool, p, port, args.idle))
            print(f"idle    {tool:15} {args.idle:>9,} subscribers: RSS {before:.1f} -> "
                  f"{after:.1f} MiB, {(after - before) * 1024 / args.idle:.1f} KiB each")
        finally:
            stop(p)
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
