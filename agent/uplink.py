"""The agent's connection to its relay: send numbered batches, apply acks, reconnect forever."""

from __future__ import annotations

import asyncio
import logging
import random

import msgspec
import websockets

from storage_events.wire import (
    Ack,
    Batch,
    Error,
    Hello,
    Welcome,
    decode_to_agent,
    encode_frame,
    ingest_url,
)

from .outbox import Outbox

log = logging.getLogger("storage_events.agent")


class RelayRefused(Exception):
    """The relay answered with an error frame: retrying at once would not help."""


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

    async def run(self) -> None:
        backoff = 0.05
        while not (self.drain_only and self.outbox.unacked == 0):
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
                    self.outbox.connected(reply.acked)
                    log.info("connected to %s: relay holds seq %d, %d events to send",
                             self.url, reply.acked, len(self.outbox))
                    self.connected.set()
                    backoff = 0.05
                    await self._pump(ws)
                    if self.drain_only and self.outbox.unacked == 0:
                        log.info("stream %s fully acknowledged", self.outbox.stream)
                        return
            except RelayRefused as e:
                log.error("relay %s refused this agent: %s", self.url, e)
                backoff = self.max_backoff
            except (OSError, TimeoutError, websockets.WebSocketException,
                    msgspec.DecodeError, msgspec.ValidationError) as e:
                reason = e.rcvd.reason if isinstance(e, websockets.ConnectionClosed) and e.rcvd \
                    else e
                log.warning("relay %s unreachable (%s); retrying in %.1f s, %d events waiting",
                            self.url, reason or type(e).__name__, backoff, len(self.outbox))
            self.connected.clear()
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, self.max_backoff)

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
            batch = self.outbox.next_batch(self.max_batch)
            if batch:
                await ws.send(encode_frame(Batch(batch)))
            else:
                await self.wake.wait()

    async def _receive(self, ws: websockets.ClientConnection) -> None:
        async for frame in ws:
            if isinstance(frame, str):
                raise RelayRefused("relay sent a text frame on the ingest protocol")
            msg = decode_to_agent(frame)
            if isinstance(msg, Ack):
                self.outbox.ack(msg.seq)
                self.acked.set()
                self.wake.set()  # the window may have room again
            elif isinstance(msg, Error):
                raise RelayRefused(msg.message)
