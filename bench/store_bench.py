"""Event log backends: the relay's ingest events/s and SSE deliveries/s with its SQLite log
beside its NATS JetStream store, one and two relay replicas on one 3-node cluster, in one run.

    .venv/bin/python bench/store_bench.py [--events 200000] [--agents 4] [--subscribers 20]
        [--runs 3] [--only sqlite,nats-1,nats-2] [--json FILE] [--dir DIR]

Configurations, measured in turn within each run:
  sqlite  one relay, its SQLite log (the default store) in the bench's temp dir;
  nats-1  one relay on a JetStream stream (3 replicas) of a 3-server nats-server cluster;
  nats-2  two relays on the same stream: agents and subscribers split over both.
The cluster is started once, on loopback, with its store_dir in the same temp dir on disk as
the SQLite logs (so both backends write to the same kind of storage); each measurement gets
fresh relays, a fresh SQLite dir or a stream of its own (deleted afterwards).

Per measurement: S SSE subscribers (in one child process, so that reading them does not hold
up the publishers) connect live (`since=now`), split over the relays. Then K simulated agents,
each its own stream `<node>:<runid>` with seq 1, 2, 3, ..., publish N events in total over the
ingest WebSocket as the agent does (msgpack Hello, then Batches of 2000 events, a few batches
in flight), each waiting for the Ack of its last seq.
  ingest events/s       N / (first send -> last agent's final Ack)
  relay CPU / 1k ev     utime+stime of the relay processes from the first send until every
                        subscriber has every event (storing and fan-out alike), per 1,000
                        events; nats-server CPU the same, separately
  SSE deliveries/s      events received by all subscribers / (first send -> every subscriber
                        has seen the last event)
Every subscriber must receive every id exactly once, in order, and (nats-2) both replicas
must serve the same set of ids; the bench says what was missing or doubled and exits 1 if not.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import ctypes
import itertools
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from harness import BIN, cpu_seconds, free_port, nats_server_binary, read_within, stop, tail

from storage_events.wire import (
    Ack,
    Batch,
    Error,
    Event,
    Hello,
    Welcome,
    decode_to_agent,
    encode_frame,
)

CONFIGS = ("sqlite", "nats-1", "nats-2")
SUBSCRIBER_MODE = "--subscriber-process"  # argv[1] of the child that holds the subscribers
GRACE = 60.0  # seconds subscribers may take to see the last event after the last ack
LEADER_LINES = (
    b"JetStream cluster new metadata leader",
    b"Self is new JetStream cluster metadata leader",
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine_cpu() -> dict[str, float]:
    """CPU seconds of the whole machine (all cores) by kind, from /proc/stat. softirq is
    where loopback TCP is processed, outside any process's utime+stime; steal is time the
    hypervisor gave to another guest."""
    v = [
        int(x) / os.sysconf("SC_CLK_TCK")
        for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    ]
    user, nice, system, idle, iowait, irq, softirq, steal = v
    return {
        "busy": sum(v) - idle - iowait,
        "user": user + nice,
        "system": system,
        "irq+softirq": irq + softirq,
        "steal": steal,
    }


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores, kernel included)."""
    return machine_cpu()["busy"]


def wait_quiet(cap: float, limit: float = 0.2) -> float:
    """Wait (at most ``cap`` s) until the machine is about idle, as the federation bench does:
    on two cores, anyone else's work moves these figures. Returns the cores busy then."""
    deadline = time.monotonic() + cap
    while True:
        b0 = machine_busy()
        time.sleep(1)
        busy = machine_busy() - b0
        if busy < limit or time.monotonic() > deadline:
            return busy


def _die_with_parent() -> None:
    # The children run in sessions of their own (a Ctrl-C reaches the bench alone, which then
    # stops them in order); this makes the kernel end them even if the bench is killed.
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


class Processes:
    """Every process the bench starts, stopped by pid in reverse order."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[Any], logfile: Path, **kw: Any) -> subprocess.Popen:
        with open(logfile, "ab") as out:
            p = subprocess.Popen(
                [str(a) for a in args],
                stdout=kw.pop("stdout", out),
                stderr=out,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                **kw,
            )
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        stop(p)
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in reversed(self.procs[:]):
            self.stop(p)


# -- the NATS cluster -----------------------------------------------------------------------


class NatsCluster:
    """Three nats-server processes with JetStream, routed to each other on loopback."""

    def __init__(self, base: Path, procs: Processes, size: int = 3) -> None:
        binary = nats_server_binary("--only sqlite")
        self.version = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, check=True
        ).stdout.strip()
        clients = [free_port() for _ in range(size)]
        routes = [free_port() for _ in range(size)]
        self.logs: list[Path] = []
        self.procs: list[subprocess.Popen] = []
        for i in range(size):
            others = ", ".join(
                f"nats-route://127.0.0.1:{p}" for j, p in enumerate(routes) if j != i
            )
            conf = base / f"nats{i}.conf"
            conf.write_text(f"""
