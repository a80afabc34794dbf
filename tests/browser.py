"""Headless Chromium driven over the DevTools protocol, for tests of the relay's web page."""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
from pathlib import Path

import httpx
from conftest import Proc, wait_for
from websockets.sync.client import connect

# Without the background-networking flags Chromium keeps dialing Google's hosts, which this
# machine's closed network refuses.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
    "about:blank",
]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    def __init__(self, tmp: Path, procs: list[Proc]) -> None:
        exe = chromium()
        assert exe, "chromium is not installed: tests/run installs it"
        profile = tmp / "chromium-profile"
        self.proc = Proc([exe, f"--user-data-dir={profile}", *FLAGS], tmp / "chromium.log")
        procs.append(self.proc)
        port_file = profile / "DevToolsActivePort"
        wait_for(port_file.exists, 30, "chromium's DevTools port")
        port = port_file.read_text().split()[0]
        pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
        target = next(p for p in pages if p["type"] == "page")
        self._stack = contextlib.ExitStack()
        self._ws = self._stack.enter_context(connect(target["webSocketDebuggerUrl"], max_size=None))
        self._ids = itertools.count(1)

    def call(self, method: str, **params: object) -> dict:
        msg_id = next(self._ids)
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self._ws.recv(timeout=30))
            if reply.get("id") == msg_id:
                assert "error" not in reply, reply
                return reply["result"]

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def js(self, expression: str) -> object:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def close(self) -> None:
        self._stack.close()
        self.proc.stop()
