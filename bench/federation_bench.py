"""File close → SSE subscriber latency through a federation hop, beside the one-hop figure.

    cd bench && ../.venv/bin/python federation_bench.py [--runs 3] [--steady 20] [--cut 10]
                                                        [--rate 1000] [--json FILE]

Four hosts, each a network namespace with a veth into one bridge (as tests/netns.py does): three
site relays, each with an agent watching its own tree on a private tmpfs, and a central relay.
The central pulls site1 and site2 (``[[upstream]]``) and site3 pushes to it (``[[push]]``, a
relay-role token). One writer per site closes 1,000 files/s (each file: IN_CREATE +
IN_CLOSE_WRITE published by the agent). Four SSE subscribers (one on the central, one on each
site relay, all outside the namespaces, each a process of its own) stamp every IN_CLOSE_WRITE
on arrival; latency = arrival − the writer's close() (CLOCK_MONOTONIC, one clock for all), by
path.

Timeline of a run (seconds after the first close): warm-up, then the steady window (the
central ÷ one-hop figures), then site1's link is cut for --cut seconds, healed, then the
same for site3 (the pushing site). For each cut: latency at the central of the other sites'
events closed during the cut, against the last 10 s before the first cut; and when the cut
site's own events arrived. Everything is fresh per run; namespaces and processes are removed
at the end, also on error. Needs root (namespaces, tmpfs). Never run by the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from harness import BIN, PACED, stop, tmpfs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from netns import Hosts  # the tests' hosts, shared rather than copied

from storage_events.relay.auth import hash_token

SITES = ["site1", "site2", "site3"]
MODE = {"site1": "pull", "site2": "pull", "site3": "push"}
SECRET = {n: f"bench-{n}-0123456789abcdef" for n in ("reader", "pull", "push", *SITES)}

# A subscriber of its own: stamps each chunk as it arrives, then parses it; one line per event.
SUBSCRIBER = r"""
import json, signal, sys, time
import httpx
url, token, out = sys.argv[1], sys.argv[2], sys.argv[3]
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
with open(out, "w") as f, httpx.Client(timeout=httpx.Timeout(10, read=None)) as c:
    with c.stream("GET", url + "/events", params={"type": "IN_CLOSE_WRITE"},
                  headers={"Authorization": "Bearer " + token}) as r:
        print(r.status_code, flush=True)
        buf = b""
        for chunk in r.iter_raw():
            t = time.monotonic()
            *lines, buf = (buf + chunk).split(b"\n")
            for line in lines:
                if line.startswith(b"data: "):
                    e = json.loads(line[6:])
                    f.write(f"{e['site']} {t} {e['path']}\n")
            f.flush()
