"""The agent's connection to its relay: send numbered batches, apply acks, reconnect forever."""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections import deque
from collections.abc import Callable

import msgspec
import websockets

from storage_events.wire import (
    FRAME_BUDGET,
    Ack,
    Batch,
    Error,
    Event,
    Hello,
    Welcome,
    decode_to_agent,
    encode_frame,
    ingest_url,
    loss_notice,
    short_path,
)

from .outbox import Outbox

log = logging.getLogger("storage_events.agent")


# Close codes with which a relay refuses what it was sent (1009 alone, with no error frame, is
# the web server's frame limit).
_REFUSED = frozenset({1007, 1008, 1009})
_FRAME_LIMIT = re.compile(r"frame with (\d+) bytes exceeds limit of (\d+)")


class RelayRefused(Exception):
    """The relay answered with an error frame: retrying at once would not help."""


class BatchRefused(Exception):
    """The relay refused a batch of events (its error frame, or its close code, says why)."""

    def __init__(self, reason: str, *, frame_too_big: bool = False, implicit: bool = False) -> None:
        super().__init__(reason)
        self.frame_too_big = frame_too_big
        # Only inferred: the connection dropped, without a close frame, while a batch was in
        # flight, at the same place again (a web server dropping an oversized frame does that).
        self.implicit = implicit


