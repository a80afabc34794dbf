"""The agent beside inotifywait (inotify-tools, C) and Python watchdog, in one run, on tmpfs.

    python bench/agent_bench.py [--runs 3] [--only setup,drain,burst,latency,race]
                                [--tools inotifywait,watchdog,storage-events]
                                [--build NAME=VENV_BIN]...

``--build`` adds another build of storage-events (its venv's bin directory, e.g. one of an
earlier commit) as a tool of its own, measured in the same runs.

Workloads (see docs/benchmarks.md for what each measures and why):
  setup    watch set-up time and RSS for a tree of 101,011 directories
  drain    a tool stopped (SIGSTOP) while 200,000 files are written with a 1M-event queue, then
           continued: time to process everything queued (ours: decoded, paths resolved, in the
           outbox, counted by the agent's own metrics)
  burst    200,000 files as fast as possible at the default queue size: how many are reported
           (ours: stored by the relay), overflows
  latency  1,000 files/s for 10 s: close() -> reported, p50/p99 (ours: through the relay to an
           SSE subscriber, which is later than relay-acked)
  race     1,000 x (mkdir a/b/c, create a/b/c/f) back to back: files reported
The tool storage-events-nostat (latency only) is the agent with ``stat = false``: what the
fstatat per event costs.
Needs root (tmpfs, sysctls), `apt-get install inotify-tools`, `pip install watchdog`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import harness
import httpx
from harness import PACED, Stack, cpu_seconds, make_root, rss_mib, stop, sysctl, tmpfs, wait_line
from harness import burst as burst_files

TREE = (10, 100, 100)  # 10 * 100 * 100 leaves: 101,011 directories with the inner ones
FILES = 200_000
EVENTS = [
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
]

RACE = r"""
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, f"a{i:05d}")
    os.mkdir(d); os.mkdir(d + "/b"); os.mkdir(d + "/b/c")
    fd = os.open(d + "/b/c/f", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"x"); os.close(fd)
"""

WATCHDOG = r"""
import sys, time, threading
from watchdog.observers import Observer
from watchdog.events import FileSystemEventHandler
root, mode, want = sys.argv[1], sys.argv[2], int(sys.argv[3])
seen, done = set(), threading.Event()
class H(FileSystemEventHandler):
    def on_any_event(self, e):
        if e.event_type in ("closed", "created") and not e.is_directory:
            if mode == "latency" and e.event_type == "closed":
                print(e.src_path, time.monotonic(), flush=True)
            seen.add(e.src_path)
            if len(seen) >= want and not done.is_set():
                print("DONE", time.monotonic(), len(seen), flush=True); done.set()
                import os; os._exit(0)
def bye(*_):
    print("COUNT", time.monotonic(), len(seen), flush=True)
    import os; os._exit(0)
import signal; signal.signal(signal.SIGTERM, bye)
o = Observer(); o.schedule(H(), root, recursive=True); o.start()
print("READY", flush=True)
done.wait()
time.sleep(3600)
"""


def py(code: str, *args: object) -> str:
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, check=True
    ).stdout


def build_tree(base: Path) -> Path:
    root = base / "tree100k"
    if not root.exists():
        a, b, c = TREE
        for i in range(a):
            for j in range(b):
                for k in range(c):
                    os.makedirs(root / f"d{i:02d}" / f"d{j:03d}" / f"d{k:03d}")
    return root


# -- tools -----------------------------------------------------------------------------------


def start_inotifywait(root: Path, out: Path) -> subprocess.Popen:
    p = subprocess.Popen(
        ["inotifywait", "-m", "-r", *EVENTS, "--format", "%e %w%f", str(root)],
        stdout=open(out, "wb"),  # noqa: SIM115 (the child owns it)
        stderr=subprocess.PIPE,
    )
    wait_line(p.stderr, b"Watches established")
    return p


def start_watchdog(root: Path, mode: str, want: int) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", WATCHDOG, str(root), mode, str(want)], stdout=subprocess.PIPE
    )
    wait_line(p.stdout, b"READY")
    return p


def quiet_file(path: Path, idle: float = 2.0, cap: float = 120) -> float:
    """Wait until ``path`` stops growing; return the monotonic time of its last write."""
    size, since, start = -1, time.monotonic(), time.monotonic()
    while time.monotonic() - since < idle and time.monotonic() - start < cap:
        s = path.stat().st_size
        if s != size:
            size, since = s, time.monotonic()
        time.sleep(0.05)
    return time.monotonic() - (time.time() - path.stat().st_mtime)


def count_closes(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.startswith(b"CLOSE_WRITE"))


def feed_count(url: str, match: Callable[[str], bool]) -> int:
    """Lines of the relay's whole feed that ``match``, read until it goes quiet."""
    count = 0
    try:
        with httpx.stream(
            "GET", url + "/events", params={"since": "earliest"}, timeout=httpx.Timeout(5, read=2)
        ) as r:
            for line in r.iter_lines():
                count += match(line)
    except httpx.ReadTimeout:
        pass  # idle: everything stored has been read
    return count


