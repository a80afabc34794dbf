"""The Kafka sink (``[kafka]``): the relay's own log, from a checkpoint, onto a topic.

It reads the log as a pushing relay does (:class:`~..log.tail.Tail`), hands the records to the
producer's thread, and moves its checkpoint only on delivery reports (:class:`.Progress`), so
every stored event reaches the topic at least once, each stream's in order. A broker that is
down or slow never holds up ingest or the feed: the sink stops reading once ``WINDOW`` messages
are out, falls behind (its lag is in ``/sites`` and ``/metrics``), and catches up afterwards.
When retention drops events the sink has not yet published, it publishes an overflow event
for them in their place (as a pushing relay does) and logs an error: the loss is announced
on the topic, never silent.

A *term* is one stretch of publishing: the checkpoint read, a producer made, the log published
until the term ends, what is out flushed for a few seconds, the checkpoint kept. With the
embedded log one term lasts as long as the relay; on a NATS store, the replica holding the
sink's lease publishes, one term per holding (:mod:`.shared`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from storage_events.relay.config import KafkaConfig
from storage_events.relay.dcache.lease import LeaseKeeper
from storage_events.relay.federation.core import lost
from storage_events.relay.kafka.checkpoint import CheckpointError, Checkpoints, FileCheckpoint
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
    def __init__(
        self, cfg: KafkaConfig, events: EventLog, me: str, place: FileCheckpoint | None = None
    ) -> None:
        """``place``: the checkpoint file (the embedded log); None: a NATS store's lease and
        key, opened once the log has started."""
        self.cfg = cfg
        self.log = events
        self.me = me
        self.place = place
        self.progress = Progress(0)
        self.connected = False  # a delivery succeeded since the last client-level error
        self.last_error: str | None = None
        self.delivered = 0  # messages reported delivered since start
        self.lost = 0  # events retention dropped before they were published
        self.rewinds = 0  # failed deliveries that sent the sink back to its checkpoint
        self.running = False  # in a term: this relay publishes
        self._tail = Tail(events)
        self._wake = asyncio.Event()
        self._thread: ProducerThread | None = None
        self._checkpoints: Checkpoints | None = None
        self._keeper: LeaseKeeper | None = None
        self._term: asyncio.Task[None] | None = None
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

    async def start(self) -> None:
        """Once the log has started, before the relay serves: a damaged checkpoint file
        (:class:`CheckpointError`) or a bad producer setting (``KafkaException``) is an error
        of the relay's start, not of a task nobody watches."""
        from confluent_kafka import Producer

        Producer(self.cfg.producer()).purge()  # (only made to check the settings)
        if self.place is not None:
            await self.place.load(self.log.epoch)

    async def run(self) -> None:
        if self.place is not None:
            self._term = asyncio.current_task()
            await self._publish_term(self.place)
            return
        from storage_events.relay.kafka.shared import open_shared

        checkpoints, self._keeper = await open_shared(self.log, self.cfg.topic, self.me)
        await self._keeper.hold(lambda: self._publish_term(checkpoints))

    async def close(self) -> None:
        """End the term (flushing what is out for a few seconds, keeping the checkpoint) and,
        on a NATS store, give the lease up."""
        if self._keeper is not None:
            await self._keeper.stop()
        elif self._term is not None:
            # The relay's shutdown may have cancelled it already: a second cancel would cut its
            # flush and its last checkpoint short.
            if not self._term.cancelling():
                self._term.cancel()
            await asyncio.gather(self._term, return_exceptions=True)

    async def _publish_term(self, checkpoints: Checkpoints) -> None:
        checkpoint, why = await checkpoints.load(self.log.epoch)
        if why:
            log.warning("Kafka sink: %s", why)
        checkpoint = min(checkpoint, self.log.head)
        self.progress = progress = Progress(checkpoint)
        self._checkpoints, self._saved = checkpoints, checkpoint
        self._tail.clear()
        thread = self._thread = ProducerThread(
            self.cfg.producer(),
            self.cfg.topic,
            asyncio.get_running_loop(),
            lambda *reports: self._reports(progress, *reports),
            self._client_error,
        )
        thread.start()
        self.running = True
        log.info(
            "Kafka sink: publishing to topic %r at %s after id %d (%d to catch up)",
            self.cfg.topic,
            self.cfg.bootstrap_servers,
            checkpoint,
            self.lag,
        )
        saver = asyncio.create_task(self._save_often())
        try:
            await self._publish(progress, thread)
        finally:
            saver.cancel()
            self.running = False
            left = await asyncio.to_thread(thread.stop, FLUSH_ON_STOP)
            self._reports(progress, *thread.take())
            if left:
                log.warning(
                    "Kafka sink: %d message(s) undelivered when publishing stopped; they are "
                    "sent again when it starts (after id %d)",
                    left,
                    progress.checkpoint,
                )
            with contextlib.suppress(CheckpointError):
                await self._save()

    async def _publish(self, progress: Progress, thread: ProducerThread) -> None:
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

    def _reports(
        self,
        progress: Progress,
        generation: int,
        through: int | None,
        failed: list[tuple[int | None, Any]],
    ) -> None:
        if progress is not self.progress or generation != progress.generation:
            return  # of an earlier term, or handed over before a rewind
        if through is not None:
            self.delivered += progress.delivered(generation, through)
            if not self.connected:
                self.connected = True
                self._backoff = 1.0
                log.info("Kafka sink: delivering to %s", self.cfg.bootstrap_servers)
        if failed:
            id, err = failed[0]
            self.last_error = f"event {id}: {err}"
            self.rewinds += 1
            log.error(
                "Kafka sink: %d message(s) not delivered to topic %r (first: event %s: %s); "
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
            p = self.progress
            self._reports(p, p.generation, None, [(None, err)])

    async def _save_often(self) -> None:
        while True:
            await asyncio.sleep(SAVE_EVERY)
            with contextlib.suppress(CheckpointError):
                await self._save()

    async def _save(self) -> None:
        checkpoint, checkpoints = self.progress.checkpoint, self._checkpoints
        if checkpoint != self._saved and checkpoints is not None:
            try:
                await checkpoints.save(self.log.epoch, checkpoint)
            except CheckpointError as e:
                log.error("Kafka sink: %s; it is kept in memory and tried again", e)
                self.last_error = str(e)
                raise
            self._saved = checkpoint
