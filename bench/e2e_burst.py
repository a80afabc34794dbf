"""Events/s from file close to SSE subscriber for a burst of files, beside inotifywait.

    python bench/e2e_burst.py [--files 100000] [--runs 3]

Runs on a private tmpfs (the VM disk is throttled). Per run and tool, one burst of N files
(create + write + close) is written by the same generator; we measure from the first close to
the moment the consumer has seen every file's IN_CLOSE_WRITE:

* storage-events: agent → relay (SQLite log on the tmpfs) → SSE subscriber process;
* inotifywait -m -r (Debian inotify-tools): kernel → its stdout, the C floor with no network,
  no log and no subscriber.

Reports delivered counts (loss is a failure, not a footnote) and the ratio ours / inotifywait.
Needs root (for the tmpfs mount) and `apt-get install inotify-tools`.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from harness import BIN, burst, burst_options, free_port, make_root, stop, tmpfs, wait_http

SUBSCRIBER = r"""
import sys, time, httpx
url, want, idle = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
closes = overflows = 0
last = time.monotonic()
with httpx.Client(timeout=httpx.Timeout(idle, read=idle)) as c:
    try:
        with c.stream("GET", url + "/events", params={"since": "now"}) as r:
            print("ready", flush=True)
            rest = b""
            for chunk in r.iter_bytes():
                *messages, rest = (rest + chunk).split(b"\n\n")
                for m in messages:
                    closes += b'IN_CLOSE_WRITE' in m
                    overflows += m.startswith(b"id:") and b"event: overflow" in m
                last = time.monotonic()
                if closes >= want:
                    break
    except httpx.ReadTimeout:
        pass
print(f"{closes} {overflows} {last}", flush=True)
"""


def run_ours(base: Path, n: int, dirs: int) -> dict:
    root = make_root(base, "ours", dirs)
    data = base / "relay-data"
    shutil.rmtree(data, ignore_errors=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logs = open(base / "ours.log", "ab")  # noqa: SIM115
    relay = subprocess.Popen(
        [BIN / "storage-events-relay", "serve", "--listen", f"127.0.0.1:{port}", "--data", data],
        stdout=logs,
        stderr=logs,
    )
    procs = [relay]
    try:
        wait_http(url + "/healthz")
        agent = subprocess.Popen(
            [BIN / "storage-events-agent", "run", "--relay", url, "--site", "bench", str(root)],
            stdout=logs,
            stderr=logs,
        )
        procs.append(agent)
        deadline = time.monotonic() + 20
        while not httpx.get(url + "/healthz").json()["agents"]:
            if time.monotonic() > deadline:
                raise RuntimeError("agent did not connect")
            time.sleep(0.05)
        sub = subprocess.Popen(
            [sys.executable, "-c", SUBSCRIBER, url, str(n), "10"], stdout=subprocess.PIPE, text=True
        )
        procs.append(sub)
        assert sub.stdout is not None
        assert sub.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        start, gen_end = burst(root, n, dirs)
        closes, overflows, last = sub.stdout.readline().split()
        return {
            "delivered": int(closes),
            "overflows": int(overflows),
            "seconds": float(last) - start,
            "gen_seconds": gen_end - start,
        }
    finally:
        for p in reversed(procs):
            stop(p)
        logs.close()


def run_inotifywait(base: Path, n: int, dirs: int) -> dict:
    root = make_root(base, "peer", dirs)
    out_path = base / "inotifywait.out"
    with open(out_path, "wb") as out:
        p = subprocess.Popen(
            [
                "inotifywait",
                "-m",
                "-r",
                "-e",
                "create",
                "-e",
                "close_write",
                "-e",
                "delete",
                "-e",
                "moved_from",
                "-e",
                "moved_to",
                "-e",
                "attrib",
                "--format",
                "%e %w%f",
                str(root),
            ],
            stdout=out,
            stderr=subprocess.PIPE,
        )
        assert p.stderr is not None
        while b"Watches established" not in p.stderr.readline():
            pass
        time.sleep(0.3)
        start, gen_end = burst(root, n, dirs)
        # Done when the output file stops growing; its mtime is the last event's time.
        size, quiet = -1, time.monotonic()
        while time.monotonic() - quiet < 2.0:
            s = out_path.stat().st_size
            if s != size:
                size, quiet = s, time.monotonic()
            time.sleep(0.05)
        stop(p)
    mtime_wall = out_path.stat().st_mtime
    last = time.monotonic() - (time.time() - mtime_wall)
    closes = sum(1 for line in out_path.open("rb") if line.startswith(b"CLOSE_WRITE"))
    return {
        "delivered": closes,
        "overflows": 0,
        "seconds": last - start,
        "gen_seconds": gen_end - start,
    }


def main() -> None:
    args = burst_options(__doc__)
    if not shutil.which("inotifywait"):
        sys.exit("inotifywait is missing: apt-get install inotify-tools")
    queued = Path("/proc/sys/fs/inotify/max_queued_events").read_text().strip()
    results: list[dict] = []
    with tmpfs() as base:
        for run in range(args.runs):
            for tool, fn in (("inotifywait", run_inotifywait), ("storage-events", run_ours)):
                r = fn(base, args.files, args.dirs) | {"tool": tool, "run": run}
                r["events_per_s"] = 2 * r["delivered"] / r["seconds"]
                results.append(r)
                print(json.dumps(r), flush=True)
    print(
        f"\n{args.files} files x {args.runs} runs, max_queued_events={queued}, "
        f"{os.cpu_count()} CPUs, tmpfs"
    )
    print(
        f"{'tool':16} {'delivered':>10} {'overflow':>9} {'events/s (median)':>18} "
        f"{'ratio to inotifywait':>21}"
    )
    ratios = [
        o["events_per_s"] / p["events_per_s"]
        for o, p in zip(results[1::2], results[0::2], strict=True)
    ]
    for tool in ("inotifywait", "storage-events"):
        rs = [r for r in results if r["tool"] == tool]
        rate = statistics.median(r["events_per_s"] for r in rs)
        ratio = (
            f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"
            if tool == "storage-events"
            else "1"
        )
        print(
            f"{tool:16} {min(r['delivered'] for r in rs):>10} "
            f"{max(r['overflows'] for r in rs):>9} {rate:>18,.0f} {ratio:>21}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
