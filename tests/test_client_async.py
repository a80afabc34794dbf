"""The asyncio client against a real relay: the same items as the sync one, resuming across a
relay restart with nothing missed or repeated."""

from __future__ import annotations

import asyncio
import signal

from conftest import agents_connected, start_agent, wait_for
from test_dcache_api import write

from storage_events.client import asubscribe


def test_asubscribe_resumes_across_a_relay_restart(tmp_path, procs, relay):
    root = tmp_path / "w"
    root.mkdir()
    start_agent(tmp_path, procs, relay.url, root)
    wait_for(lambda: agents_connected(relay), 10, "agent connection")

    async def follow() -> list[tuple[int, str, list[str]]]:
        got: list[tuple[int, str, list[str]]] = []
        loop = asyncio.get_running_loop()
        restarted = False
        async for item in asubscribe(
            relay.url, paths=[str(root)], since="earliest", max_backoff=0.5
        ):
            if item.type != "inotify":
                continue
            ev = item.event
            got.append((ev.id, ev.path, ev.flags))
            if len(got) == 20 and not restarted:  # 10 files in: the relay goes and comes back
                restarted = True
                await loop.run_in_executor(None, relay.proc.stop, signal.SIGTERM)
                for i in range(10, 20):
                    write(root / f"f{i}")  # (the agent holds them until the relay is back)
                await loop.run_in_executor(None, relay.start)
            if len(got) == 40:
                return got
        return got

    for i in range(10):
        write(root / f"f{i}")
    got = asyncio.run(asyncio.wait_for(follow(), 120))
    assert [i for i, _, _ in got] == sorted({i for i, _, _ in got})  # in order, none twice
    assert [(p, f) for _, p, f in got] == [
        (str(root / f"f{i}"), [flag]) for i in range(20) for flag in ("IN_CREATE", "IN_CLOSE_WRITE")
    ]
