"""``storage-events demo``: a relay, an agent and a live tail on one machine, in one command."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import httpx

from .client import subscribe
from .printable import text_line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, relay: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if relay.poll() is not None:
            raise click.ClickException("the relay exited at start-up (see its output above)")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise click.ClickException(f"the relay did not answer on {url} within {timeout:.0f} s")


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def _show_some_activity(folder: Path, url: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # until the agent is connected
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/healthz", timeout=1).json().get("agents"):
                break
        time.sleep(0.2)
    (folder / "hello.txt").write_text("hello from storage-events\n")
    (folder / "run1").mkdir(exist_ok=True)
    (folder / "run1" / "data.h5").write_bytes(b"\0" * 1024)
    (folder / "hello.txt").rename(folder / "run1" / "hello.txt")


def run_demo(folder: str, port: int) -> None:
    watched = Path(folder).resolve()
    watched.mkdir(parents=True, exist_ok=True)
    state = watched.parent / (watched.name + ".relay-data")
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            subprocess.Popen(
                [
                    _bin("storage-events-relay"),
                    "serve",
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--data",
                    str(state),
                ]
            )
        )
        _wait_healthy(url, procs[0])
        procs.append(
            subprocess.Popen(
                [
                    _bin("storage-events-agent"),
                    "run",
                    "--relay",
                    url,
                    "--site",
                    "demo",
                    str(watched),
                ]
            )
        )
        click.secho(
            f"\nrelay  {url}   (feed: curl -N {url}/events)\nagent  watching "
            f"{watched}\n\nTouch, write, move or delete files in {watched} and watch "
            "them arrive below. Ctrl-C stops everything.\n",
            fg="green",
            err=True,
        )
        threading.Thread(target=_show_some_activity, args=(watched, url), daemon=True).start()
        for item in subscribe(url, since="now"):
            click.echo(text_line(item))
    except KeyboardInterrupt:
        pass
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
