"""Which replica of a NATS store does a job only one may do (hold the dCache channels, publish
to Kafka): a lease, one key in a key-value bucket whose values live ``TTL`` seconds.

The holder rewrites the key every ``RENEW`` seconds, each time with compare-and-set on the
revision it wrote last; the others try to create it, which succeeds only once it has expired.
A holder that cannot renew stops acting as one ``MARGIN`` seconds before its last write expires,
so that two replicas never both route (the channel store's compare-and-set catches one that was
paused past that point without noticing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from nats.errors import Error as NATSError
from nats.js.errors import KeyWrongLastSequenceError

log = logging.getLogger("storage_events.relay")

TTL = 10.0
RENEW = 3.0  # seconds between the holder's writes
TRY = 1.0  # seconds between the others' attempts
MARGIN = 2.0
WRITE_TIMEOUT = MARGIN / 2  # a renewal that takes longer is given up (the lease may still hold)
KEY = "holder"


@dataclass(slots=True)
class Lease:
    """What this replica knows of its lease, without I/O. Times are monotonic seconds, taken
    *before* the write they stand for: the server starts the TTL later than that."""

    ttl: float = TTL
    margin: float = MARGIN
    revision: int | None = None  # of our value of the key, while we think we hold it
    written: float = float("-inf")

    def holds(self, now: float) -> bool:
        return self.revision is not None and now - self.written < self.ttl - self.margin

    def wrote(self, revision: int, at: float) -> None:
        self.revision, self.written = revision, at

    def lost(self) -> None:
        self.revision, self.written = None, float("-inf")

    def wait(self, now: float) -> float:
        """Seconds until the next attempt: a holder's last chance comes before it must stop."""
        if self.revision is None:
            return TRY
        return max(0.0, min(RENEW, self.written + self.ttl - self.margin - now))


class LeaseKeeper:
    """The lease in bucket ``kv`` for the replica named ``me``; ``what``: the job, for logs."""

    def __init__(self, kv: Any, me: str, what: str = "dCache channels", key: str = KEY) -> None:
        self.kv = kv
        self.me = me.encode()
        self.what = what
        self.key = key
        self.lease = Lease()
        self._holder: asyncio.Task[None] | None = None

    async def attempt(self) -> bool:
        """Take or renew the lease; whether we hold it after this."""
        lease = self.lease
        now = time.monotonic()
        try:
            if lease.revision is None:
                write = self.kv.create(self.key, self.me)
            else:
                write = self.kv.update(self.key, self.me, last=lease.revision)
            lease.wrote(await asyncio.wait_for(write, WRITE_TIMEOUT), now)
        except KeyWrongLastSequenceError:
            if lease.revision is not None:
                log.warning("%s: the lease was taken by another relay", self.what)
            lease.lost()  # (or another relay holds it still)
        except (NATSError, TimeoutError) as e:  # (the cluster may be electing a leader)
            if lease.revision is not None:
                log.warning("%s: cannot renew the lease (%s)", self.what, str(e) or "timeout")
        return lease.holds(time.monotonic())

    async def release(self) -> None:
        """Give the lease up at once (the relay stops): another replica takes over without
        waiting for it to expire."""
        if self.lease.revision is None:
            return
        try:
            await self.kv.delete(self.key, last=self.lease.revision)
        except NATSError as e:
            log.warning("%s: cannot give the lease up (%s); it expires", self.what, e)
        self.lease.lost()

    async def hold(self, job: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``job()`` whenever this replica holds the lease, until cancelled: it is cancelled
        when the lease is lost, and run again when the lease is taken again or after it failed."""
        try:
            while True:
                # Before the next attempt, which may take its time: a lease that may have
                # expired meanwhile is given up first.
                await self._let_go(self.lease.holds(time.monotonic()))
                try:
                    held = await self.attempt()
                except Exception:
                    log.exception("%s: the lease could not be written", self.what)
                    held = self.lease.holds(time.monotonic())
                await self._let_go(held)
                if held and self._holder is None:
                    self._holder = asyncio.get_running_loop().create_task(job())
                await asyncio.sleep(self.lease.wait(time.monotonic()))
        finally:
            if self._holder is not None:
                self._holder.cancel()  # (stop() waits for it)

    async def stop(self) -> None:
        """End the job, then give the lease up at once: another replica takes over without
        waiting for it to expire, and never while this one still does the job."""
        await self._let_go(False, quiet=True)
        await self.release()

    async def _let_go(self, held: bool, quiet: bool = False) -> None:
        """End the job if the lease is gone, or the job ended (failed)."""
        holder = self._holder
        if holder is None or (held and not holder.done()):
            return
        if not held and not quiet:
            log.warning("%s: lease lost; no longer this relay's", self.what)
        if not holder.cancelling():  # (once: a second cancel would cut its clean-up short)
            holder.cancel()
        (ended,) = await asyncio.gather(holder, return_exceptions=True)
        if isinstance(ended, Exception):
            log.error("%s: failed (%s); trying again", self.what, ended)
        self._holder = None
