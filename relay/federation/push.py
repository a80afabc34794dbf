"""Pushing this relay's log to another relay (``[[push]]``) over its ``/ingest``, the way an agent
publishes: a hello with ``role="relay"``, batches of stored events (each with our id), and
cumulative acks naming the last of our ids the other relay holds durably. The protocol is
:class:`~storage_events.publish.PublishSession`'s; this is its I/O and the log's part."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

import websockets

from storage_events.publish import PeerProtocolError, PublishSession, Refused
from storage_events.relay.config import PushConfig
from storage_events.relay.federation.core import lost
from storage_events.relay.log.base import EventLog, Record
from storage_events.relay.log.tail import Tail
from storage_events.wire import Event, Hello, ingest_url

log = logging.getLogger("storage_events.relay")

BATCH = 1000
WINDOW = 20_000  # events sent and not yet acknowledged, at most
MAX_BACKOFF = 10.0


class Pusher:
    def __init__(self, cfg: PushConfig, events: EventLog, me: str) -> None:
        self.cfg = cfg
        self.url = ingest_url(cfg.url)
        self.log = events
        self.me = me
        self.connected = False
        self._session: PublishSession | None = None  # made at the first connection
        self._wake = asyncio.Event()  # new records, or an acknowledgement
        self._tail = Tail(events)

    @property
    def position(self) -> int:
        """The last of our ids the other relay acknowledged."""
        return self._session.acked if self._session is not None else 0

    def notify(self, records: list[Record]) -> None:
        """Hub listener: there is more to push."""
        if self.connected and records:
            self._tail.notify(records)
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
            except Refused as e:
                log.error("relay %s refused our push: %s", self.cfg.url, e)
            except PeerProtocolError as e:
                log.error("%s; retrying in %.0f s", e, backoff)
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
        session = self._session
        if session is None:  # (the log's epoch is known once it has started)
            # The log's epoch in the stream name: a log started afresh is pushed from its start.
            stream = f"relay:{self.me}:{self.log.epoch}"
            hello = Hello(
                role="relay", site=self.me, node=self.me, stream=stream, token=self.cfg.token
            )
            session = self._session = PublishSession(hello, peer=self.cfg.url, window=WINDOW)
        await ws.send(session.start())
        session.receive(await ws.recv())
        self._tail.clear()
        self.connected = True
        log.info("pushing to %s after our id %d", self.cfg.url, session.acked)
        # Batches are sent without waiting for each ack (up to WINDOW ids ahead), so a far
        # relay's round trip does not limit the rate.
        acks = asyncio.create_task(self._acks(ws, session))
        try:
            while not acks.done():
                self._wake.clear()
                batch = await self._next(session.sent) if session.can_send else []
                if not batch:
                    await self._wake.wait()
                    continue
                # Events that do not fit in the frame are read again by id, after these.
                frame, _ = session.frame(batch)
                await ws.send(frame)
            acks.result()  # raises what ended the acknowledgements
        finally:
            acks.cancel()
            self._tail.clear()

    async def _acks(self, ws: websockets.ClientConnection, session: PublishSession) -> None:
        try:
            while True:
                session.receive(await ws.recv())
                self._wake.set()
        finally:
            self._wake.set()  # the sender notices that this ended

    async def _next(self, sent: int) -> list[Event]:
        """The events after our id ``sent``, with an overflow event first where retention took
        some before they were pushed."""
        lost_to, records = await self._tail.next(sent, BATCH)
        events = [self._gap(sent, lost_to)] if lost_to > sent else []
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
