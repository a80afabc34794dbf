"""Catch-up replay rate and RSS per idle subscriber, the relay beside nginx+nchan in the same run,
and what each does when a subscriber resumes from an id that is no longer held.

    python bench/relay_bench.py [--events 1000000,100000] [--idle 10000] [--runs 1] [--json FILE]
    python bench/relay_bench.py --evicted-demo

replay: each server is given N events (the relay over its ingest WebSocket in batches of 500,
  as agents do, its SQLite log on a private tmpfs; nchan by pipelined POSTs of one message, into
  a message buffer sized to hold all N, in shared memory), then one SSE subscriber asks for all
  of them (the relay: `since=earliest`; nchan: a new subscriber gets its buffer from the
  oldest message) and reads until the last: events/s from the request to the last event.
idle: K SSE subscribers connect and stay idle; growth of the server's RSS (nchan: its one
  worker process) / K. Both servers are checked to count K subscribers.
evicted: a 100-event history (nchan: nchan_message_buffer_length 100; the relay:
  retention_events = 100) after 140 events; a subscriber resumes with the Last-Event-ID of
  event 10, which is gone. Printed: what each server sends first.
nchan runs when nginx and libnginx-mod-nchan are installed (bench/setup), one worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
from fanout_bench import NCHAN_MODULE, event, publish_nchan, publish_relay
from harness import BIN, free_port, rss_mib, stop, tmpfs, wait_http

from storage_events.sse import SSEParser
from storage_events.wire import event_json

NCHAN_CONF = """load_module {module};
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  client_body_temp_path {dir}/tmp;
  nchan_shared_memory_size {shm_mib}M;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = /sub {{ nchan_subscriber eventsource; nchan_channel_id $arg_c;
                      nchan_subscriber_first_message oldest; }}
    location = /pub {{ nchan_publisher; nchan_channel_id $arg_c;
                      nchan_message_buffer_length {buffer}; nchan_message_timeout 1h; }}
    location = /pub_small {{ nchan_publisher; nchan_channel_id $arg_c;
                            nchan_message_buffer_length {small}; nchan_message_timeout 1h; }}
  }}
}}
"""
# The evicted-id demonstration: 140 events, 100 held, resume after event 10 (gone) and, as a
# control, after event 50 (held).
HISTORY, PUBLISHED, RESUME_AT, HELD_AT = 100, 140, 10, 50


# nchan's message ids are <unix second>:<16-bit tag>: publishing faster than 32,767 messages in
# a second wraps the tag and breaks the buffer's order (a catch-up then stalls after a message or
# two), so its buffer is filled at this pace.
NCHAN_PUBLISH_RATE = 30_000


def nchan_shm_mib(events: int) -> int:
    # Measured: 1,000,000 of these ~230-byte messages take about 540 MiB of shared memory.
    return max(64, events * 1024 // (1 << 20))


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def start_nchan(base: Path, *, buffer: int, connections: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    d = base / f"nchan-{port}"
    (d / "tmp").mkdir(parents=True)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    (d / "nginx.conf").write_text(
        NCHAN_CONF.format(
            module=NCHAN_MODULE,
            dir=d,
            port=port,
            nofile=nofile,
            connections=connections,
            shm_mib=nchan_shm_mib(buffer),
            buffer=buffer,
            small=HISTORY,
        )
    )
    log = open(base / "nchan.log", "ab")  # noqa: SIM115
    p = subprocess.Popen(
        ["nginx", "-g", "daemon off;", "-c", str(d / "nginx.conf"), "-p", str(d)],
        stdout=log,
        stderr=log,
    )
    wait_port(port)
    return p, port


def start_relay(base: Path, config: str = "") -> tuple[subprocess.Popen, int]:
    port = free_port()
    args = [
        BIN / "storage-events-relay",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--data",
        base / f"data-{port}",
    ]
    if config:
        (base / f"relay-{port}.toml").write_text(config)
        args += ["--config", base / f"relay-{port}.toml"]
    log = open(base / "relay.log", "ab")  # noqa: SIM115
    p = subprocess.Popen(args, stdout=log, stderr=log)
    wait_http(f"http://127.0.0.1:{port}/healthz")
    return p, port


def nchan_info(port: int, channel: str, pub: str = "/pub") -> dict[str, str]:
    """nchan's channel info (GET on the publisher location): queued messages, subscribers..."""
    text = httpx.get(f"http://127.0.0.1:{port}{pub}?c={channel}", timeout=10).text
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