class Uplink:
    def __init__(
        self,
        relay: str,
        hello: Hello,
        outbox: Outbox,
        wake: asyncio.Event,
        *,
        max_batch: int = 2000,
        max_backoff: float = 10.0,
        drain_only: bool = False,
        max_frame: int = FRAME_BUDGET,
        on_replace: Callable[[Event], None] | None = None,
    ) -> None:
        self.url = ingest_url(relay)
        self.hello = hello
        self.outbox = outbox
        self.wake = wake  # set whenever the outbox has something new to send
        self.max_batch = max_batch
        self.max_backoff = max_backoff
        self.drain_only = drain_only  # an earlier run's stream: done once all is acknowledged
        self.connected = asyncio.Event()
        self.acked = asyncio.Event()  # set on every acknowledgement
        self.max_frame = max_frame  # bytes per frame; lowered when the relay's is smaller
        self.on_replace = on_replace  # told of an event replaced by a loss notice (the spool)
        # Events per batch now, and at most: both shrink when the relay refuses a batch, so
        # that the event it cannot take is found and replaced, or the relay's limit is met.
        self.limit = self.ceiling = max_batch
        self._sent: deque[tuple[int, int, int]] = deque()  # (first seq, events, bytes) in flight

    async def run(self) -> None:
        backoff = 0.05
        refused: BatchRefused | None = None  # what the relay said of the last batch it refused
        dropped_at, drops = -1, 0  # where connections dropped with batches in flight, how often
        while not (self.drain_only and self.outbox.unacked == 0):
            welcomed = False
            try:
                async with websockets.connect(
                    self.url, max_size=64 * 1024 * 1024, open_timeout=10, compression=None
                ) as ws:
                    await ws.send(encode_frame(self.hello))
                    reply = decode_to_agent(await asyncio.wait_for(ws.recv(), 10))
                    if isinstance(reply, Error):
                        raise RelayRefused(reply.message)
                    if not isinstance(reply, Welcome):
                        raise RelayRefused(f"expected a welcome frame, got {reply!r}")
                    welcomed = True
                    if self.drain_only and reply.acked > self.outbox.last_seq:
                        # An earlier run sent events it had not spooled yet when it was killed:
                        # the relay has more than the spool, so nothing is left to send.
                        self.outbox.ack(self.outbox.last_seq)
                        log.info("stream %s fully acknowledged", self.outbox.stream)
                        return
                    self.outbox.connected(reply.acked)
                    if refused is not None:
                        # The relay stored everything before the batch it refused: that batch
                        # starts right after what it holds.
                        self._refused(reply.acked + 1, refused)
                        refused = None
                    self._sent.clear()
                    log.info(
                        "connected to %s: relay holds seq %d, %d events to send",
                        self.url,
                        reply.acked,
                        len(self.outbox),
                    )
                    self.connected.set()
                    backoff = 0.05
                    await self._pump(ws)
                    if self.drain_only and self.outbox.unacked == 0:
                        log.info("stream %s fully acknowledged", self.outbox.stream)
                        return
            except BatchRefused as e:
                refused = e
                log.warning("relay %s refused a batch: %s", self.url, e)
            except RelayRefused as e:
                log.error("relay %s refused this agent: %s", self.url, e)
                backoff = self.max_backoff
            except (
                OSError,
                TimeoutError,
                websockets.WebSocketException,
                msgspec.DecodeError,
                msgspec.ValidationError,
            ) as e:
                rcvd = e.rcvd if isinstance(e, websockets.ConnectionClosed) else None
                if welcomed and self._sent and rcvd is not None and rcvd.code in _REFUSED:
                    # Closed without an error frame (or before we read it): the web server's
                    # frame limit (1009), or the relay's reason in the close frame.
                    refused = BatchRefused(
                        rcvd.reason or "message too big", frame_too_big=rcvd.code == 1009
                    )
                    log.warning(
                        "relay %s refused a batch (close code %d): %s", self.url, rcvd.code, refused
                    )
                elif (
                    welcomed
                    and self._sent
                    and rcvd is None
                    and isinstance(e, websockets.ConnectionClosed)
                ):
                    drops = drops + 1 if dropped_at == self.outbox.acked else 1
                    dropped_at = self.outbox.acked
                    if drops >= 2:
                        refused = BatchRefused(
                            f"the relay dropped the connection {drops} times while it had the "
                            "batch (too big for it?)",
                            frame_too_big=True,
                            implicit=True,
                        )
                        log.warning("relay %s: %s", self.url, refused)
                    else:
                        log.warning("relay %s dropped the connection; retrying", self.url)
                else:
                    reason = rcvd.reason if rcvd is not None else e
                    log.warning(
                        "relay %s unreachable (%s); retrying in %.1f s, %d events waiting",
                        self.url,
                        reason or type(e).__name__,
                        backoff,
                        len(self.outbox),
                    )
            self.connected.clear()
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            if refused is None:
                backoff = min(backoff * 2, self.max_backoff)

    def _refused(self, first: int, refused: BatchRefused) -> None:
        """The relay refused the batch that began with seq ``first``: send smaller batches, and
        when it was a single event, put a loss notice in its place so the stream moves on."""
        batch = next((b for b in self._sent if b[0] == first), None)
        if refused.frame_too_big and self._sent:
            # The web server refuses a frame as it arrives, while the relay may not have
            # acknowledged those before it: the culprit is the big frame, not the first unacked.
            limit = _FRAME_LIMIT.search(str(refused))
            if limit is not None:
                self.max_frame = max(1024, int(limit.group(2)) - 1024)
                batch = next((b for b in self._sent if b[2] > int(limit.group(2))), batch)
            else:
                batch = max(self._sent, key=lambda b: b[2])
                self.max_frame = max(1024, min(self.max_frame, batch[2] // 2))
        count = batch[1] if batch is not None else self.limit
        if batch is not None and count == 1:
            first = batch[0]
        if count > 1:
            self.ceiling = max(1, count // 2)
            self.limit = max(1, count // 4)
            log.warning(
                "resending from seq %d of %s in batches of at most %d events (%d "
                "bytes) to find what the relay refuses",
                first,
                self.outbox.stream,
                self.limit,
                self.max_frame,
            )
            return
        event = self.outbox.held(first)
        if event is None:
            return  # (acknowledged meanwhile: nothing to replace)

        if event.flags == ["IN_Q_OVERFLOW"] and event.path == "/":
            log.error(
                "relay %s refuses even the loss notice seq %d of %s (%s): it cannot be "
                "replaced further; check the relay's log and limits",
                self.url,
                first,
                self.outbox.stream,
                refused,
            )
            return
        notice = loss_notice(event)
        log.error(
            "relay %s refuses event seq %d of %s (%s %s): %s. It is replaced by an "
            "overflow notice of %s, so that the stream goes on; what changed there is "
            "not known to subscribers.",
            self.url,
            first,
            self.outbox.stream,
            ",".join(event.flags),
            short_path(event.path),
            refused,
            short_path(notice.path),
        )
        self.outbox.replace(notice)
        if self.on_replace is not None:
            self.on_replace(notice)
        self.ceiling = self.max_batch  # it was that event, not the size of the batches
        self.limit = 1

    async def _pump(self, ws: websockets.ClientConnection) -> None:
        receiver = asyncio.create_task(self._receive(ws))
        sender = asyncio.create_task(self._send(ws))
        try:
            done, _ = await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in (receiver, sender):
                task.cancel()
            await asyncio.gather(receiver, sender, return_exceptions=True)

    async def _send(self, ws: websockets.ClientConnection) -> None:
        while not (self.drain_only and self.outbox.unacked == 0):
            self.wake.clear()
            batch = self.outbox.next_batch(self.limit)
            if not batch:
                await self.wake.wait()
                continue
            frame = encode_frame(Batch(batch))
            while len(frame) > self.max_frame and len(batch) > 1:
                # Split by bytes: events vary (deep paths, raw names), and the relay closes
                # the connection on a frame over its limit, which would be resent forever.
                keep = min(
                    len(batch) - 1, max(1, int(len(batch) * self.max_frame / len(frame) * 0.9))
                )
                self.outbox.unsend(batch[keep:])
                batch = batch[:keep]
                frame = encode_frame(Batch(batch))
            self._sent.append((batch[0].seq, len(batch), len(frame)))
            await ws.send(frame)

    async def _receive(self, ws: websockets.ClientConnection) -> None:
        async for frame in ws:
            if isinstance(frame, str):
                raise RelayRefused("relay sent a text frame on the ingest protocol")
            msg = decode_to_agent(frame)
            if isinstance(msg, Ack):
                self.outbox.ack(msg.seq)
                while self._sent and self._sent[0][0] + self._sent[0][1] - 1 <= msg.seq:
                    self._sent.popleft()
                    self.limit = min(self.ceiling, self.limit * 2)  # taken: grow back
                self.acked.set()
                self.wake.set()  # the window may have room again
            elif isinstance(msg, Error):
                if self._sent:
                    raise BatchRefused(msg.message)
                raise RelayRefused(msg.message)
