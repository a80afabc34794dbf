"""Real processes for real tests: relays, agents and subscribers started as users start them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

BIN = Path(sys.executable).parent


def command(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{path} is missing: install the project into this virtualenv"
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Proc:
    """A child process whose output goes to a file the test can show when it fails."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        *,
        stdout_path: Path | None = None,
        env: dict[str, str] | None = None,
    ):
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        # A separate stdout file keeps stderr warnings out of machine-read output.
        self._out = open(stdout_path, "wb") if stdout_path else None  # noqa: SIM115
        self.popen = subprocess.Popen(
            args,
            stdout=self._out or self._log,
            stderr=self._log if self._out else subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        self.send(sig)
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.popen.pid, signal.SIGKILL)
            rc = self.popen.wait(5)
        self._log.close()
        if self._out:
            self._out.close()
        return rc


class Relay:
    def __init__(
        self,
        tmp: Path,
        procs: list[Proc],
        name: str = "relay",
        extra: tuple[str, ...] = (),
        scheme: str = "http",
        host: str = "127.0.0.1",
        netns: list[str] | None = None,
        port: int | None = None,
        token: str | None = None,
    ) -> None:
        self.host = host  # where it listens; outside a namespace tests reach it on loopback
        self.port = port or free_port()
        self.url = (
            f"{scheme}://{host if netns or host.startswith('127.') else '127.0.0.1'}:{self.port}"
        )
        self.netns = netns or []  # the `ip netns exec NS` prefix of a relay on another "host"
        self.data = tmp / f"{name}-data"
        self.name = name
        self.tmp = tmp
        self.extra = extra
        # A relay with tokens tells only its status to anonymous callers: any of its tokens
        # gets the rest of /healthz (head, agents, ...), which tests read.
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._procs = procs
        self.proc: Proc | None = None
        self.start()

    def start(self) -> None:
        self.proc = Proc(
            [
                *self.netns,
                command("storage-events-relay"),
                "serve",
                "--listen",
                f"{self.host}:{self.port}",
                "--data",
                str(self.data),
                *self.extra,
            ],
            self.tmp / f"{self.name}.log",
        )
        self._procs.append(self.proc)
        wait_for(self.healthy, 20, f"relay on {self.url}")

    def healthy(self) -> dict | None:
        assert self.proc is not None
        if self.proc.popen.poll() is not None:
            raise AssertionError(f"relay exited:\n{self.proc.output()}")
        try:
            # (Generous: on a loaded machine a relay may take a while to answer.)
            r = httpx.get(self.url + "/healthz", headers=self.headers, timeout=5, verify=False)
        except httpx.TransportError:
            return None
        return r.json() if r.status_code == 200 else None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.stop(signal.SIGKILL)


class Tail:
    """``storage-events tail URL --format json`` in the background, collecting its lines."""

    def __init__(self, tmp: Path, procs: list[Proc], url: str, *args: str, name: str = "tail"):
        self.out = tmp / f"{name}.jsonl"
        self.proc = Proc(
            [command("storage-events"), "tail", url, "--format", "json", "-v", *args],
            tmp / f"{name}.err",
            stdout_path=self.out,
        )
        procs.append(self.proc)

    def events(self) -> list[dict]:
        lines = self.out.read_bytes().split(b"\n")
        return [json.loads(line) for line in lines[:-1]]

    def wait_count(self, n: int, timeout: float = 60) -> list[dict]:
        wait_for(
            lambda: len(self.events()) >= n,
            timeout,
            f"{n} events from tail (have {len(self.events())}); "
            f"stderr: {self.proc.output()[-2000:]}",
        )
        return self.events()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        with contextlib.suppress(Exception):
            p.stop(timeout=10)


@pytest.fixture
def relay(tmp_path: Path, procs: list[Proc]) -> Relay:
    return Relay(tmp_path, procs)


