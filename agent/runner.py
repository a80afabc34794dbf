"""Runs one agent: watcher, spool and uplinks on one asyncio loop, with a clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from storage_events.wire import Event, Hello, flags_mask

from .config import AgentConfig
from .kernel_reader import KernelReader
from .outbox import Outbox
from .select import Selector
from .spool import Spool, SpoolError
from .uplink import Uplink
from .watcher import Root, Watcher

log = logging.getLogger("storage_events.agent")


class AgentError(Exception):
    pass


class Agent:
    """The parts of one running agent and the rules that connect them."""

    def __init__(self, cfg: AgentConfig, roots: list[Root], spool: Spool | None) -> None:
        self.cfg = cfg
        self.spool = spool
        memory = cfg.memory_events if spool else sys.maxsize
        # One stream per agent incarnation: its seq numbers restart at 1.
        self.outbox = Outbox(f"{cfg.node}:{uuid.uuid4().hex[:12]}", memory_limit=memory)
        # Streams of earlier runs whose events the relay has not acknowledged yet.
        self.old = [Outbox.restored(s, first, last, memory_limit=cfg.memory_events)
                    for s, first, last in (spool.streams() if spool else [])]
        self.watcher = Watcher(roots, site=cfg.site, node=cfg.node, sink=self.publish)
        loop = asyncio.get_running_loop()  # built inside run_agent
        self.reader = KernelReader(self.watcher.fileno(),
                                   lambda: loop.call_soon_threadsafe(self.process))
        self.paused = False
        self.uplinks = [self._uplink(box, drain_only=False) for box in [self.outbox]]
        self.uplinks += [self._uplink(box, drain_only=True) for box in self.old]

    def _uplink(self, box: Outbox, *, drain_only: bool) -> Uplink:
        return Uplink(self.cfg.relay,
                      Hello(site=self.cfg.site, node=self.cfg.node, stream=box.stream,
                            token=self.cfg.token),
                      box, asyncio.Event(), max_batch=self.cfg.max_batch, drain_only=drain_only)

    def publish(self, event: Event) -> None:
        self.outbox.add(event)
        if self.spool:
            self.spool.add(event)
        if not self.paused and self._full():
            # Stop reading the kernel queue rather than drop what was read: if the relay stays
            # away long enough, the kernel queue overflows, and that overflow is announced and
            # repaired by a rescan like any other, against a model that matches what was sent.
            self.paused = True
            self.reader.pause()
            where = (f"spool {self.cfg.spool} reached its quota of {self.cfg.spool_quota} bytes"
                     if self.spool else f"{self.cfg.memory_events} events wait in memory "
                     "(no --spool)")
            log.error("%s while the relay does not acknowledge: reading inotify is paused; "
                      "changes from now on may be lost and will be announced as an overflow "
                      "with a rescan. Raise spool_quota or bring the relay back.", where)

    def _full(self) -> bool:
        if self.spool:
            return self.spool.full
        return self.outbox.unacked >= self.cfg.memory_events

    def _has_room(self) -> bool:
        if self.spool:
            return self.spool.size < 0.9 * self.spool.quota
        return self.outbox.unacked < 0.9 * self.cfg.memory_events

    def process(self) -> None:
        """Handle what the reader thread took from the kernel (called on the loop)."""
        self.watcher.handle_raw(self.reader.take())
        self.wake()

    def wake(self) -> None:
        for up in self.uplinks:
            if up.outbox.has_unsent:
                up.wake.set()

    async def maintain(self) -> None:
        """Every flush interval: resolve pending moves, write the spool, drop what is acked,
        load back what was spilled, and recover from dropped events."""
        next_snapshot = time.monotonic() + self.cfg.snapshot_interval
        while True:
            await asyncio.sleep(self.cfg.flush_interval)
            self.watcher.expire()
            if self.spool:
                rows = self.spool.take()
                acked = {up.outbox.stream: up.outbox.acked for up in self.uplinks}
                await asyncio.to_thread(self.spool.write, rows, acked)
                for up in self.uplinks:
                    want = up.outbox.refill_wanted()
                    if want:
                        up.outbox.refill(self.spool.load(up.outbox.stream, *want))
            if self.paused and self._has_room():
                log.warning("the relay caught up: reading inotify again")
                self.paused = False
                self.reader.resume()
            if self.spool and self.cfg.snapshot_interval > 0 and \
                    time.monotonic() >= next_snapshot:
                next_snapshot = time.monotonic() + self.cfg.snapshot_interval
                self.spool.write_snapshot(self.watcher.snapshot())
            self.wake()

    async def drain(self, grace: float) -> None:
        """Give the relay ``grace`` seconds to acknowledge what is queued, then say what is
        left (in the spool, it is sent on the next start)."""
        deadline = time.monotonic() + grace
        while any(up.outbox.unacked for up in self.uplinks) and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._any_ack()), 0.1)
        left = sum(up.outbox.unacked for up in self.uplinks)
        if not left:
            log.info("stopped; the relay acknowledged every event (last seq %d)",
                     self.outbox.last_seq)
        elif self.spool:
            log.warning("stopping with %d unacknowledged events kept in %s; they are sent on "
                        "the next start", left, self.cfg.spool)
        else:
            log.error("stopping with %d events the relay has not acknowledged (seq %d-%d of "
                      "%s); without --spool they are lost", left, self.outbox.acked + 1,
                      self.outbox.last_seq, self.outbox.stream)

    async def _any_ack(self) -> None:
        for up in self.uplinks:
            up.acked.clear()
        waits = [asyncio.create_task(up.acked.wait()) for up in self.uplinks]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()


def _stop_on_crash(stop: asyncio.Event) -> Callable[[asyncio.Task[None]], None]:
    """A task that dies of a bug must not leave a zombie agent that silently publishes nothing:
    log it and stop (systemd restarts the agent, and the spool keeps what was pending)."""

    def done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("internal error, stopping the agent", exc_info=task.exception())
            stop.set()

    return done


def _roots(cfg: AgentConfig) -> list[Root]:
    roots = []
    for r in cfg.root:
        path = os.path.abspath(r.path)
        if not os.path.isdir(path):
            log.error("root %s is not a directory; skipping it", path)
            continue
        roots.append(Root(path, r.prefix if r.prefix is not None else path,
                          Selector(r.include, r.exclude), flags_mask(r.types)))
    if not roots:
        raise AgentError("nothing to watch: give at least one existing directory")
    return roots


async def run_agent(cfg: AgentConfig) -> None:
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))  # deep trees in snapshots
    roots = _roots(cfg)
    spool = None
    if cfg.spool:
        try:
            spool = Spool(Path(cfg.spool), quota=cfg.spool_quota)
        except SpoolError as e:
            raise AgentError(str(e)) from None
    else:
        log.warning("no spool configured: events not yet acknowledged are lost if the agent "
                    "stops, and a restart cannot report what changed meanwhile")
    agent = Agent(cfg, roots, spool)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    reader = agent.reader
    if cfg.metrics:
        from .metrics import serve_metrics  # prometheus-client only when asked for

        try:
            serve_metrics(agent, cfg.metrics)
        except (OSError, ValueError) as e:
            raise AgentError(f"cannot serve metrics on {cfg.metrics}: {e}") from None
    if spool and spool.unclean:
        log.warning("the agent did not stop cleanly last time: announcing possible loss")
    if agent.watcher.start(spool.read_snapshot() if spool else None,
                           unclean=bool(spool and spool.unclean)) == 0:
        raise AgentError("no root could be watched (see the errors above)")
    reader.start()
    if spool:
        # A baseline at once: should this run end without a clean stop, the next one can still
        # report what changed since (behind an overflow notice: some of it may be repeated).
        spool.write_snapshot(agent.watcher.snapshot())
    for box in agent.old:
        log.info("resending %d unacknowledged events of stream %s", box.unacked, box.stream)
    log.info("agent %s/%s publishing stream %s to %s", cfg.site, cfg.node, agent.outbox.stream,
             agent.uplinks[0].url)
    tasks = [asyncio.create_task(up.run()) for up in agent.uplinks]
    tasks.append(asyncio.create_task(agent.maintain()))
    for task in tasks:
        task.add_done_callback(_stop_on_crash(stop))
    agent.wake()
    clean = False
    try:
        await stop.wait()
        reader.stop()
        agent.process()
        agent.watcher.read()  # the last events still queued in the kernel
        agent.wake()
        await agent.drain(cfg.shutdown_grace)
        clean = True
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if spool:
            spool.flush({up.outbox.stream: up.outbox.acked for up in agent.uplinks})
            if clean:
                spool.write_snapshot(agent.watcher.snapshot())
            spool.close(clean=clean)
        agent.watcher.close()