# -- workloads -------------------------------------------------------------------------------


def setup(base: Path, tool: str) -> dict:
    root = build_tree(base)
    t0 = time.monotonic()
    if tool == "inotifywait":
        p = start_inotifywait(root, base / "iw.out")
    elif tool == "watchdog":
        p = start_watchdog(root, "count", 1)
    else:
        p = subprocess.Popen(
            [
                harness.BIN / "storage-events-agent",
                "run",
                "--relay",
                "http://127.0.0.1:9",
                # Watching only, as inotifywait does: announcing the 101,011 directories to the
                # namespace view (the default at a first start) is a separate cost.
                "--no-announce-existing",
                str(root),
            ],
            stderr=subprocess.PIPE,
        )
        wait_line(p.stderr, b"watching 101011 directories")
    ready = time.monotonic() - t0
    rss = rss_mib(p.pid)
    stop(p)
    return {"seconds": ready, "rss_mib": rss}


def drain(base: Path, tool: str) -> dict:
    with sysctl("max_queued_events", 1 << 20):
        root = make_root(base, "drain", 100)
        if tool == "inotifywait":
            p = start_inotifywait(root, base / "iw.out")
        elif tool == "watchdog":
            p = start_watchdog(root, "count", FILES)
        else:
            stack = Stack(base, root)
            p = stack.agent
        os.kill(p.pid, signal.SIGSTOP)
        burst_files(root, FILES, 100)
        t0 = time.monotonic()
        os.kill(p.pid, signal.SIGCONT)
        if tool == "inotifywait":
            end = quiet_file(base / "iw.out")
            got = count_closes(base / "iw.out")
        elif tool == "watchdog":
            line = p.stdout.readline().split()
            end, got = float(line[1]), int(line[2])
        else:
            while stack.metric("events_published") < 2 * FILES:
                time.sleep(0.02)
            end, got = time.monotonic(), int(stack.metric("events_published")) // 2
        (stop(p) if tool in ("inotifywait", "watchdog") else stack.close())
    return {"seconds": end - t0, "files": got, "files_per_s": got / (end - t0)}


def burst(base: Path, tool: str) -> dict:
    root = make_root(base, "burst", 100)
    if tool == "inotifywait":
        p = start_inotifywait(root, base / "iw.out")
        burst_files(root, FILES, 100)
        quiet_file(base / "iw.out")
        got, overflows = count_closes(base / "iw.out"), 0
        stop(p)
    elif tool == "watchdog":
        p = start_watchdog(root, "count", FILES)
        burst_files(root, FILES, 100)
        time.sleep(10)  # what it has not reported by now it has lost (overflow, no rescan)
        stop(p)
        got, overflows = int(p.stdout.read().split()[-1]), -1  # its overflows only log
    else:
        stack = Stack(base, root)
        burst_files(root, FILES, 100)
        last, since = -1.0, time.monotonic()
        while time.monotonic() - since < 3:
            head = httpx.get(stack.url + "/healthz").json()["head"]
            if head != last:
                last, since = head, time.monotonic()
            time.sleep(0.1)
        got = feed_count(
            stack.url, lambda line: line.startswith("data:") and "IN_CLOSE_WRITE" in line
        )
        overflows = feed_count(stack.url, lambda line: line == "event: overflow")
        stack.close()
    return {"files": got, "lost": FILES - got, "overflows": overflows}


