"""``/ingest``: the WebSocket agents publish on.

:class:`IngestSession` is the protocol with no I/O: it checks every frame and says what to
store or why the connection must close. :class:`Ingest` is the thin WebSocket shell around it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import msgspec
from starlette.websockets import WebSocket, WebSocketDisconnect

from storage_events.wire import (
    Ack,
    Batch,
    Error,
    Event,
    Flag,
    Hello,
    Welcome,
    decode_to_relay,
    encode_frame,
)

from .auth import Authenticator, AuthError
from .hub import Hub
from .log import EventLog

log = logging.getLogger("storage_events.relay")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_STREAM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_KNOWN_FLAGS = frozenset(f"IN_{f.name}" for f in Flag if f is not Flag.ISDIR)
MAX_PATH = 16 * 4096


class ProtocolError(Exception):
    """The peer broke the ingest protocol; the message tells it (and the log) how."""

    def __init__(self, message: str, code: int = 1008) -> None:
        super().__init__(message)
        self.code = code  # WebSocket close code


@dataclass(frozen=True, slots=True)
class IngestLimits:
    max_batch: int = 10_000


class IngestSession:
    """One connection's protocol state: a :class:`Hello`, then batches of its stream."""

    def __init__(self, limits: IngestLimits, auth: Authenticator | None = None) -> None:
        self.limits = limits
        self.auth = auth
        self.hello: Hello | None = None

    def receive(self, frame: bytes | str) -> Hello | list[Event]:
        if isinstance(frame, str):
            raise ProtocolError("text frames are not part of the ingest protocol: send msgpack "
                                "in binary frames", 1003)
        try:
            msg = decode_to_relay(frame)
        except msgspec.ValidationError as e:
            raise ProtocolError(f"invalid frame: {e}", 1007) from None
        except msgspec.DecodeError as e:
            raise ProtocolError(f"frame is not msgpack: {e}", 1007) from None
        if self.hello is None:
            if not isinstance(msg, Hello):
                raise ProtocolError("the first frame must be a hello")
            return self._check_hello(msg)
        if not isinstance(msg, Batch):
            raise ProtocolError("hello sent twice on one connection")
        return self._check_batch(msg.events)

    def _check_hello(self, hello: Hello) -> Hello:
        if not _NAME.match(hello.site):
            raise ProtocolError(f"site name {hello.site[:80]!r} is not valid: use letters, "
                                "digits, '.', '_' or '-' (at most 64)")
        if not _NAME.match(hello.node):
            raise ProtocolError(f"node name {hello.node[:80]!r} is not valid")
        if not _STREAM.match(hello.stream):
            raise ProtocolError(f"stream name {hello.stream[:80]!r} is not valid")
        if self.auth is not None:
            try:
                who = self.auth.identify(hello.token)
            except AuthError as e:
                raise ProtocolError(str(e)) from None
            if who is not None and who.role != "agent":
                raise ProtocolError(f"token {who.name!r} is a {who.role} token: it cannot "
                                    "publish")
            if who is not None and who.site != hello.site:
                raise ProtocolError(f"token {who.name!r} may publish as site {who.site!r}, "
                                    f"not {hello.site!r}")
        self.hello = hello
        return hello

    def _check_batch(self, events: list[Event]) -> list[Event]:
        hello = self.hello
        assert hello is not None
        if len(events) > self.limits.max_batch:
            raise ProtocolError(f"batch of {len(events)} events exceeds the limit of "
                                f"{self.limits.max_batch}", 1009)
        previous = 0
        for i, ev in enumerate(events):
            where = f"event {i} (seq {ev.seq})"
            if ev.stream != hello.stream:
                raise ProtocolError(f"{where} belongs to stream {ev.stream[:80]!r}, "
                                    f"not to this connection's {hello.stream!r}")
            if ev.site != hello.site or ev.node != hello.node:
                raise ProtocolError(f"{where} claims site/node {ev.site[:64]!r}/{ev.node[:64]!r}"
                                    f" but the connection said {hello.site!r}/{hello.node!r}")
            if ev.seq <= previous:
                raise ProtocolError(f"{where}: seq numbers must increase within a batch")
            previous = ev.seq
            if not ev.path or len(ev.path) > MAX_PATH or "\0" in ev.path:
                raise ProtocolError(f"{where}: path is empty, too long or contains NUL")
            if not ev.flags or not _KNOWN_FLAGS.issuperset(ev.flags):
                raise ProtocolError(f"{where}: flags {ev.flags[:8]!r} are not inotify flag names")
            ev.id = 0
        return events


class Ingest:
    """The WebSocket endpoint. Batches from all connections are stored one at a time by a
    single writer thread, and published to the hub in id order."""

    def __init__(self, log: EventLog, hub: Hub, limits: IngestLimits,
                 auth: Authenticator | None = None) -> None:
        self.auth = auth
        self.log = log
        self.hub = hub
        self.limits = limits
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="log-writer")
        self._lock = asyncio.Lock()
        self.connections = 0
        self.stored = 0  # events stored since start
        self.by_site: Counter[str] = Counter()  # open connections
        self.last_ts: dict[str, int] = {}  # newest event time stored, by site

    async def store(self, events: list[Event]) -> None:
        async with self._lock:
            loop = asyncio.get_running_loop()
            records = await loop.run_in_executor(self._writer, self.log.append, events)
            self.hub.publish(records)
            self.stored += len(records)
            if events:
                self.last_ts[events[-1].site] = events[-1].ts

    async def trim(self, **limits: float) -> int:
        """Apply retention on the writer thread, between two batches."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._writer,
                                              functools.partial(self.log.trim, **limits))

    async def endpoint(self, ws: WebSocket) -> None:
        await ws.accept()
        session = IngestSession(self.limits, self.auth)
        peer = f"{ws.client.host}:{ws.client.port}" if ws.client else "?"
        site: str | None = None
        self.connections += 1
        try:
            hello = session.receive(await _receive(ws, timeout=10))
            assert isinstance(hello, Hello)
            peer = f"{hello.site}/{hello.node} ({peer})"
            site = hello.site
            self.by_site[site] += 1
            await ws.send_bytes(encode_frame(
                Welcome(stream=hello.stream, acked=self.log.position(hello.stream))))
            log.info("agent %s connected, stream %s", peer, hello.stream)
            while True:
                events = session.receive(await _receive(ws))
                assert isinstance(events, list)
                if events:
                    await self.store(events)
                    await ws.send_bytes(encode_frame(
                        Ack(hello.stream, self.log.position(hello.stream))))
        except ProtocolError as e:
            log.warning("closing ingest connection from %s: %s", peer, e)
            await _refuse(ws, str(e), e.code)
        except TimeoutError:
            await _refuse(ws, "no hello within 10 s", 1008)
        except WebSocketDisconnect:
            log.info("agent %s disconnected", peer)
        finally:
            self.connections -= 1
            if site is not None:
                self.by_site[site] -= 1

    def close(self) -> None:
        self._writer.shutdown(wait=True)


async def _receive(ws: WebSocket, timeout: float | None = None) -> bytes | str:
    message = await asyncio.wait_for(ws.receive(), timeout)
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    return message.get("bytes") if message.get("bytes") is not None else message.get("text", "")


async def _refuse(ws: WebSocket, message: str, code: int) -> None:
    try:
        await ws.send_bytes(encode_frame(Error(message)))
        # A close reason is limited to 123 bytes; the Error frame has the whole story.
        await ws.close(code, message.encode()[:123].decode("utf-8", "ignore"))
    except (RuntimeError, WebSocketDisconnect, OSError):
        pass  # the peer is already gone