def nchan_worker(p: subprocess.Popen) -> int:
    out = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout
    (pid,) = out.split()  # worker_processes 1
    return int(pid)


def server_pid(tool: str, p: subprocess.Popen) -> int:
    return nchan_worker(p) if tool == "nchan" else p.pid


def server_rss(tool: str, p: subprocess.Popen) -> float:
    return rss_mib(server_pid(tool, p))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def replay(port: int, path: str, want: int, cap: float) -> tuple[int, float, bool]:
    """Read ``want`` events, or for ``cap`` seconds at most: (events, events/s, capped)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
    start_t = time.perf_counter()
    count, carry, capped = 0, b"", False
    while count < want:
        left = start_t + cap - time.perf_counter()
        try:
            chunk = await asyncio.wait_for(reader.read(1 << 20), max(left, 0))
        except TimeoutError:
            capped = True
            break
        if not chunk:
            break
        buf = carry + chunk
        count += buf.count(b"\ndata: ")
        carry = buf[-6:]
    elapsed = time.perf_counter() - start_t
    writer.close()
    return count, count / elapsed, capped


def measure_replay(tool: str, base: Path, n: int, run: int, cap: float) -> dict:
    if tool == "nchan":
        p, port = start_nchan(base, buffer=n, connections=1024)
    else:
        p, port = start_relay(base)
    try:
        t = time.perf_counter()
        if tool == "nchan":
            asyncio.run(
                asyncio.wait_for(
                    publish_nchan(port, n, channel="replay", rate=NCHAN_PUBLISH_RATE), 600
                )
            )
            info = nchan_info(port, "replay")
            held = int(info["queued messages"])
            # <unix second>:<tag>; a negative tag would mean it wrapped (see publish_nchan).
            assert int(info["last message id"].split(":")[1]) >= 0, info
        else:
            asyncio.run(asyncio.wait_for(publish_relay(port, n), 600))
            while (health := httpx.get(f"http://127.0.0.1:{port}/healthz").json())["head"] < n:
                time.sleep(0.1)
            held = health["head"] - health["first"] + 1
        stored = n / (time.perf_counter() - t)
        rss_held = server_rss(tool, p)
        path = "/sub?c=replay" if tool == "nchan" else "/events?since=earliest"
        cpu = cpu_seconds(server_pid(tool, p))
        count, rate, capped = asyncio.run(replay(port, path, held, cap))
        cpu = cpu_seconds(server_pid(tool, p)) - cpu
    finally:
        stop(p)
    r = {
        "measure": "replay",
        "tool": tool,
        "run": run,
        "events": n,
        "held": held,
        "stored_per_s": stored,
        "server_rss_mib": rss_held,
        "replayed": count,
        "replay_events_per_s": rate,
        "replay_capped_at_s": cap if capped else None,
        "replay_server_cpu_s": cpu,
        "replay_seconds": count / rate,
    }
    if tool == "nchan":
        r["nchan_message_buffer_length"] = n
        r["nchan_shared_memory_mib"] = nchan_shm_mib(n)
    print(
        f"replay  {tool:15} {held:>9,} events held (stored at {stored:>9,.0f}/s, server RSS "
        f"{rss_held:,.0f} MiB), {count:,} replayed at {rate:>10,.0f} events/s (server CPU "
        f"{cpu:.1f} s of {count / rate:.1f} s{'; stopped at the cap' if capped else ''})",
        flush=True,
    )
    return r


async def connect_idle(port: int, path: str, k: int) -> list[asyncio.StreamWriter]:
    writers = []
    for i in range(0, k, 200):
        conns = await asyncio.gather(
            *(asyncio.open_connection("127.0.0.1", port) for _ in range(min(200, k - i)))
        )
        for _, writer in conns:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode()
            )
            writers.append(writer)
        await asyncio.sleep(0.05)
    await asyncio.sleep(2.0)
    return writers


def measure_idle(tool: str, base: Path, k: int, run: int) -> dict:
    if tool == "nchan":
        # nginx starts closing idle connections to reuse them when fewer than 1/16 of its
        # worker_connections are free: leave room.
        p, port = start_nchan(base, buffer=10, connections=k * 5 // 4 + 100)
    else:
        p, port = start_relay(base)

    async def hold() -> tuple[float, int]:
        writers = await connect_idle(port, "/sub?c=idle" if tool == "nchan" else "/events", k)
        after = server_rss(tool, p)
        if tool == "nchan":
            seen = int(nchan_info(port, "idle")["active subscribers"])
        else:
            seen = httpx.get(f"http://127.0.0.1:{port}/healthz").json()["subscribers"]
        for w in writers:
            w.close()
        return after, seen

    try:
        time.sleep(0.5)
        before = server_rss(tool, p)
        after, seen = asyncio.run(hold())
    finally:
        stop(p)
    each = (after - before) * 1024 / k
    print(
        f"idle    {tool:15} {seen:>9,} subscribers connected: RSS {before:.1f} -> {after:.1f} "
        f"MiB, {each:.1f} KiB each",
        flush=True,
    )
    return {
        "measure": "idle",
        "tool": tool,
        "run": run,
        "subscribers": k,
        "connected": seen,
        "rss_before_mib": before,
        "rss_after_mib": after,
        "kib_per_subscriber": each,
    }


def read_sse(url: str, last_event_id: str, want: int) -> tuple[int, list[dict]]:
    """Resume with ``Last-Event-ID``; the status and the messages read (until ``want`` of them
    or a second of silence)."""
    parser, messages = SSEParser(), []
    headers = {"Accept": "text/event-stream", "Last-Event-ID": last_event_id}
    with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(10, read=1)) as r:
        with contextlib.suppress(httpx.ReadTimeout):
            for chunk in r.iter_raw():
                for m in parser.feed(chunk):
                    data = json.loads(m.data)
                    messages.append(
                        {
                            "event": m.event,
                            "id": m.id,
                            "seq": data.get("seq"),
                            "data": data if "seq" not in data else None,
                        }
                    )
                if len(messages) >= want:
                    break
        return r.status_code, messages


def describe(
    tool: str, status: int, messages: list[dict], resumed: str, control: tuple[int, list[dict]]
) -> dict:
    seqs = [m["seq"] for m in messages if m["seq"] is not None]
    markers = [m for m in messages if m["seq"] is None]
    first = messages[0] if messages else None
    skipped = sorted(set(range(RESUME_AT + 1, PUBLISHED + 1)) - set(seqs))
    out = {
        "measure": "evicted",
        "tool": tool,
        "history": HISTORY,
        "published": PUBLISHED,
        "last_event_id": resumed,
        "resumed_after_event": RESUME_AT,
        "status": status,
        "first_message": first,
        "events_delivered": len(seqs),
        "first_event": seqs[0] if seqs else None,
        "last_event": seqs[-1] if seqs else None,
        "markers": markers,
        "missing_events": [skipped[0], skipped[-1]] if skipped else [],
    }
    held = [m["seq"] for m in control[1] if m["seq"] is not None]
    out["control"] = {
        "resumed_after_event": HELD_AT,
        "status": control[0],
        "messages": len(control[1]),
        "first_event": held[0] if held else None,
        "last_event": held[-1] if held else None,
    }
    gone = f"events {skipped[0]}-{skipped[-1]} ({len(skipped)})" if skipped else "nothing"
    said = (
        ", ".join(f"`event: {m['event']}` {json.dumps(m['data'])}" for m in markers)
        or "no marker of any kind"
    )
    print(
        f"evicted {tool:15} Last-Event-ID {resumed} (event {RESUME_AT}, no longer held): "
        f"HTTP {status}; first message: "
        + (f"`event: {first['event']}` id {first['id']}" if first else "none")
        + f"; then events {out['first_event']}-{out['last_event']} ({len(seqs)}); "
        f"missing {gone}; {said}",
        flush=True,
    )
    print(
        f"        {'':15} control, resuming after event {HELD_AT} (held): HTTP {control[0]}, "
        f"{len(control[1])} messages, events {out['control']['first_event']}-"
        f"{out['control']['last_event']}",
        flush=True,
    )
    return out


def evicted_nchan(base: Path) -> dict:
    p, port = start_nchan(base, buffer=10, connections=1024)
    try:
        ids = {}
        with httpx.Client() as client:
            for i in range(1, PUBLISHED + 1):
                client.post(
                    f"http://127.0.0.1:{port}/pub_small?c=evict", content=event_json(event(i))
                )
                ids[i] = nchan_info(port, "evict", "/pub_small")["last message id"]
        held = int(nchan_info(port, "evict", "/pub_small")["queued messages"])
        assert held == HISTORY, held
        status, messages = read_sse(
            f"http://127.0.0.1:{port}/sub?c=evict", ids[RESUME_AT], HISTORY + 5
        )
        control = read_sse(f"http://127.0.0.1:{port}/sub?c=evict", ids[HELD_AT], HISTORY)
    finally:
        stop(p)
    return describe("nchan", status, messages, ids[RESUME_AT], control)


def evicted_relay(base: Path) -> dict:
    p, port = start_relay(base, f"retention_events = {HISTORY}\nretention_check = 0.2\n")
    try:
        asyncio.run(publish_relay(port, PUBLISHED))
        deadline = time.monotonic() + 20
        while httpx.get(f"http://127.0.0.1:{port}/healthz").json()["first"] <= PUBLISHED - HISTORY:
            assert time.monotonic() < deadline, "retention did not run"
            time.sleep(0.1)
        status, messages = read_sse(f"http://127.0.0.1:{port}/events", str(RESUME_AT), HISTORY + 1)
        control = read_sse(f"http://127.0.0.1:{port}/events", str(HELD_AT), HISTORY)
    finally:
        stop(p)
    return describe("storage-events", status, messages, str(RESUME_AT), control)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--events",
        default="1000000,100000",
        help="replay sizes, comma-separated (default 1000000,100000)",
    )
    ap.add_argument(
        "--replay-cap",
        type=float,
        default=60.0,
        help="stop reading a replay after this many seconds (nchan's replay of a "
        "large buffer is slow: it walks its message list for each message)",
    )
    ap.add_argument("--idle", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--no-nchan", action="store_true", help="measure the relay alone")
    ap.add_argument(
        "--evicted-demo",
        action="store_true",
        help="only show what each server does with an evicted Last-Event-ID",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the servers inherit it
    if args.idle + 100 > hard:
        args.idle = hard - 100
        print(f"open-file limit {hard}: measuring {args.idle} idle subscribers")
    nchan = NCHAN_MODULE.exists() and shutil.which("nginx") and not args.no_nchan
    if not nchan and not args.no_nchan:
        print("nginx or libnginx-mod-nchan missing (bench/setup installs them): relay alone")
    tools = (["nchan"] if nchan else []) + ["storage-events"]
    results = []
    with tmpfs("8g") as base:
        if not args.evicted_demo:
            for run in range(args.runs):
                for n in map(int, args.events.split(",")):
                    for tool in tools:
                        results.append(measure_replay(tool, base, n, run, args.replay_cap))
                for tool in tools:
                    results.append(measure_idle(tool, base, args.idle, run))
                for d in base.glob("data-*"):
                    shutil.rmtree(d)
        if nchan:
            results.append(evicted_nchan(base))
        results.append(evicted_relay(base))
    if len(tools) == 2 and not args.evicted_demo:
        summarize(results, args.runs)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


def summarize(results: list[dict], runs: int) -> None:
    def pick(measure: str, tool: str, run: int, **match: int) -> dict:
        return next(
            r
            for r in results
            if r["measure"] == measure
            and r["tool"] == tool
            and r["run"] == run
            and all(r[k] == v for k, v in match.items())
        )

    print("\nsame-run ratios, storage-events / nchan:")
    sizes = sorted({r["events"] for r in results if r["measure"] == "replay"}, reverse=True)
    for run in range(runs):
        cells = [f"run {run}:"]
        for n in sizes:
            ours = pick("replay", "storage-events", run, events=n)
            theirs = pick("replay", "nchan", run, events=n)
            ratio = ours["replay_events_per_s"] / theirs["replay_events_per_s"]
            cells.append(
                f"replay of {n:,} {ratio:.2f}"
                + (" (nchan capped)" if theirs["replay_capped_at_s"] else "")
                + ","
            )
        ours, theirs = pick("idle", "storage-events", run), pick("idle", "nchan", run)
        cells.append(
            "RSS per idle subscriber "
            f"{ours['kib_per_subscriber'] / theirs['kib_per_subscriber']:.2f}"
        )
        print(" ".join(cells))


if __name__ == "__main__":
    main()