def start_agent(
    tmp: Path,
    procs: list[Proc],
    relay_url: str,
    *paths: Path,
    site: str = "test",
    node: str = "node1",
    name: str = "agent",
    extra: tuple[str, ...] = (),
    netns: list[str] | None = None,
) -> Proc:
    proc = Proc(
        [
            *(netns or []),
            command("storage-events-agent"),
            "run",
            "--relay",
            relay_url,
            "--site",
            site,
            "--node",
            node,
            *extra,
            *map(str, paths),
        ],
        tmp / f"{name}.log",
    )
    procs.append(proc)
    wait_for(
        lambda: "publishing stream" in proc.output() or proc.popen.poll() is not None,
        20,
        "agent start-up",
    )
    assert proc.popen.poll() is None, proc.output()
    return proc


def agents_connected(relay: Relay) -> int:
    health = relay.healthy()
    return health["agents"] if health else 0


class ChannelReader:
    """A dCache SSE client: GET the channel with ``Accept: text/event-stream`` (and, when
    reconnecting, ``Last-Event-ID``), and split the stream into messages on its own."""

    def __init__(
        self, url: str, last_event_id: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        self.headers = {"Accept": "text/event-stream", **(headers or {})}
        if last_event_id is not None:
            self.headers["Last-Event-ID"] = last_event_id
        self.url = url
        self.raw = ""
        self.status: int | None = None
        self._stop = threading.Event()
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        wait_for(lambda: self.status is not None, 10, f"stream {url}")

    def _run(self) -> None:
        try:
            with httpx.stream("GET", self.url, headers=self.headers, timeout=30) as r:
                self.status = r.status_code
                for chunk in r.iter_text():
                    self.raw += chunk
                    if self._stop.is_set():
                        return
        except httpx.HTTPError:
            pass
        finally:
            self.status = self.status or -1
            self.ended.set()

    def messages(self) -> list[tuple[str, str | None, dict]]:
        """(event, id or None, data) of each complete message; comments skipped. A block's own
        id line only: SYSTEM events must carry none."""
        out = []
        for block in self.raw.split("\n\n")[:-1]:
            fields = dict(
                line.split(": ", 1)
                for line in block.split("\n")
                if line and not line.startswith(":")
            )
            if "data" in fields:
                out.append((fields["event"], fields.get("id"), json.loads(fields["data"])))
        return out

    def wait(self, n: int, timeout: float = 20) -> list[tuple[str, str | None, dict]]:
        wait_for(
            lambda: len(self.messages()) >= n,
            timeout,
            f"{n} messages on {self.url}; have:\n{self.raw}",
        )
        return self.messages()

    def stop(self) -> None:
        self._stop.set()  # noticed at the next heartbeat
        assert self.ended.wait(10), "the stream did not end"


class NatsCluster:
    def __init__(self, tmp: Path, procs: list[Proc], size: int = 3) -> None:
        clients = [free_port() for _ in range(size)]
        routes = [free_port() for _ in range(size)]
        self.procs: list[Proc] = []
        for i in range(size):
            conf = tmp / f"nats{i}.conf"
            others = ", ".join(
                f"nats-route://127.0.0.1:{p}" for j, p in enumerate(routes) if j != i
            )
            conf.write_text(f"""
server_name: n{i}
listen: 127.0.0.1:{clients[i]}
jetstream {{ store_dir: "{tmp / f"js{i}"}" }}
cluster {{ name: storage-events-test, listen: 127.0.0.1:{routes[i]}, routes: [{others}] }}
""")
            proc = Proc([command("nats-server"), "-c", str(conf)], tmp / f"nats{i}.log")
            procs.append(proc)
            self.procs.append(proc)
        self.urls = [f"nats://127.0.0.1:{p}" for p in clients]
        self.store = ",".join(self.urls)
        # The cluster is ready once it has elected a JetStream meta leader.
        wait_for(
            lambda: any(
                "JetStream cluster new metadata leader" in p.output()
                or "Self is new JetStream cluster metadata leader" in p.output()
                for p in self.procs
            ),
            30,
            "a JetStream meta leader",
        )
