"""What every event log backend promises (relay/log/base.py, ``EventLog``), checked on each:
the embedded SQLite log, and JetStream on a real three-server nats-server cluster. A backend is
"reopened" the way a relay restarts: a new instance on the same directory or stream (on
JetStream that is also what a second relay replica on the same stream sees)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import NatsCluster, Proc

from storage_events.relay.log.base import KEEP_ALL, EventLog, Record, Retention
from storage_events.relay.log.nats import NATSLog
from storage_events.relay.log.sqlite import SQLiteLog
from storage_events.wire import Event


def ev(stream: str, seq: int, *, site: str = "s", node: str = "n", path: str = "/d/f", **kw: Any):
    return Event(
        site=site,
        node=node,
        path=path,
        flags=["IN_CLOSE_WRITE"],
        ts=1,
        stream=stream,
        seq=seq,
        **kw,
    )


@pytest.fixture(scope="module")
def nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsCluster]:
    procs: list[Proc] = []
    cluster = NatsCluster(tmp_path_factory.mktemp("nats"), procs)
    yield cluster
    for proc in procs:
        proc.stop()


class Backend:
    """Opens logs of one kind on one place; ``again()`` opens another on the same place."""

    def __init__(self, kind: str, tmp: Path, cluster: NatsCluster | None) -> None:
        self.kind = kind
        self.tmp = tmp
        self.cluster = cluster
        self.place = uuid.uuid4().hex[:8]
        self.opened: list[EventLog] = []

    async def open(
        self, name: str = "central", retention: Retention = KEEP_ALL, place: str | None = None
    ) -> EventLog:
        place = place or self.place
        log: EventLog
        if self.kind == "sqlite":
            log = SQLiteLog(self.tmp / place, name=name, retention=retention)
        else:
            assert self.cluster is not None
            log = NATSLog(self.cluster.urls, name=name, stream=f"T{place}", retention=retention)
        await log.start()
        self.opened.append(log)
        return log

    async def close_all(self) -> None:
        for log in self.opened:
            await log.close()


@pytest.fixture(params=["sqlite", "nats"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    cluster = request.getfixturevalue("nats") if request.param == "nats" else None
    return Backend(request.param, tmp_path, cluster)


def run(backend: Backend, body: Callable[[Backend], Awaitable[None]]) -> None:
    async def main() -> None:
        try:
            await body(backend)
        finally:
            await backend.close_all()

    asyncio.run(main())


@asynccontextmanager
async def following(log: EventLog) -> AsyncIterator[list[Record]]:
    heard: list[Record] = []
    log.follow(heard.extend)
    yield heard


async def until(predicate: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_numbers_dedups_and_survives_reopening(backend):
    async def body(b: Backend) -> None:
        log = await b.open()
        stored = await log.append([ev("n:1", 1), ev("n:1", 2), ev("m:1", 1)])
        assert [r.id for r in stored] == [1, 2, 3]
        assert (await log.append([ev("n:1", 2), ev("n:1", 3)]))[0].id == 4  # seq 2 was held
        assert await log.append([ev("n:1", 3)]) == []  # all held: nothing stored, none returned
        assert (log.head, await log.position("n:1"), await log.position("m:1")) == (4, 3, 1)
        log = await b.open()
        assert (log.head, await log.position("n:1")) == (4, 3)
        rows = await log.read(1, 10)
        assert [r.id for r in rows] == [2, 3, 4]
        assert b'id: 2\nevent: inotify\ndata: {"id":2,' in rows[0].sse
        assert rows[0].event().via == ["central"] and rows[0].event().origin_id == 2
        assert await log.read(4, 10) == []
        assert [r.id for r in await log.read(0, 2)] == [1, 2]

    run(backend, body)


def test_append_returns_what_it_stored_as_readers_get_it(backend):
    async def body(b: Backend) -> None:
        log = await b.open()
        given = [ev("n:1", i, path=f"/d/{i}") for i in range(1, 6)]
        stored = await log.append(given)
        assert all(e.id == 0 and e.via == [] for e in given)  # the caller's events unchanged
        read = await log.read(0, 10)
        assert [(r.id, r.data, r.sse) for r in stored] == [(r.id, r.data, r.sse) for r in read]
        assert log.stored == 5 and log.size > 0 and log.first == 1

    run(backend, body)


def test_every_stored_record_reaches_every_follower_once_in_order(backend):
    """Whoever stored it: on a shared store, another relay's appends reach this one too."""

    async def body(b: Backend) -> None:
        here = await b.open(name="a")
        other = await b.open(name="b") if b.kind == "nats" else here
        async with following(here) as heard:
            for i in range(0, 300, 50):
                await (here if i % 100 else other).append(
                    [ev("n:1", s) for s in range(i + 1, i + 51)]
                )
            await until(lambda: len(heard) >= 300, "300 records")
        await asyncio.sleep(0.2)  # (nothing more comes)
        assert [r.id for r in heard] == list(range(1, 301))
        assert [r.event().seq for r in heard] == list(range(1, 301))

    run(backend, body)


