"""Runs one agent: the watcher and the uplink on one asyncio loop, with a clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import uuid

from storage_events.wire import Hello

from .config import AgentConfig
from .kernel_reader import KernelReader
from .outbox import Outbox
from .uplink import Uplink
from .watcher import Root, Watcher

log = logging.getLogger("storage_events.agent")

_EXPIRE_EVERY = 0.1  # seconds: resolves unpaired moves within the tree's move window


class AgentError(Exception):
    pass


async def run_agent(cfg: AgentConfig) -> None:
    roots = []
    for r in cfg.root:
        path = os.path.abspath(r.path)
        if not os.path.isdir(path):
            log.error("root %s is not a directory; skipping it", path)
            continue
        roots.append(Root(path, r.prefix if r.prefix is not None else path))
    if not roots:
        raise AgentError("nothing to watch: give at least one existing directory")

    # One stream per agent incarnation: its seq numbers restart at 1.
    outbox = Outbox(f"{cfg.node}:{uuid.uuid4().hex[:12]}")
    watcher = Watcher(roots, site=cfg.site, node=cfg.node, outbox=outbox)
    wake = asyncio.Event()
    uplink = Uplink(
        cfg.relay,
        Hello(site=cfg.site, node=cfg.node, stream=outbox.stream, token=cfg.token),
        outbox,
        wake,
        max_batch=cfg.max_batch,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def process() -> None:
        watcher.handle_raw(reader.take())
        if outbox.has_unsent:
            wake.set()

    reader = KernelReader(watcher.fileno(), lambda: loop.call_soon_threadsafe(process))
    if watcher.start() == 0:
        raise AgentError("no root could be watched (see the errors above)")
    reader.start()
    log.info("agent %s/%s publishing stream %s to %s", cfg.site, cfg.node, outbox.stream,
             uplink.url)
    uplink_task = asyncio.create_task(uplink.run())

    async def expire_loop() -> None:
        while True:
            await asyncio.sleep(_EXPIRE_EVERY)
            watcher.expire()
            if outbox.has_unsent:
                wake.set()

    expire_task = asyncio.create_task(expire_loop())
    try:
        await stop.wait()
    finally:
        reader.stop()
        process()
        watcher.read()  # the last events still queued in the kernel
        wake.set()
        expire_task.cancel()
        await _drain(outbox, uplink, cfg.shutdown_grace)
        uplink_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await uplink_task
        watcher.close()


async def _drain(outbox: Outbox, uplink: Uplink, grace: float) -> None:
    """Give the relay ``grace`` seconds to acknowledge what is queued, then say what is left."""
    deadline = asyncio.get_running_loop().time() + grace
    while len(outbox) and asyncio.get_running_loop().time() < deadline:
        uplink.acked.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(uplink.acked.wait(), 0.1)
    if len(outbox):
        log.error("stopping with %d events the relay has not acknowledged (seq %d-%d of %s)",
                  len(outbox), outbox.acked + 1, outbox.last_seq, outbox.stream)
    else:
        log.info("stopped; the relay acknowledged every event (last seq %d)", outbox.last_seq)
