"""confluent-kafka's producer on a thread of its own, so that neither producing nor serving its
reports ever runs on the relay's event loop.

The loop hands over batches of records with :meth:`ProducerThread.submit`; the thread turns them
into messages and produces them (waiting, off the loop, when librdkafka's queue is full). Only
failures are reported message by message (``delivery.report.only.error``); success is known
when nothing is outstanding, which the thread makes happen at least every ``DRAIN_EVERY``
seconds by waiting for delivery before it produces more: then it reports the last id it was
given (see :class:`.Progress`). :meth:`ProducerThread.reset` throws the producer away with
everything it still holds and makes a new one: the sink does that after a failed delivery,
before it sends again from its checkpoint.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from storage_events.relay.kafka.message import message, oversize
from storage_events.relay.log.base import Record

log = logging.getLogger("storage_events.relay")
kafka_log = logging.getLogger("storage_events.relay.kafka")

# (generation, the last id delivered with all before it or None, (id, error) of failures)
Reports = Callable[[int, int | None, list[tuple[int | None, Any]]], None]

DRAIN_EVERY = 0.5  # seconds: how often, at most, the checkpoint waits for a moment of no backlog
DRAIN_WAIT = 1.0  # seconds the producer waits for such a moment before it goes on producing

_RESET = object()
_STOP = object()


class ProducerThread:
    def __init__(
        self,
        conf: dict[str, Any],
        topic: str,
        loop: asyncio.AbstractEventLoop,
        reports: Reports,
        errors: Callable[[Any], None],
    ) -> None:
        self.conf = conf
        self.topic = topic
        self.max_bytes = int(conf.get("message.max.bytes", 1_000_000))
        self._loop = loop
        self._reports = reports
        self._errors = errors  # librdkafka's client-level errors (all brokers down, …)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._generation = 0
        self._produced: int | None = None  # the last id produced, not yet reported
        self._failed: list[tuple[int | None, Any]] = []
        self._oversize: set[int] = set()  # refused by the broker as too large: sent as notices
        self._thread = threading.Thread(target=self._run, name="kafka-producer", daemon=True)
        self._producer: Any = None
        self._stopped = threading.Event()
        self._leftover = 0
        self._drained_at = time.monotonic()

    def start(self) -> None:
        self._producer = self._make()  # here, so that a bad config is an error of start()
        self._thread.start()

    def submit(self, generation: int, records: list[Record]) -> None:
        self._queue.put((generation, records))

    def reset(self) -> None:
        self._queue.put(_RESET)

    def stop(self, timeout: float) -> int:
        """Blocking: deliver what is queued within ``timeout`` s (its reports reach the loop
        if it still runs, else the caller takes them with :meth:`take`); returns how many
        messages were left undelivered."""
        self._queue.put((_STOP, timeout))
        self._stopped.wait()
        return self._leftover

    def take(self) -> tuple[int, int | None, list[tuple[int | None, Any]]]:
        """Reports not yet passed to the loop (after :meth:`stop`)."""
        taken = self._generation, self._produced, self._failed
        self._produced, self._failed = None, []
        return taken

    def _make(self) -> Any:
        from confluent_kafka import Producer

        return Producer(
            {
                **self.conf,
                "delivery.report.only.error": True,
                "on_delivery": self._failure,
                "error_cb": self._error,
                # librdkafka's own log lines go to the relay's log (served by poll(), here).
                "logger": kafka_log,
            }
        )

    def _error(self, err: Any) -> None:
        self._loop.call_soon_threadsafe(self._errors, err)

    def _failure(self, err: Any, msg: Any) -> None:
        """A message that was not delivered (the only reports asked for)."""
        try:
            id = json.loads(msg.value())["id"]
        except (ValueError, KeyError, TypeError):
            id = None
        if err.code() == _size_error() and id is not None:
            self._oversize.add(id)
        self._failed.append((id, err))

    def _pass_on(self, drained: bool) -> None:
        """Reports to the loop: failures, and, when nothing is outstanding, the last id."""
        if self._failed or (drained and self._produced is not None):
            taken = self.take()
            if taken[2]:  # (after a failure nothing of this generation counts as delivered)
                taken = (taken[0], None, taken[2])
            try:
                self._loop.call_soon_threadsafe(self._reports, *taken)
            except RuntimeError:  # the loop has closed: stop() callers take them
                self._produced, self._failed = taken[1], taken[2]

    def _run(self) -> None:
        producer = self._producer
        try:
            while True:
                try:
                    # Messages out: come back soon to see them delivered. None: wait for work.
                    item = self._queue.get(timeout=0.005 if len(producer) else 0.5)
                except queue.Empty:
                    item = None
                if item is _RESET:
                    producer = self._replace(producer)
                elif isinstance(item, tuple) and item[0] is _STOP:
                    self._leftover = producer.flush(item[1])
                    if self._leftover:  # (not all of it is known delivered)
                        self._produced = None
                    self._pass_on(self._leftover == 0)
                    return
                elif item is not None:
                    generation, records = item
                    if generation != self._generation:
                        self._generation, self._produced = generation, None
                    for record in records:
                        self._produce(producer, record)
                    self._produced = records[-1].id
                    if time.monotonic() - self._drained_at > DRAIN_EVERY:
                        producer.flush(DRAIN_WAIT)  # (a moment of no backlog, for the checkpoint)
                producer.poll(0)
                drained = len(producer) == 0
                if drained:
                    self._drained_at = time.monotonic()
                self._pass_on(drained)
        except Exception:
            log.exception("Kafka sink: the producer thread failed; the relay must be restarted")
        finally:
            self._stopped.set()

    def _replace(self, producer: Any) -> Any:
        producer.purge()  # (their failures arrive for the old generation: dropped here)
        producer.poll(0)
        self._produced, self._failed = None, []
        return self._make()

    def _produce(self, producer: Any, record: Record) -> None:
        msg = message(record)
        if record.id in self._oversize or (
            len(msg.value) > self.max_bytes // 2 and msg.size > self.max_bytes
        ):
            msg = self._substitute(msg, record)
        while True:
            try:
                producer.produce(self.topic, msg.value, msg.key, headers=msg.headers)
                return
            except BufferError:  # librdkafka's queue is full: wait for room, here
                producer.poll(0.05)
            except Exception as e:  # KafkaException (its KafkaError): refused before it was queued
                err = e.args[0] if e.args and hasattr(e.args[0], "code") else None
                if err is not None and err.code() == _size_error():
                    self._oversize.add(record.id)
                    msg = self._substitute(msg, record)
                    continue
                self._failed.append((record.id, err or e))
                return

    def _substitute(self, msg: Any, record: Record) -> Any:
        log.error(
            "Kafka sink: event %d (%s:%d) is %d bytes, more than the producer or broker accepts "
            "(message.max.bytes %d); publishing a too_large notice in its place. Raise "
            "message.max.bytes in [kafka.config] and on the broker to publish such events.",
            record.id,
            record.event().stream,
            record.event().seq,
            msg.size,
            self.max_bytes,
        )
        return oversize(record, msg.size)


@functools.cache
def _size_error() -> int:
    from confluent_kafka import KafkaError

    return KafkaError.MSG_SIZE_TOO_LARGE
