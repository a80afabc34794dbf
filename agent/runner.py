"""Runs one agent: watcher, spool and uplinks on one asyncio loop, with a clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import msgspec

from storage_events.errors import StorageEventsError
from storage_events.wire import (
    MAX_PATH,
    Event,
    Hello,
    event_problem,
    flags_mask,
    loss_notice,
    short_path,
)

from . import journal
from .config import AgentConfig
from .kernel_reader import KernelReader
from .outbox import Outbox
from .select import Selector
from .spool import JOURNAL_BYTES, JOURNAL_EVENTS, Spool, SpoolError
from .uplink import Uplink
from .watcher import Root, Watcher

log = logging.getLogger("storage_events.agent")

_READER_BUFFER = 256 * 1024 * 1024  # raw kernel events held in memory, at most (the default)
_REFUSALS_LOGGED = 20  # refused events logged one by one per run; then every 1000th


class AgentError(StorageEventsError):
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
        self.old = [
            Outbox.restored(s, first, last, memory_limit=cfg.memory_events)
            for s, first, last in (spool.streams() if spool else [])
        ]
        self.stop = asyncio.Event()
        self.crashed: BaseException | None = None
        self.refused = 0  # events replaced by loss notices before they were numbered
        self.watcher = Watcher(
            roots,
            site=cfg.site,
            node=cfg.node,
            sink=self.publish,
            retry_interval=cfg.retry_interval,
            announce=cfg.announce_existing,
            stat=cfg.stat,
        )
        loop = asyncio.get_running_loop()  # built inside run_agent
        # While processing is paused, kernel events wait in the reader's memory: with a spool
        # its quota sets the scale (a raw event is a fraction of a spooled one), so an agent
        # given little room for its backlog does not hold hundreds of MiB of it in memory.
        buffered = min(_READER_BUFFER, cfg.spool_quota // 4) if spool else _READER_BUFFER
        self.reader = KernelReader(
            self.watcher.fileno(),
            lambda: loop.call_soon_threadsafe(self._process_safely),
            max_buffered=buffered,
        )
        self.watcher.drain = self.reader.drain
        self.paused = False
        self.uplinks = [self._uplink(box, drain_only=False) for box in [self.outbox]]
        self.uplinks += [self._uplink(box, drain_only=True) for box in self.old]

    def _uplink(self, box: Outbox, *, drain_only: bool) -> Uplink:
        return Uplink(
            self.cfg.relay,
            Hello(site=self.cfg.site, node=self.cfg.node, stream=box.stream, token=self.cfg.token),
            box,
            asyncio.Event(),
            max_batch=self.cfg.max_batch,
            drain_only=drain_only,
            on_replace=self.spool.replace if self.spool else None,
        )

    def fail(self, exc: BaseException) -> None:
        """An internal error: stop (cleanly as far as possible) and exit non-zero, so that the
        supervisor restarts the agent rather than leaving one that silently publishes nothing."""
        log.critical("internal error, stopping the agent", exc_info=exc)
        if self.crashed is None:
            self.crashed = exc
        self.stop.set()

    def publish(self, event: Event) -> None:
        """The watcher's sink: number, hold and spool ``event``."""
        path = event.path
        # The watcher's flags are kernel names and its paths hold no NUL: only a path's length
        # can be wrong in the common case, so the whole check runs only when it may matter.
        if (
            not path
            or len(path) > MAX_PATH
            or event.old_path is not None
            or event.raw_path is not None
        ):
            problem = event_problem(event)
            if problem is not None:
                event = self._refuse(event, problem)
        # Numbered only here, where it is certainly held (outbox) and spooled: the spool never
        # refuses; when it is full, processing stops before more events are made (process).
        self.outbox.add(event)
        if self.spool:
            self.spool.add(event)
        if not self.paused and self._full():
            self._pause()

    def _refuse(self, event: Event, problem: str) -> Event:
        """An event no relay would accept, and that would stop the stream: publish a loss notice
        in its place instead (an overflow of the nearest acceptable ancestor)."""
        notice = loss_notice(event)
        self.refused += 1
        if self.refused <= _REFUSALS_LOGGED or self.refused % 1000 == 0:
            log.error(
                "cannot publish %s of %s: %s. Publishing an overflow of %s instead "
                "(subscribers learn that something there changed)%s",
                ",".join(event.flags[:4]),
                short_path(event.path),
                problem,
                short_path(notice.path),
                ""
                if self.refused < _REFUSALS_LOGGED
                else f"; {self.refused} such events so far, only every 1000th is logged",
            )
        return notice

    def _pause(self) -> None:
        # Stop processing rather than drop what was processed: kernel events wait unparsed in
        # the reader, then in the kernel queue; if that overflows, the overflow is announced
        # and repaired by a rescan, against a tree model that holds only what was published.
        self.paused = True
        if self.spool and self.spool.disk_full:
            where = f"spool {self.cfg.spool} cannot be written (the disk is full)"
        elif self.spool:
            where = f"spool {self.cfg.spool} reached its quota of {self.cfg.spool_quota} bytes"
        else:
            where = f"{self.cfg.memory_events} events wait in memory (no --spool)"
        log.error(
            "%s while the relay does not acknowledge: processing inotify events is "
            "paused; if the kernel queue overflows meanwhile, that is announced and "
            "repaired by a rescan. Raise spool_quota, free disk space, or bring the "
            "relay back.",
            where,
        )

    def _full(self) -> bool:
        if self.spool:
            return self.spool.full
        return self.outbox.unacked >= self.cfg.memory_events

    def _has_room(self) -> bool:
        if self.spool:
            return not self.spool.disk_full and self.spool.size < 0.9 * self.spool.quota
        return self.outbox.unacked < 0.9 * self.cfg.memory_events

    def process(self) -> None:
        """Handle what the reader thread took from the kernel (called on the loop), unless
        processing is paused: then it stays in the reader, unparsed."""
        if self.paused:
            return
        if self._full():
            self._pause()
            return
        self.watcher.handle_raw(self.reader.take())
        self.wake()

    def _process_safely(self) -> None:
        try:
            self.process()
        except Exception as e:  # a callback's error would only be logged by asyncio
            self.fail(e)

    def wake(self) -> None:
        for up in self.uplinks:
            if up.outbox.has_unsent:
                up.wake.set()

    def snapshot(self) -> bool:
        """Save the tree model with the last seq of every stream it reflects."""
        assert self.spool is not None
        points = {up.outbox.stream: up.outbox.last_seq for up in self.uplinks}
        return self.spool.write_snapshot(self.watcher.snapshot(), points)

    async def maintain(self) -> None:
        """Every flush interval: resolve pending moves, write the spool, drop what is acked,
        load back what was spilled, and recover from dropped events."""
        next_snapshot = time.monotonic() + self.cfg.snapshot_interval
        while True:
            await asyncio.sleep(self.cfg.flush_interval)
            if not self.paused:  # paused: kernel events wait unparsed, and so does the rest
                self.watcher.tick()
            spool = self.spool
            if spool:
                taken = spool.take()
                acked = {up.outbox.stream: up.outbox.acked for up in self.uplinks}
                await asyncio.to_thread(spool.write, taken, acked)
                for up in self.uplinks:
                    want = up.outbox.refill_wanted()
                    if want:
                        up.outbox.refill(spool.load(up.outbox.stream, *want))
            if self.paused and self._has_room():
                log.warning(
                    "%s: reading inotify again",
                    "the spool has room again" if spool else "the relay caught up",
                )
                self.paused = False
                self.process()
            if (
                spool
                and not spool.disk_full
                and (
                    (self.cfg.snapshot_interval > 0 and time.monotonic() >= next_snapshot)
                    or spool.journal_events >= JOURNAL_EVENTS
                    or spool.journal_bytes >= JOURNAL_BYTES
                )
            ):
                # Also early when many events were published since the last one: they are
                # kept until the next snapshot (the journal), which bounds them.
                next_snapshot = time.monotonic() + self.cfg.snapshot_interval
                self.snapshot()
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
            log.info(
                "stopped; the relay acknowledged every event (last seq %d)", self.outbox.last_seq
            )
        elif self.spool:
            log.warning(
                "stopping with %d unacknowledged events kept in %s; they are sent on "
                "the next start",
                left,
                self.cfg.spool,
            )
        else:
            log.error(
                "stopping with %d events the relay has not acknowledged (seq %d-%d of "
                "%s); without --spool they are lost",
                left,
                self.outbox.acked + 1,
                self.outbox.last_seq,
                self.outbox.stream,
            )

    async def _any_ack(self) -> None:
        for up in self.uplinks:
            up.acked.clear()
        waits = [asyncio.create_task(up.acked.wait()) for up in self.uplinks]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()


