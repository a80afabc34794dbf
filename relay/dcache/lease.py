"""Which replica of a NATS store holds the dCache channels: a lease, one key in a key-value bucket
whose values live ``TTL`` seconds.

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
    """The lease in bucket ``kv`` for the replica named ``me``."""

    def __init__(self, kv: Any, me: str) -> None:
        self.kv = kv
        self.me = me.encode()
        self.lease = Lease()

    async def attempt(self) -> bool:
        """Take or renew the lease; whether we hold it after this."""
        lease = self.lease
        now = time.monotonic()
        try:
            if lease.revision is None:
                write = self.kv.create(KEY, self.me)
            else:
                write = self.kv.update(KEY, self.me, last=lease.revision)
            lease.wrote(await asyncio.wait_for(write, WRITE_TIMEOUT), now)
        except KeyWrongLastSequenceError:
            if lease.revision is not None:
                log.warning("dCache channels: the lease was taken by another relay")
            lease.lost()  # (or another relay holds it still)
        except (NATSError, TimeoutError) as e:  # (the cluster may be electing a leader)
            if lease.revision is not None:
                log.warning("dCache channels: cannot renew the lease (%s)", str(e) or "timeout")
        return lease.holds(time.monotonic())

    async def release(self) -> None:
        """Give the lease up at once (the relay stops): another replica takes over without
        waiting for it to expire."""
        if self.lease.revision is None:
            return
        try:
            await self.kv.delete(KEY, last=self.lease.revision)
        except NATSError as e:
            log.warning("dCache channels: cannot give the lease up (%s); it expires", e)
        self.lease.lost()
