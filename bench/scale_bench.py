"""Thousands of agents, each a steady trickle, against ONE relay; nats-server with JetStream
under the same load in the same run, as the peer.

    .venv/bin/python bench/scale_bench.py --agents 500 --rate 4 --seconds 10
    .venv/bin/python bench/scale_bench.py --agents 1000 --rate 20 --seconds 10 --json out.json
    .venv/bin/python bench/scale_bench.py --idle 10000
    options: [--warmup 2] [--window 1] [--procs P] [--runs 1] [--skip-nats] [--grace 30]
             [--nats-msg-id] [--logs DIR] [--json FILE]

Active mode (`--agents N --rate R --seconds S`), per run, one after the other:
  relay  one `storage-events-relay serve` (its SQLite log on a private tmpfs), one SSE
         subscriber (`/events?since=now`, a process of its own), and N simulated agents over
         real WebSocket connections speaking the ingest protocol through the project's own
         PublishSession: a hello, then each agent makes an event due every 1/R s (phases spread
         evenly over the agents), sends it at once when nothing is in flight, and otherwise
         accumulates what becomes due and sends it as one batch when the ack arrives (`--window
         W` batches may be in flight; the real agent's policy, never a fixed linger).
  nats   one `nats-server -js` (its store_dir on the tmpfs), a stream of file storage on
         `scale.>`, one subscriber (an ordered push consumer, delivering only new messages, a
         process of its own) and N publishers, N connections like N agents, each publishing
         the same event JSON at R msg/s with `js.publish` (one message, awaiting its ack
         before the next: what is due meanwhile waits in the publisher's queue).
The load comes from P generator processes (default 2 from 200 agents), each one asyncio loop
owning N/P agents with one ticker for all of them. Only the steady window is measured: it starts
`--warmup` s after the load does (everyone connected by then) and lasts S s.

Figures, for each of relay and nats-server:
  offered / stored / delivered ev/s  events made due, acknowledged (relay: its cumulative acks;
                           nats: the publish acks) and received distinct by the subscriber,
                           in the window, per second
  server CPU us/event      utime+stime (/proc/PID/stat) of the relay process, or of
                           nats-server, over the window / events acknowledged in the window
                           (storing and fan-out to the subscriber alike); the generator
                           processes' and the subscriber's the same, separately, so the reader
                           sees what making the load cost on the same two cores
  machine busy cores       the whole machine over the window (/proc/stat, kernel and other
                           users included): more than the processes above add up to means
                           someone else was using the machine
  missing / duplicates     events made due (all of them, window or not) the subscriber never
                           received within --grace s after the end; events received twice
                           (by stream and seq); out of order: a seq arriving ahead of its
                           predecessor
  lag at end               events made due by the end of sending that the subscriber had not
                           received at that moment; caught up after: seconds from the end of
                           sending until it had every event
  latency p50/p99/max      from the event's `ts` (time.time_ns() when it became due, so time
                           spent waiting behind a batch in flight counts) to when the
                           subscriber parsed it, for events made due in the window
  RSS per connection       server RSS after all N connected (hello and welcome) minus before,
                           / N, in KiB
  relay / nats CPU         the key figure: relay CPU per event / nats-server CPU per message,
                           in the same run
Idle mode (`--idle K`): K agents connect (hello and welcome) and send nothing; the relay's RSS
growth / K, then its CPU while they sit for --seconds s (default 30: the relay and the agents'
websockets client each ping every 20 s); the same for K idle NATS connections. The open-file
limit is raised to K + 4096 (the servers and generators inherit it) and the relay is given
max_connections of at least K + 256 (beyond its default, 10,000, it would answer 503).

CPU time is counted in clock ticks (10 ms): give the window enough seconds that the server uses
at least a few CPU seconds in it (500 x 4 for 10 s: about 4 s).

Design targets the figures are compared with: 500 agents x 4 ev/s: relay CPU/event <= 1x
nats-server's per message; 1,000 x 20 ev/s: every event delivered and p99 <= 100 ms; 10,000
idle agents: <= 20 KiB relay RSS each. On a shared machine, the machine busy figure tells
whether a run was disturbed.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import ctypes
import json
import os
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import websockets
from harness import (
    cpu_seconds,
    free_port,
    nats_server_binary,
    read_within,
    relay_command,
    rss_mib,
    stop,
    tail,
    tmpfs,
    wait_http,
)

from storage_events.errors import PeerError
from storage_events.publish import PublishSession
from storage_events.wire import Event, Hello, Welcome, event_json, ingest_url

GENERATOR = "--generator-process"  # argv[1] of a child that holds simulated agents
SUBSCRIBER = "--subscriber-process"  # argv[1] of the child that holds the subscriber
SITE = "bench"
FLAGS = ["IN_CLOSE_WRITE"]  # shared by every event made: never mutated
NATS_STREAM = "SCALE"
SUBJECT = "scale"
TARGET_CPU_RATIO = 1.0
TARGET_P99_MS = 100.0
TARGET_IDLE_KIB = 20.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def emit(obj: dict[str, Any]) -> None:
    """A child's report to the bench: one JSON line on stdout."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def run_loop(coro: Any) -> None:
    """uvloop when it is installed (the relay's extra brings it), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


async def stdin_lines() -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def command(reader: asyncio.StreamReader) -> dict[str, Any]:
    """The bench's next command; its stdin closing (the bench is gone) means close."""
    line = await reader.readline()
    return json.loads(line) if line.strip() else {"close": True}


# -- measuring ------------------------------------------------------------------------------


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine, all cores, from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(v) - v[3] - v[4]) / tick, v[7] / tick


def percentiles_ms(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    values.sort()
    n = len(values)
    pick = {q: values[min(n - 1, int(q / 100 * n))] for q in (50, 90, 99)}
    return {f"p{q}": v / 1e6 for q, v in pick.items()} | {"max": values[-1] / 1e6}


def sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.monotonic()))


