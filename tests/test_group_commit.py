"""Group commit in the SQLite log: batches that arrive together share one transaction, each
caller gets exactly what its batch stored, listeners see each commit once, whole and in order;
a lone batch is committed without waiting for company."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from storage_events.relay.log.sqlite import SQLiteLog
from storage_events.wire import Event


def batch(node: str, first: int, count: int) -> list[Event]:
    return [
        Event(
            site="s",
            node=node,
            path=f"/d/f{seq}",
            flags=["IN_CLOSE_WRITE"],
            ts=time.time_ns(),
            stream=f"{node}:1",
            seq=seq,
        )
        for seq in range(first, first + count)
    ]


@pytest.mark.parametrize("durability", ["NORMAL", "FULL"])
def test_batches_arriving_together_share_one_commit(tmp_path: Path, durability: str) -> None:
    async def main() -> None:
        log = SQLiteLog(tmp_path, synchronous=durability)
        seen: list[list[int]] = []
        log.follow(lambda records: seen.append([r.id for r in records]))
        # 50 connections' batches in one loop iteration, one of them a resend of another's.
        batches = [batch(f"n{i}", 1, 3) for i in range(50)]
        results = await asyncio.gather(*(log.append(b) for b in batches), log.append(batches[7]))
        assert log.commits == 1
        assert seen == [list(range(1, 151))]
        for i, stored in enumerate(results[:50]):
            assert [(r.event().stream, r.event().seq) for r in stored] == [
                (f"n{i}:1", seq) for seq in (1, 2, 3)
            ]
        assert results[50] == []  # the resend: held already, stored once
        # Alone, a batch is committed at once and on its own.
        assert [r.id for r in await log.append(batch("n0", 4, 1))] == [151]
        assert log.commits == 2 and seen[-1] == [151]
        assert {key: log.held(f"{key}:1") for key in ("n0", "n7", "n49")} == {
            "n0": 4,
            "n7": 3,
            "n49": 3,
        }
        await log.close()
        again = SQLiteLog(tmp_path, synchronous=durability)  # durable, positions included
        assert (again.head, await again.position("n0:1"), await again.position("n7:1")) == (
            151,
            4,
            3,
        )
        assert len(await again.read(0, 1000)) == 151
        await again.close()

    asyncio.run(main())


def test_a_failed_commit_fails_every_batch_in_it_and_stores_none(tmp_path: Path) -> None:
    async def main() -> None:
        log = SQLiteLog(tmp_path)
        await log.append(batch("n0", 1, 1))
        log._writer.execute("PRAGMA query_only = ON")  # every write now fails
        results = await asyncio.gather(
            *(log.append(batch(f"n{i}", 2 if i == 0 else 1, 2)) for i in range(3)),
            return_exceptions=True,
        )
        assert all(type(r).__name__ == "StoreError" for r in results), results
        assert "cannot write the event log" in str(results[0])
        assert (log.head, log.held("n0:1"), log.held("n1:1")) == (1, 1, 0)  # nothing moved
        log._writer.execute("PRAGMA query_only = OFF")
        stored = await log.append(batch("n1", 1, 2))  # the sender's resend is stored whole
        assert [r.id for r in stored] == [2, 3]
        await log.close()

    asyncio.run(main())
