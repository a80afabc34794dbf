"""The Kafka sink against librdkafka's in-process mock cluster (``test.mock.num.brokers``): a
real SQLite log, the real producer thread, a real consumer reading the topic back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from conftest import free_port
from test_log_conformance import ev

from storage_events.relay.config import KafkaConfig
from storage_events.relay.kafka.checkpoint import FileCheckpoint
from storage_events.relay.kafka.sink import KafkaSink
from storage_events.relay.log.base import KEEP_ALL, Retention
from storage_events.relay.log.sqlite import SQLiteLog

MOCK = {"test.mock.num.brokers": 3}
TOPIC = "storage-events"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


@contextlib.asynccontextmanager
async def opened(data: Path, retention: Retention = KEEP_ALL) -> AsyncIterator[SQLiteLog]:
    log = SQLiteLog(data, name="central", retention=retention)
    await log.start()
    try:
        yield log
    finally:
        await log.close()


@contextlib.asynccontextmanager
async def sinking(log: SQLiteLog, data: Path, **config) -> AsyncIterator[KafkaSink]:
    cfg = KafkaConfig(bootstrap_servers="127.0.0.1:9", config={**MOCK, **config})
    sink = KafkaSink(cfg, log, "central", FileCheckpoint(data, TOPIC))
    log.follow(sink.notify)
    await sink.start()
    task = asyncio.create_task(sink.run())
    try:
        yield sink
    finally:
        await sink.close()
        assert task.done()


async def caught_up(sink: KafkaSink, log: SQLiteLog, timeout: float = 30) -> None:
    async def wait() -> None:
        while sink.progress.checkpoint < log.head:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(wait(), timeout)


def read_topic(sink: KafkaSink, want: int, timeout: float = 30) -> list:
    """Every message on the sink's (mock) cluster, each partition from its start."""
    md = sink._thread._producer.list_topics(TOPIC, timeout=10)
    servers = ",".join(f"{b.host}:{b.port}" for b in md.brokers.values())
    consumer = Consumer(
        {"bootstrap.servers": servers, "group.id": "test", "enable.auto.commit": False}
    )
    try:
        consumer.assign([TopicPartition(TOPIC, p, 0) for p in md.topics[TOPIC].partitions])
        got: list = []
        loop = asyncio.new_event_loop()  # (only for its clock)
        deadline = loop.time() + timeout
        while len(got) < want and loop.time() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                got.append(msg)
        loop.close()
        extra = consumer.poll(0.5)  # nothing beyond what was wanted
        assert extra is None or extra.error(), f"more than {want} messages on the topic"
        return got
    finally:
        consumer.close()


async def append(log: SQLiteLog, streams: list[str], first: int, last: int) -> None:
    for seq in range(first, last + 1, 100):
        await log.append(
            [
                ev(s, q, path=f"/d/{s}/{q}")
                for s in streams
                for q in range(seq, min(seq + 100, last + 1))
            ]
        )


def by_key(messages: list) -> dict[bytes, list[int]]:
    out: dict[bytes, list[int]] = {}
    for m in sorted(messages, key=lambda m: (m.partition(), m.offset())):
        out.setdefault(m.key(), []).append(json.loads(m.value())["seq"])
    return out


def test_every_stored_event_reaches_the_topic_once_each_stream_in_order(tmp_path):
    streams = ["a:1", "b:1", "c:1"]

    async def main():
        async with opened(tmp_path) as log:
            await append(log, streams, 1, 1000)  # before the sink starts: catch-up
            async with sinking(log, tmp_path) as sink:
                await append(log, streams, 1001, 2000)  # while it runs: live
                await caught_up(sink, log)
                messages = await asyncio.to_thread(read_topic, sink, 6000)
                stored = {r.id: r for r in await log.read(0, 10_000)}
            assert sink.progress.checkpoint == log.head == 6000
            assert FileCheckpoint(tmp_path, TOPIC).read(log.epoch) == (6000, None)
        return messages, stored

    messages, stored = run(main())
    assert len(messages) == 6000
    assert by_key(messages) == {s.encode(): list(range(1, 2001)) for s in streams}
    for m in messages:
        value = m.value()
        r = stored[json.loads(value)["id"]]
        assert value == r.data  # exactly what /events sends
        headers = dict(m.headers())
        event = r.event()
        assert headers["ce_id"] == f"{event.stream}:{event.seq}".encode()
        assert headers["ce_subject"] == event.path.encode()
        assert headers["content-type"] == b"application/json"


def test_a_restart_resumes_after_the_checkpoint(tmp_path):
    async def main():
        async with opened(tmp_path) as log:
            await append(log, ["a:1"], 1, 1000)
            async with sinking(log, tmp_path) as sink:
                await caught_up(sink, log)
            await append(log, ["a:1"], 1001, 1500)
            # A new producer, and a new mock cluster: it holds only what the second sink sent.
            async with sinking(log, tmp_path) as sink:
                await caught_up(sink, log)
                return await asyncio.to_thread(read_topic, sink, 500)

    messages = run(main())
    assert sorted(json.loads(m.value())["id"] for m in messages) == list(range(1001, 1501))