def wall_ns(mono: float) -> int:
    """The time.time_ns() of a time.monotonic() instant (events carry wall-clock ts)."""
    return time.time_ns() + int((mono - time.monotonic()) * 1e9)


def scan_log(path: Path, needles: tuple[str, ...]) -> dict[str, Any]:
    """How many lines of a server's log are warnings or errors, and the first few."""
    found: list[str] = []
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return {"lines": 0, "first": []}
    for line in text.splitlines():
        if any(n in line for n in needles):
            found.append(line[:300])
    return {"lines": len(found), "first": found[:5]}


# -- processes ------------------------------------------------------------------------------


def _die_with_parent() -> None:
    # Children run in sessions of their own (a Ctrl-C reaches the bench alone, which then
    # stops them by pid); this makes the kernel end them even if the bench is killed.
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def spawn(args: list[Any], logfile: Path, *, pipes: bool = False) -> subprocess.Popen:
    with open(logfile, "ab") as out:
        return subprocess.Popen(
            [str(a) for a in args],
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else out,
            stderr=out,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


class Child:
    """A generator or the subscriber: this file run again, JSON lines both ways."""

    def __init__(self, name: str, role: str, spec: dict[str, Any], logfile: Path) -> None:
        self.name, self.logfile, self.buf = name, logfile, b""
        self.proc = spawn(
            [sys.executable, Path(__file__).resolve(), role, json.dumps(spec)], logfile, pipes=True
        )
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
            self.proc.stdin.flush()

    def read(self, key: str, timeout: float) -> Any:
        """The value of the child's next report that has ``key`` (select on the raw pipe: a
        buffered reader could hold a line select never reports)."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                line, _, self.buf = self.buf.partition(b"\n")
                report = json.loads(line)
                if key in report:
                    return report[key]
            chunk = read_within(self.fd, deadline - time.monotonic())
            if chunk is None:
                raise RuntimeError(
                    f"{self.name} did not report {key!r} within {timeout:g} s; its log "
                    f"({self.logfile}):\n{tail(self.logfile)}"
                )
            if not chunk:
                raise RuntimeError(
                    f"{self.name} ended (exit {self.proc.wait()}) before reporting "
                    f"{key!r}; its log ({self.logfile}):\n{tail(self.logfile)}"
                )
            self.buf += chunk

    def close(self, timeout: float = 30) -> None:
        """Ask it to close its connections and exit; stopped by pid if it does not."""
        self.send({"close": True})
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"warning: {self.name} did not exit within {timeout:g} s of close; stopping it")
        stop(self.proc)


# -- the simulated agents and publishers (generator process) -------------------------------


class Counters:
    """One generator's totals, kept by its agents as they go (no sums over thousands)."""

    __slots__ = ("acked", "batches", "errors", "first_error", "generated", "late_max", "queued")

    def __init__(self) -> None:
        self.generated = self.acked = self.batches = self.queued = self.errors = 0
        self.late_max = 0.0  # s: how far the ticker fell behind the schedule, at worst
        self.first_error: str | None = None

    def error(self, what: str) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = what

    def mark(self) -> dict[str, int]:
        return {"generated": self.generated, "acked": self.acked, "batches": self.batches}


class _Sender:
    """What an agent and its NATS peer share: a name, a seq, what was acknowledged, a task."""

    __slots__ = ("acked", "alive", "c", "dir", "node", "seq", "stream", "task")

    def __init__(self, index: int, spec: dict[str, Any], c: Counters) -> None:
        self.node = f"scale-{index:05d}"
        self.stream = f"{self.node}:{spec['runid']}"
        self.dir = f"/data/d{index % 100}"
        self.c = c
        self.seq = self.acked = 0
        self.alive = False
        self.task: asyncio.Task | None = None

    @property
    def unacked_lost(self) -> int:
        """Events that will never be acknowledged: made after the connection was lost."""
        return 0 if self.alive else self.seq - self.acked

    async def close(self) -> None:
        self.alive = False
        if self.task is not None:
            self.task.cancel()
        with contextlib.suppress(Exception):
            await self._disconnect()

    async def _disconnect(self) -> None:
        raise NotImplementedError

    def _next(self, ts: int) -> Event | None:
        """The event that is due, numbered; None once the connection is lost (nothing is sent)."""
        if not self.alive:
            return None
        self.seq += 1
        self.c.generated += 1
        return Event(
            site=SITE,
            node=self.node,
            path=f"{self.dir}/f{self.seq}",
            flags=FLAGS,
            is_dir=False,
            ts=ts,
            stream=self.stream,
            seq=self.seq,
        )


class RelayAgent(_Sender):
    """One agent: its stream over one WebSocket, the accumulate-while-in-flight policy."""

    __slots__ = ("in_flight", "pending", "session", "window", "ws")

    def __init__(self, index: int, spec: dict[str, Any], c: Counters) -> None:
        super().__init__(index, spec, c)
        hello = Hello(role="agent", site=SITE, node=self.node, stream=self.stream, token=None)
        self.session = PublishSession(hello, peer=spec["url"])
        self.window = spec["window"]
        self.ws: Any = None
        self.pending: list[Event] = []
        self.in_flight: deque[int] = deque()  # the last seq of each batch not yet acked

    async def connect(self, url: str) -> None:
        ws = await websockets.connect(
            ingest_url(url), compression=None, max_size=None, open_timeout=60
        )  # as the agent: no compression
        await ws.send(self.session.start())
        reply = self.session.receive(await asyncio.wait_for(ws.recv(), 30))
        if not isinstance(reply, Welcome) or reply.acked != 0:
            await ws.close()
            raise RuntimeError(f"expected a Welcome with acked 0 for {self.stream}: {reply!r}")
        self.ws, self.alive = ws, True

    def start(self) -> None:
        self.task = asyncio.create_task(self._receive())

    async def due(self, ts: int) -> None:
        event = self._next(ts)
        if event is None:
            return
        self.pending.append(event)
        if len(self.in_flight) < self.window:
            await self._send()
        else:
            self.c.queued += 1  # waits for the batch in flight to be acknowledged

    async def _send(self) -> None:
        while self.pending and len(self.in_flight) < self.window:
            frame, self.pending = self.session.frame(self.pending)
            self.in_flight.append(self.session.sent)
            self.c.batches += 1
            try:
                await self.ws.send(frame)  # (returns at once unless the socket is backed up)
            except websockets.ConnectionClosed as e:
                self._lost(f"send failed: {e}")
                return

    async def _receive(self) -> None:
        try:
            async for frame in self.ws:
                self.session.receive(frame)  # after the welcome, only acks pass
                acked = self.session.acked
                self.c.acked += acked - self.acked
                self.acked = acked
                while self.in_flight and self.in_flight[0] <= acked:
                    self.in_flight.popleft()
                if self.pending:
                    await self._send()
            self._lost(f"closed by the relay ({self.ws.close_code} {self.ws.close_reason!r})")
        except websockets.ConnectionClosed as e:
            self._lost(f"connection lost: {e}")
        except PeerError as e:
            self._lost(str(e))

    def _lost(self, why: str) -> None:
        if self.alive:
            self.alive = False
            self.c.error(f"agent {self.node}: {why}")

    async def _disconnect(self) -> None:
        if self.ws is not None:
            await self.ws.close()


class NatsPublisher(_Sender):
    """The peer of one agent: one NATS connection, one js.publish at a time, each awaited."""

    __slots__ = ("busy", "js", "msg_id", "nc", "queue", "subject", "wake")

    def __init__(self, index: int, spec: dict[str, Any], c: Counters) -> None:
        super().__init__(index, spec, c)
        self.subject = f"{SUBJECT}.{self.node}"
        self.msg_id = spec["msg_id"]
        self.queue: deque[tuple[int, bytes]] = deque()
        self.wake = asyncio.Event()
        self.busy = False
        self.nc: Any = None
        self.js: Any = None

    async def connect(self, url: str) -> None:
        import nats

        async def on_error(e: Exception) -> None:
            self.c.error(f"publisher {self.node}: {e!r}")

        self.nc = await nats.connect(
            url, name=self.node, allow_reconnect=False, connect_timeout=30, error_cb=on_error
        )
        self.js = self.nc.jetstream()
        self.alive = True

    def start(self) -> None:
        self.task = asyncio.create_task(self._publish())

    async def due(self, ts: int) -> None:
        event = self._next(ts)
        if event is None:
            return
        if self.busy or self.queue:
            self.c.queued += 1  # waits for the publish in flight to be acknowledged
        self.queue.append((self.seq, event_json(event)))
        self.wake.set()

    async def _publish(self) -> None:
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                while self.queue:
                    seq, data = self.queue[0]
                    self.busy = True
                    headers = {"Nats-Msg-Id": f"{self.stream}:{seq}"} if self.msg_id else None
                    await self.js.publish(self.subject, data, headers=headers)
                    self.queue.popleft()
                    self.acked += 1
                    self.c.acked += 1
                    self.c.batches += 1
                self.busy = False
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a timeout, a closed connection, an API error: all reported
            self.alive = False
            self.c.error(f"publisher {self.node}: {e!r}")

    async def _disconnect(self) -> None:
        if self.nc is not None:
            await self.nc.close()


Sender = RelayAgent | NatsPublisher


async def connect_all(senders: list[Sender], url: str, parallel: int) -> list[str]:
    """Connect everyone, ``parallel`` at a time (beyond, the server's accept backlog fills);
    returns why each failure failed."""
    gate = asyncio.Semaphore(parallel)

    async def one(s: Sender) -> str | None:
        async with gate:
            try:
                await s.connect(url)
            except Exception as e:
                return f"{s.node}: {e!r}"
        return None

    return [f for f in await asyncio.gather(*(one(s) for s in senders)) if f is not None]


async def ticker(
    senders: list[Sender], c: Counters, rate: float, t0: float, end: float, tick: float
) -> None:
    """Make every sender's events due at ``rate`` each from ``t0`` to ``end``: slot j is sender
    j % n at t0 + j / (n * rate), so phases are spread evenly; one wake-up serves every slot
    that came due since the last (no sleeping task per event)."""
    n = len(senders)
    per_s = n * rate
    total = max(0, int((end - t0) * per_s))
    made = 0
    while made < total:
        now = time.monotonic()
        target = min(total, int((now - t0) * per_s) + 1) if now >= t0 else 0
        if target > made:
            c.late_max = max(c.late_max, now - (t0 + made / per_s))
            ts = time.time_ns()
            for j in range(made, target):
                await senders[j % n].due(ts)
            made = target
        await asyncio.sleep(max(tick, t0 + made / per_s - time.monotonic()))


async def generate(
    senders: list[Sender], c: Counters, spec: dict[str, Any], t0: float, warm: float, end: float
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    marks: dict[str, dict[str, int]] = {}
    for s in senders:
        s.start()
    loop.call_later(max(0.0, warm - time.monotonic()), lambda: marks.update(warm=c.mark()))
    await ticker(senders, c, spec["rate"], t0, end, spec["tick"])
    marks["end"] = c.mark()
    ended = time.monotonic()
    # Then every event made must be acknowledged (those of lost connections never will be).
    deadline = ended + spec["grace"]
    drained: float | None = None
    while time.monotonic() < deadline:
        if c.acked >= c.generated - sum(s.unacked_lost for s in senders):
            drained = max(0.0, time.monotonic() - end)  # (the last slot is before end)
            break
        await asyncio.sleep(0.02)
    return {
        "marks": marks,
        "final": c.mark(),
        "ticker_end_late_s": ended - end,
        "drained_s": drained,
        "late_max_s": c.late_max,
        "queued": c.queued,
        "errors": c.errors,
        "first_error": c.first_error,
        "alive": sum(s.alive for s in senders),
    }


async def generator_main(spec: dict[str, Any]) -> None:
    c = Counters()
    make = RelayAgent if spec["kind"] == "relay" else NatsPublisher
    senders: list[Sender] = [make(i, spec, c) for i in range(spec["first"], spec["last"])]
    started = time.monotonic()
    failures = await connect_all(senders, spec["url"], spec["parallel"])
    alive = [s for s in senders if s.alive]
    emit(
        {
            "connected": {
                "count": len(alive),
                "failed": len(failures),
                "first_failure": failures[0] if failures else None,
                "seconds": time.monotonic() - started,
            }
        }
    )
    commands = await stdin_lines()
    cmd = await command(commands)
    if "go" in cmd and alive:
        t0, warm, end = cmd["go"]
        emit({"result": await generate(alive, c, spec, t0, warm, end)})
        cmd = await command(commands)
    closing = [asyncio.create_task(s.close()) for s in senders]
    await asyncio.wait(closing, timeout=20)


# -- the subscriber process -----------------------------------------------------------------


class Seen(msgspec.Struct):
    """What the subscriber reads of each event (msgspec skips the other fields)."""

    stream: str
    seq: int
    ts: int


decode_seen = msgspec.json.Decoder(Seen).decode


class Tally:
    """Every event received, by (stream, seq): seqs run 1, 2, 3... per stream, so a stream's
    highest seq received in order, and the few that came ahead of it, say what is there."""

    def __init__(self) -> None:
        self.high: dict[str, int] = {}
        self.ahead: dict[str, set[int]] = {}
        self.received = self.distinct = self.duplicates = self.out_of_order = 0
        self.other: dict[str, int] = {}  # SSE messages that are not events (gap, shutdown)
        self.closed: str | None = None  # why the feed ended, if it did
        self.ts = array.array("q")  # of each distinct event, and its latency in ns
        self.latency = array.array("q")
        self.last_new = 0.0  # monotonic: when the newest distinct event arrived
        self.marks: dict[str, int] = {}

    def add(self, seen: Seen, now_ns: int, now: float) -> None:
        self.received += 1
        stream, seq = seen.stream, seen.seq
        high = self.high.get(stream, 0)
        if seq == high + 1:
            ahead = self.ahead.get(stream)
            while ahead and seq + 1 in ahead:
                seq += 1
                ahead.discard(seq)
            self.high[stream] = seq
        elif seq <= high or seq in self.ahead.get(stream, ()):
            self.duplicates += 1
            return
        else:
            self.out_of_order += 1
            self.ahead.setdefault(stream, set()).add(seq)
        self.distinct += 1
        self.last_new = now
        self.ts.append(seen.ts)
        self.latency.append(now_ns - seen.ts)

    def result(self, expect: int, end: float, warm_ns: int, end_ns: int) -> dict[str, Any]:
        pairs = zip(self.ts, self.latency, strict=True)
        window = [lat for ts, lat in pairs if warm_ns <= ts < end_ns]
        return {
            "received": self.received,
            "distinct": self.distinct,
            "duplicates": self.duplicates,
            "out_of_order": self.out_of_order,
            "other_messages": self.other,
            "closed": self.closed,
            "marks": self.marks,
            "caught_up_s": max(0.0, self.last_new - end) if self.distinct >= expect else None,
            "latency_events": len(window),
            "latency_ms": percentiles_ms(window),
        }


class SSEFeed(asyncio.Protocol):
    """The relay's /events?since=now over a raw socket. The relay yields whole SSE messages
    per HTTP chunk, so chunk-size lines fall only between messages; what follows the last
    blank line of a read is a message still arriving."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.head: bytes | None = b""
        self.carry = b""
        self.ready = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.hanging_up = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(  # type: ignore[attr-defined]
            b"GET /events?since=now HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Accept: text/event-stream\r\n\r\n"
        )

    def data_received(self, data: bytes) -> None:
        if self.head is not None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            status = self.head.split(b"\r\n", 1)[0].decode(errors="replace")
            if " 200 " not in status:
                self.ready.set_exception(RuntimeError(f"the relay answered /events: {status}"))
                return
            data, self.head = self.head[end + 4 :], None
        buf = self.carry + data
        end = buf.rfind(b"\n\n")
        if end < 0:
            self.carry = buf
            return
        self.carry = buf[end + 2 :]
        if not self.ready.done():
            self.ready.set_result(None)  # the resume block: subscribed from here on
        now_ns, now = time.time_ns(), time.monotonic()
        add, tally = self.tally.add, self.tally
        for block in buf[:end].split(b"\n\n"):
            kind, _, data = block.partition(b"\nevent: ")[2].partition(b"\ndata: ")
            if kind == b"inotify":
                add(decode_seen(data), now_ns, now)
            elif kind:
                name = kind.decode(errors="replace")
                tally.other[name] = tally.other.get(name, 0) + 1

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.hanging_up:
            self.tally.closed = f"the relay ended the feed ({exc or 'closed'})"
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(f"the relay closed /events at once ({exc})"))


async def open_sse(url: str, tally: Tally) -> Callable[[], Any]:
    loop = asyncio.get_running_loop()
    host, port = httpx.URL(url).host, httpx.URL(url).port
    feed = SSEFeed(tally)
    await loop.create_connection(lambda: feed, host, port)
    await asyncio.wait_for(feed.ready, 30)

    async def close() -> None:
        feed.hanging_up = True
        if feed.transport is not None:
            feed.transport.close()

    return close


async def open_nats_feed(url: str, tally: Tally) -> Callable[[], Any]:
    import nats
    from nats.js.api import DeliverPolicy

    async def on_error(e: Exception) -> None:
        tally.closed = tally.closed or f"NATS error: {e!r}"

    nc = await nats.connect(url, name="scale-subscriber", allow_reconnect=False, error_cb=on_error)

    async def on_msg(msg: Any) -> None:
        tally.add(decode_seen(msg.data), time.time_ns(), time.monotonic())

    await nc.jetstream().subscribe(
        f"{SUBJECT}.>", cb=on_msg, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
    )
    return nc.close


async def subscriber_main(spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    tally = Tally()
    opener = open_sse if spec["kind"] == "relay" else open_nats_feed
    close = await opener(spec["url"], tally)
    emit({"ready": True})
    commands = await stdin_lines()
    cmd = await command(commands)
    if "window" in cmd:
        warm, end, warm_ns, end_ns = cmd["window"]
        for name, at in (("warm", warm), ("end", end)):
            loop.call_later(
                max(0.0, at - time.monotonic()),
                lambda name=name: tally.marks.update({name: tally.distinct}),
            )
        cmd = await command(commands)
    if "expect" in cmd:
        expect = cmd["expect"]
        deadline = end + spec["grace"]
        while tally.distinct < expect and tally.closed is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # anything sent twice would most likely come right behind
        emit({"result": tally.result(expect, end, warm_ns, end_ns)})
    await close()


def child_main(role: str, arg: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench stops its children itself
    spec = json.loads(arg)
    run_loop(generator_main(spec) if role == GENERATOR else subscriber_main(spec))


# -- the servers ----------------------------------------------------------------------------


@dataclass
class Server:
    kind: str  # "relay" or "nats"
    proc: subprocess.Popen
    url: str
    logfile: Path

    @property
    def name(self) -> str:
        return "relay" if self.kind == "relay" else "nats-server"

    def agents(self) -> int | None:
        """The relay's own count of agent connections (/healthz)."""
        if self.kind != "relay":
            return None
        return httpx.get(self.url + "/healthz", timeout=10).json().get("agents")

    def log_problems(self) -> dict[str, Any]:
        needles = (
            (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")
            if self.kind == "relay"
            else ("[WRN]", "[ERR]", "[FTL]")
        )
        return scan_log(self.logfile, needles)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode}; its log "
                f"({self.logfile}):\n{tail(self.logfile)}"
            )


def start_relay(base: Path, logs: Path, max_connections: int) -> Server:
    port = free_port()
    config = logs / "relay.toml"
    # uvicorn answers 503 beyond max_connections (default 10,000): the idle test goes beyond.
    config.write_text(f'name = "scale-bench"\nmax_connections = {max_connections}\n')
    data = base / "relay-data"
    shutil.rmtree(data, ignore_errors=True)
    logfile = logs / "relay.log"
    proc = spawn(
        relay_command(port, data, "--config", config),
        logfile,
    )
    server = Server("relay", proc, f"http://127.0.0.1:{port}", logfile)
    try:
        wait_http(server.url + "/healthz", timeout=30)
    except RuntimeError:
        stop(proc)
        raise RuntimeError(
            f"the relay did not answer {server.url}/healthz within 30 s (exit "
            f"{proc.returncode}); its log ({logfile}):\n{tail(logfile)}"
        ) from None
    return server


def start_nats(base: Path, logs: Path) -> Server:
    port = free_port()
    store = base / "nats-js"
    shutil.rmtree(store, ignore_errors=True)
    logfile = logs / "nats-server.log"
    proc = spawn(
        [nats_server_binary("--skip-nats"), "-a", "127.0.0.1", "-p", port, "-js", "-sd", store],
        logfile,
    )
    server = Server("nats", proc, f"nats://127.0.0.1:{port}", logfile)
    deadline = time.monotonic() + 30
    while b"Server is ready" not in logfile.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(
                f"nats-server did not get ready within 30 s (exit {proc.returncode}); its "
                f"log ({logfile}):\n{tail(logfile)}"
            )
        time.sleep(0.05)
    try:
        asyncio.run(asyncio.wait_for(create_stream(server.url), 30))
    except Exception as e:
        stop(proc)
        raise RuntimeError(f"could not create the JetStream stream {NATS_STREAM}: {e!r}") from e
    return server


async def create_stream(url: str) -> None:
    import nats
    from nats.js.api import StorageType

    nc = await nats.connect(url, connect_timeout=10)
    try:
        await nc.jetstream().add_stream(
            name=NATS_STREAM, subjects=[f"{SUBJECT}.>"], storage=StorageType.FILE
        )
    finally:
        await nc.close()


@contextlib.contextmanager
def server(kind: str, base: Path, logs: Path, max_connections: int) -> Iterator[Server]:
    s = start_relay(base, logs, max_connections) if kind == "relay" else start_nats(base, logs)
    try:
        yield s
    finally:
        stop(s.proc)


# -- one measurement ------------------------------------------------------------------------


def start_generators(
    kind: str, args: argparse.Namespace, url: str, count: int, logs: Path, stack: Any
) -> list[Child]:
    runid = secrets.token_hex(4)
    procs = min(args.procs, count)
    gens = []
    for p in range(procs):
        spec = {
            "kind": kind,
            "url": url,
            "first": p * count // procs,
            "last": (p + 1) * count // procs,
            "rate": args.rate,
            "window": args.window,
            "runid": runid,
            "tick": args.tick,
            "grace": args.grace,
            "parallel": args.parallel,
            "msg_id": args.nats_msg_id,
        }
        g = Child(f"{kind} generator {p}", GENERATOR, spec, logs / f"{kind}-generator-{p}.log")
        stack.callback(g.close)
        gens.append(g)
    return gens


def wait_connected(gens: list[Child], count: int) -> dict[str, Any]:
    timeout = 60 + count / 50
    reports = [g.read("connected", timeout) for g in gens]
    failures = [r["first_failure"] for r in reports if r["first_failure"]]
    return {
        "connected": sum(r["count"] for r in reports),
        "connect_failed": sum(r["failed"] for r in reports),
        "first_connect_failure": failures[0] if failures else None,
        "connect_s": max(r["seconds"] for r in reports),
    }


def sample(pids: dict[str, list[int]]) -> dict[str, float]:
    out = {name: sum(cpu_seconds(p) for p in group) for name, group in pids.items()}
    out["machine"], out["steal"] = machine_cpu()
    return out


def per_event_us(cpu: float, events: int) -> float | None:
    return cpu * 1e6 / events if events else None


def measure_active(kind: str, args: argparse.Namespace, base: Path, logs: Path) -> dict[str, Any]:
    n = args.agents
    with contextlib.ExitStack() as stack:
        srv = stack.enter_context(server(kind, base, logs, max(10_000, n + 256)))
        sub_spec = {"kind": kind, "url": srv.url, "grace": args.grace}
        sub = Child(f"{kind} subscriber", SUBSCRIBER, sub_spec, logs / f"{kind}-subscriber.log")
        stack.callback(sub.close)
        sub.read("ready", 30)
        time.sleep(0.5)
        rss_before = rss_mib(srv.proc.pid)
        gens = start_generators(kind, args, srv.url, n, logs, stack)
        conn = wait_connected(gens, n)
        log(f"  {kind}: {conn['connected']:,} connected in {conn['connect_s']:.1f} s")
        time.sleep(1.0)
        srv.check_alive()
        rss_after = rss_mib(srv.proc.pid)
        seen_by_relay = srv.agents()

        t0 = time.monotonic() + 0.5
        warm = t0 + args.warmup
        end = warm + args.seconds
        for p, g in enumerate(gens):
            g.send({"go": [t0 + p / (n * args.rate), warm, end]})  # the processes interleave
        sub.send({"window": [warm, end, wall_ns(warm), wall_ns(end)]})
        pids = {"server": [srv.proc.pid], "generators": [g.pid for g in gens], "sub": [sub.pid]}
        sleep_until(warm)
        s0 = sample(pids)
        sleep_until(end)
        s1 = sample(pids)
        log(f"  {kind}: sending ended; waiting for the acks and the subscriber")
        results = [g.read("result", args.grace + 60) for g in gens]
        generated = sum(r["final"]["generated"] for r in results)
        sub.send({"expect": generated})
        got = sub.read("result", args.grace + 60)
        srv.check_alive()
        problems = srv.log_problems()  # before the connections close and it stops
    return summarize_active(
        kind,
        args,
        srv,
        conn,
        seen_by_relay,
        (rss_before, rss_after),
        (s0, s1),
        end - warm,
        results,
        got,
        problems,
    )


def summarize_active(
    kind: str,
    args: argparse.Namespace,
    srv: Server,
    conn: dict[str, Any],
    seen_by_relay: int | None,
    rss: tuple[float, float],
    samples: tuple[dict[str, float], dict[str, float]],
    window: float,
    results: list[dict[str, Any]],
    got: dict[str, Any],
    problems: dict[str, Any],
) -> dict[str, Any]:
    (rss_before, rss_after), (s0, s1) = rss, samples

    def total(mark: str, key: str) -> int:
        return sum(r["marks"][mark][key] for r in results)

    made = total("end", "generated") - total("warm", "generated")
    acked = total("end", "acked") - total("warm", "acked")
    batches = total("end", "batches") - total("warm", "batches")
    delivered = got["marks"].get("end", 0) - got["marks"].get("warm", 0)
    cpu = {k: s1[k] - s0[k] for k in s0}
    generated = sum(r["final"]["generated"] for r in results)
    errors = [r["first_error"] for r in results if r["first_error"]]
    drained = [r["drained_s"] for r in results]
    return {
        "kind": kind,
        "agents": args.agents,
        "rate": args.rate,
        "window_s": window,
        **conn,
        "agents_seen_by_relay": seen_by_relay,
        "offered_per_s": made / window,
        "stored_per_s": acked / window,
        "delivered_per_s": delivered / window,
        "server_cpu_s": cpu["server"],
        "server_cores": cpu["server"] / window,
        "server_us_per_event": per_event_us(cpu["server"], acked),
        "generator_cpu_s": cpu["generators"],
        "generator_us_per_event": per_event_us(cpu["generators"], made),
        "subscriber_cpu_s": cpu["sub"],
        "subscriber_us_per_event": per_event_us(cpu["sub"], delivered),
        "machine_busy_cores": cpu["machine"] / window,
        "machine_steal_cores": cpu["steal"] / window,
        "events_per_send": made / batches if batches else None,  # relay: events per batch
        "queued_behind_in_flight": sum(r["queued"] for r in results),
        "schedule_late_max_ms": max(r["late_max_s"] for r in results) * 1e3,
        "generated": generated,
        "acked": sum(r["final"]["acked"] for r in results),
        "acks_drained_s": None if None in drained else max(drained),
        "received": got["received"],
        "distinct": got["distinct"],
        "missing": generated - got["distinct"],
        "duplicates": got["duplicates"],
        "out_of_order": got["out_of_order"],
        "other_messages": got["other_messages"],
        "feed_closed": got["closed"],
        "lag_at_end": total("end", "generated") - got["marks"].get("end", 0),
        "caught_up_s": got["caught_up_s"],
        "latency_ms": got["latency_ms"],
        "latency_events": got["latency_events"],
        "rss_before_mib": rss_before,
        "rss_after_mib": rss_after,
        "rss_kib_per_connection": (rss_after - rss_before) * 1024 / max(1, conn["connected"]),
        "disconnected": sum(r["errors"] for r in results),
        "first_error": errors[0] if errors else None,
        "server_log": problems,
        "server_log_file": str(srv.logfile),
    }


def measure_idle(kind: str, args: argparse.Namespace, base: Path, logs: Path) -> dict[str, Any]:
    k = args.idle
    with contextlib.ExitStack() as stack:
        srv = stack.enter_context(server(kind, base, logs, max(10_000, k + 256)))
        time.sleep(1.0)
        rss_before = rss_mib(srv.proc.pid)
        gens = start_generators(kind, args, srv.url, k, logs, stack)
        conn = wait_connected(gens, k)
        log(f"  {kind}: {conn['connected']:,} idle connected in {conn['connect_s']:.1f} s")
        time.sleep(2.0)  # what the last connections started settles
        srv.check_alive()
        rss_after = rss_mib(srv.proc.pid)
        seen_by_relay = srv.agents()
        pids = {"server": [srv.proc.pid], "generators": [g.pid for g in gens]}
        s0 = sample(pids)
        time.sleep(args.seconds)
        s1 = sample(pids)
        srv.check_alive()
        rss_held = rss_mib(srv.proc.pid)
        seen_after = srv.agents()
        problems = srv.log_problems()
    return {
        "kind": kind,
        "idle": k,
        **conn,
        "agents_seen_by_relay": seen_by_relay,
        "agents_seen_after_hold": seen_after,
        "rss_before_mib": rss_before,
        "rss_after_mib": rss_after,
        "rss_after_hold_mib": rss_held,
        "rss_kib_per_connection": (rss_after - rss_before) * 1024 / max(1, conn["connected"]),
        "hold_s": args.seconds,
        "server_idle_cores": (s1["server"] - s0["server"]) / args.seconds,
        "generator_idle_cores": (s1["generators"] - s0["generators"]) / args.seconds,
        "server_log": problems,
        "server_log_file": str(srv.logfile),
    }


# -- reporting ------------------------------------------------------------------------------


def num(v: Any, spec: str = ",.1f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return format(v, ",") if isinstance(v, int) else str(v)


def lat(r: dict[str, Any]) -> str:
    m = r.get("latency_ms")
    return f"{m['p50']:.1f} / {m['p99']:.1f} / {m['max']:.0f}" if m else "-"


ACTIVE_ROWS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("connected", lambda r: f"{num(r['connected'])} (failed {r['connect_failed']})"),
    ("offered ev/s", lambda r: num(r["offered_per_s"])),
    ("stored (acked) ev/s", lambda r: num(r["stored_per_s"])),
    ("delivered ev/s", lambda r: num(r["delivered_per_s"])),
    ("server CPU us/event", lambda r: num(r["server_us_per_event"], ".1f")),
    ("server CPU cores", lambda r: num(r["server_cores"], ".3f")),
    ("generators CPU us/event", lambda r: num(r["generator_us_per_event"], ".1f")),
    ("subscriber CPU us/event", lambda r: num(r["subscriber_us_per_event"], ".1f")),
    ("machine busy cores", lambda r: num(r["machine_busy_cores"], ".2f")),
    ("generators CPU cores", lambda r: num(r["generator_cpu_s"] / r["window_s"], ".3f")),
    ("events per send", lambda r: num(r["events_per_send"], ".2f")),
    ("queued behind in-flight", lambda r: num(r["queued_behind_in_flight"])),
    ("acks drained after s", lambda r: num(r["acks_drained_s"], ".3f")),
    ("generated / delivered", lambda r: f"{num(r['generated'])} / {num(r['distinct'])}"),
    ("missing / duplicates", lambda r: f"{num(r['missing'])} / {num(r['duplicates'])}"),
    ("lag at end (events)", lambda r: num(r["lag_at_end"])),
    ("caught up after (s)", lambda r: num(r["caught_up_s"], ".3f")),
    ("latency p50/p99/max ms", lat),
    ("RSS per connection KiB", lambda r: num(r["rss_kib_per_connection"], ".1f")),
    ("schedule late max ms", lambda r: num(r["schedule_late_max_ms"], ".1f")),
    ("disconnected", lambda r: num(r["disconnected"])),
    ("log warnings/errors", lambda r: num(r["server_log"]["lines"])),
]

IDLE_ROWS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("connected", lambda r: f"{num(r['connected'])} (failed {r['connect_failed']})"),
    ("connect time s", lambda r: num(r["connect_s"], ".1f")),
    ("seen by the relay", lambda r: num(r["agents_seen_by_relay"])),
    ("RSS before / after MiB", lambda r: f"{r['rss_before_mib']:.1f} / {r['rss_after_mib']:.1f}"),
    ("RSS per connection KiB", lambda r: num(r["rss_kib_per_connection"], ".1f")),
    ("RSS after hold MiB", lambda r: num(r["rss_after_hold_mib"], ".1f")),
    ("server CPU idle cores", lambda r: num(r["server_idle_cores"], ".4f")),
    ("log warnings/errors", lambda r: num(r["server_log"]["lines"])),
]