def _stop_on_crash(fail: Callable[[BaseException], None]) -> Callable[[asyncio.Task[None]], None]:
    """A task that dies of a bug must not leave a zombie agent that silently publishes nothing:
    log it and stop, with a non-zero exit status (systemd restarts the agent, and the spool
    keeps what was pending)."""

    def done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            fail(task.exception())

    return done


def _roots(cfg: AgentConfig) -> list[Root]:
    roots = []
    for r in cfg.root:
        path = os.path.abspath(r.path)
        if not os.path.isdir(path):
            log.error("root %s is not a directory; skipping it", path)
            continue
        roots.append(
            Root(
                path,
                r.prefix if r.prefix is not None else path,
                Selector(r.include, r.exclude),
                flags_mask(r.types),
            )
        )
    if not roots:
        raise AgentError("nothing to watch: give at least one existing directory")
    # A directory in two roots would be watched twice and its events published twice, under
    # two prefixes, with two models that disagree after every move between them.
    real = [os.path.realpath(r.path) for r in roots]
    for i, a in enumerate(real):
        for j in range(i + 1, len(real)):
            b = real[j]
            if a == b or b.startswith(a.rstrip("/") + "/") or a.startswith(b.rstrip("/") + "/"):
                inner, outer = (roots[i], roots[j]) if len(a) > len(b) else (roots[j], roots[i])
                how = "the same directory as" if a == b else "inside"
                raise AgentError(
                    f"roots overlap: {inner.path} is {how} {outer.path}. Each directory may "
                    "belong to one root only: remove one of them (a root watches its whole "
                    "tree; `exclude` leaves parts of it out)"
                )
    return roots