def test_checkpoints_are_stored_with_the_events_and_relayed_origins_kept(backend):
    async def body(b: Backend) -> None:
        log = await b.open()
        direct = [ev("site1:a", i, id=i, via=["site1"], origin_id=i) for i in range(1, 6)]
        relayed = [
            ev("site1:a", i, id=100 + i, via=["site1", "regional"], origin_id=i)
            for i in range(3, 9)
        ]
        stored = await log.append(direct[:3], ("@upstream:site1", 3))
        stored += await log.append(relayed, ("@upstream:regional", 108))
        stored += await log.append(direct[3:], ("@upstream:site1", 5))  # held: only the mark
        assert [r.event().seq for r in stored] == [1, 2, 3, 4, 5, 6, 7, 8]
        assert [r.event().via for r in stored][2:4] == [
            ["site1", "central"],
            ["site1", "regional", "central"],
        ]
        assert stored[3].event().origin_id == 4  # kept as it arrived, never replaced
        assert await log.position("@upstream:site1") == 5
        assert await log.position("@upstream:regional") == 108
        mine = await log.append([ev("local:1", 1)])
        assert mine[0].event().via == ["central"] and mine[0].event().origin_id == mine[0].id
        assert (await log.read(mine[0].id - 1, 1))[0].event().origin_id == mine[0].id
        epoch = log.epoch
        reopened = await b.open()  # checkpoints are durable
        assert await reopened.position("@upstream:site1") == 5 and reopened.head == mine[0].id
        assert reopened.epoch == epoch != 0
        fresh = await b.open(place=uuid.uuid4().hex[:8])
        assert fresh.epoch != epoch  # a new log, a new epoch

    run(backend, body)


def test_a_stream_belongs_to_its_first_site_and_route(backend):
    async def body(b: Backend) -> None:
        log = await b.open()
        assert len(await log.append([ev("n:1", 1, site="a")])) == 1
        forged = await log.append([ev("n:1", 2, site="b"), ev("m:1", 1, site="b")])
        assert [r.event().stream for r in forged] == ["m:1"]  # n:1's position is untouched
        assert await log.position("n:1") == 1 and log.stream_owner("n:1").site == "a"
        # Nor may a relayed copy take over an agent's stream (its seqs would be acknowledged).
        relayed = [ev("n:1", 9, site="a", id=9, via=["x"], origin_id=9)]
        assert await log.append(relayed, ("@upstream:x", 9)) == []
        assert await log.position("n:1") == 1
        again = await b.open()  # the owner is durable, and shared by the relays of a store
        await again.position("n:1")
        assert again.stream_owner("n:1").site == "a"
        # A sender with a valid token for site b, through another relay that has not looked
        # the stream up yet: refused there too.
        other = await b.open()
        assert await other.append([ev("n:1", 2, site="b")]) == []
        assert await other.position("n:1") == 1

    run(backend, body)


