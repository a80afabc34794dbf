"""The Kafka sink (``[kafka]``): the relay's own log, from a checkpoint, onto a topic.

It reads the log as a pushing relay does (:class:`~..log.tail.Tail`), hands the records to the
producer's thread, and moves its checkpoint only on delivery reports (:class:`.Progress`), so
every stored event reaches the topic at least once, each stream's in order. A broker that is
down or slow never holds up ingest or the feed: the sink stops reading once ``WINDOW`` messages
are out, falls behind (its lag is in ``/sites`` and ``/metrics``), and catches up afterwards.
When retention drops events the sink has not yet published, it publishes an overflow event
for them in their place (as a pushing relay does) and logs an error: the loss is announced
on the topic, never silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from storage_events.relay.config import KafkaConfig
from storage_events.relay.federation.core import lost
from storage_events.relay.kafka.checkpoint import CheckpointError, FileCheckpoint
from storage_events.relay.kafka.producer import ProducerThread
from storage_events.relay.kafka.progress import Progress
from storage_events.relay.log.base import EventLog, Record, make_record
from storage_events.relay.log.tail import Tail
from storage_events.wire import event_json, flags_mask

log = logging.getLogger("storage_events.relay")

BATCH = 2_000
WINDOW = 50_000  # messages handed to the producer and not yet reported, at most
SAVE_EVERY = 0.5  # seconds between checkpoint writes (what a crash may send twice)
MAX_BACKOFF = 30.0
FLUSH_ON_STOP = 5.0  # seconds a stopping relay waits for what is out to be delivered


class KafkaSink:
    def __init__(self, cfg: KafkaConfig, events: EventLog, me: str, checkpoint: FileCheckpoint):
        self.cfg = cfg
        self.log = events
        self.me = me
        self.checkpoints = checkpoint
        self.progress = Progress(0)
        self.connected = False  # a delivery succeeded since the last client-level error
        self.last_error: str | None = None
        self.delivered = 0  # messages reported delivered since start
        self.lost = 0  # events retention dropped before they were published
        self.rewinds = 0  # failed deliveries that sent the sink back to its checkpoint
        self.running = False
        self._tail = Tail(events)
        self._wake = asyncio.Event()
        self._thread: ProducerThread | None = None
        self._saved = -1
        self._backoff = 1.0
        self._hold_until = 0.0

    @property
    def lag(self) -> int:
        """Ids stored and not yet known to be on the topic (a shared store may leave ids
        unused, so this is at most the events behind)."""
        return max(0, self.log.head - self.progress.checkpoint) if self.running else 0

    def status(self) -> dict[str, Any]:
        return {
            "topic": self.cfg.topic,
            "bootstrap_servers": self.cfg.bootstrap_servers,
            "running": self.running,
            "connected": self.connected,
            "checkpoint": self.progress.checkpoint,
            "lag": self.lag,
            "in_flight": self.progress.in_flight,
            "delivered": self.delivered,
            "lost_to_retention": self.lost,
            "rewinds": self.rewinds,
            "last_error": self.last_error,
        }

    def notify(self, records: list[Record]) -> None:
        """Hub listener: there is more to publish."""
        if self.running and records:
            self._tail.notify(records)
            self._wake.set()

    def start(self) -> None:
        """On the loop, once the log has started: reads the checkpoint and makes the producer;
        raises :class:`CheckpointError` or ``KafkaException`` (a bad [kafka.config])."""
        checkpoint, why = self.checkpoints.load(self.log.epoch)
        if why:
            log.warning("Kafka sink: %s", why)
        checkpoint = min(checkpoint, self.log.head)
        self.progress = Progress(checkpoint)
        self._saved = checkpoint
        self._thread = ProducerThread(
            self.cfg.producer(),
            self.cfg.topic,
            asyncio.get_running_loop(),
            self._reports,
            self._client_error,
        )
        self._thread.start()
        self.running = True
        log.info(
            "Kafka sink: publishing to topic %r at %s after id %d (%d to catch up)",
            self.cfg.topic,
            self.cfg.bootstrap_servers,
            checkpoint,
            self.lag,
        )

    async def run(self) -> None:
        saver = asyncio.create_task(self._save_often())
        try:
            await self._publish()
        finally:
            saver.cancel()

    async def _publish(self) -> None:
        progress, thread = self.progress, self._thread
        assert thread is not None
        while True:
            self._wake.clear()
            wait = self._hold_until - time.monotonic()
            if wait > 0:  # after a failed delivery
                await asyncio.sleep(wait)
                continue
            if progress.in_flight < WINDOW:
                after = progress.dispatched
                lost_to, records = await self._tail.next(after, BATCH)
                if progress.dispatched != after:  # rewound while reading
                    continue
                if lost_to > after:
                    records.insert(0, self._gap(after, lost_to))
                if records:
                    thread.submit(progress.generation, records)
                    progress.sent([r.id for r in records])
                    continue
            await self._wake.wait()

    def _gap(self, after: int, lost_to: int) -> Record:
        self.lost += lost_to - after
        log.error(
            "Kafka sink: ids %d-%d were dropped by retention before they were published "
            "(the sink was %d behind); publishing an overflow event in their place. Keep the "
            "broker reachable, or retain more (retention_days, retention_events)",
            after + 1,
            lost_to,
            lost_to - after,
        )
        ev = lost(self.me, lost_to, time.time_ns())
        ev.id, ev.via = lost_to, [self.me]
        return make_record(
            lost_to, ev.site, ev.node, ev.path, flags_mask(ev.flags), event_json(ev), ev
        )

    def _reports(self, generation: int, delivered: list[int], failed: list[tuple[int, Any]]):
        progress = self.progress
        if generation != progress.generation:
            return
        if delivered:
            self.delivered += len(delivered)
            progress.delivered(generation, delivered)
            if not self.connected:
                self.connected = True
                self._backoff = 1.0
                log.info("Kafka sink: delivering to %s again", self.cfg.bootstrap_servers)
        if failed:
            id, err = failed[0]
            self.last_error = f"event {id}: {err}"
            self.rewinds += 1
            log.error(
                "Kafka sink: %d message(s) not delivered to topic %r (first: event %d: %s); "
                "sending again after id %d in %.0f s with a new producer",
                len(failed),
                self.cfg.topic,
                id,
                err,
                progress.checkpoint,
                self._backoff,
            )
            progress.rewind()
            self._tail.clear()
            assert self._thread is not None
            self._thread.reset()
            self._hold_until = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)
        self._wake.set()

    def _client_error(self, err: Any) -> None:
        text = f"{err}"
        if text != self.last_error:  # librdkafka repeats itself while a broker is down
            log.warning("Kafka sink: %s", text)
        self.last_error = text
        self.connected = False
        if err.fatal():  # (the idempotent producer's state is lost): start over with a new one
            self._reports(self.progress.generation, [], [(self.progress.checkpoint + 1, err)])

    async def _save_often(self) -> None:
        while True:
            await asyncio.sleep(SAVE_EVERY)
            with contextlib.suppress(CheckpointError):
                await asyncio.to_thread(self._save)

    def _save(self) -> None:
        checkpoint = self.progress.checkpoint
        if checkpoint != self._saved:
            try:
                self.checkpoints.save(self.log.epoch, checkpoint)
            except CheckpointError as e:
                log.error("Kafka sink: %s; it is kept in memory and tried again", e)
                self.last_error = str(e)
                raise
            self._saved = checkpoint

    async def close(self) -> None:
        """Deliver what is out (for a few seconds at most) and keep the checkpoint."""
        if not self.running:
            return
        self.running = False
        thread = self._thread
        assert thread is not None
        left = await asyncio.to_thread(thread.stop, FLUSH_ON_STOP)
        self._reports(*thread.take())
        if left:
            log.warning(
                "Kafka sink: %d message(s) undelivered at stop; they are sent again at the "
                "next start (after id %d)",
                left,
                self.progress.checkpoint,
            )
        with contextlib.suppress(CheckpointError):
            self._save()