def latency(base: Path, tool: str, rate: int = 1000, secs: float = 10) -> dict:
    """Each file is one create and one close-write: 2 events. CPU per event counts every
    process of the tool (ours: agent, relay and the `tail` client, each on its own) from just
    before the first file to 2 s after the last."""
    root = make_root(base, "lat", 10)
    seen: dict[str, float] = {}
    procs: dict[str, int] = {}
    if tool == "inotifywait":
        p = subprocess.Popen(
            ["inotifywait", "-m", "-r", *EVENTS, "--format", "%e %w%f", str(root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        wait_line(p.stderr, b"Watches established")
        procs["inotifywait"] = p.pid

        def read() -> None:
            for line in p.stdout:
                kind, _, path = line.decode().strip().partition(" ")
                if kind == "CLOSE_WRITE,CLOSE":
                    seen[path] = time.monotonic()

    elif tool == "watchdog":
        p = start_watchdog(root, "latency", 10**9)
        procs["watchdog"] = p.pid

        def read() -> None:
            for line in p.stdout:
                words = line.decode().split()
                if len(words) == 2:  # not its closing COUNT line
                    seen.setdefault(words[0], float(words[1]))

    else:
        # storage-events-nostat: the agent without the fstatat per event (stat = false)
        stack = Stack(base, root, agent_config="stat = false\n" if tool.endswith("nostat") else "")
        p = subprocess.Popen(
            [
                harness.BIN / "storage-events",
                "tail",
                stack.url,
                "--type",
                "IN_CLOSE_WRITE",
                "--format",
                "json",
            ],
            stdout=subprocess.PIPE,
        )
        procs |= {"agent": stack.agent.pid, "relay": stack.relay.pid, "client": p.pid}
        time.sleep(1.0)

        def read() -> None:
            for line in p.stdout:
                seen[json.loads(line)["path"]] = time.monotonic()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    cpu0 = {name: cpu_seconds(pid) for name, pid in procs.items()}
    closes = {}
    for line in py(PACED, root, rate, secs).splitlines():
        path, when = line.rsplit(" ", 1)
        closes[path] = float(when)
    time.sleep(2)
    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in procs.items()}
    stop(p)
    if tool not in ("inotifywait", "watchdog"):  # (storage-events and its variants)
        stack.close()
    lat = sorted((seen[p] - t) * 1000 for p, t in closes.items() if p in seen)
    events = 2 * len(closes)
    return {
        "samples": len(lat),
        "missing": len(closes) - len(lat),
        "p50_ms": statistics.median(lat),
        "p99_ms": lat[int(0.99 * (len(lat) - 1))],
        "cpu_us_per_event": {name: round(c / events * 1e6, 1) for name, c in cpu.items()},
    }


def race(base: Path, tool: str, n: int = 1000) -> dict:
    root = make_root(base, "race", 0)
    root.mkdir(exist_ok=True)
    if tool == "inotifywait":
        p = start_inotifywait(root, base / "iw.out")
        py(RACE, root, n)
        quiet_file(base / "iw.out")
        text = (base / "iw.out").read_text()
        got = len({line.split()[-1] for line in text.splitlines() if line.endswith("/b/c/f")})
        stop(p)
    elif tool == "watchdog":
        p = start_watchdog(root, "count", n)
        py(RACE, root, n)
        time.sleep(3)
        stop(p)
        got = int(p.stdout.read().split()[-1])
    else:
        stack = Stack(base, root)
        py(RACE, root, n)
        time.sleep(3)
        got = feed_count(
            stack.url,
            lambda line: line.startswith("data:") and '/b/c/f"' in line and "IN_CREATE" in line,
        )
        stack.close()
    return {"reported": got, "of": n}


WORKLOADS = {"setup": setup, "drain": drain, "burst": burst, "latency": latency, "race": race}
TOOLS = ["inotifywait", "watchdog", "storage-events"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default=",".join(WORKLOADS))
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument(
        "--build",
        action="append",
        default=[],
        metavar="NAME=VENV_BIN",
        help="another build of storage-events to measure beside the others",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    builds = {"storage-events": harness.BIN}
    for spec in args.build:
        name, _, bin_dir = spec.partition("=")
        if not bin_dir or not (Path(bin_dir) / "storage-events-agent").exists():
            ap.error(f"--build {spec!r}: give NAME=DIR, DIR holding storage-events-agent")
        builds[name] = Path(bin_dir)
    tools = args.tools.split(",") + [name for name in builds if name != "storage-events"]
    results = []
    with tmpfs("8g") as base:
        for name in args.only.split(","):
            for run in range(args.runs):
                for tool in tools:  # interleaved, so a slow patch of the machine hits all
                    harness.BIN = builds.get(tool, builds["storage-events"])
                    kind = "storage-events" if tool in builds else tool
                    r = WORKLOADS[name](base, kind) | {"workload": name, "tool": tool, "run": run}
                    results.append(r)
                    print(json.dumps(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