def test_an_agent_stream_that_skips_seqs_is_announced_as_loss(backend):
    async def body(b: Backend) -> None:
        log = await b.open()
        await log.append([ev("n:1", 1)])
        stored = await log.append([ev("n:1", 5)])
        assert [(r.event().seq, r.event().flags) for r in stored] == [
            (4, ["IN_Q_OVERFLOW"]),
            (5, ["IN_CLOSE_WRITE"]),
        ]
        assert await log.position("n:1") == 5

    run(backend, body)


def test_a_batch_sent_again_through_another_relay_is_stored_once(backend):
    """A relay stored a batch, then its sender lost the ack and reconnected elsewhere."""

    async def body(b: Backend) -> None:
        first = await b.open(name="a")
        second = await b.open(name="b") if b.kind == "nats" else first
        batch = [ev("n:1", i) for i in range(1, 101)]
        await first.append(batch[:60])
        assert await second.position("n:1") == 60
        stored = await second.append(batch)
        assert [r.event().seq for r in stored] == list(range(61, 101))
        ids = [r.event().seq for r in await first.read(0, 1000)]
        assert ids == list(range(1, 101))

    run(backend, body)


def test_retention_by_count_bytes_and_age(backend):
    async def body(b: Backend) -> None:
        log = await b.open(retention=Retention(max_events=80))
        await log.append([ev("n:1", i, path=f"/d/{i:04d}") for i in range(1, 101)])
        assert await log.trim() == 20
        assert (log.first, log.head) == (21, 100)
        per_event = log.size // 80
        limit = 50 * per_event
        log.retention = Retention(max_bytes=limit)
        gone = await log.trim()
        assert log.size <= limit  # under the limit, having dropped no more than needed:
        last_dropped = 20 + gone
        assert gone in (30, 31) and log.first == last_dropped + 1
        assert [r.id for r in await log.read(0, 1)] == [log.first]
        age = 0.05 if b.kind == "sqlite" else 1.0  # (JetStream expires by its own timer)
        await asyncio.sleep(age * 1.5)
        log.retention = Retention(max_age=age)
        await log.append([ev("n:1", 101, path="/d/new")])
        deadline = time.monotonic() + 10
        dropped = await log.trim()
        while dropped < 100 - last_dropped and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            dropped += await log.trim()
        assert dropped == 100 - last_dropped
        assert (log.first, log.head) == (101, 101)
        reopened = await b.open(retention=Retention(max_age=age))
        assert (reopened.first, reopened.head) == (101, 101)

    run(backend, body)


def test_nats_replicas_default_to_the_cluster_size(nats):
    async def body() -> None:
        log = NATSLog(nats.urls[:1], name="r", stream=f"T{uuid.uuid4().hex[:8]}")
        await log.start()
        try:
            info = await log._js.stream_info(log.stream)
            assert info.config.num_replicas == 3
        finally:
            await log.close()

    asyncio.run(body())


def test_concurrent_appends_store_each_event_once(backend):
    """Agents publish at once, and a sender's resend races its first try."""

    async def body(b: Backend) -> None:
        log = await b.open()
        batches = [[ev(f"n{k}:1", i, node=f"n{k}") for i in range(1, 201)] for k in range(6)]
        racing = [batches[0][:100], batches[0]]  # a resend overlapping its first try
        stored = await asyncio.gather(*(log.append(x) for x in [*batches, *racing]))
        assert sum(len(s) for s in stored) == 1200
        records = await log.read(0, 5000)
        seen = [(r.event().stream, r.event().seq) for r in records]
        assert len(seen) == len(set(seen)) == 1200
        for k in range(6):
            assert await log.position(f"n{k}:1") == 200
            seqs = [s for stream, s in seen if stream == f"n{k}:1"]
            assert seqs == list(range(1, 201))  # each stream in order, no loss notice

    run(backend, body)
