"""Pushing this relay's log to another relay (``[[push]]``) over its ``/ingest``, the way an agent
publishes: a hello with ``role="relay"``, batches of stored events (each with our id), and
cumulative acks naming the last of our ids the other relay holds durably."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

import websockets

from storage_events.wire import (
    Ack,
    Batch,
    Error,
    Hello,
    Welcome,
    decode_to_agent,
    encode_frame,
    event_from_json,
    ingest_url,
)

from .config import PushConfig
from .federation import lost
from .log import EventLog, Record

log = logging.getLogger("storage_events.relay")

BATCH = 1000
MAX_BACKOFF = 10.0


class Refused(Exception):
    pass


class Pusher:
    def __init__(self, cfg: PushConfig, events: EventLog, me: str) -> None:
        self.cfg = cfg
        self.url = ingest_url(cfg.url)
        self.log = events
        self.me = me
        self.position = 0  # the last of our ids the other relay acknowledged
        self.connected = False
        self._wake = asyncio.Event()

    def notify(self, records: list[Record]) -> None:
        """Hub listener: there is more to push."""
        self._wake.set()

    async def run(self) -> None:
        backoff = 0.5
        context = None
        if self.url.startswith("wss://"):
            context = ssl.create_default_context(cafile=self.cfg.ca_file)
        while True:
            try:
                async with websockets.connect(self.url, ssl=context, max_size=None,
                                              open_timeout=10, compression=None) as ws:
                    await self._push(ws)
            except Refused as e:
                log.error("relay %s refused our push: %s", self.cfg.url, e)
            except (OSError, TimeoutError, websockets.WebSocketException) as e:
                log.warning("cannot push to %s (%s: %s); retrying in %.0f s", self.cfg.url,
                            type(e).__name__, e, backoff)
            else:
                backoff = 0.5
            finally:
                self.connected = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _push(self, ws: websockets.ClientConnection) -> None:
        await ws.send(encode_frame(Hello(role="relay", site=self.me, node=self.me,
                                         stream=f"relay:{self.me}", token=self.cfg.token)))
        welcome = decode_to_agent(await ws.recv())
        if isinstance(welcome, Error):
            raise Refused(welcome.message)
        assert isinstance(welcome, Welcome)
        self.position = welcome.acked
        self.connected = True
        log.info("pushing to %s after our id %d", self.cfg.url, self.position)
        while True:
            self._wake.clear()
            events = []
            if self.position + 1 < self.log.first:  # retention took what they never got
                gap = lost(self.me, self.log.first - 1, time.time_ns())
                gap.id, gap.via = self.log.first - 1, [self.me]
                events.append(gap)
                log.error("push to %s: ids %d-%d were dropped by retention before they were "
                          "pushed; sending an overflow event", self.cfg.url, self.position + 1,
                          self.log.first - 1)
            records = await asyncio.to_thread(self.log.read, max(self.position,
                                                                 self.log.first - 1), BATCH)
            events.extend(event_from_json(r.data) for r in records)
            if not events:
                await self._wake.wait()
                continue
            await ws.send(encode_frame(Batch(events)))
            reply = decode_to_agent(await ws.recv())
            if isinstance(reply, Error):
                raise Refused(reply.message)
            assert isinstance(reply, Ack)
            self.position = reply.seq
