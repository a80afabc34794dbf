"""``storage-events demo`` in a terminal (a pty), as a new user first runs it: the feed's lines
only (the relay's and agent's logs go to a file), the web page's URL, and a script in which
every kind of event appears, a rename with both halves."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import signal
import time

import httpx
from conftest import command, free_port

KINDS = ("IN_CREATE", "IN_CLOSE_WRITE", "IN_ATTRIB", "IN_MOVED_FROM", "IN_MOVED_TO", "IN_DELETE")


def test_the_demo_shows_the_feed_the_page_and_every_kind_of_event(tmp_path):
    port = free_port()
    folder = tmp_path / "demo"
    pid, fd = pty.fork()
    if pid == 0:  # the child: the demo, in the terminal
        os.chdir(tmp_path)
        os.execv(
            command("storage-events"), ["storage-events", "demo", str(folder), "--port", str(port)]
        )
    out = b""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    out += os.read(fd, 65536)
                except OSError:
                    break
            text = out.decode(errors="replace")
            if all(k in text for k in KINDS) and "run1/notes.txt" in text.split("IN_DELETE")[-1]:
                break
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)  # Ctrl-C: it stops the relay and the agent itself
        for _ in range(100):
            if os.waitpid(pid, os.WNOHANG)[0]:
                break
            time.sleep(0.1)
        else:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        with contextlib.suppress(OSError):
            while select.select([fd], [], [], 0.2)[0]:
                out += os.read(fd, 65536)
        os.close(fd)
    text = out.decode(errors="replace").replace("\r\n", "\n")
    assert f"web page  http://127.0.0.1:{port}/" in text
    feed = [
        line
        for line in re.sub(r"\x1b\[[0-9;]*m", "", text).split("\n")
        if re.match(r"^\d+ demo/", line)
    ]
    kinds = {k for line in feed for k in KINDS if f" {k} " in line}
    assert kinds == set(KINDS), feed
    moved = [line for line in feed if " IN_MOVED_TO " in line]
    assert moved and moved[0].endswith(f"{folder}/run1/notes.txt (from {folder}/notes.txt)"), moved
    # Nothing but the banner and the feed: the logs are in their file.
    assert not re.search(r"\b(INFO|WARNING|ERROR)\b|uvicorn", text), text
    assert "uvicorn" in (tmp_path / "demo.log").read_text()
