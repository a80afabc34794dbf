"""The agent's connection to its relay: send numbered batches, apply acks, reconnect forever.

The protocol is :class:`~storage_events.publish.PublishSession`'s; this is its I/O and the
outbox's part (which events go, which one a loss notice replaces)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import websockets

from storage_events.publish import BatchRefused, PeerProtocolError, PublisherRefused, PublishSession
from storage_events.wire import FRAME_BUDGET, Event, Hello, ingest_url, loss_notice, short_path

from .outbox import Outbox

log = logging.getLogger("storage_events.agent")


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
        self.max_backoff = max_backoff
        self.drain_only = drain_only  # an earlier run's stream: done once all is acknowledged
        self.connected = asyncio.Event()
        self.acked = asyncio.Event()  # set on every acknowledgement
        self.on_replace = on_replace  # told of an event replaced by a loss notice (the spool)
        self.session = PublishSession(
            hello, peer=self.url, max_events=max_batch, max_frame=max_frame
        )

    async def run(self) -> None:
        backoff = 0.05
        refused: BatchRefused | None = None  # what the relay said of the last batch it refused
        while not (self.drain_only and self.outbox.unacked == 0):
            try:
                async with websockets.connect(
                    self.url, max_size=64 * 1024 * 1024, open_timeout=10, compression=None
                ) as ws:
                    await ws.send(self.session.start())
                    self.session.receive(await asyncio.wait_for(ws.recv(), 10))
                    held = self.session.acked
                    if self.drain_only and held > self.outbox.last_seq:
                        # An earlier run sent events it had not spooled yet when it was killed:
                        # the relay has more than the spool, so nothing is left to send.
                        self.outbox.ack(self.outbox.last_seq)
                        log.info("stream %s fully acknowledged", self.outbox.stream)
                        return
                    if held > self.outbox.last_seq:
                        # This run numbered fewer: the relay's answer is wrong (a relay that
                        # is not what it says, or a log mixed up with another's).
                        raise PeerProtocolError(
                            f"relay {self.url} says it holds seq {held} of stream "
                            f"{self.outbox.stream}, but this agent numbered only "
                            f"{self.outbox.last_seq}; nothing is acknowledged from that answer"
                        )
                    self.outbox.connected(held)
                    if refused is not None:
                        # Only now: the relay may have stored the refused event after all.
                        self._refused(refused)
                        refused = None
                    log.info(
                        "connected to %s: relay holds seq %d, %d events to send",
                        self.url,
                        held,
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
            except PublisherRefused as e:
                log.error("relay %s refused this agent: %s", self.url, e)
                backoff = self.max_backoff
            except PeerProtocolError as e:
                log.error("%s; retrying in %.1f s", e, self.max_backoff)
                backoff = self.max_backoff
            except websockets.ConnectionClosed as e:
                code, reason = (e.rcvd.code, e.rcvd.reason) if e.rcvd is not None else (None, "")
                closed = self.session.closed(code, reason)
                if closed is not None:
                    refused = closed
                    how = "" if code is None else f" (close code {code})"
                    log.warning("relay %s refused a batch%s: %s", self.url, how, closed)
                elif code is None:
                    log.warning("relay %s dropped the connection; retrying", self.url)
                else:
                    self._unreachable(reason or type(e).__name__, backoff)
            except (OSError, TimeoutError, websockets.WebSocketException) as e:
                self._unreachable(str(e) or type(e).__name__, backoff)
            self.connected.clear()
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            if refused is None:
                backoff = min(backoff * 2, self.max_backoff)

    def _unreachable(self, reason: str, backoff: float) -> None:
        log.warning(
            "relay %s unreachable (%s); retrying in %.1f s, %d events waiting",
            self.url,
            reason,
            backoff,
            len(self.outbox),
        )

    def _refused(self, refused: BatchRefused) -> None:
        """Send smaller batches, or put a loss notice in the place of the event refused."""
        self.session.adapt(refused, lambda seq: self._replace(seq, refused))
        if refused.batch.count > 1:
            log.warning(
                "resending from seq %d of %s in batches of at most %d events (%d "
                "bytes) to find what the relay refuses",
                self.session.acked + 1,
                self.outbox.stream,
                self.session.limit,
                self.session.max_frame,
            )

    def _replace(self, seq: int, refused: BatchRefused) -> bool:
        """Put a loss notice in the place of event ``seq``, which the relay refuses, so that
        the stream moves on; False when there is nothing to replace."""
        event = self.outbox.held(seq)
        if event is None:
            return False  # (acknowledged meanwhile)
        if event.flags == ["IN_Q_OVERFLOW"] and event.path == "/":
            log.error(
                "relay %s refuses even the loss notice seq %d of %s (%s): it cannot be "
                "replaced further; check the relay's log and limits",
                self.url,
                seq,
                self.outbox.stream,
                refused,
            )
            return False
        notice = loss_notice(event)
        log.error(
            "relay %s refuses event seq %d of %s (%s %s): %s. It is replaced by an "
            "overflow notice of %s, so that the stream goes on; what changed there is "
            "not known to subscribers.",
            self.url,
            seq,
            self.outbox.stream,
            ",".join(event.flags),
            short_path(event.path),
            refused,
            short_path(notice.path),
        )
        self.outbox.replace(notice)
        if self.on_replace is not None:
            self.on_replace(notice)
        return True

    async def _pump(self, ws: websockets.ClientConnection) -> None:
        receiver = asyncio.create_task(self._receive(ws))
        sender = asyncio.create_task(self._send(ws))
        try:
            await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
            if sender.done() and isinstance(sender.exception(), websockets.ConnectionClosed):
                # The frames the relay sent before it closed are still to be read: an error
                # frame among them says which batch it refused, and why.
                await asyncio.wait({receiver})
            for task in (receiver, sender):
                if task.done():
                    task.result()
        finally:
            for task in (receiver, sender):
                task.cancel()
            await asyncio.gather(receiver, sender, return_exceptions=True)

    async def _send(self, ws: websockets.ClientConnection) -> None:
        while not (self.drain_only and self.outbox.unacked == 0):
            self.wake.clear()
            may = self.session.may_send(self.outbox.ready)
            batch = self.outbox.next_batch(self.session.limit) if may else []
            if not batch:
                await self.wake.wait()
                continue
            frame, rest = self.session.frame(batch)
            self.outbox.unsend(rest)
            await ws.send(frame)

    async def _receive(self, ws: websockets.ClientConnection) -> None:
        while True:
            self.session.receive(await ws.recv())  # (after the welcome, only acks pass)
            self.outbox.ack(self.session.acked)
            self.acked.set()
            self.wake.set()  # the window may have room again