def _previous(spool: Spool, roots: list[Root]) -> dict | None:
    """The snapshot to compare the tree on disk with: after an unclean stop, with the events
    published since applied, so the restart reports changes against what was published."""
    previous = spool.read_snapshot()
    if previous is None or not spool.unclean:
        return previous
    if spool.journal_lost:
        log.warning(
            "the spool's journal is incomplete (its disk was full): comparing the tree "
            "with the last snapshot alone; the overflow announced covers the rest"
        )
        return previous
    marks: journal.Marks = {}
    try:
        journal.apply(previous, spool.journal(), [(r.path, r.prefix) for r in roots], marks)
        journal.settle(previous, marks)
        return previous
    except (sqlite3.Error, msgspec.DecodeError, ValueError, TypeError, KeyError, IndexError) as e:
        log.error(
            "cannot replay the spool's journal in %s (%s): starting without a snapshot; "
            "the overflow announced for each root is all subscribers get",
            spool.directory,
            e,
        )
        return None


def _close_spool(agent: Agent, spool: Spool, clean: bool) -> None:
    """Write what is left; ``clean`` only if all of it, and the snapshot, were written (else
    the next start announces possible loss and replays the journal)."""
    try:
        spool.flush({up.outbox.stream: up.outbox.acked for up in agent.uplinks})
    except sqlite3.Error as e:
        log.error("cannot write the spool %s at shutdown: %s", spool.directory, e)
        clean = False
    if spool.disk_full:
        log.error(
            "some events could not be written to the spool %s (the disk is full) and "
            "are lost; the next start announces possible loss and reports what changed",
            spool.directory,
        )
        clean = False
    if clean:
        clean = agent.snapshot()
    try:
        spool.close(clean=clean)
    except sqlite3.Error as e:
        log.error("cannot close the spool %s: %s", spool.directory, e)


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
        log.warning(
            "no spool configured: events not yet acknowledged are lost if the agent "
            "stops, and a restart cannot report what changed meanwhile"
        )
    agent = Agent(cfg, roots, spool)
    loop = asyncio.get_running_loop()
    stop = agent.stop
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def retry() -> None:
        log.warning("SIGHUP: retrying directories that could not be watched")
        try:
            agent.watcher.retry()
        except Exception as e:
            agent.fail(e)

    loop.add_signal_handler(signal.SIGHUP, retry)

    reader = agent.reader
    if cfg.metrics:
        from .metrics import serve_metrics  # prometheus-client only when asked for

        try:
            serve_metrics(agent, cfg.metrics)
        except (OSError, ValueError) as e:
            raise AgentError(f"cannot serve metrics on {cfg.metrics}: {e}") from None
    unclean = bool(spool and spool.unclean)
    if unclean:
        log.warning("the agent did not stop cleanly last time: announcing possible loss")
    previous = _previous(spool, roots) if spool else None
    if agent.watcher.start(previous, unclean=unclean) == 0:
        raise AgentError("no root could be watched (see the errors above)")
    reader.start()
    if spool:
        # A baseline at once: should this run end without a clean stop, the next one can still
        # report what changed since (behind an overflow notice: some of it may be repeated).
        agent.snapshot()
    for box in agent.old:
        log.info("resending %d unacknowledged events of stream %s", box.unacked, box.stream)
    log.info(
        "agent %s/%s publishing stream %s to %s",
        cfg.site,
        cfg.node,
        agent.outbox.stream,
        agent.uplinks[0].url,
    )
    tasks = [asyncio.create_task(up.run()) for up in agent.uplinks]
    tasks.append(asyncio.create_task(agent.maintain()))
    for task in tasks:
        task.add_done_callback(_stop_on_crash(agent.fail))
    agent.wake()
    clean = False
    try:
        await stop.wait()
        reader.stop()
        if agent.crashed is None and not agent.paused:
            agent.process()
            agent.watcher.read()  # the last events still queued in the kernel
        # (Paused: what is left unread is reported by the next start, against the snapshot.)
        agent.wake()
        await agent.drain(cfg.shutdown_grace)
        clean = agent.crashed is None
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if spool:
            _close_spool(agent, spool, clean)
        agent.watcher.close()
    if agent.crashed is not None:
        raise AgentError(
            "stopped after an internal error (logged above); exiting with a "
            "non-zero status so that the service manager restarts the agent. "
            "Unacknowledged events are in the spool, if one is configured."
        )
