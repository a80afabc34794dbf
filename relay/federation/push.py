"""Pushing this relay's log to another relay (``[[push]]``) over its ``/ingest``, the way an agent
publishes: a hello with ``role="relay"``, batches of stored events (each with our id), and
cumulative acks naming the last of our ids the other relay holds durably."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

import websockets

from storage_events.relay.config import PushConfig
from storage_events.relay.federation.core import PeerRefused, lost
from storage_events.relay.log.base import EventLog, Record
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
)

log = logging.getLogger("storage_events.relay")

BATCH = 1000
WINDOW = 20_000  # events sent and not yet acknowledged, at most
PENDING = 50_000  # records kept from notify() for the next batches; beyond, read the log
MAX_BACKOFF = 10.0


class Pusher:
    def __init__(self, cfg: PushConfig, events: EventLog, me: str) -> None:
        self.cfg = cfg
        self.url = ingest_url(cfg.url)
        self.log = events
        self.me = me
        self.position = 0  # the last of our ids the other relay acknowledged
        self.connected = False
        self._wake = asyncio.Event()  # new records, or an acknowledgement
        self._pending: list[Record] = []  # just stored, not yet sent: saves reading them back

    def notify(self, records: list[Record]) -> None:
        """Hub listener: there is more to push."""
        if self.connected and records:
            if (self._pending and records[0].id != self._pending[-1].id + 1) or len(
                self._pending
            ) > PENDING:
                self._pending.clear()  # the log has them
            self._pending.extend(records)
        self._wake.set()

    async def run(self) -> None:
        backoff = 0.5
        context = None
        if self.url.startswith("wss://"):
            context = ssl.create_default_context(cafile=self.cfg.ca_file)
        while True:
            try:
                async with websockets.connect(
                    self.url, ssl=context, max_size=None, open_timeout=10, compression=None
                ) as ws:
                    await self._push(ws)
            except PeerRefused as e:
                log.error("relay %s refused our push: %s", self.cfg.url, e)
            except (OSError, TimeoutError, websockets.WebSocketException) as e:
                log.warning(
                    "cannot push to %s (%s: %s); retrying in %.0f s",
                    self.cfg.url,
                    type(e).__name__,
                    e,
                    backoff,
                )
            except Exception:
                log.exception("pushing to %s failed; retrying in %.0f s", self.cfg.url, backoff)
            else:
                backoff = 0.5
            finally:
                self.connected = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _push(self, ws: websockets.ClientConnection) -> None:
        # The log's epoch in the stream name: a log started afresh is pushed from its start.
        stream = f"relay:{self.me}:{self.log.epoch}"
        await ws.send(
            encode_frame(
                Hello(role="relay", site=self.me, node=self.me, stream=stream, token=self.cfg.token)
            )
        )
        welcome = decode_to_agent(await ws.recv())
        if isinstance(welcome, Error):
            raise PeerRefused(welcome.message)
        assert isinstance(welcome, Welcome)
        self.position = sent = welcome.acked
        self._pending.clear()
        self.connected = True
        log.info("pushing to %s after our id %d", self.cfg.url, self.position)
        # Batches are sent without waiting for each ack (up to WINDOW events ahead), so a far
        # relay's round trip does not limit the rate.
        acks = asyncio.create_task(self._acks(ws))
        try:
            while not acks.done():
                self._wake.clear()
                batch = await self._next(sent) if sent - self.position < WINDOW else []
                if not batch:
                    await self._wake.wait()
                    continue
                frame = encode_frame(Batch(batch))
                while len(frame) > FRAME_BUDGET and len(batch) > 1:
                    # Long paths: fewer events a frame (the rest follow, read again by id), or
                    # the other relay would refuse the frame, and every resend of it.
                    batch = batch[: len(batch) // 2]
                    frame = encode_frame(Batch(batch))
                await ws.send(frame)
                sent = batch[-1].id
            acks.result()  # raises what ended the acknowledgements
        finally:
            acks.cancel()
            self._pending.clear()

    async def _acks(self, ws: websockets.ClientConnection) -> None:
        try:
            while True:
                reply = decode_to_agent(await ws.recv())
                if isinstance(reply, Error):
                    raise PeerRefused(reply.message)
                assert isinstance(reply, Ack)
                self.position = reply.seq
                self._wake.set()
        finally:
            self._wake.set()  # the sender notices that this ended

    async def _next(self, sent: int) -> list[Event]:
        """The events after our id ``sent``: from what was just stored, else from the log."""
        events = []
        first = self.log.first
        if sent + 1 < first:  # retention took what they never got
            events.append(self._gap(sent, first - 1))
            sent = first - 1
        pending = self._pending
        if pending and pending[0].id <= sent:  # (rare: taken from the log meanwhile)
            pending[:] = [r for r in pending if r.id > sent]
        if pending and pending[0].id == sent + 1:
            records = pending[:BATCH]
            del pending[:BATCH]
        else:
            pending.clear()
            records = await asyncio.to_thread(self.log.read, sent, BATCH)
            if records and records[0].id > sent + 1:  # retention ran between first and read
                events.append(self._gap(sent, records[0].id - 1))
        events.extend(r.event() for r in records)
        return events

    def _gap(self, sent: int, lost_to: int) -> Event:
        log.error(
            "push to %s: ids %d-%d were dropped by retention before they were pushed; "
            "sending an overflow event",
            self.cfg.url,
            sent + 1,
            lost_to,
        )
        gap = lost(self.me, lost_to, time.time_ns())
        gap.id, gap.via, gap.origin_id = lost_to, [self.me], lost_to
        return gap
