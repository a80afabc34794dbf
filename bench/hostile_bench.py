"""Hostile peers against a real relay: does it keep serving an honest agent and subscriber?

    .venv/bin/python bench/hostile_bench.py [--duration 60] [--per-kind 20] [--baseline 10]
        [--after 10] [--rate 20] [--kinds 1,2,...|NAME,...] [--out FILE] [--logs DIR]

One relay (its SQLite log on a private tmpfs, loopback, a config with tokens: an agent token for
site "honest", reader tokens, an agent token for site "evil", a relay token for relay
"evilrelay" allowed sites ["evil"], a JWT secret for readers, and, for kind 10, --per-kind
``[[upstream]]`` entries pointing at the attacker's servers), one real honest agent
(``storage-events-agent run --site honest --node n1 --token ...``) watching a tree in which a
writer closes --rate files/s, one SSE subscriber process (site=honest, type=IN_CLOSE_WRITE, its
own reader token; resumes with Last-Event-ID after a drop) that stamps each event on arrival,
and a probe process that GETs /healthz every 20 ms on a fresh connection, alternately without
and with a token. A second relay of the same build and config that nobody attacks (the control)
is probed the same way throughout, so what the machine's load alone does to /healthz is in the
same run.

Phases, one relay throughout: ``baseline`` (honest load only), ``attack`` (the same honest load
while one attacker process runs --per-kind connections of each hostile kind, each reconnecting
when closed), ``after`` (honest load only again: did the relay recover?). Each phase ends with a
drain (until every honest file arrived, at most --drain s). Reported per phase: /healthz latency
p50/p99/max (and failures), file close -> subscriber latency p50/p99/max and whether every file's
IN_CLOSE_WRITE arrived exactly once, relay CPU (/proc/PID/stat) and max RSS/fds, the relay log by
level; per hostile kind: attempts and how the relay answered (error frame / HTTP status / close
code / how long it held the connection), summarised. Ratios are attack / baseline of the same
run. Prints the command line and markdown tables for docs/benchmarks.md; --out writes JSON.

Hostile kinds (all from one asyncio process; big frames are built once):

 1 huge-frame       pre-auth: a 16 MiB binary first frame, a msgpack Batch of ~357,000 minimal
                    events, no hello, no token
 2 slow-hello       pre-auth: a WebSocket on /ingest that sends nothing (even slots), or drips a
                    hello frame one byte per second (odd slots)
 3 evil-agent       the "evil" agent token: hello with the honest agent's stream, with another
                    evil node's stream, seq jumps (+10**12, 2**63, 2**64-1, -1), old_path of 8
                    MiB, 500,000 (valid) flags, NUL in old_path, relative / `..` paths, raw_path
                    that disagrees with path, a newline in path
 4 evil-relay       the "evilrelay" relay token (sites ["evil"]) pushing events of site honest
                    (into the honest agent's own stream, and a new one), of site evil with seq
                    2**63 and 2**63-1, forged via/origin_id, via entries with newlines (a fake
                    log line; once with this relay's own name in via, which makes it log the
                    via), `<relay>.gap` and `honest.gap` streams, ids that go backwards
 5 cross-origin     Origin: http://attacker.example on /ingest (no token; the evil token), a
                    text/plain POST /api/v1/events/channels (no token; token in the URL), a CORS
                    preflight, GET /events with Host: attacker.example (no token; a token)
 6 slowloris        `GET /events HTTP/1.1\\r\\nHost: ...\\r\\n`, then one header byte every --drip s
 7 slow-reader      GET /events?since=earliest with a valid reader token, SO_RCVBUF 4 KiB, never
                    read (the TCP state is polled to see whether the relay closes it)
 8 bad-tokens       expired / unsigned / wrong-secret / no-exp / no-sub / not-yet-valid /
                    garbage JWTs, random bearer tokens, an agent token, on /events /sites /metrics
 9 channel-watches  a dCache channel per connection, subscriptions added back to back (up to
                    10,000 distinct paths per channel), the channel's SSE reconnected every 500
10 evil-upstream    --per-kind tiny servers the relay pulls ([[upstream]]): /healthz says
                    {"epoch": 1, "status": "ok"}, /events is one endless SSE line (`data: AAAA...`
                    at --upstream-rate bytes/s each, never a newline)

Disk pressure is out of scope (the tmpfs is large; its use is reported). Every process it starts
is stopped by pid, the tmpfs is unmounted; nothing machine-wide is changed. Needs root for the
tmpfs (without root: a plain temporary directory). Never run by the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import hashlib
import hmac
import json
import os
import platform
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
from harness import BIN, PACED, free_port, make_root, stop, tmpfs

REPO = Path(__file__).resolve().parent.parent
RELAY_NAME = "benchrelay"
MARKER = "INJECTED-BY-HOSTILE-BENCH"
# A log record of the relay's own text format, smuggled in after a newline.
FAKE_LINE = f"2026-01-01 00:00:00,000 CRITICAL storage_events.relay: {MARKER} relay taken over"
LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (DEBUG|INFO|WARNING|ERROR|"
    r"CRITICAL) (\S+): (.*)$"
)
MAX_FRAME = 16 * 1024 * 1024  # the relay's default max_frame (uvicorn ws_max_size)

KINDS = {
    1: ("huge-frame", "pre-auth 16 MiB Batch of ~357k minimal events, no hello"),
    2: ("slow-hello", "pre-auth WebSocket that sends nothing / drips a hello 1 byte/s"),
    3: ("evil-agent", "evil agent token: foreign streams, seq jumps, oversized and odd fields"),
    4: ("evil-relay", "evilrelay token: site honest, huge seq, forged via, newlines, .gap"),
    5: ("cross-origin", "Origin/Host of attacker.example on /ingest, channels, /events"),
    6: ("slowloris", "request head dripped one byte every few seconds"),
    7: ("slow-reader", "since=earliest with a reader token, 4 KiB rcvbuf, never read"),
    8: ("bad-tokens", "bad/expired/unsigned JWTs, random tokens on /events /sites /metrics"),
    9: ("channel-watches", "dCache channel, subscriptions back to back, SSE reconnects"),
    10: ("evil-upstream", "[[upstream]] servers sending one endless SSE line"),
}
SECRETS = ("honest", "honest-reader", "reader", "evil", "evilrelay", "jwt")


# -- small shared pieces ---------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores, kernel included)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted ``values``."""
    return values[min(len(values) - 1, max(0, -(-int(q * 1000) * len(values) // 1000) - 1))]


def dist(values: list[float], digits: int = 2) -> dict:
    v = sorted(values)
    if not v:
        return {"n": 0}
    return {
        "n": len(v),
        "p50": round(statistics.median(v), digits),
        "p99": round(pct(v, 0.99), digits),
        "max": round(v[-1], digits),
    }


def norm(text: str, limit: int = 160) -> str:
    """An answer reduced to its kind: long numbers and hex ids out, newlines shown."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    text = re.sub(r"(?=[0-9a-f]*[a-f])[0-9a-f]{12,}", "H", text)  # hex ids
    text = re.sub(r"\d[\d,_]{3,}", "N", text)
    return text if len(text) <= limit else text[:limit] + "…"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_hs256(claims: dict, key: str, header: dict | None = None) -> str:
    h = b64url(json.dumps(header or {"alg": "HS256", "typ": "JWT"}).encode())
    p = b64url(json.dumps(claims).encode())
    sig = hmac.new(key.encode(), f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{b64url(sig)}"


def hash_token(token: str) -> str:  # as relay/auth.py hashes them
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


# -- the honest subscriber and the probe: processes of their own -----------------------------

SUBSCRIBER = r"""
import json, signal, sys, time
import httpx
from storage_events.sse import SSEParser
url, token, out = sys.argv[1], sys.argv[2], sys.argv[3]
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
last, first = None, True
with open(out, "w") as f, httpx.Client(timeout=httpx.Timeout(10, read=None),
                                       trust_env=False) as c:
    while True:
        headers = {"Authorization": "Bearer " + token, "Accept": "text/event-stream"}
        params = {"type": "IN_CLOSE_WRITE", "site": "honest"}
        if last is not None:
            headers["Last-Event-ID"] = last
        else:
            params["since"] = "now"
        try:
            with c.stream("GET", url + "/events", params=params, headers=headers) as r:
                f.write(f"# {time.monotonic()} status {r.status_code}\n")
                f.flush()
                if first:
                    print(r.status_code, flush=True)
                    first = False
                if r.status_code != 200:
                    time.sleep(0.5)
                    continue
                parser = SSEParser()
                for chunk in r.iter_raw():
                    t = time.monotonic()
                    for m in parser.feed(chunk):
                        if m.event in ("inotify", "overflow"):
                            e = json.loads(m.data)
                            f.write(f"E {t} {m.event} {e['id']} {e['site']} {e['stream']} "
                                    f"{e['seq']} {json.dumps(e['path'])}\n")
                        else:
                            f.write(f"# {t} event {m.event} {m.data[:200]!r}\n")
                    last = parser.last_event_id or last
                    f.flush()
                f.write(f"# {time.monotonic()} ended\n")
        except httpx.HTTPError as e:
            f.write(f"# {time.monotonic()} dropped {type(e).__name__}: {e}\n")
            f.flush()
            if first:
                print(0, flush=True)
                first = False
            time.sleep(0.2)
"""

# One GET /healthz per interval, each on a fresh connection (as a health checker does), on the
# CLOCK_MONOTONIC schedule; alternately without and with a bearer token.
PROBE = r"""
import signal, socket, sys, time
port, token, out, interval = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
reqs = [b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
        + token.encode() + b"\r\nConnection: close\r\n\r\n"]
due, i = time.monotonic(), 0
with open(out, "w", buffering=1) as f:
    while True:
        t = time.monotonic()
        status = 0
        s = None
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(reqs[i % 2])
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else -1
        except socket.timeout:
            status = -2
        except OSError:
            status = -3
        finally:
            if s is not None:
                s.close()
        f.write(f"{t} {i % 2} {status} {(time.monotonic() - t) * 1000:.3f}\n")
        i += 1
        due += interval
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        else:
            due = now
"""


# -- the bench (main process) ----------------------------------------------------------------


@contextlib.contextmanager
def workdir(size: str) -> Iterator[Path]:
    if os.geteuid() == 0:
        with tmpfs(size) as base:
            yield base
    else:
        with tempfile.TemporaryDirectory(prefix="se-hostile-") as d:
            yield Path(d)


def sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.monotonic()))


class Bench:
    def __init__(self, args: argparse.Namespace, base: Path) -> None:
        self.args = args
        self.base = base
        self.procs: list[subprocess.Popen] = []
        self.logs: list = []
        self.secret = {k: secrets.token_urlsafe(32) for k in SECRETS}
        ports: set[int] = set()
        while len(ports) < 1 + (args.per_kind if 10 in args.kinds else 0):
            ports.add(free_port())
        self.port, *self.upstream_ports = sorted(ports)
        self.url = f"http://127.0.0.1:{self.port}"
        self.tree = base / "tree"
        self.samples: list[tuple[float, int, int, int]] = []  # t, rss KiB, fds, threads
        self.sampling = threading.Event()
        self.attacker: subprocess.Popen | None = None
        self.rss_exceeded = False
        self.honest_stream = ""
        self.raw: dict[str, dict] = {}  # phase name -> what phase() returned

    # processes

    def start(self, name: str, cmd: list, **kw) -> subprocess.Popen:
        log = open(self.base / f"{name}.log", "ab")  # noqa: SIM115 - closed in close()
        self.logs.append(log)
        p = subprocess.Popen(
            [str(c) for c in cmd], stdout=kw.pop("stdout", log), stderr=kw.pop("stderr", log), **kw
        )
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in reversed(self.procs):
            stop(p)
        for log in self.logs:
            log.close()

    def relay_config(self, upstreams: bool = True) -> str:
        s = self.secret

        def token(
            name: str,
            role: str,
            secret: str,
            site: str | None = None,
            sites: list[str] | None = None,
        ) -> str:
            lines = [
                "[[token]]",
                f'name = "{name}"',
                f'role = "{role}"',
                f'hash = "{hash_token(secret)}"',
            ]
            if site:
                lines.append(f'site = "{site}"')
            if sites is not None:
                lines.append(f"sites = {json.dumps(sites)}")
            return "\n".join(lines)

        parts = [
            f'name = "{RELAY_NAME}"',
            token("honest-agent", "agent", s["honest"], "honest"),
            token("honest-reader", "reader", s["honest-reader"]),
            token("reader", "reader", s["reader"]),
            token("evil-agent", "agent", s["evil"], "evil"),
            token("evilrelay", "relay", s["evilrelay"], "evilrelay", ["evil"]),
        ]
        for i, port in enumerate(self.upstream_ports if upstreams else ()):
            parts.append(f'[[upstream]]\nurl = "http://127.0.0.1:{port}"\nname = "evilup{i:02d}"')
        parts.append(f'[jwt]\nsecret = "{s["jwt"]}"')
        return "\n\n".join(parts) + "\n"

    def health(self, port: int | None = None) -> dict | None:
        try:
            r = httpx.get(
                f"http://127.0.0.1:{port or self.port}/healthz",
                timeout=2,
                trust_env=False,
                headers={"Authorization": f"Bearer {self.secret['honest-reader']}"},
            )
            return r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def wait(self, pred, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.relay.poll() is not None:
                raise RuntimeError(
                    f"the relay exited ({self.relay.returncode}) while waiting "
                    f"for {what}:\n{self.log_tail(40)}"
                )
            if pred():
                return
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for {what}")

    def log_tail(self, n: int) -> str:
        text = (self.base / "relay.log").read_bytes().decode(errors="replace")
        return "\n".join(text.splitlines()[-n:])

    def log_size(self) -> int:
        return (self.base / "relay.log").stat().st_size

    def set_up(self) -> None:
        for phase in ("baseline", "attack", "after"):
            make_root(self.tree, phase, 10)
        cfg = self.base / "relay.toml"
        cfg.write_text(self.relay_config())
        self.relay = self.start(
            "relay",
            [
                BIN / "storage-events-relay",
                "serve",
                "--config",
                cfg,
                "--listen",
                f"127.0.0.1:{self.port}",
                "--data",
                self.base / "relay-data",
            ],
        )
        self.wait(lambda: self.health() is not None, 30, "the relay's /healthz")
        self.version = (self.health() or {}).get("version")
        self.agent = self.start(
            "agent",
            [
                BIN / "storage-events-agent",
                "run",
                "--relay",
                self.url,
                "--site",
                "honest",
                "--node",
                "n1",
                "--token",
                self.secret["honest"],
                "--spool",
                self.base / "spool",
                self.tree,
            ],
        )
        agent_log = self.base / "agent.log"
        self.wait(
            lambda: b"publishing stream" in agent_log.read_bytes() or self.agent.poll() is not None,
            60,
            "the agent's start-up",
        )
        if self.agent.poll() is not None:
            raise RuntimeError(f"the agent exited:\n{agent_log.read_text(errors='replace')}")
        m = re.search(rb"publishing stream (\S+)", agent_log.read_bytes())
        self.honest_stream = m.group(1).decode() if m else ""
        self.wait(lambda: (self.health() or {}).get("agents", 1) >= 1, 30, "the agent to connect")
        self.sub_out = self.base / "subscriber.txt"
        self.sub = self.start(
            "subscriber",
            [
                sys.executable,
                "-c",
                SUBSCRIBER,
                self.url,
                self.secret["honest-reader"],
                self.sub_out,
            ],
            stdout=subprocess.PIPE,
        )
        assert self.sub.stdout is not None
        status = self.sub.stdout.readline().strip()
        if status != b"200":
            raise RuntimeError(f"the honest subscriber got HTTP {status!r}")
        self.probe_out = self.base / "probe.txt"
        self.start(
            "probe",
            [
                sys.executable,
                "-c",
                PROBE,
                self.port,
                self.secret["honest-reader"],
                self.probe_out,
                self.args.probe,
            ],
        )
        # The peer in the same run: the same build and config, on the same machine, that no
        # one attacks. What its /healthz suffers is the machine's load, not the attacks'.
        control_cfg = self.base / "control.toml"
        control_cfg.write_text(self.relay_config(upstreams=False))
        self.control_port = free_port()
        self.control = self.start(
            "control",
            [
                BIN / "storage-events-relay",
                "serve",
                "--config",
                control_cfg,
                "--listen",
                f"127.0.0.1:{self.control_port}",
                "--data",
                self.base / "control-data",
            ],
        )
        self.wait(
            lambda: self.health(self.control_port) is not None, 30, "the control relay's /healthz"
        )
        self.control_out = self.base / "control-probe.txt"
        self.start(
            "control-probe",
            [
                sys.executable,
                "-c",
                PROBE,
                self.control_port,
                self.secret["honest-reader"],
                self.control_out,
                self.args.probe,
            ],
        )
        threading.Thread(target=self.sample, daemon=True).start()
        time.sleep(1.0)

    def sample(self) -> None:
        pid = self.relay.pid
        while not self.sampling.is_set():
            try:
                st = proc_status(pid)
                fds = len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, ValueError):
                return
            self.samples.append((time.monotonic(), st.get("VmRSS", 0), fds, st.get("Threads", 0)))
            if st.get("VmRSS", 0) > self.args.rss_limit * 1024 and not self.rss_exceeded:
                self.rss_exceeded = True
                if self.attacker is not None and self.attacker.poll() is None:
                    self.attacker.send_signal(signal.SIGTERM)  # it stops and reports
            time.sleep(0.25)

    def start_attacker(self) -> subprocess.Popen:
        spec = {
            "port": self.port,
            "per_kind": self.args.per_kind,
            "kinds": sorted(self.args.kinds),
            "duration": self.args.duration,
            "pause": self.args.pause,
            "drip": self.args.drip,
            "upstream_ports": self.upstream_ports,
            "upstream_rate": self.args.upstream_rate,
            "tokens": self.secret,
            "honest_stream": self.honest_stream or "n1:unknown",
            "honest_root": str(self.tree / "attack"),
            "relay_name": RELAY_NAME,
            "out": str(self.base / "attacker.json"),
        }
        path = self.base / "attacker-spec.json"
        path.write_text(json.dumps(spec))
        # Remote attackers cost the relay's host nothing; one on the same two cores does, so
        # it may run at a lower priority (--attacker-nice) to stand in for them.
        nice = ["nice", "-n", str(self.args.attacker_nice)] if self.args.attacker_nice else []
        p = self.start(
            "attacker",
            [*nice, sys.executable, Path(__file__).resolve(), "--attacker", path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert p.stdout is not None
        line = p.stdout.readline().strip()
        if line != b"ready":
            raise RuntimeError(
                "the attacker did not start: "
                + (self.base / "attacker.log").read_text(errors="replace")[-3000:]
            )
        return p

    def arrivals(self) -> list[tuple[float, str, int, str, str, int, str]]:
        out = []
        for line in self.sub_out.read_bytes().decode(errors="replace").split("\n")[:-1]:
            if line.startswith("E "):
                _, t, kind, eid, site, stream, seq, path = line.split(" ", 7)
                out.append((float(t), kind, int(eid), site, stream, int(seq), json.loads(path)))
        return out

    def phase(self, name: str, secs: float) -> dict:
        args = self.args
        attack = name == "attack"
        root = self.tree / name
        if attack:
            self.attacker = self.start_attacker()
        t0 = time.monotonic() + 0.5
        if self.attacker is not None and attack:
            assert self.attacker.stdin is not None
            self.attacker.stdin.write(f"{t0}\n".encode())
            self.attacker.stdin.flush()
        writer = subprocess.Popen(
            [sys.executable, "-c", PACED, str(root), str(args.rate), str(secs), str(t0)],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(writer)
        sleep_until(t0)
        cpu0, busy0, log0 = cpu_seconds(self.relay.pid), machine_busy(), self.log_size()
        sleep_until(t0 + secs)
        alive = self.relay.poll() is None
        cpu1 = cpu_seconds(self.relay.pid) if alive else cpu0
        busy1, log1 = machine_busy(), self.log_size()
        out, _ = writer.communicate(timeout=secs + 60)
        closes = {p: float(t) for p, t in (ln.rsplit(" ", 1) for ln in out.splitlines())}
        attacker = None
        if attack and self.attacker is not None:
            try:
                self.attacker.wait(60)
            except subprocess.TimeoutExpired:
                self.attacker.kill()
                self.attacker.wait()
            with contextlib.suppress(OSError, ValueError):
                attacker = json.loads((self.base / "attacker.json").read_text())
        # Drain: until every file arrived, at most --drain s.
        drained = time.monotonic()
        while time.monotonic() - drained < args.drain and self.relay.poll() is None:
            seen = {a[6] for a in self.arrivals() if a[3] == "honest"}
            if all(p in seen for p in closes):
                break
            time.sleep(0.25)
        t_end = time.monotonic()
        return {
            "name": name,
            "t0": t0,
            "t1": t0 + secs,
            "t_end": t_end,
            "seconds": secs,
            "drain_s": round(t_end - drained, 2),
            "closes": closes,
            "relay_cpu_s": cpu1 - cpu0,
            "machine_busy_s": busy1 - busy0,
            "log": (log0, log1, self.log_size()),
            "attacker": attacker,
            "relay_alive": self.relay.poll() is None,
        }

    def shutdown(self) -> dict:
        self.sampling.set()
        hwm = 0
        with contextlib.suppress(OSError):
            hwm = proc_status(self.relay.pid).get("VmHWM", 0)
        data_mib = (
            sum(f.stat().st_size for f in (self.base / "relay-data").rglob("*") if f.is_file())
            / 2**20
        )
        for p in self.procs:
            if p is not self.relay and p is not self.agent:
                stop(p)
        stop(self.agent)
        t = time.monotonic()
        stop(self.relay)
        return {
            "relay_exit": self.relay.returncode,
            "relay_stop_s": round(time.monotonic() - t, 2),
            "relay_vmhwm_mib": round(hwm / 1024, 1),
            "relay_data_mib": round(data_mib, 1),
        }

    # analysis

    @staticmethod
    def probes(path: Path, lo: float, hi: float) -> list[tuple[int, int, float]]:
        """(with a token?, HTTP status, ms) of the probes made between lo and hi."""
        out = []
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 4 and lo <= float(parts[0]) < hi:
                out.append((int(parts[1]), int(parts[2]), float(parts[3])))
        return out

    def analyse(self, ph: dict) -> dict:
        lo, hi = ph["t0"], ph["t1"]
        probes = self.probes(self.probe_out, lo, hi)
        control = [ms for _, _, ms in self.probes(self.control_out, lo, hi)]
        lat = [ms for _, _, ms in probes]
        failed = collections.Counter(str(s) for _, s, _ in probes if s != 200)
        closes = ph["closes"]
        written = set().union(*(p["closes"] for p in self.raw.values()))
        arrivals = self.arrivals()
        per_path: dict[str, list[float]] = collections.defaultdict(list)
        forged = overflow = 0
        for t, kind, _, site, stream, _, path in arrivals:
            if site != "honest":
                continue
            if kind == "overflow":
                overflow += lo <= t <= ph["t_end"]
            elif path in closes:
                per_path[path].append(t)
            elif path not in written or stream != self.honest_stream:
                forged += lo <= t <= ph["t_end"]
        delivery = [(min(per_path[p]) - t) * 1000 for p, t in closes.items() if per_path.get(p)]
        rss = [s[1] for s in self.samples if lo <= s[0] <= hi]
        fds = [s[2] for s in self.samples if lo <= s[0] <= hi]
        threads = [s[3] for s in self.samples if lo <= s[0] <= hi]
        wall = hi - lo
        return {
            "seconds": ph["seconds"],
            "drain_s": ph["drain_s"],
            "relay_alive": ph["relay_alive"],
            "healthz_ms": dist(lat),
            "control_healthz_ms": dist(control),
            "healthz_no_token_ms": dist([m for v, _, m in probes if v == 0]),
            "healthz_token_ms": dist([m for v, _, m in probes if v == 1]),
            "healthz_probes": len(probes),
            "healthz_failed": dict(failed),
            # closed loop: a slow answer delays the next probe, so fewer are made than planned
            "healthz_scheduled": int(wall / self.args.probe),
            "healthz_over_50ms": sum(1 for ms in lat if ms > 50),
            "files": len(closes),
            "exactly_once": sum(1 for p in closes if len(per_path.get(p, ())) == 1),
            "missing": sum(1 for p in closes if not per_path.get(p)),
            "late": sum(1 for p in closes if per_path.get(p) and min(per_path[p]) > ph["t_end"]),
            "duplicated": sum(1 for p in closes if len(per_path.get(p, ())) > 1),
            "forged_honest_events_seen": forged,
            "overflow_events_seen": overflow,
            "delivery_ms": dist(delivery, 1),
            "relay_cpu_s": round(ph["relay_cpu_s"], 2),
            "relay_cpu_cores": round(ph["relay_cpu_s"] / wall, 3),
            "machine_busy_cores": round(ph["machine_busy_s"] / wall, 2),
            "relay_rss_max_mib": round(max(rss) / 1024, 1) if rss else None,
            "relay_fds_max": max(fds) if fds else None,
            "relay_threads_max": max(threads) if threads else None,
        }


# -- the relay's log -------------------------------------------------------------------------


def read_log(path: Path, start: int, end: int) -> list[str]:
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(max(0, end - start))
    return data.decode(errors="replace").split("\n")


def log_summary(lines: list[str]) -> dict:
    levels: collections.Counter[str] = collections.Counter()
    messages: collections.Counter[str] = collections.Counter()
    tracebacks: list[list[str]] = []
    continuation = injected = 0
    current: list[str] | None = None
    for line in lines:
        if not line:
            continue
        m = LOG_LINE.match(line)
        if m:
            current = None
            levels[m.group(2)] += 1
            if MARKER in line and line.startswith(FAKE_LINE[:30]):
                injected += 1
            messages[f"{m.group(2)} {norm(m.group(4), 140)}"] += 1
            continue
        continuation += 1
        if line.startswith("Traceback (most recent call last)"):
            current = [line[:300]]
            tracebacks.append(current)
        elif current is not None and len(current) < 80:
            current.append(line[:300])
    return {
        "levels": dict(levels),
        "continuation_lines": continuation,
        "tracebacks": len(tracebacks),
        "injected_records": injected,
        "top_messages": messages.most_common(15),
        "first_tracebacks": ["\n".join(tb) for tb in tracebacks[:2]],
        "traceback_kinds": collections.Counter(tb[-1] for tb in tracebacks).most_common(8),
    }


# -- the attacker (a process of its own: `hostile_bench.py --attacker SPEC`) ----------------


class Tally:
    def __init__(self, name: str) -> None:
        self.name = name
        self.attempts = 0
        self.open_at_end = 0
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.durations: list[float] = []
        self.values: dict[str, list[float]] = collections.defaultdict(list)

    def add(self, outcome: str, seconds: float) -> None:
        self.outcomes[outcome] += 1
        self.durations.append(seconds)

    def report(self) -> dict:
        return {
            "name": self.name,
            "attempts": self.attempts,
            "open_at_end": self.open_at_end,
            "outcomes": dict(self.outcomes.most_common()),
            "attempt_seconds": dist(self.durations),
            "values": {k: dist(v) for k, v in sorted(self.values.items())},
        }


class Attack:
    def __init__(self, spec: dict) -> None:
        import msgspec

        from storage_events import wire

        self.wire = wire
        self.msgspec = msgspec
        self.spec = spec
        self.port = spec["port"]
        self.ws_url = f"ws://127.0.0.1:{self.port}/ingest"
        self.http = f"http://127.0.0.1:{self.port}"
        self.tok = spec["tokens"]
        self.pause = spec["pause"]
        self.deadline = float("inf")
        self.stopping = asyncio.Event()
        self.tally = {k: Tally(KINDS[k][0]) for k in spec["kinds"]}
        self.state: dict[tuple[int, int], dict] = {}
        self.handlers: set[asyncio.Task] = set()
        self.first_pull: float | None = None
        self.t0 = 0.0
        self.build()

    # frames, built once

    def build(self) -> None:
        ms = self.msgspec
        minimal = {
            "site": "e",
            "node": "n",
            "path": "/",
            "flags": [],
            "ts": 0,
            "stream": "s",
            "seq": 1,
        }
        each = len(ms.msgpack.encode(minimal))
        n = (MAX_FRAME - 32) // each
        self.huge = ms.msgpack.encode({"type": "batch", "events": [minimal] * n})
        self.huge_events = n
        assert len(self.huge) <= MAX_FRAME, len(self.huge)
        base = {"site": "evil", "node": "big", "path": "/hostile/big", "ts": time.time_ns()}
        self.old_path_8m = self.template(
            {
                **base,
                "flags": ["IN_MOVED_TO"],
                "cookie": 1,
                "old_path": "/" + "a" * (8 << 20),
                "stream": "big:oldpath",
            }
        )
        self.flags_500k = self.template(
            {**base, "flags": ["IN_CLOSE_WRITE"] * 500_000, "stream": "big:flags"}
        )
        now = int(time.time())
        key = self.tok["jwt"]
        unsigned = (
            b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
            + "."
            + b64url(json.dumps({"sub": "bench", "exp": now + 3600}).encode())
            + "."
        )
        self.bad_tokens = [
            ("jwt-expired", jwt_hs256({"sub": "bench", "exp": now - 3600}, key)),
            ("jwt-without-exp", jwt_hs256({"sub": "noexp"}, key)),
            ("jwt-wrong-secret", jwt_hs256({"sub": "bench", "exp": now + 3600}, "not-it")),
            ("jwt-alg-none", unsigned),
            (
                "jwt-not-yet-valid",
                jwt_hs256({"sub": "bench", "exp": now + 7200, "nbf": now + 3600}, key),
            ),
            ("jwt-without-sub", jwt_hs256({"exp": now + 3600}, key)),
            (
                "jwt-bad-claims",
                jwt_hs256({"sub": "bench", "exp": now + 3600, "sites": "all", "paths": 7}, key),
            ),
            (
                "jwt-garbage",
                "eyJ"
                + secrets.token_urlsafe(30)
                + "."
                + secrets.token_urlsafe(60)
                + "."
                + secrets.token_urlsafe(40),
            ),
            (
                "jwt-6KiB-claims",
                jwt_hs256(
                    {
                        "sub": "bench",
                        "exp": now + 3600,
                        "paths": [f"/p{i}/" + "a" * 90 for i in range(50)],
                    },
                    key,
                ),
            ),
            ("random-token", secrets.token_urlsafe(32)),
            ("random-token-4KiB", secrets.token_urlsafe(3072)),
            ("agent-token", self.tok["evil"]),
        ]
        self.xorigin_jwt = jwt_hs256({"sub": "xorigin", "exp": now + 86400}, key)
        self.upstream_chunk = b"A" * 65536

    def template(self, event: dict) -> bytes:
        """A batch of one event whose seq (its last key, a uint64: the frame's last 8 bytes)
        can be set without encoding the rest again."""
        frame = self.msgspec.msgpack.encode(
            {"type": "batch", "events": [{**event, "seq": 1 << 40}]}
        )
        assert frame[-9] == 0xCF
        return frame[:-8]

    @staticmethod
    def patched(prefix: bytes, seq: int) -> bytes:
        return prefix + seq.to_bytes(8, "big")

    def over(self) -> bool:
        return self.stopping.is_set() or time.monotonic() >= self.deadline

    def event(self, site: str, node: str, stream: str, seq: int, **kw):
        kw.setdefault("path", "/hostile/file")
        kw.setdefault("flags", ["IN_CLOSE_WRITE"])
        return self.wire.Event(
            site=site, node=node, stream=stream, seq=seq, ts=time.time_ns(), **kw
        )

    def batch(self, *events) -> bytes:
        return self.wire.encode_frame(self.wire.Batch(list(events)))

    def hello(self, site: str, node: str, stream: str, token: str | None, role: str = "agent"):
        return self.wire.encode_frame(
            self.wire.Hello(role=role, site=site, node=node, stream=stream, token=token)
        )

    # WebSocket plumbing

    def connect(self, **kw):
        import websockets

        return websockets.connect(
            self.ws_url,
            max_size=None,
            compression=None,
            proxy=None,
            open_timeout=10,
            ping_interval=None,
            close_timeout=2,
            **kw,
        )

    def describe(self, msg: bytes | str) -> str:
        wire = self.wire
        if isinstance(msg, str):
            return f"text frame {norm(msg, 60)!r}"
        try:
            m = wire.decode_to_agent(msg)
        except Exception:
            return f"undecodable frame of {len(msg)} bytes"
        if isinstance(m, wire.Error):
            return f"error: {norm(m.message)}"
        if isinstance(m, wire.Ack):
            return f"ack {m.seq}"
        return f"welcome acked={m.acked}"

    async def replies(self, ws, wait: float, until_ack: bool = False) -> str:
        """What the relay sends until it closes (or ``wait`` s; or its first ack)."""
        import websockets

        frames: list[str] = []
        try:
            async with asyncio.timeout(wait):
                async for msg in ws:
                    frames.append(self.describe(msg))
                    if until_ack and frames[-1].startswith("ack"):
                        return "; ".join(frames[:3])
        except TimeoutError:
            return "; ".join([*frames[:3], f"still open after {wait:.0f} s"])
        except websockets.ConnectionClosed:
            pass
        code, reason = ws.close_code, norm(ws.close_reason or "", 60)
        if any(reason.rstrip("…")[:40] in f for f in frames):
            reason = ""  # the error frame said it already
        frames.append(f"[close {code}{' ' + reason if reason else ''}]")
        return "; ".join(frames[:4])

    async def publish(self, hello: bytes, batch, until_ack: bool = True, **kw) -> str:
        """hello, then ``batch(acked)`` -> (frame, top seq) once welcomed: the answer."""
        wire = self.wire
        async with self.connect(**kw) as ws:
            await ws.send(hello)
            first = await asyncio.wait_for(ws.recv(), 15)
            try:
                welcome = wire.decode_to_agent(first) if isinstance(first, bytes) else None
            except Exception:
                welcome = None
            if not isinstance(welcome, wire.Welcome):
                return (
                    "refused at hello: " + self.describe(first) + "; " + await self.replies(ws, 5)
                )
            frame, top = batch(welcome.acked)
            await ws.send(frame)
            answer = await self.replies(ws, 15, until_ack=until_ack)
            m = re.match(r"ack (-?\d+)", answer)
            if m and top is not None:
                return (
                    "acked (stored)"
                    if int(m.group(1)) >= top
                    else "ack below the sent seq (not stored)"
                )
            return answer


def failure(e: BaseException) -> str:
    import websockets

    if isinstance(e, websockets.InvalidStatus):
        return f"HTTP {e.response.status_code} at the WebSocket handshake"
    if isinstance(e, websockets.ConnectionClosed):
        code = e.rcvd.code if e.rcvd else None
        reason = e.rcvd.reason if e.rcvd else ""
        return f"closed before an answer [close {code}{' ' + norm(reason, 60) if reason else ''}]"
    if isinstance(e, TimeoutError | httpx.TimeoutException):
        return f"timed out ({type(e).__name__})"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, OSError):
        return f"{type(e).__name__}: {norm(e.strerror or str(e), 80)}"
    if isinstance(e, httpx.HTTPError):
        return f"{type(e).__name__}: {norm(str(e), 80)}"
    return f"{type(e).__name__}: {norm(str(e), 100)}"


def held(seconds: float) -> str:
    """Held-time buckets, for grouping answers."""
    for edge in (1, 2, 5, 10, 15, 20, 30, 45, 60, 90):
        if seconds < edge:
            return f"< {edge} s"
    return ">= 90 s"


# kind 1
async def huge_frame(a: Attack, i: int, n: int) -> str:
    async with a.connect() as ws:
        await ws.send(a.huge)
        return await a.replies(ws, 30)


# kind 2
async def slow_hello(a: Attack, i: int, n: int) -> str:
    t = time.monotonic()
    if i % 2 == 0:
        async with a.connect() as ws:
            answer = await a.replies(ws, 600)
        return f"silent: {answer}, held {held(time.monotonic() - t)}"
    reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
    try:
        key = base64.b64encode(os.urandom(16))
        writer.write(
            b"GET /ingest HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n" % (a.port, key)
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
        status = head.split(b" ", 2)[1].decode(errors="replace")
        if status != "101":
            return f"drip: HTTP {status} at the handshake"
        frame = client_frame(a.hello("evil", f"drip{i}", f"drip{i}:1", a.tok["evil"]))
        got, k = b"", 0
        with contextlib.suppress(ConnectionError):
            while True:
                if k < len(frame):
                    writer.write(frame[k : k + 1])
                    k += 1
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), 1.0)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                got += chunk
                if any(op == 8 for op, _ in server_frames(got)):
                    break  # the relay's close frame: it has answered
        answer = (
            "; ".join(a.describe(p) if op == 2 else close_text(p) for op, p in server_frames(got))
            or "nothing"
        )
        return f"drip: {answer}, held {held(time.monotonic() - t)} ({k} of {len(frame)} bytes)"
    finally:
        writer.close()


def client_frame(payload: bytes, opcode: int = 2) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[j % 4] for j, b in enumerate(payload))


def server_frames(buf: bytes) -> list[tuple[int, bytes]]:
    out, i = [], 0
    while i + 2 <= len(buf):
        op, n, j = buf[i] & 0x0F, buf[i + 1] & 0x7F, i + 2
        if n == 126:
            n, j = int.from_bytes(buf[j : j + 2], "big"), j + 2
        elif n == 127:
            n, j = int.from_bytes(buf[j : j + 8], "big"), j + 8
        if j + n > len(buf):
            break
        out.append((op, buf[j : j + n]))
        i = j + n
    return out


def close_text(payload: bytes) -> str:
    if len(payload) < 2:
        return "[close]"
    reason = payload[2:].decode(errors="replace")
    return f"[close {int.from_bytes(payload[:2], 'big')}{' ' + norm(reason, 60) if reason else ''}]"


# kind 3
EVIL_AGENT = [
    "hijack-honest-stream",
    "other-node-stream",
    "seq-jump-1e12",
    "seq-2^63",
    "seq-2^64-1",
    "seq-negative",
    "old_path-8MiB",
    "flags-500k",
    "nul-old_path",
    "relative-path",
    "dotdot-path",
    "raw_path-mismatch",
    "newline-path",
]


async def variant_of(names: list[str], k: int, run: Callable[[str], Awaitable[str]]) -> str:
    """The k-th variant of an attack (they take turns), and how it was answered."""
    variant = names[k % len(names)]
    try:
        return f"{variant}: {await run(variant)}"
    except Exception as e:
        return f"{variant}: {failure(e)}"


def slug(variant: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", variant)


async def evil_agent(a: Attack, i: int, n: int) -> str:
    return await variant_of(EVIL_AGENT, i + n, lambda v: _evil_agent(a, i, n, v))


async def _evil_agent(a: Attack, i: int, n: int, variant: str) -> str:
    tok, ev = a.tok["evil"], a.event
    node = f"e{i}-{slug(variant)}"
    stream = f"{node}:1"  # <node>:<run id>, as agents name theirs
    hello = a.hello("evil", node, stream, tok)

    def one(**kw):
        return lambda acked: (a.batch(ev("evil", node, stream, acked + 1, **kw)), acked + 1)

    if variant == "hijack-honest-stream":  # node n1 of site evil, the honest n1's stream
        honest = a.spec["honest_stream"]
        answer = await a.publish(
            a.hello("evil", "n1", honest, tok),
            lambda acked: (a.batch(ev("evil", "n1", honest, acked + 1)), acked + 1),
        )
    elif variant == "other-node-stream":
        shared = f"b{i}:1"  # node b{i} starts it, then node a{i} says it is its own
        await a.publish(
            a.hello("evil", f"b{i}", shared, tok),
            lambda acked: (a.batch(ev("evil", f"b{i}", shared, acked + 1)), None),
        )
        answer = await a.publish(
            a.hello("evil", f"a{i}", shared, tok),
            lambda acked: (a.batch(ev("evil", f"a{i}", shared, acked + 1)), acked + 1),
        )
    elif variant == "seq-jump-1e12":
        answer = await a.publish(
            hello, lambda acked: (a.batch(ev("evil", node, stream, acked + 10**12)), acked + 10**12)
        )
    elif variant in ("seq-2^63", "seq-2^64-1", "seq-negative"):
        seq = {"seq-2^63": 2**63, "seq-2^64-1": 2**64 - 1, "seq-negative": -1}[variant]
        answer = await a.publish(hello, lambda acked: (a.batch(ev("evil", node, stream, seq)), seq))
    elif variant in ("old_path-8MiB", "flags-500k"):
        prefix = a.old_path_8m if variant == "old_path-8MiB" else a.flags_500k
        big = "big:oldpath" if variant == "old_path-8MiB" else "big:flags"
        answer = await a.publish(
            a.hello("evil", "big", big, tok),
            lambda acked: (a.patched(prefix, acked + 1), acked + 1),
        )
    elif variant == "nul-old_path":
        answer = await a.publish(
            hello, one(flags=["IN_MOVED_TO"], cookie=1, old_path="/hostile/a\0b")
        )
    elif variant == "relative-path":
        answer = await a.publish(hello, one(path="relative/file"))
    elif variant == "dotdot-path":
        answer = await a.publish(hello, one(path="/hostile/../../etc/passwd"))
    elif variant == "raw_path-mismatch":
        answer = await a.publish(hello, one(path="/hostile/ok.txt", raw_path=b"/etc/shadow\xff"))
    else:  # newline-path
        answer = await a.publish(hello, one(path=f"/hostile/x\n{FAKE_LINE}"))
    return answer


# kind 4
EVIL_RELAY = [
    "site-honest-stream",
    "site-honest-new-stream",
    "evil-seq-2^63",
    "evil-seq-2^63-1",
    "forged-via-origin",
    "via-newline-loop",
    "via-newline",
    "newline-path",
    "gap-stream-evilrelay",
    "honest.gap-as-honest",
    "honest.gap-as-evil",
    "id-regress",
]


async def evil_relay(a: Attack, i: int, n: int) -> str:
    return await variant_of(EVIL_RELAY, i + n, lambda v: _evil_relay(a, i, n, v))


async def _evil_relay(a: Attack, i: int, n: int, variant: str) -> str:
    me = a.spec["relay_name"]
    hello = a.hello(
        "evilrelay", "evilrelay", f"relay:evilrelay:{i + 1}", a.tok["evilrelay"], role="relay"
    )

    def ev(
        eid: int,
        site: str,
        stream: str,
        seq: int,
        via: list[str] | None = None,
        node: str = "r1",
        **kw,
    ):
        kw.setdefault("path", "/hostile/relayed")
        kw.setdefault("origin_id", eid)  # as a relay that stored it first would say
        return a.event(site, node, stream, seq, id=eid, via=via or ["evilrelay"], **kw)

    s = f"r1:{i}-{slug(variant)}"  # a stream of node r1, as its agent would name it
    seq = 10**12 + n
    make = {
        "site-honest-stream": lambda c: [
            ev(
                c + 1,
                "honest",
                a.spec["honest_stream"],
                10**12,
                node="n1",
                path=a.spec["honest_root"] + "/forged",
            )
        ],
        "site-honest-new-stream": lambda c: [
            ev(c + 1, "honest", "forged:1", n + 1, node="n1", path="/forged/new-stream")
        ],
        "evil-seq-2^63": lambda c: [ev(c + 1, "evil", s, 2**63)],
        "evil-seq-2^63-1": lambda c: [ev(c + 1, "evil", s, 2**63 - 1)],
        "forged-via-origin": lambda c: [
            ev(c + 1, "evil", s, n + 1, origin_id=1, via=["cern", "desy-central", "evilrelay"])
        ],
        "via-newline-loop": lambda c: [
            ev(c + 1, "evil", s, n + 1, via=[f"evil\n{FAKE_LINE}", me, "evilrelay"])
        ],
        "via-newline": lambda c: [
            ev(c + 1, "evil", s, n + 1, via=[f"evil\n{FAKE_LINE}", "evilrelay"])
        ],
        "newline-path": lambda c: [ev(c + 1, "evil", s, n + 1, path=f"/hostile/\n{FAKE_LINE}")],
        "gap-stream-evilrelay": lambda c: [
            ev(
                c + 1,
                "evilrelay",
                "evilrelay.gap",
                seq,
                node="evilrelay",
                path="/",
                flags=["IN_Q_OVERFLOW"],
                is_dir=True,
            )
        ],
        "honest.gap-as-honest": lambda c: [
            ev(
                c + 1,
                "honest",
                "honest.gap",
                seq,
                node="honest",
                path="/",
                flags=["IN_Q_OVERFLOW"],
                is_dir=True,
            )
        ],
        "honest.gap-as-evil": lambda c: [
            ev(
                c + 1,
                "evil",
                "honest.gap",
                seq,
                node="honest",
                path="/",
                flags=["IN_Q_OVERFLOW"],
                is_dir=True,
            )
        ],
        "id-regress": lambda c: [ev(c + 2, "evil", s, 2 * n + 1), ev(c + 1, "evil", s, 2 * n + 2)],
    }[variant]

    def batch(acked: int) -> tuple[bytes, None]:
        return a.batch(*make(acked)), None

    answer = await a.publish(hello, batch)
    return "acked" if answer.startswith("ack ") else answer


# kind 5
XORIGIN = [
    "ws-origin-no-token",
    "ws-origin-evil-token",
    "post-channel-no-token",
    "post-channel-token-in-url",
    "options-preflight",
    "events-host-attacker-no-token",
    "events-host-attacker-token",
]
ATTACKER_ORIGIN = "http://attacker.example"


async def cross_origin(a: Attack, i: int, n: int) -> str:
    return await variant_of(XORIGIN, i + n, lambda v: _cross_origin(a, i, v))


async def _cross_origin(a: Attack, i: int, variant: str) -> str:
    if variant.startswith("ws-origin"):
        site, token = (
            ("honest", None) if variant == "ws-origin-no-token" else ("evil", a.tok["evil"])
        )
        node = f"xo{i}"
        stream = f"{node}:1"
        return await a.publish(
            a.hello(site, node, stream, token),
            lambda acked: (a.batch(a.event(site, node, stream, acked + 1)), acked + 1),
            origin=ATTACKER_ORIGIN,
        )
    async with httpx.AsyncClient(
        timeout=15, trust_env=False, limits=httpx.Limits(max_keepalive_connections=0)
    ) as c:
        origin = {"Origin": ATTACKER_ORIGIN}
        channels = a.http + "/api/v1/events/channels"
        if variant.startswith("post-channel"):
            params = {"access_token": a.xorigin_jwt} if variant.endswith("url") else None
            r = await c.post(
                channels,
                params=params,
                content=b'{"client-id": "xo"}',
                headers={**origin, "Content-Type": "text/plain"},
            )
            extra = ""
            if r.status_code == 201 and r.headers.get("location"):
                d = await c.delete(
                    r.headers["location"], headers={"Authorization": f"Bearer {a.xorigin_jwt}"}
                )
                extra = f" (deleted after: {d.status_code})"
        elif variant == "options-preflight":
            r = await c.request(
                "OPTIONS",
                channels,
                headers={
                    **origin,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization,content-type",
                },
            )
            extra = ""
        else:
            headers = {"Host": "attacker.example", "Accept": "text/event-stream"}
            if variant == "events-host-attacker-token":
                headers["Authorization"] = f"Bearer {a.xorigin_jwt}"
            async with c.stream("GET", a.http + "/events", headers=headers) as r:
                pass
            extra = ""
        acao = r.headers.get("access-control-allow-origin")
        return f"HTTP {r.status_code}{extra}" + (
            f", Access-Control-Allow-Origin: {acao}" if acao else ""
        )


# kind 6
async def slowloris(a: Attack, i: int, n: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
    t = time.monotonic()
    got, k, how = b"", 0, "closed"
    try:
        writer.write(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        drip = b"X-Hostile-Bench-" + b"a" * 100_000
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), a.spec["drip"])
                except TimeoutError:
                    writer.write(drip[k : k + 1])
                    k += 1
                    continue
                if not chunk:
                    break
                got += chunk
        except ConnectionError:
            how = "reset"
    finally:
        writer.close()
    status = got.split(b"\r\n", 1)[0].decode(errors="replace") if got else "no response"
    return f"{how} by the relay after {held(time.monotonic() - t)} ({norm(status, 60)})"


# kind 7
async def slow_reader(a: Attack, i: int, n: int) -> str:
    loop = asyncio.get_running_loop()
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
        await loop.sock_connect(s, ("127.0.0.1", a.port))
        await loop.sock_sendall(
            s,
            (
                "GET /events?since=earliest HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {a.tok['reader']}\r\nAccept: text/event-stream\r\n\r\n"
            ).encode(),
        )
        t = time.monotonic()
        while True:  # never read: only look at the TCP state (1 established, 7 closed,
            await asyncio.sleep(1.0)  # 8 close-wait: the relay sent FIN)
            state = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
            if state != 1:
                break
        try:
            head = s.recv(256)
        except OSError:
            head = b""
        status = head.split(b"\r\n", 1)[0].decode(errors="replace") or "nothing read"
        what = {7: "reset", 8: "closed"}.get(state, f"TCP state {state}")
        return f"{what} by the relay after {held(time.monotonic() - t)} ({norm(status, 40)})"
    finally:
        s.close()


# kind 8
ENDPOINTS = ["/events", "/sites", "/metrics"]


async def bad_tokens(a: Attack, i: int, n: int) -> str:
    pairs = [(lbl, tok, ep) for lbl, tok in a.bad_tokens for ep in ENDPOINTS]
    label, token, endpoint = pairs[(i + n * a.spec["per_kind"]) % len(pairs)]
    async with httpx.AsyncClient(timeout=15, trust_env=False) as c:
        headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
        async with c.stream("GET", a.http + endpoint, headers=headers) as r:
            status = r.status_code
    return f"{label} on {endpoint}: HTTP {status}"


# kind 9
async def channel_watches(a: Attack, i: int, n: int) -> str | tuple[str, float]:
    st = a.state.setdefault((9, i), {"client": None, "channel": None, "k": 0, "last": None})
    if st["client"] is None:
        st["client"] = httpx.AsyncClient(
            timeout=15, trust_env=False, headers={"Authorization": f"Bearer {a.tok['reader']}"}
        )
    c: httpx.AsyncClient = st["client"]
    if st["channel"] is None or st["k"] >= 10_000:
        r = await c.post(a.http + "/api/v1/events/channels", json={"client-id": f"hostile{i}"})
        if r.status_code == 201:
            st["channel"], st["k"] = r.headers["location"], 0
            return "create channel: HTTP 201", 0.0
        return f"create channel: HTTP {r.status_code}", a.pause
    ch, k = st["channel"], st["k"]
    if k % 500 == 0 and st.get("sse_at") != k:
        st["sse_at"] = k
        headers = {"Accept": "text/event-stream"}
        if st["last"]:
            headers["Last-Event-ID"] = st["last"]
        data = b""
        async with c.stream("GET", ch, headers=headers) as r:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    async for chunk in r.aiter_raw():
                        data += chunk
        ids = re.findall(rb"^id: (\d+)", data, re.M)
        if ids:
            st["last"] = ids[-1].decode()
        return f"channel SSE (re)connect: HTTP {r.status_code}", 0.0
    t = time.monotonic()
    r = await c.post(
        ch + "/subscriptions/inotify", json={"path": f"/hostile/c{i}/d{k % 100:02d}/w{k:05d}"}
    )
    a.tally[9].values[f"subscribe ms, {k // 1000}k watches"].append((time.monotonic() - t) * 1000)
    if r.status_code in (201, 303):
        st["k"] += 1
        return f"subscribe: HTTP {r.status_code}", 0.0
    if r.status_code == 404:
        st["channel"] = None  # expired or deleted: a new one
    elif 400 <= r.status_code < 500:
        st["k"] = 10_000  # a limit: the next channel
    return f"subscribe: HTTP {r.status_code} {norm(r.text, 100)}", a.pause


# kind 10
async def upstream_handler(
    a: Attack, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    task = asyncio.current_task()
    assert task is not None
    a.handlers.add(task)
    tally = a.tally[10]
    tally.attempts += 1
    t = time.monotonic()
    if a.first_pull is None:
        a.first_pull = t - a.t0
    sent, outcome = 0, None
    rate = a.spec["upstream_rate"]
    chunk = a.upstream_chunk
    try:
        while True:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
            target = head.split(b" ", 2)[1].decode(errors="replace")
            if target.startswith("/healthz"):
                body = b'{"epoch": 1, "status": "ok"}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
                tally.outcomes['GET /healthz: answered {"epoch": 1, "status": "ok"}'] += 1
                continue
            if not target.startswith("/events"):
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                outcome = f"GET {norm(target, 40)}: 404"
                return
            tally.outcomes[f"GET {norm(target, 60)}: one endless line sent"] += 1
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-cache\r\nConnection: close\r\n\r\ndata: "
            )
            due = time.monotonic()
            while True:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
                due += len(chunk) / rate
                await asyncio.sleep(max(0.0, due - time.monotonic()))
    except asyncio.CancelledError:
        outcome = "endless line still streaming at the end of the attack"
        tally.open_at_end += 1
        raise
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
        outcome = "the relay closed the endless line" if sent else "the relay closed the connection"
    except Exception as e:
        outcome = failure(e)
    finally:
        if outcome:
            tally.add(outcome, time.monotonic() - t)
        if sent:
            tally.values["MiB sent per endless line"].append(sent / 2**20)
            tally.values["seconds per endless line"].append(time.monotonic() - t)
        writer.close()
        a.handlers.discard(task)


ATTACKS = {
    1: huge_frame,
    2: slow_hello,
    3: evil_agent,
    4: evil_relay,
    5: cross_origin,
    6: slowloris,
    7: slow_reader,
    8: bad_tokens,
    9: channel_watches,
}


async def runner(a: Attack, kind: int, i: int) -> None:
    tally, fn, n = a.tally[kind], ATTACKS[kind], 0
    await asyncio.sleep(i * 0.01)  # not all in the same millisecond
    while not a.over():
        tally.attempts += 1
        t = time.monotonic()
        pause = a.pause
        try:
            out = await fn(a, i, n)
            if isinstance(out, tuple):
                out, pause = out
        except asyncio.CancelledError:
            tally.open_at_end += 1
            tally.add("still open at the end of the attack", time.monotonic() - t)
            raise
        except Exception as e:
            out, pause = failure(e), max(pause, 0.1)
        tally.add(out, time.monotonic() - t)
        n += 1
        await asyncio.sleep(pause)


async def attacker_main(spec: dict) -> None:
    a = Attack(spec)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, a.stopping.set)
    print("ready", flush=True)
    line = await loop.run_in_executor(None, sys.stdin.readline)
    a.t0 = float(line)
    await asyncio.sleep(max(0.0, a.t0 - time.monotonic()))
    a.deadline = a.t0 + spec["duration"]
    servers = []
    if 10 in spec["kinds"]:
        for port in spec["upstream_ports"]:
            try:
                servers.append(
                    await asyncio.start_server(
                        lambda r, w: upstream_handler(a, r, w), "127.0.0.1", port
                    )
                )
            except OSError as e:
                a.tally[10].add(f"cannot listen on {port}: {e.strerror}", 0.0)
    tasks = [
        asyncio.create_task(runner(a, k, i))
        for k in spec["kinds"]
        if k in ATTACKS
        for i in range(spec["per_kind"])
    ]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(a.stopping.wait(), max(0.0, a.deadline - time.monotonic()))
    ended = time.monotonic()
    for s in servers:
        s.close()
    pending = [*tasks, *a.handlers]
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=15)
    for st in a.state.values():
        if st.get("client") is not None:
            with contextlib.suppress(Exception):
                await st["client"].aclose()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out = {
        "kinds": {str(k): t.report() for k, t in a.tally.items()},
        "huge_frame_events": a.huge_events,
        "huge_frame_bytes": len(a.huge),
        "attack_seconds": round(ended - a.t0, 2),
        "stopped_early": a.stopping.is_set(),
        "first_upstream_pull_s": None if a.first_pull is None else round(a.first_pull, 2),
        "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
        "max_rss_mib": round(ru.ru_maxrss / 1024),
    }
    Path(spec["out"]).write_text(json.dumps(out, indent=1))


# -- reporting -------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not b:
        return "—"
    return f"{a / b:.2f}"


def ms3(d: dict) -> str:
    return f"{d['p50']} / {d['p99']} / {d['max']}" if d.get("n") else "—"


def markdown(res: dict) -> str:
    ph = res["phases"]
    names = [n for n in ("baseline", "attack", "after") if n in ph]
    base, att = ph.get("baseline"), ph.get("attack")

    def row(label: str, fn, r=None) -> str:
        cells = []
        for n in names:
            try:
                cells.append(str(fn(ph[n])))
            except (KeyError, TypeError):
                cells.append("—")
        rr = r(base, att) if (r and base and att) else ""
        return f"| {label} | " + " | ".join(cells) + f" | {rr} |"

    out = [
        "| figure | " + " | ".join(names) + " | attack / baseline |",
        "|---|" + "---|" * len(names) + "---|",
        row("seconds (+ drain)", lambda p: f"{p['seconds']:g} (+{p['drain_s']:g})"),
        row(
            "/healthz probes made of scheduled (failed; > 50 ms)",
            lambda p: (
                f"{p['healthz_probes']} of {p['healthz_scheduled']} "
                f"({sum(p['healthz_failed'].values())}; {p['healthz_over_50ms']})"
            ),
        ),
        row(
            "/healthz p50 / p99 / max, ms",
            lambda p: ms3(p["healthz_ms"]),
            lambda b, a: "p99 " + ratio(a["healthz_ms"].get("p99"), b["healthz_ms"].get("p99")),
        ),
        row(
            "control relay (not attacked, same machine) /healthz p50 / p99 / max, ms",
            lambda p: ms3(p["control_healthz_ms"]),
        ),
        row(
            "/healthz p99, attacked ÷ control",
            lambda p: ratio(p["healthz_ms"].get("p99"), p["control_healthz_ms"].get("p99")),
        ),
        row(
            "/healthz p99 without / with token, ms",
            lambda p: f"{p['healthz_no_token_ms'].get('p99')} / {p['healthz_token_ms'].get('p99')}",
        ),
        row("honest files closed", lambda p: p["files"]),
        row(
            "delivered exactly once / missing / duplicated (by the end of the run)",
            lambda p: f"{p['exactly_once']} / {p['missing']} / {p['duplicated']}",
        ),
        row("of them arrived after the phase's drain", lambda p: p["late"]),
        row("forged `site=honest` events seen", lambda p: p["forged_honest_events_seen"]),
        row("loss notices (`overflow`) seen", lambda p: p["overflow_events_seen"]),
        row(
            "file close → subscriber p50 / p99 / max, ms",
            lambda p: ms3(p["delivery_ms"]),
            lambda b, a: "p99 " + ratio(a["delivery_ms"].get("p99"), b["delivery_ms"].get("p99")),
        ),
        row(
            "relay CPU, s (cores)",
            lambda p: f"{p['relay_cpu_s']} ({p['relay_cpu_cores']})",
            lambda b, a: ratio(a["relay_cpu_s"], b["relay_cpu_s"]),
        ),
        row(
            "relay RSS max, MiB",
            lambda p: p["relay_rss_max_mib"],
            lambda b, a: ratio(a["relay_rss_max_mib"], b["relay_rss_max_mib"]),
        ),
        row(
            "relay open fds max",
            lambda p: p["relay_fds_max"],
            lambda b, a: ratio(a["relay_fds_max"], b["relay_fds_max"]),
        ),
        row(
            "relay log WARNING / ERROR / tracebacks",
            lambda p: (
                f"{p['log']['levels'].get('WARNING', 0)} / "
                f"{p['log']['levels'].get('ERROR', 0)} / {p['log']['tracebacks']}"
            ),
        ),
        row("machine busy, cores", lambda p: p["machine_busy_cores"]),
    ]
    lines = ["\n".join(out), ""]
    attacker = res.get("attacker") or {}
    if attacker:
        lines.append(
            f"Attacker: {attacker.get('cpu_s')} s CPU over "
            f"{attacker.get('attack_seconds')} s, max RSS "
            f"{attacker.get('max_rss_mib')} MiB"
            + (", stopped early (relay RSS limit)" if attacker.get("stopped_early") else "")
            + ".\n"
        )
        lines += [
            "| # | kind | attempts | open at end | answers (count) |",
            "|---|---|---|---|---|",
        ]
        for k, t in sorted(attacker.get("kinds", {}).items(), key=lambda kv: int(kv[0])):
            answers = list(t["outcomes"].items())
            shown = "; ".join(f"{norm(o, 110)} ×{c}" for o, c in answers[:4])
            if len(answers) > 4:
                shown += f"; … {len(answers) - 4} more kinds of answer"
            lines.append(
                f"| {k} | {t['name']} | {t['attempts']} | {t['open_at_end']} | "
                f"{shown.replace('|', '/')} |"
            )
        lines.append("")
    lines += [
        "| relay log lines | " + " | ".join(res["log"]) + " |",
        "|---|" + "---|" * len(res["log"]),
    ]
    for level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        lines.append(
            f"| {level} | "
            + " | ".join(str(s["levels"].get(level, 0)) for s in res["log"].values())
            + " |"
        )
    lines.append(
        "| tracebacks | " + " | ".join(str(s["tracebacks"]) for s in res["log"].values()) + " |"
    )
    lines.append(
        "| forged records (log injection) | "
        + " | ".join(str(s["injected_records"]) for s in res["log"].values())
        + " |"
    )
    return "\n".join(lines)


def all_answers(res: dict) -> str:
    """Every kind of answer each hostile kind got, and the values it measured."""
    out = []
    for k, t in sorted(
        (res.get("attacker") or {}).get("kinds", {}).items(), key=lambda kv: int(kv[0])
    ):
        out.append(
            f"* {k} {t['name']}: {t['attempts']} attempts, {t['open_at_end']} open at "
            f"the end; attempt seconds {ms3(t['attempt_seconds'])} (p50 / p99 / max)"
        )
        for o, c in t["outcomes"].items():
            out.append(f"  * {c} × {o}")
        for v, d in t["values"].items():
            out.append(f"  * {v}: {ms3(d)} (p50 / p99 / max, n={d.get('n')})")
    return "\n".join(out)


def relay_code() -> dict:
    def git(*a: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO), *a], capture_output=True, text=True
        ).stdout.strip()

    h = hashlib.sha256()
    for f in sorted((REPO / "relay").glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "modified": git("status", "--porcelain", "--", "relay", "storage_events").splitlines(),
        "relay_sources_sha256": h.hexdigest()[:16],
    }


def parse_kinds(text: str) -> set[int]:
    names = {v[0]: k for k, v in KINDS.items()}
    out = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        k = int(part) if part.isdigit() else names.get(part)
        if k not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown kind {part!r}: 1-10 or " + ", ".join(names))
        out.add(k)
    return out


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--attacker":
        asyncio.run(attacker_main(json.loads(Path(sys.argv[2]).read_text())))
        return
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    ap.add_argument("--duration", type=float, default=60, help="attack seconds (60)")
    ap.add_argument("--per-kind", type=int, default=20, help="connections of each kind (20)")
    ap.add_argument("--baseline", type=float, default=10, help="baseline seconds (10)")
    ap.add_argument(
        "--after",
        type=float,
        default=10,
        help="seconds of honest load after the attack (10; 0: none)",
    )
    ap.add_argument("--rate", type=int, default=20, help="honest files closed per second (20)")
    ap.add_argument(
        "--kinds",
        type=parse_kinds,
        default=set(KINDS),
        help="hostile kinds to run, numbers or names (default: all)",
    )
    ap.add_argument(
        "--pause",
        type=float,
        default=0.1,
        help="seconds between reconnects of one hostile connection (0.1)",
    )
    ap.add_argument("--drip", type=float, default=2.0, help="slowloris: s between bytes (2)")
    ap.add_argument(
        "--upstream-rate",
        type=int,
        default=2 << 20,
        help="bytes/s of each endless upstream line (2 MiB/s)",
    )
    ap.add_argument("--probe", type=float, default=0.02, help="s between /healthz probes")
    ap.add_argument(
        "--drain",
        type=float,
        default=30,
        help="after each phase, wait at most this long for the honest files",
    )
    ap.add_argument(
        "--rss-limit",
        type=int,
        default=6144,
        help="MiB: stop the attack early if the relay's RSS passes this (6144)",
    )
    ap.add_argument("--tmpfs-size", default="8g")
    ap.add_argument(
        "--attacker-nice",
        type=int,
        default=0,
        help="run the attacker process at this nice level (0: as the relay)",
    )
    ap.add_argument("--out", type=Path, help="write the JSON results here")
    ap.add_argument("--logs", type=Path, help="copy the processes' logs into this directory")
    args = ap.parse_args()
    command = shlex.join([sys.executable, *sys.argv])
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the relay inherits it
    print(f"command: {command}", flush=True)
    res: dict = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "args": {
            k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
        },
        "relay_code": relay_code(),
        "phases": {},
        "raw": {},
    }
    with workdir(args.tmpfs_size) as base:
        b = Bench(args, base)
        try:
            b.set_up()
            res["relay_version"] = b.version
            res["honest_stream"] = b.honest_stream
            boundaries = {"start-up": 0}
            plan = [("baseline", args.baseline), ("attack", args.duration)]
            if args.after > 0:
                plan.append(("after", args.after))
            for name, secs in plan:
                if b.relay.poll() is not None:
                    print(f"the relay has exited ({b.relay.returncode}): no {name} phase")
                    break
                print(f"phase {name}: {secs:g} s ...", flush=True)
                b.raw[name] = ph = b.phase(name, secs)
                boundaries[name] = ph["log"][0]
                if ph["attacker"] is not None:
                    res["attacker"] = ph["attacker"]
            relay_alive = b.relay.poll() is None
            res["relay_rc_during_run"] = None if relay_alive else b.relay.returncode
            boundaries["shutdown"] = b.log_size()
            res["shutdown"] = b.shutdown()
        finally:
            b.close()
            res["rss_limit_exceeded"] = b.rss_exceeded
        # Deliveries are counted over the whole run: a file of one phase that arrives during a
        # later one is late (its latency says how late), not missing.
        for name, ph in b.raw.items():
            res["phases"][name] = b.analyse(ph)
            print(json.dumps({name: res["phases"][name]}), flush=True)
        log_path = base / "relay.log"
        size = log_path.stat().st_size if log_path.exists() else 0
        marks = sorted(boundaries.items(), key=lambda kv: kv[1])
        res["log"] = {}
        for (name, start), (_, end) in zip(marks, [*marks[1:], ("end", size)], strict=True):
            res["log"][name] = log_summary(read_log(log_path, start, end))
        for name in res["phases"]:
            res["phases"][name]["log"] = res["log"][name]
        res["log_tail"] = [ln[:400] for ln in read_log(log_path, max(0, size - 64_000), size)[-40:]]
        agent_log = (base / "agent.log").read_text(errors="replace").splitlines()
        res["agent_log"] = log_summary(agent_log)
        res["agent_log_tail"] = [ln[:300] for ln in agent_log[-15:]]
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            for f in base.glob("*.log"):
                shutil.copy(f, args.logs / f.name)
            for f in ("subscriber.txt", "probe.txt", "attacker.json", "relay.toml"):
                if (base / f).exists():
                    shutil.copy(base / f, args.logs / f)
    print()
    print(f"command: {command}")
    print(
        f"relay {res.get('relay_version')} (commit {res['relay_code']['commit']}, "
        f"{len(res['relay_code']['modified'])} modified files under relay/ and storage_events/, "
        f"sources {res['relay_code']['relay_sources_sha256']}); {res['machine']['cpus']} CPUs, "
        f"Linux {res['machine']['kernel']}, Python {res['machine']['python']}; "
        f"honest load {args.rate} files/s; {args.per_kind} connections per hostile kind"
    )
    print(f"shutdown: {res.get('shutdown')}\n")
    print(markdown(res))
    print("\nAnswers, per hostile kind:\n" + all_answers(res))
    attack_log = res["log"].get("attack")
    if attack_log:
        print("\nrelay log during the attack, most frequent records:")
        for msg, count in attack_log["top_messages"]:
            print(f"  {count:>7} {msg}")
        if attack_log["traceback_kinds"]:
            print("tracebacks (last line, count):")
            for last, count in attack_log["traceback_kinds"]:
                print(f"  {count:>7} {last}")
        for tb in attack_log["first_tracebacks"][:1]:
            print("first traceback:\n" + "\n".join("    " + ln for ln in tb.splitlines()[-25:]))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1, default=str) + "\n")
        print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
