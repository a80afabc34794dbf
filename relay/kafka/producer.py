"""confluent-kafka's producer on a thread of its own, so that neither producing nor serving its
delivery reports ever runs on the relay's event loop.

The loop hands over batches of records with :meth:`ProducerThread.submit`; the thread turns them
into messages, produces them (waiting, off the loop, when librdkafka's queue is full), and passes
delivery reports back to the loop in batches. :meth:`ProducerThread.reset` throws the producer
away with everything it still holds and makes a new one: the sink does that after a failed
delivery, before it sends again from its checkpoint.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from storage_events.relay.kafka.message import Message, message, oversize
from storage_events.relay.log.base import Record

log = logging.getLogger("storage_events.relay")
kafka_log = logging.getLogger("storage_events.relay.kafka")

# (generation, ids delivered, (id, error) of those that failed)
Reports = Callable[[int, list[int], list[tuple[int, Any]]], None]

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
        self._delivered: list[int] = []
        self._failed: list[tuple[int, Any]] = []
        self._oversize: set[int] = set()  # refused by the broker as too large: sent as notices
        self._thread = threading.Thread(target=self._run, name="kafka-producer", daemon=True)
        self._producer: Any = None
        self._stopped = threading.Event()
        self._leftover = 0

    def start(self) -> None:
        self._producer = self._make()  # here, so that a bad config is an error of start()
        self._thread.start()

    def submit(self, generation: int, records: list[Record]) -> None:
        self._queue.put((generation, records))

    def reset(self) -> None:
        self._queue.put(_RESET)

    def stop(self, timeout: float) -> int:
        """Blocking: deliver what is queued within ``timeout`` s (its reports reach the loop
        first if it still runs, else the caller takes them with :meth:`take`); returns how many
        messages were left undelivered."""
        self._queue.put((_STOP, timeout))
        self._stopped.wait()
        return self._leftover

    def take(self) -> tuple[int, list[int], list[tuple[int, Any]]]:
        """Reports not yet passed to the loop (after :meth:`stop`)."""
        taken = self._generation, self._delivered, self._failed
        self._delivered, self._failed = [], []
        return taken

    def _make(self) -> Any:
        from confluent_kafka import Producer

        # librdkafka's own log lines go to the relay's log (served by poll(), on this thread).
        return Producer({**self.conf, "error_cb": self._error, "logger": kafka_log})

    def _error(self, err: Any) -> None:
        self._loop.call_soon_threadsafe(self._errors, err)

    def _report(self, generation: int, id: int, err: Any, msg: Any) -> None:
        if generation != self._generation:
            return  # handed over before a reset: the sink sends it again
        if err is None:
            self._delivered.append(id)
            return
        if err.code() == _size_error():
            self._oversize.add(id)
        self._failed.append((id, err))

    def _pass_on(self) -> None:
        if self._delivered or self._failed:
            taken = self.take()
            try:
                self._loop.call_soon_threadsafe(self._reports, *taken)
            except RuntimeError:  # the loop has closed: stop() callers take them
                self._delivered, self._failed = taken[1], taken[2]

    def _run(self) -> None:
        producer = self._producer
        try:
            while True:
                try:
                    # Messages out: come back soon for their reports. None: wait for work.
                    item = self._queue.get(timeout=0.005 if len(producer) else 0.5)
                except queue.Empty:
                    item = None
                if item is _RESET:
                    producer = self._replace(producer)
                elif isinstance(item, tuple) and item[0] is _STOP:
                    self._leftover = producer.flush(item[1])
                    self._pass_on()
                    return
                elif item is not None:
                    generation, records = item
                    self._generation = generation
                    for record in records:
                        self._produce(producer, generation, record)
                producer.poll(0)
                self._pass_on()
        except Exception:
            log.exception("Kafka sink: the producer thread failed; the relay must be restarted")
        finally:
            self._stopped.set()

    def _replace(self, producer: Any) -> Any:
        producer.purge()  # (their reports arrive with errors, for the old generation)
        producer.poll(0)
        self._delivered, self._failed = [], []
        return self._make()

    def _produce(self, producer: Any, generation: int, record: Record) -> None:
        msg = message(record)
        if msg.size > self.max_bytes or record.id in self._oversize:
            msg = self._substitute(msg, record)
        report = functools.partial(self._report, generation, record.id)
        while True:
            try:
                producer.produce(
                    self.topic, msg.value, msg.key, headers=msg.headers, on_delivery=report
                )
                return
            except BufferError:  # librdkafka's queue is full: wait for room, here
                producer.poll(0.05)
                self._pass_on()
            except Exception as e:  # KafkaException: refused before it was queued
                from confluent_kafka import KafkaError

                err = e.args[0] if e.args and isinstance(e.args[0], KafkaError) else None
                if err is not None and err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                    self._oversize.add(record.id)
                    msg = self._substitute(msg, record)
                    continue
                self._failed.append((record.id, err or e))
                return

    def _substitute(self, msg: Message, record: Record) -> Message:
        log.error(
            "Kafka sink: event %d (%s) is %d bytes, more than the producer or broker accepts "
            "(message.max.bytes %d); publishing a too_large notice in its place. Raise "
            "message.max.bytes in [kafka.config] and on the broker to publish such events.",
            record.id,
            f"{record.event().stream}:{record.event().seq}",
            msg.size,
            self.max_bytes,
        )
        return oversize(record, msg.size)


@functools.cache
def _size_error() -> int:
    from confluent_kafka import KafkaError

    return KafkaError.MSG_SIZE_TOO_LARGE