def test_retention_overtaking_a_lagging_sink_is_announced_on_the_topic(tmp_path, caplog):
    async def main():
        async with opened(tmp_path, Retention(max_events=100)) as log:
            await append(log, ["a:1"], 1, 500)
            FileCheckpoint(tmp_path, TOPIC).write(log.epoch, 10)
            await log.trim()
            assert log.first == 401
            async with sinking(log, tmp_path) as sink:
                await caught_up(sink, log)
                return sink.lost, await asyncio.to_thread(read_topic, sink, 101)

    with caplog.at_level(logging.ERROR, "storage_events.relay"):
        lost, messages = run(main())
    assert lost == 390
    values = [json.loads(m.value()) for m in sorted(messages, key=lambda m: m.offset())]
    notice = next(v for v in values if v["stream"] == "central.gap")
    assert notice["flags"] == ["IN_Q_OVERFLOW"] and notice["id"] == 400
    assert sorted(v["id"] for v in values if v is not notice) == list(range(401, 501))
    assert "ids 11-400 were dropped by retention before they were published" in caplog.text


def test_an_event_larger_than_kafka_takes_goes_as_a_notice_in_its_place(tmp_path, caplog):
    async def main():
        async with opened(tmp_path) as log:
            await log.append([ev("a:1", 1, path="/d/" + "x" * 60_000), ev("a:1", 2)])
            async with sinking(log, tmp_path, **{"message.max.bytes": 50_000}) as sink:
                await caught_up(sink, log)
                return await asyncio.to_thread(read_topic, sink, 2)

    with caplog.at_level(logging.ERROR, "storage_events.relay"):
        messages = run(main())
    first, second = sorted(messages, key=lambda m: m.offset())
    assert json.loads(first.value())["type"] == "too_large"
    assert dict(first.headers())["ce_id"] == b"a:1:1"
    assert json.loads(second.value())["seq"] == 2
    assert "publishing a too_large notice in its place" in caplog.text


def test_an_unreachable_broker_holds_the_checkpoint_and_says_why(tmp_path, caplog):
    async def main():
        async with opened(tmp_path) as log:
            await append(log, ["a:1"], 1, 200)
            cfg = KafkaConfig(
                bootstrap_servers=f"127.0.0.1:{free_port()}",
                config={"message.timeout.ms": 1000},
            )
            sink = KafkaSink(cfg, log, "central", FileCheckpoint(tmp_path, TOPIC))
            await sink.start()
            task = asyncio.create_task(sink.run())
            while sink.rewinds < 2:  # each failure: back to the checkpoint, a new producer
                await asyncio.sleep(0.1)
            await sink.close()
            assert task.done()
            return sink.status()

    with caplog.at_level(logging.WARNING, "storage_events.relay"):
        status = run(main())
    assert status["checkpoint"] == 0 and status["delivered"] == 0
    assert not status["connected"] and status["last_error"]
    assert "not delivered to topic 'storage-events'" in caplog.text
    assert "sending again after id 0" in caplog.text
    assert FileCheckpoint(tmp_path, TOPIC).read(0)[0] == 0  # (nothing claimed delivered)


def test_a_bad_producer_setting_is_an_error_at_start(tmp_path):
    async def main():
        async with opened(tmp_path) as log:
            cfg = KafkaConfig(bootstrap_servers="k:9092", config={"no.such.setting": 1})
            await KafkaSink(cfg, log, "central", FileCheckpoint(tmp_path, TOPIC)).start()

    with pytest.raises(KafkaException, match=r"no\.such\.setting"):
        run(main())


def test_a_stopping_relay_flushes_what_is_out_and_keeps_the_checkpoint(tmp_path):
    async def main():
        async with opened(tmp_path) as log:
            cfg = KafkaConfig(bootstrap_servers="127.0.0.1:9", config={**MOCK, "linger.ms": 1000})
            sink = KafkaSink(cfg, log, "central", FileCheckpoint(tmp_path, TOPIC))
            log.follow(sink.notify)
            await sink.start()
            task = asyncio.create_task(sink.run())
            await append(log, ["a:1"], 1, 3000)
            while sink.progress.dispatched < log.head:  # all handed over, lingering unsent
                await asyncio.sleep(0.01)
            assert sink.progress.checkpoint < log.head
            task.cancel()  # as the relay's shutdown cancels its tasks, then stops the others
            await asyncio.sleep(0.1)  # (meanwhile the sink flushes)
            await sink.close()
            return FileCheckpoint(tmp_path, TOPIC).read(log.epoch)[0], sink.delivered

    assert run(main()) == (3000, 3000)