server_name: n{i}
listen: 127.0.0.1:{clients[i]}
jetstream {{ store_dir: "{base / f"js{i}"}" }}
cluster {{ name: store-bench, listen: 127.0.0.1:{routes[i]}, routes: [{others}] }}
""")
            self.logs.append(base / f"nats{i}.log")
            self.procs.append(procs.start([binary, "-c", conf], self.logs[-1]))
        self.urls = [f"nats://127.0.0.1:{p}" for p in clients]
        self.store = ",".join(self.urls)
        self._wait_leader(30)

    def _wait_leader(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p, path in zip(self.procs, self.logs, strict=True):
                if p.poll() is not None:
                    raise RuntimeError(
                        f"nats-server {path.stem} exited with {p.returncode} "
                        f"while the cluster formed; its log:\n{tail(path)}"
                    )
            if any(line in path.read_bytes() for path in self.logs for line in LEADER_LINES):
                return
            time.sleep(0.1)
        raise RuntimeError(
            f"the nats cluster elected no JetStream metadata leader within "
            f"{timeout:g} s; the first server's log:\n{tail(self.logs[0])}"
        )

    def cpu(self) -> dict[str, float]:
        return {f"n{i}": cpu_seconds(p.pid) for i, p in enumerate(self.procs)}

    def delete_stream(self, name: str) -> None:
        """Each measurement has its stream; removing it keeps the cluster's disk and state
        the same for the next one."""

        async def delete() -> None:
            import nats

            nc = await nats.connect(servers=self.urls, connect_timeout=5)
            try:
                await nc.jetstream().delete_stream(name)
            finally:
                await nc.close()

        try:
            asyncio.run(asyncio.wait_for(delete(), 30))
        except Exception as e:  # the next measurement has a stream of its own anyway
            log(f"warning: could not delete JetStream stream {name}: {e!r}")


# -- relays ---------------------------------------------------------------------------------


@dataclass
class Relay:
    name: str
    port: int
    proc: subprocess.Popen
    logfile: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> dict[str, Any]:
        return httpx.get(self.url + "/healthz", timeout=5).json()

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line.startswith("storage_events_relay_") and " " in line and "{" not in line:
                key, value = line.rsplit(" ", 1)
                out[key.removeprefix("storage_events_relay_")] = float(value)
        return out


def start_relay(
    procs: Processes, base: Path, name: str, store: str | None, stream: str | None
) -> Relay:
    port = free_port()
    config = base / f"{name}.toml"
    lines = [f"name = {json.dumps(name)}"]
    if store is not None:
        lines += [
            f"store = {json.dumps(store)}",
            "nats_replicas = 3",
            f"nats_stream = {json.dumps(stream)}",
        ]
    config.write_text("\n".join(lines) + "\n")
    logfile = base / f"{name}.log"
    # (--data for the NATS relays too: it still keeps its channel store there.)
    p = procs.start(
        [
            BIN / "storage-events-relay",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--data",
            base / f"{name}-data",
            "--config",
            config,
        ],
        logfile,
    )
    relay = Relay(name, port, p, logfile)
    deadline = time.monotonic() + 60  # a NATS relay creates its stream first
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(
                f"relay {name} exited with {p.returncode} at start; its log:\n{tail(logfile)}"
            )
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(relay.url + "/healthz", timeout=1).status_code == 200:
                return relay
        time.sleep(0.1)
    raise RuntimeError(
        f"relay {name} did not answer /healthz within 60 s; its log:\n{tail(logfile)}"
    )


# -- simulated agents -----------------------------------------------------------------------


@dataclass
class Agent:
    node: str
    stream: str
    relay: Relay
    frames: list[bytes]
    last_seq: int
    acked: int = 0


def make_agents(n: int, k: int, batch: int, relays: list[Relay]) -> list[Agent]:
    """Frames are encoded before the clock starts: the relay is measured, not this encoder."""
    runid = secrets.token_hex(6)
    agents = []
    for a in range(k):
        node = f"bench-node-{a:02d}-{runid}"
        stream = f"{node}:{runid}"
        count = n // k + (a < n % k)
        ts = time.time_ns()
        frames = []
        for first in range(1, count + 1, batch):
            events = [
                Event(
                    site="bench",
                    node=node,
                    path=f"/data/{node}/d{i % 100:03d}/f{i:07d}.h5",
                    flags=["IN_CLOSE_WRITE"],
                    ts=ts + i,
                    stream=stream,
                    seq=i,
                )
                for i in range(first, min(first + batch, count + 1))
            ]
            frames.append(encode_frame(Batch(events)))
        agents.append(Agent(node, stream, relays[a % len(relays)], frames, count))
    return agents


async def ingest(agents: list[Agent], window: int, timeout: float) -> tuple[float, float]:
    """All agents connect and say hello, then publish together; (first send, last ack) on the
    monotonic clock."""
    import websockets

    async def recv(ws: Any, agent: Agent) -> Welcome | Ack:
        reply = decode_to_agent(await ws.recv())
        if isinstance(reply, Error):
            raise RuntimeError(
                f"relay {agent.relay.name} refused agent {agent.node}: {reply.message}"
            )
        return reply

    async def ack(ws: Any, agent: Agent) -> int:
        reply = await recv(ws, agent)
        if not isinstance(reply, Ack):
            raise RuntimeError(f"agent {agent.node}: expected an Ack, got {reply!r}")
        return reply.seq

    async with contextlib.AsyncExitStack() as stack:
        sockets = []
        for agent in agents:
            ws = await stack.enter_async_context(
                websockets.connect(
                    agent.relay.url.replace("http://", "ws://") + "/ingest",
                    max_size=None,
                    compression=None,
                    open_timeout=30,
                )
            )  # as the agent: no compression
            await ws.send(encode_frame(Hello(site="bench", node=agent.node, stream=agent.stream)))
            welcome = await asyncio.wait_for(recv(ws, agent), 30)
            if not isinstance(welcome, Welcome) or welcome.acked != 0:
                raise RuntimeError(
                    f"agent {agent.node}: expected a Welcome with acked 0 on a "
                    f"new stream, got {welcome!r}"
                )
            sockets.append(ws)

        async def publish(ws: Any, agent: Agent) -> float:
            inflight = 0
            for frame in agent.frames:
                if inflight >= window:
                    agent.acked = await ack(ws, agent)
                    inflight -= 1
                await ws.send(frame)
                inflight += 1
            for _ in range(inflight):
                agent.acked = await ack(ws, agent)
            if agent.acked != agent.last_seq:
                raise RuntimeError(
                    f"agent {agent.node}: the last Ack says seq {agent.acked}, "
                    f"not {agent.last_seq}: the relay did not store every batch "
                    "(its log follows)"
                )
            return time.monotonic()

        async def progress() -> None:
            total = sum(a.last_seq for a in agents)
            while True:
                await asyncio.sleep(5)
                log(f"    ... {sum(a.acked for a in agents):,} of {total:,} events acked")

        ticker = asyncio.create_task(progress())
        start = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                ends = await asyncio.gather(
                    *(publish(ws, a) for ws, a in zip(sockets, agents, strict=True))
                )
        except TimeoutError:
            raise RuntimeError(
                f"ingest did not finish within {timeout:g} s (acked: "
                f"{', '.join(f'{a.acked:,}/{a.last_seq:,}' for a in agents)}): the relay "
                "stopped acknowledging; its log follows"
            ) from None
        finally:
            ticker.cancel()
    return start, max(ends)


# -- the subscriber process -----------------------------------------------------------------


class LineReader:
    """Lines from a child's stdout, with a timeout (select on the raw pipe: a buffered
    reader could hold a line that select then never reports)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        self.proc, self.fd, self.buf = proc, proc.stdout.fileno(), b""

    def readline(self, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            chunk = read_within(self.fd, deadline - time.monotonic())
            if chunk is None:
                raise RuntimeError(
                    f"the subscriber process did not report {what} within {timeout:g} s"
                )
            if not chunk:
                raise RuntimeError(
                    f"the subscriber process ended (exit "
                    f"{self.proc.wait()}) before reporting {what} (its log "
                    "follows)"
                )
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()


_ID = re.compile(rb"id: (\d+)\nevent: inotify\n")


class SSEReader(asyncio.Protocol):
    """One live subscriber: keeps the id of every event it receives. The relay yields whole
    SSE messages (one HTTP chunk each), so chunk-size lines only fall between messages and
    never match the id pattern."""

    def __init__(self, port: int, want: int, done: asyncio.Event) -> None:
        self.port, self.want, self.all_done = port, want, done
        self.ids = array.array("q")
        self.other = 0  # messages of a type other than inotify (overflow, gap): must be none
        self.head = b""
        self.carry = b""
        self.start_id: int | None = None
        self.ready = asyncio.get_running_loop().create_future()
        self.done_at: float | None = None
        self.closed = False
        self.hanging_up = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(
            b"GET /events?since=now HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # type: ignore
            b"Accept: text/event-stream\r\n\r\n"
        )

    def data_received(self, data: bytes) -> None:
        if not self.ready.done():
            self.head += data
            end = self.head.find(b"\n\n", self.head.find(b"\r\n\r\n"))
            if b"\r\n\r\n" not in self.head or end < 0:
                return
            status = self.head.split(b"\r\n", 1)[0]
            if b" 200 " not in status:
                self.ready.set_exception(
                    RuntimeError(
                        f"relay on port {self.port} answered /events with {status.decode()!r}"
                    )
                )
                self.transport.close()
                return
            found = re.search(rb"id: (\d+)\n\n", self.head)
            self.start_id = int(found.group(1)) if found else None
            data, self.head = self.head[end + 2 :], b""
            self.ready.set_result(None)
        buf = self.carry + data
        end = buf.rfind(b"\n\n")  # what follows is a message still arriving
        if end < 0:
            self.carry = buf
            return
        part, self.carry = buf[: end + 2], buf[end + 2 :]
        before = len(self.ids)
        self.ids.extend(map(int, _ID.findall(part)))
        self.other += part.count(b"\nevent: ") - (len(self.ids) - before)
        if self.done_at is None and len(self.ids) >= self.want:
            self.done_at = time.monotonic()
            self.all_done.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = not self.hanging_up  # the relay ended the feed: never should, here
        if not self.ready.done():
            self.ready.set_exception(
                RuntimeError(f"relay on port {self.port} closed /events before answering ({exc})")
            )
        self.all_done.set()


async def subscribers_main(spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    subs = [SSEReader(port, spec["want"], wake) for port in spec["ports"]]
    for s in subs:
        await loop.create_connection(lambda s=s: s, "127.0.0.1", s.port)
    await asyncio.wait_for(asyncio.gather(*(s.ready for s in subs)), 30)
    print("ready", json.dumps(sorted({s.start_id for s in subs}, key=str)), flush=True)

    # The bench writes "FIRST LAST" (the ids stored) once the last batch is acknowledged;
    # from then on the subscribers have GRACE seconds to see the last event.
    ingested = loop.run_in_executor(None, sys.stdin.readline)
    deadline: float | None = None

    def finished() -> bool:
        return all(s.done_at is not None or s.closed for s in subs)

    while not finished():
        if ingested.done() and deadline is None:
            deadline = time.monotonic() + spec["grace"]
        if deadline is not None and time.monotonic() >= deadline:
            break
        wake.clear()
        if finished():
            break
        waiter = asyncio.ensure_future(wake.wait())
        await asyncio.wait(
            [waiter] if ingested.done() else [waiter, ingested],
            timeout=None if deadline is None else deadline - time.monotonic(),
            return_when=asyncio.FIRST_COMPLETED,
        )
        waiter.cancel()
    done = [s.done_at for s in subs]
    print("delivered", json.dumps(None if None in done else max(done)), flush=True)
    first, last = map(int, (await ingested).split())
    # Anything sent twice would most likely come right behind: keep reading a little.
    await asyncio.sleep(0.5)
    for s in subs:
        s.hanging_up = True
        s.transport.close()
    print(json.dumps(check(subs, first, last)), flush=True)


def check(subs: list[SSEReader], first: int, last: int) -> dict[str, Any]:
    """Exactly once, in order, on every subscriber; the same ids on every relay."""
    expected = set(range(first, last + 1))
    per_sub, by_port = [], {}
    for s in subs:
        got = set(s.ids)
        missing, extra = sorted(expected - got), sorted(got - expected)
        ordered = all(a < b for a, b in itertools.pairwise(s.ids))
        doubled = len(s.ids) - len(got)
        per_sub.append(
            {
                "ok": len(s.ids) == len(expected)
                and not (doubled or missing or extra or s.other or s.closed)
                and ordered
                and s.done_at is not None,
                "port": s.port,
                "received": len(s.ids),
                "distinct": len(got),
                "doubled": doubled,
                "missing": len(missing),
                "missing_first": missing[:5],
                "unexpected": len(extra),
                "unexpected_first": extra[:5],
                "in_order": ordered,
                "other_messages": s.other,
                "start_id": s.start_id,
                "done_at": s.done_at,
                "closed_early": s.closed,
            }
        )
        by_port.setdefault(s.port, set()).update(got)
    sets = list(by_port.values())
    same = all(x == sets[0] for x in sets[1:])
    ok = same and all(p["ok"] for p in per_sub)
    return {
        "ok": ok,
        "same_ids_on_every_relay": same,
        "first": first,
        "last": last,
        "subscribers": per_sub,
    }


def subscriber_process(arg: str) -> None:
    try:
        import uvloop  # the relay's extra: a cheaper read loop for 20 busy sockets

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(subscribers_main(json.loads(arg)))


# -- one measurement ------------------------------------------------------------------------


@dataclass
class Settings:
    events: int
    agents: int
    subscribers: int
    batch: int
    window: int


@dataclass
class Env:
    base: Path
    procs: Processes
    cluster: NatsCluster | None
    quiet_cap: float = 30.0
    failures: list[str] = field(default_factory=list)


def measure(config: str, run: int, s: Settings, env: Env) -> dict[str, Any]:
    work = env.base / f"run{run}-{config}"
    work.mkdir()
    label = f"[run {run}] {config}"
    stream = f"BENCH_R{run}_{config.replace('-', '_').upper()}" if config != "sqlite" else None
    store = env.cluster.store if env.cluster and stream else None
    names = {"sqlite": ["sqlite"], "nats-1": ["nats1"], "nats-2": ["nats2a", "nats2b"]}[config]
    relays: list[Relay] = []
    sub: subprocess.Popen | None = None
    idle = wait_quiet(env.quiet_cap)
    if idle >= 0.2:
        log(
            f"{label}: warning: the machine is still {idle:.2f} cores busy with other work "
            f"after {env.quiet_cap:g} s; measuring anyway (the JSON records it)"
        )
    try:
        for name in names:
            relays.append(start_relay(env.procs, work, f"bench-{name}", store, stream))
        head0 = max(r.health()["head"] for r in relays)
        agents = make_agents(s.events, s.agents, s.batch, relays)
        ports = [relays[j % len(relays)].port for j in range(s.subscribers)]
        spec = {"ports": ports, "want": s.events, "grace": GRACE}
        sub = env.procs.start(
            [sys.executable, __file__, SUBSCRIBER_MODE, json.dumps(spec)],
            work / "subscribers.log",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        lines = LineReader(sub)
        starts = json.loads(lines.readline(40, "its subscribers connected").split(" ", 1)[1])
        for r in relays:
            want = ports.count(r.port)
            deadline = time.monotonic() + 10
            while (seen := r.health()["subscribers"]) != want:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"relay {r.name} counts {seen} subscribers, not {want}")
                time.sleep(0.05)
        log(
            f"{label}: {len(relays)} relay(s) up, {s.subscribers} subscribers live "
            f"(since=now, after id {starts}); {s.agents} agents publish {s.events:,} events"
        )

        def cpu() -> dict[str, float]:
            out = {r.name: cpu_seconds(r.proc.pid) for r in relays}
            if store and env.cluster:
                out.update({f"nats-server {k}": v for k, v in env.cluster.cpu().items()})
            assert sub is not None
            out["bench subscribers"] = cpu_seconds(sub.pid)
            out["bench agents"] = time.process_time()
            out["at"] = time.monotonic()
            return out

        machine0 = machine_cpu()
        cpu0 = cpu()
        t0, t_acked = asyncio.run(ingest(agents, s.window, max(120.0, s.events / 500)))
        cpu_ingest = cpu()
        ingest_s = t_acked - t0
        log(
            f"{label}: ingest {ingest_s:.2f} s, {s.events / ingest_s:,.0f} events/s; waiting "
            "for the subscribers"
        )
        # Every relay's head must reach the last id: the replica that did not store an event
        # learns of it from its subscription to the stream.
        deadline = time.monotonic() + GRACE
        while (heads := {r.health()["head"] for r in relays}) != {head0 + s.events}:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"after the last ack, the relays' heads are {sorted(heads)}, "
                    f"not all {head0 + s.events:,} ({s.events:,} events on "
                    f"{head0:,}): the log did not store each event once"
                )
            time.sleep(0.05)
        assert sub.stdin is not None
        sub.stdin.write(f"{head0 + 1} {head0 + s.events}\n".encode())
        sub.stdin.flush()
        delivered_at = json.loads(lines.readline(GRACE + 30, "its deliveries").split(" ", 1)[1])
        cpu_end = cpu()
        machine_end = machine_cpu()
        result = json.loads(lines.readline(120, "its check of the ids"))
        metrics = {r.name: r.metrics() for r in relays}
    except (RuntimeError, httpx.HTTPError) as e:
        # The temp dir goes at exit: what the logs say has to be in the message.
        logs = [(r.name, r.logfile) for r in relays] + [("subscribers", work / "subscribers.log")]
        raise RuntimeError(
            f"{label}: {e}\n"
            + "\n".join(f"  last lines of {name}'s log:\n{tail(path, 8)}" for name, path in logs)
        ) from None
    finally:
        if sub is not None:
            env.procs.stop(sub)
        for r in relays:
            env.procs.stop(r.proc)
        if env.cluster and stream:
            env.cluster.delete_stream(stream)
    shutil.rmtree(work, ignore_errors=True)

    received = sum(p["received"] for p in result["subscribers"])
    deliver_s = (delivered_at - t0) if delivered_at is not None else None
    relay_cpu = sum(cpu_end[r.name] - cpu0[r.name] for r in relays)
    nats_keys = [k for k in cpu0 if k.startswith("nats-server")]
    busy = {k: cpu_end[k] - cpu0[k] for k in cpu0 if k != "at"}
    wall = cpu_end["at"] - cpu0["at"]
    machine = {k: machine_end[k] - machine0[k] for k in machine0}
    nats_cpu = sum(cpu_end[k] - cpu0[k] for k in nats_keys) if nats_keys else None
    row: dict[str, Any] = {
        "config": config,
        "run": run,
        "relays": len(relays),
        "events": s.events,
        "agents": s.agents,
        "subscribers": s.subscribers,
        "batch": s.batch,
        "window": s.window,
        "ingest_seconds": ingest_s,
        "ingest_events_per_s": s.events / ingest_s,
        "deliveries": received,
        "deliveries_seconds": deliver_s,
        "deliveries_per_s": received / deliver_s if deliver_s else None,
        "relay_cpu_s": relay_cpu,
        "relay_cpu_s_per_1000": relay_cpu * 1000 / s.events,
        "relay_cpu_s_until_last_ack": sum(cpu_ingest[r.name] - cpu0[r.name] for r in relays),
        "nats_server_cpu_s": nats_cpu,
        "nats_server_cpu_s_per_1000": nats_cpu * 1000 / s.events if nats_cpu is not None else None,
        "cpu_s": busy,
        # Busy cores of the whole machine from the first send to the last delivery (kernel
        # included), and before the measurement: what else shared the two cores.
        "machine_busy_cores": (machine_end["busy"] - machine0["busy"]) / wall,
        "ours_busy_cores": sum(busy.values()) / wall,
        "machine_cpu_s": machine,
        # What no process of the bench used, less the kernel's network and the hypervisor:
        # other people's processes, those that ended meanwhile included.
        "others_busy_cores": (
            machine["busy"] - sum(busy.values()) - machine["irq+softirq"] - machine["steal"]
        )
        / wall,
        "machine_busy_cores_before": idle,
        "relay_metrics": metrics,
        "exactly_once": result["ok"],
        "check": result,
    }
    if result["ok"]:
        log(
            f"{label}: {received:,} deliveries in {deliver_s:.2f} s, "
            f"{row['deliveries_per_s']:,.0f}/s; every subscriber got ids {result['first']:,}-"
            f"{result['last']:,} once, in order"
            + ("; both relays served the same ids" if len(relays) > 1 else "")
        )
        log(
            f"{label}: CPU s: "
            + ", ".join(f"{k} {v:.1f}" for k, v in busy.items())
            + f"; the machine {row['machine_busy_cores']:.2f} cores busy: ours "
            f"{row['ours_busy_cores']:.2f}, softirq {machine['irq+softirq'] / wall:.2f}, steal "
            f"{machine['steal'] / wall:.2f}, others {row['others_busy_cores']:.2f}"
        )
    else:
        bad = [p for p in result["subscribers"] if not p["ok"]]
        text = (
            f"{label}: FAILED exactly-once delivery: {len(bad)} of {s.subscribers} "
            f"subscribers wrong; same ids on every relay: {result['same_ids_on_every_relay']}"
        )
        for p in bad[:8]:
            text += (
                f"\n    port {p['port']}: received {p['received']:,} (distinct "
                f"{p['distinct']:,}), doubled {p['doubled']:,}, missing {p['missing']:,} "
                f"{p['missing_first']}, unexpected {p['unexpected']:,} "
                f"{p['unexpected_first']}, in order {p['in_order']}, other messages "
                f"{p['other_messages']}, closed early {p['closed_early']}"
            )
        print("!" * 78 + "\n" + text + "\n" + "!" * 78, flush=True)
        env.failures.append(text)
    return row


# -- report ---------------------------------------------------------------------------------


def fs_of(path: Path) -> str:
    """The file system ``path`` is on, from the mount table: 'ext4 on /dev/vda (/)'."""
    best = ("?", "?", "?")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        mount = left.split()[4]
        fstype, source = right.split()[:2]
        if (str(path) + "/").startswith(mount.rstrip("/") + "/") and len(mount) >= len(best[2]):
            best = (fstype, source, mount)
    return f"{best[0]} on {best[1]} (mounted at {best[2]})"


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    here = Path(__file__).resolve().parent
    commit = (
        subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        or None
    )
    dirty = (
        subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        != ""
    )
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": commit,
        "commit_dirty": dirty,
        "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
    }