"""


def relay_config(
    path: Path, name: str, *, tokens: list[str], upstream: list[str] = (), push: list[str] = ()
) -> Path:
    """``tokens``: [[token]] blocks as text; ``upstream``/``push``: URLs."""
    lines = [f'name = "{name}"', *tokens]
    for url in upstream:
        lines += ["[[upstream]]", f'url = "{url}"', f'token = "{SECRET["pull"]}"']
    for url in push:
        lines += ["[[push]]", f'url = "{url}"', f'token = "{SECRET["push"]}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def token(name: str, role: str, secret: str, site: str | None = None) -> str:
    text = f'[[token]]\nname = "{name}"\nrole = "{role}"\nhash = "{hash_token(secret)}"'
    if role in ("agent", "relay"):  # a relay token names the relay that pushes with it
        text += f'\nsite = "{site}"'
    if role == "relay":
        text += f'\nsites = ["{site}"]'
    return text


def wait_until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError, ValueError, KeyError):
            if pred():
                return
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def get(url: str) -> dict:
    return httpx.get(url, timeout=2, headers={"Authorization": f"Bearer {SECRET['reader']}"}).json()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores, kernel included)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def wait_quiet(limit: float = 0.3, cap: float = 180) -> float:
    """Wait (at most ``cap`` s) until the machine is about idle: other work skews latency."""
    deadline = time.monotonic() + cap
    while True:
        b0 = machine_busy()
        time.sleep(2)
        busy = (machine_busy() - b0) / 2
        if busy < limit or time.monotonic() > deadline:
            return busy


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * (len(values) - 1)))]


def summary(lat: list[float]) -> dict:
    lat = sorted(lat)
    if not lat:
        return {"n": 0}
    return {
        "n": len(lat),
        "p50_ms": round(statistics.median(lat), 3),
        "p99_ms": round(pct(lat, 0.99), 3),
        "max_ms": round(lat[-1], 3),
    }


def one_run(base: Path, hosts: Hosts, run: int, args: argparse.Namespace) -> dict:
    d = base / f"run{run}"
    d.mkdir()
    idle_before = round(wait_quiet(), 2)
    port = 8808 + run  # a fresh port per run: no TIME_WAIT from the previous run's relays
    url = {h: f"http://{hosts.addr[h]}:{port}" for h in ["central", *SITES]}
    procs: list[subprocess.Popen] = []
    logs = []

    def start(host: str, name: str, cmd: list, **kw) -> subprocess.Popen:
        log = open(d / f"{name}.log", "wb")  # noqa: SIM115 - closed below
        logs.append(log)
        p = subprocess.Popen(
            [*(hosts.exec(host) if host else []), *map(str, cmd)],
            stdout=kw.pop("stdout", log),
            stderr=kw.pop("stderr", log),
            **kw,
        )
        procs.append(p)
        return p

    def relay(host: str, cfg: Path) -> subprocess.Popen:
        p = start(
            host,
            host,
            [
                BIN / "storage-events-relay",
                "serve",
                "--listen",
                f"{hosts.addr[host]}:{port}",
                "--data",
                d / f"{host}-data",
                "--config",
                cfg,
            ],
        )
        wait_until(lambda: get(url[host] + "/healthz")["status"] == "ok", 20, f"{host} relay")
        return p

    try:
        pids = {}
        for site in SITES:
            tokens = [
                token(f"agent-{site}", "agent", SECRET[site], site),
                token("central", "reader", SECRET["pull"]),
                token("bench", "reader", SECRET["reader"]),
            ]
            push = [url["central"]] if MODE[site] == "push" else []
            cfg = relay_config(d / f"{site}.toml", site, tokens=tokens, push=push)
            if MODE[site] == "pull":
                pids[site] = relay(site, cfg).pid
            else:
                push_cfg = cfg
        cfg = relay_config(
            d / "central.toml",
            "central",
            tokens=[
                token("bench", "reader", SECRET["reader"]),
                token("site3-relay", "relay", SECRET["push"], "site3"),
            ],
            upstream=[url[s] for s in SITES if MODE[s] == "pull"],
        )
        pids["central"] = relay("central", cfg).pid
        for site in SITES:
            if MODE[site] == "push":
                pids[site] = relay(site, push_cfg).pid

        def federated() -> bool:
            s = get(url["central"] + "/sites")
            return (
                all(u["connected"] for u in s["upstreams"])
                and len(s["upstreams"]) == 2
                and s["pushing_here"] == {"site3": 1}
            )

        wait_until(federated, 30, "the central relay's upstreams and push")

        roots = {}
        for i, site in enumerate(SITES, 1):
            roots[site] = d / f"{site}-tree"
            for k in range(10):
                (roots[site] / f"d{k:03d}").mkdir(parents=True)
            a = start(
                site,
                f"agent-{site}",
                [
                    BIN / "storage-events-agent",
                    "run",
                    "--relay",
                    url[site],
                    "--site",
                    site,
                    "--node",
                    f"node{i}",
                    "--token",
                    SECRET[site],
                    roots[site],
                ],
            )
            log = d / f"agent-{site}.log"
            wait_until(
                lambda log=log: b"publishing stream" in log.read_bytes(), 30, f"agent of {site}"
            )
            pids[f"agent-{site}"] = a.pid
        wait_until(
            lambda: all(get(url[s] + "/healthz")["agents"] == 1 for s in SITES),
            20,
            "agents connected",
        )

        subs = {}
        for h in ["central", *SITES]:
            p = start(
                "",
                f"sub-{h}",
                [sys.executable, "-c", SUBSCRIBER, url[h], SECRET["reader"], d / f"sub-{h}.txt"],
                stdout=subprocess.PIPE,
            )
            status = p.stdout.readline().strip()
            if status != b"200":
                raise RuntimeError(f"subscriber on {h}: HTTP {status!r}")
            subs[h] = p

        # The schedule, in seconds after the first close.
        warm, steady, cut = args.warmup, args.steady, args.cut
        cut1 = warm + steady
        cut3 = cut1 + cut + args.settle
        total = cut3 + cut + args.settle
        t0 = time.monotonic() + 1.0
        writers = {
            s: start(
                "",
                f"writer-{s}",
                [sys.executable, "-c", PACED, roots[s], args.rate, total, t0],
                stdout=subprocess.PIPE,
            )
            for s in SITES
        }

        def at(offset: float) -> None:
            time.sleep(max(0.0, t0 + offset - time.monotonic()))

        def ours() -> float:  # every process of this run, and this one
            return sum(cpu_seconds(p.pid) for p in procs) + sum(os.times()[:2])

        at(warm)
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        busy0, ours0, wall0 = machine_busy(), ours(), time.monotonic()
        at(cut1)
        cpu = {k: round(cpu_seconds(p) - cpu0[k], 2) for k, p in pids.items()}
        wall = time.monotonic() - wall0
        load = {
            "machine_busy_cores": round((machine_busy() - busy0) / wall, 2),
            "ours_cores": round((ours() - ours0) / wall, 2),
        }
        # the rest: kernel work not charged to a process (softirq: the veths) and other programs
        load["rest_cores"] = round(load["machine_busy_cores"] - load["ours_cores"], 2)
        events = []
        for site, begin in (("site1", cut1), ("site3", cut3)):
            at(begin)
            hosts.cut(site)
            events.append((site, "cut", time.monotonic() - t0))
            at(begin + cut)
            hosts.heal(site)
            events.append((site, "heal", time.monotonic() - t0))
        closes: dict[str, dict[str, float]] = {}
        for s, w in writers.items():
            out, _ = w.communicate(timeout=total + 60)
            closes[s] = {
                p: float(t) for p, t in (ln.rsplit(" ", 1) for ln in out.decode().splitlines())
            }
        # Drain: until the central holds every event (2 per file), or it stops growing.
        want = 2 * sum(len(c) for c in closes.values())
        last, since = -1, time.monotonic()
        while time.monotonic() - since < 10:
            head = get(url["central"] + "/healthz")["head"]
            if head >= want:
                break
            if head != last:
                last, since = head, time.monotonic()
            time.sleep(0.2)
        time.sleep(1.0)
        for p in subs.values():
            stop(p)
        central_head = get(url["central"] + "/healthz")["head"]
        sites_summary = get(url["central"] + "/sites")
    finally:
        for p in reversed(procs):
            stop(p)
        for log in logs:
            log.close()

    # -- analysis ------------------------------------------------------------------------------
    seen: dict[str, dict[str, dict[str, float]]] = {}  # subscriber -> site -> path -> t
    dups: dict[str, int] = {}
    for h in ["central", *SITES]:
        seen[h] = {s: {} for s in SITES}
        dups[h] = 0
        for line in (d / f"sub-{h}.txt").read_text().splitlines():
            site, t, path = line.split(" ", 2)
            if path in seen[h][site]:
                dups[h] += 1
            else:
                seen[h][site][path] = float(t)

    def lat(sub: str, sites: list[str], lo: float, hi: float) -> list[float]:
        out = []
        for s in sites:
            got = seen[sub][s]
            for p, t in closes[s].items():
                if lo <= t - t0 < hi and p in got:
                    out.append((got[p] - t) * 1000)
        return out

    def missing(sub: str, site: str) -> int:
        return sum(1 for p in closes[site] if p not in seen[sub][site])

    result: dict = {
        "run": run,
        "rate_per_site": args.rate,
        "schedule": {"warmup": warm, "steady": [warm, cut1], "cuts": events, "end": total},
        "cpu_s_in_steady_window": cpu,
        "steady_load": load,
        "idle_before_run_cores": idle_before,
        "central_head": central_head,
        "central_wanted": want,
        "duplicates": dups,
        "upstreams": sites_summary.get("upstreams"),
        "pushing_here": sites_summary.get("pushing_here"),
    }
    steady_r = {}
    for mode in ("pull", "push"):
        ss = [s for s in SITES if MODE[s] == mode]
        one = summary([x for s in ss for x in lat(s, [s], warm, cut1)])
        cen = summary(lat("central", ss, warm, cut1))
        steady_r[mode] = {
            "sites": ss,
            "one_hop": one,
            "central": cen,
            "ratio_p50": round(cen["p50_ms"] / one["p50_ms"], 3),
            "ratio_p99": round(cen["p99_ms"] / one["p99_ms"], 3),
        }
    result["steady"] = steady_r
    result["missing"] = {
        h: {s: missing(h, s) for s in (SITES if h == "central" else [h])} for h in seen
    }
    before = (cut1 - 10, cut1)
    cuts = {}
    for site, begin in (("site1", cut1), ("site3", cut3)):
        others = [s for s in SITES if s != site]
        window = (begin, begin + cut)
        after = (begin + cut, begin + cut + args.settle)
        own = sorted(lat("central", [site], *window))
        cuts[site] = {
            "others": others,
            "central_before": summary(lat("central", others, *before)),
            "central_during": summary(lat("central", others, *window)),
            "central_after_heal": summary(lat("central", others, *after)),
            "one_hop_before": summary([x for s in others for x in lat(s, [s], *before)]),
            "one_hop_during": summary([x for s in others for x in lat(s, [s], *window)]),
            "per_site_during": {s: summary(lat("central", [s], *window)) for s in others},
            # the cut site's own events closed while it was cut: when the central got them
            "cut_site_during": summary(own),
            "cut_site_last_arrival_after_heal_s": round(
                max(
                    (
                        seen["central"][site][p] - t0
                        for p, t in closes[site].items()
                        if window[0] <= t - t0 < window[1] and p in seen["central"][site]
                    ),
                    default=float("nan"),
                )
                - window[1],
                3,
            ),
        }
        c = cuts[site]
        c["ratio_during_p50"] = round(
            c["central_during"]["p50_ms"] / c["central_before"]["p50_ms"], 3
        )
        c["ratio_during_p99"] = round(
            c["central_during"]["p99_ms"] / c["central_before"]["p99_ms"], 3
        )
    result["cuts"] = cuts
    # Median latency per second of close time, per site, at the central and one hop away.
    result["timeline_p50_ms"] = {
        f"{sub}:{s}": [
            round(statistics.median(x), 1) if (x := lat(sub, [s], i, i + 1)) else None
            for i in range(int(total))
        ]
        for s in SITES
        for sub in ("central", s)
    }
    return result


def med(values: list[float]) -> str:
    v = sorted(values)
    return f"{statistics.median(v):.3g} [{v[0]:.3g}–{v[-1]:.3g}]"


def report(results: list[dict]) -> None:
    print("\nsteady, median [min–max] over runs (ms):")
    for mode in ("pull", "push"):
        rs = [r["steady"][mode] for r in results]
        print(
            f"  {mode:4}: one-hop p50 {med([x['one_hop']['p50_ms'] for x in rs])}, "
            f"p99 {med([x['one_hop']['p99_ms'] for x in rs])}; central p50 "
            f"{med([x['central']['p50_ms'] for x in rs])}, p99 "
            f"{med([x['central']['p99_ms'] for x in rs])}; ratio p50 "
            f"{med([x['ratio_p50'] for x in rs])}, p99 {med([x['ratio_p99'] for x in rs])}"
        )
    for site in ("site1", "site3"):
        rs = [r["cuts"][site] for r in results]
        print(
            f"  cut {site}: others at central p50 before "
            f"{med([x['central_before']['p50_ms'] for x in rs])} during "
            f"{med([x['central_during']['p50_ms'] for x in rs])}; p99 before "
            f"{med([x['central_before']['p99_ms'] for x in rs])} during "
            f"{med([x['central_during']['p99_ms'] for x in rs])} after heal "
            f"{med([x['central_after_heal']['p99_ms'] for x in rs])}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate", type=int, default=1000, help="file closes/s per site")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--steady", type=float, default=20.0)
    ap.add_argument("--cut", type=float, default=10.0)
    ap.add_argument("--settle", type=float, default=10.0, help="seconds after each heal")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.steady < 10:
        ap.error("--steady must be at least 10 (the before-cut window is its last 10 s)")
    results = []
    hosts = Hosts(["central", *SITES], prefix="fb", subnets=range(200, 250))  # not the tests'

    try:
        with tmpfs("4g") as base:
            for run in range(args.runs):
                r = one_run(base, hosts, run, args)
                results.append(r)
                print(json.dumps(r), flush=True)
    finally:
        hosts.close()
    report(results)
    if args.json:
        meta = {
            "machine": f"{os.cpu_count()} CPU, Linux {platform.release()}, Python "
            f"{platform.python_version()}",
            "date": time.strftime("%Y-%m-%d"),
            "argv": sys.argv[1:],
        }
        args.json.write_text(json.dumps({"meta": meta, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
