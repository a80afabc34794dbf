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


def _wait_healthy(
    url: str, relay: subprocess.Popen[bytes], logfile: Path, timeout: float = 20
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if relay.poll() is not None:
            raise click.ClickException(
                f"the relay exited at start-up; its output: {logfile}\n"
                + logfile.read_text(errors="replace")[-2000:]
            )
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise click.ClickException(f"the relay did not answer on {url} within {timeout:.0f} s")


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


# The script the demo plays once the agent is connected: each kind of event once, each
# step after the one before has reached the feed (a file moved into a directory the agent has
# not seen yet would arrive as a listing's find, not as a rename's second half).
SCRIPT = (
    ("mkdir run1", lambda f: (f / "run1").mkdir(exist_ok=True)),
    ("write run1/data.h5", lambda f: (f / "run1" / "data.h5").write_bytes(b"\0" * 1024)),
    ("chmod run1/data.h5", lambda f: (f / "run1" / "data.h5").chmod(0o640)),
    ("write notes.txt", lambda f: (f / "notes.txt").write_text("hello from storage-events\n")),
    ("mv notes.txt run1/", lambda f: (f / "notes.txt").rename(f / "run1" / "notes.txt")),
    ("rm run1/notes.txt", lambda f: (f / "run1" / "notes.txt").unlink()),
)


def _play(folder: Path, url: str, seen: threading.Event) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # until the agent is connected
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/healthz", timeout=1).json().get("agents"):
                break
        time.sleep(0.2)
    time.sleep(0.5)  # (its first listing done)
    for _, step in SCRIPT:
        seen.clear()
        step(folder)
        seen.wait(5)
        time.sleep(0.2)


def run_demo(folder: str, port: int) -> None:
    watched = Path(folder).resolve()
    watched.mkdir(parents=True, exist_ok=True)
    state = watched.parent / (watched.name + ".relay-data")
    logfile = watched.parent / (watched.name + ".log")
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen[bytes]] = []
    # The relay's and the agent's own lines (warnings included) go to a file: the terminal
    # shows the feed.
    logs = logfile.open("ab")
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
                ],
                stdout=logs,
                stderr=logs,
            )
        )
        _wait_healthy(url, procs[0], logfile)
        procs.append(
            subprocess.Popen(
                [
                    _bin("storage-events-agent"),
                    "run",
                    "--relay",
                    url,
                    "--site",
                    "demo",
                    "--no-announce-existing",
                    str(watched),
                ],
                stdout=logs,
                stderr=logs,
            )
        )
        click.secho(
            f"\nweb page  {url}/\nfeed      curl -N {url}/events\nwatching  {watched}\n"
            f"logs      {logfile}\n\nA short script plays first; then touch, write, move or "
            f"delete files in {watched} and watch them arrive below. Ctrl-C stops "
            "everything.\n",
            fg="green",
            err=True,
        )
        seen = threading.Event()
        threading.Thread(target=_play, args=(watched, url, seen), daemon=True).start()
        for item in subscribe(url, since="now"):
            click.echo(text_line(item))
            seen.set()
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
        logs.close()