def spread(values: list[float], fmt: str) -> str:
    if not values:
        return "—"
    med = format(statistics.median(values), fmt)
    if len(values) == 1:
        return med
    return f"{med} [{format(min(values), fmt)}–{format(max(values), fmt)}]"


def report(rows: list[dict[str, Any]], configs: list[str], runs: int) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    print(
        f"\nmedian [min–max] of {runs} run(s); CPU per 1,000 events from the first send "
        "until every subscriber had every event"
    )
    head = (
        f"{'config':<8} {'ingest events/s':>26} {'relay CPU s/1k':>22} "
        f"{'nats-server CPU s/1k':>22} {'SSE deliveries/s':>30}  exactly once"
    )
    print(head + "\n" + "-" * len(head))
    for c in configs:
        mine = [r for r in rows if r["config"] == c]
        nats = [
            r["nats_server_cpu_s_per_1000"]
            for r in mine
            if r["nats_server_cpu_s_per_1000"] is not None
        ]
        dps = [r["deliveries_per_s"] for r in mine if r["deliveries_per_s"] is not None]
        once = sum(r["exactly_once"] for r in mine)
        summary[c] = {
            k: statistics.median(v) if v else None
            for k, v in {
                "ingest_events_per_s": [r["ingest_events_per_s"] for r in mine],
                "relay_cpu_s_per_1000": [r["relay_cpu_s_per_1000"] for r in mine],
                "nats_server_cpu_s_per_1000": nats,
                "deliveries_per_s": dps,
            }.items()
        }
        summary[c]["exactly_once_runs"] = f"{once}/{len(mine)}"
        print(
            f"{c:<8} {spread([r['ingest_events_per_s'] for r in mine], ',.0f'):>26} "
            f"{spread([r['relay_cpu_s_per_1000'] for r in mine], '.4f'):>22} "
            f"{spread(nats, '.4f'):>22} {spread(dps, ',.0f'):>30}  {once}/{len(mine)} runs"
        )
    print(
        f"cores busy while measuring (of the machine's {len(os.sched_getaffinity(0))}), "
        "median [min–max]: the bench's "
        "processes | others' (the machine is shared)"
    )
    for c in configs:
        mine = [r for r in rows if r["config"] == c]
        print(
            f"  {c:<8} {spread([r['ours_busy_cores'] for r in mine], '.2f')} | "
            f"{spread([r['others_busy_cores'] for r in mine], '.2f')}"
        )
    ratios: dict[str, Any] = {}
    for top, bottom in (("nats-1", "sqlite"), ("nats-2", "nats-1")):
        if top not in configs or bottom not in configs:
            continue
        for metric in ("ingest_events_per_s", "deliveries_per_s"):
            by_run = {r["run"]: r[metric] for r in rows if r["config"] == bottom and r[metric]}
            values = [
                r[metric] / by_run[r["run"]]
                for r in rows
                if r["config"] == top and r[metric] and r["run"] in by_run
            ]
            ratios[f"{top}/{bottom} {metric}"] = values
            print(
                f"{top}/{bottom} {metric.replace('_', ' ')} (within each run): "
                f"{spread(values, '.3f')}"
            )
    summary["ratios"] = {k: statistics.median(v) if v else None for k, v in ratios.items()}
    summary["ratios_per_run"] = ratios
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument(
        "--events",
        type=int,
        default=200_000,
        help="events per measurement, all agents together (default 200,000)",
    )
    ap.add_argument("--agents", type=int, default=4, help="simulated agents (default 4)")
    ap.add_argument(
        "--subscribers",
        type=int,
        default=20,
        help="live SSE subscribers, split over the relays (default 20)",
    )
    ap.add_argument(
        "--runs",
        type=int,
        default=3,
        help="runs of every configuration, interleaved; the median is reported (default 3)",
    )
    ap.add_argument(
        "--only",
        default=",".join(CONFIGS),
        help=f"configurations, comma-separated (default {','.join(CONFIGS)})",
    )
    ap.add_argument(
        "--batch",
        type=int,
        default=2000,
        help="events per batch (the agent's max_batch, default 2000)",
    )
    ap.add_argument(
        "--window", type=int, default=4, help="batches an agent has in flight (default 4)"
    )
    ap.add_argument(
        "--dir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where the temp dir of the logs and the nats store_dir goes "
        "(default: the system's temp dir)",
    )
    ap.add_argument(
        "--quiet-cap",
        type=float,
        default=30.0,
        help="seconds to wait, before each measurement, for the machine to be "
        "about idle (default 30; then it measures anyway, with a warning)",
    )
    ap.add_argument("--json", type=Path, help="write every measurement and the summary here")
    args = ap.parse_args()
    configs = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown or not configs:
        ap.error(f"--only: unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    if args.events < args.agents or args.agents < 1 or args.subscribers < 1 or args.runs < 1:
        ap.error("need --agents ≥ 1, --subscribers ≥ 1, --runs ≥ 1 and --events ≥ --agents")
    if "nats-2" in configs and (args.agents < 2 or args.subscribers < 2):
        ap.error("nats-2 splits agents and subscribers over two relays: give at least 2 of each")
    settings = Settings(args.events, args.agents, args.subscribers, args.batch, args.window)

    # A SIGTERM cleans up as a Ctrl-C does: passed on as SIGINT, which asyncio.run turns into
    # a clean cancellation of the ingest and plain code into KeyboardInterrupt.
    # (SIGINT explicitly too: a shell starts a background job with SIGINT ignored.)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    info = machine()
    procs = Processes()
    base = Path(tempfile.mkdtemp(prefix="se-store-bench-", dir=args.dir))
    rows: list[dict[str, Any]] = []
    env = Env(base, procs, None, quiet_cap=args.quiet_cap)
    started = time.monotonic()
    interrupted = False
    try:
        info["temp_dir"] = str(base)
        info["storage"] = fs_of(base)
        dirty = " (with uncommitted changes)" if info["commit_dirty"] else ""
        log(
            f"{info['nproc']} CPUs ({info['cpu_model']}), Linux {info['kernel']}, Python "
            f"{info['python']}, commit {info['commit']}{dirty}"
        )
        log(f"SQLite logs and the nats store_dir both in {base}: {info['storage']}")
        if any(c.startswith("nats") for c in configs):
            env.cluster = NatsCluster(base, procs)
            info["nats_server"] = env.cluster.version
            log(f"3-server JetStream cluster up ({env.cluster.version}): {env.cluster.store}")
        for run in range(1, args.runs + 1):
            for config in configs:
                rows.append(measure(config, run, settings, env))
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping every process and removing the temp dir")
    except (RuntimeError, httpx.HTTPError) as e:
        print(f"\nstore_bench failed: {e}", file=sys.stderr, flush=True)
        env.failures.append(str(e))
    finally:
        procs.stop_all()
        shutil.rmtree(base, ignore_errors=True)
    if interrupted:
        sys.exit(130)
    summary = report(rows, configs, args.runs) if rows else {}
    log(f"done in {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "command": " ".join([Path(sys.executable).name, *sys.argv]),
                    "machine": info,
                    "settings": vars(settings),
                    "runs": args.runs,
                    "configs": configs,
                    "summary": summary,
                    "failures": env.failures,
                    "results": rows,
                },
                indent=1,
            )
        )
        log(f"wrote {args.json}")
    if env.failures:
        print(
            f"\n{len(env.failures)} failure(s): see above; the figures of a failed "
            "measurement do not count",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == SUBSCRIBER_MODE:
        subscriber_process(sys.argv[2])
    else:
        main()