def table(title: str, rows: list[tuple[str, Callable]], results: list[dict[str, Any]]) -> None:
    names = {"relay": "relay", "nats": "nats-server"}
    print(f"\n{title}")
    print(f"  {'':<26}" + "".join(f"{names[r['kind']]:>26}" for r in results))
    for label, cell in rows:
        print(f"  {label:<26}" + "".join(f"{cell(r):>26}" for r in results))
    for r in results:
        if r.get("first_connect_failure"):
            print(f"  {names[r['kind']]} first connect failure: {r['first_connect_failure']}")
        if r.get("first_error"):
            print(f"  {names[r['kind']]} first error: {r['first_error']}")
        if r.get("feed_closed"):
            print(f"  {names[r['kind']]} subscriber: {r['feed_closed']}")
        for line in r["server_log"]["first"]:
            print(f"  {names[r['kind']]} log: {line}")


def verdicts(run: dict[str, Any]) -> list[str]:
    """The figures next to the design targets they are meant to show."""
    out = []
    relay = run.get("relay")
    if relay and "idle" in relay:
        kib = relay["rss_kib_per_connection"]
        ok = kib <= TARGET_IDLE_KIB and relay["connect_failed"] == 0
        out.append(
            f"relay RSS {kib:.1f} KiB per idle agent (target <= {TARGET_IDLE_KIB:g}): "
            f"{'met' if ok else 'NOT met'}"
        )
        return out
    if relay:
        once = relay["missing"] == 0 and relay["duplicates"] == 0 and not relay["feed_closed"]
        out.append(f"relay: every event delivered exactly once: {'yes' if once else 'NO'}")
        if relay["latency_ms"]:
            p99 = relay["latency_ms"]["p99"]
            out.append(
                f"relay p99 ingest -> subscriber {p99:.1f} ms (target <= {TARGET_P99_MS:g}): "
                f"{'met' if p99 <= TARGET_P99_MS else 'NOT met'}"
            )
    for kind in ("relay", "nats"):
        r = run.get(kind)
        if r and r["stored_per_s"] < 0.98 * r["offered_per_s"]:
            name = "relay" if kind == "relay" else "nats-server"
            out.append(
                f"{name}: only {r['stored_per_s']:,.0f} of the {r['offered_per_s']:,.0f} ev/s "
                f"made due were acknowledged in the window: the senders fell behind (their "
                f"queues grew; generators {r['generator_cpu_s'] / r['window_s']:.2f} cores, "
                f"machine {r['machine_busy_cores']:.2f} of {os.cpu_count()} busy), so its lag "
                "and latency count that wait"
            )
    if run.get("cpu_ratio") is not None:
        ratio = run["cpu_ratio"]
        out.append(
            f"relay CPU per event / nats-server CPU per message = {ratio:.2f} (target <= "
            f"{TARGET_CPU_RATIO:g}): {'met' if ratio <= TARGET_CPU_RATIO else 'NOT met'}"
        )
    return out


def cpu_ratio(relay: dict[str, Any] | None, nats: dict[str, Any] | None) -> float | None:
    if not relay or not nats or "idle" in relay:
        return None
    r, n = relay["server_us_per_event"], nats["server_us_per_event"]
    return r / n if r is not None and n else None


# -- main -----------------------------------------------------------------------------------


def raise_nofile(need: int) -> int:
    """Raise RLIMIT_NOFILE before spawning anything: the relay, nats-server and the
    generators inherit it. Root may raise the hard limit too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return soft
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))
        return need
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < need:
        raise SystemExit(
            f"the open-file limit is {hard} and cannot be raised to the {need} this needs "
            "(one descriptor per connection in the server and in the generators): run as root "
            "or raise it (ulimit -Hn), or use fewer agents"
        )
    return hard


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=500, help="N simulated agents")
    ap.add_argument("--rate", type=float, default=4.0, help="events/s of each agent")
    ap.add_argument(
        "--seconds", type=float, help="the measured window (default 10); idle: the hold (30)"
    )
    ap.add_argument("--warmup", type=float, default=2.0, help="s of load before the window")
    ap.add_argument("--idle", type=int, metavar="K", help="idle mode: K connected idle agents")
    ap.add_argument("--window", type=int, default=1, help="batches an agent has in flight")
    ap.add_argument("--procs", type=int, help="generator processes (default 2 from 200 agents)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--skip-nats", action="store_true", help="measure the relay alone")
    ap.add_argument("--nats-msg-id", action="store_true", help="publish with Nats-Msg-Id")
    ap.add_argument("--grace", type=float, default=30.0, help="s allowed for catching up")
    ap.add_argument("--tick", type=float, default=0.002, help="the ticker's shortest sleep, s")
    ap.add_argument("--parallel", type=int, default=64, help="connects at once per generator")
    ap.add_argument("--logs", type=Path, help="where the servers' and children's logs go")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    count = args.idle if args.idle is not None else args.agents
    if args.seconds is None:
        args.seconds = 30.0 if args.idle is not None else 10.0
    if count < 1 or args.rate <= 0 or args.seconds <= 0 or args.window < 1:
        ap.error("--agents/--idle, --rate, --seconds and --window must be positive")
    if args.procs is None:
        args.procs = 2 if count >= 200 else 1
    return args


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] in (GENERATOR, SUBSCRIBER):
        child_main(sys.argv[1], sys.argv[2])
        return
    args = parse_args()
    count = args.idle if args.idle is not None else args.agents
    nofile = raise_nofile(count + 4096)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="scale-bench-"))
    logs.mkdir(parents=True, exist_ok=True)
    kinds = ["relay"] if args.skip_nats else ["relay", "nats"]
    what = (
        f"{args.idle:,} idle agents, held {args.seconds:g} s"
        if args.idle is not None
        else f"{args.agents:,} agents x {args.rate:g} ev/s = {args.agents * args.rate:,.0f} ev/s, "
        f"window {args.seconds:g} s after {args.warmup:g} s warm-up, {args.window} batch(es) "
        "in flight"
    )
    log(f"{what}; {args.procs} generator process(es); open files {nofile}; logs in {logs}")
    measure = measure_idle if args.idle is not None else measure_active
    runs: list[dict[str, Any]] = []
    with tmpfs("4g") as base:
        for run in range(1, args.runs + 1):
            out: dict[str, Any] = {"run": run}
            run_logs = logs / f"run{run}"  # each run's server logs scanned on their own
            run_logs.mkdir(exist_ok=True)
            for kind in kinds:
                log(f"run {run}: {kind}")
                out[kind] = measure(kind, args, base, run_logs)
            out["cpu_ratio"] = cpu_ratio(out.get("relay"), out.get("nats"))
            runs.append(out)
            rows = IDLE_ROWS if args.idle is not None else ACTIVE_ROWS
            table(f"run {run}: {what}", rows, [out[k] for k in kinds])
            for line in verdicts(out):
                print(f"  {line}")
    if args.runs > 1:
        ratios = [r["cpu_ratio"] for r in runs if r["cpu_ratio"] is not None]
        if ratios:
            print(
                f"\nrelay/nats CPU per event, run by run: {', '.join(f'{x:.2f}' for x in ratios)}"
                f"; median {statistics.median(ratios):.2f}"
            )
    if args.json:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"config": config, "runs": runs}, indent=1))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
