"""Live fan-out: each record's SSE bytes are rendered once and handed to every matching
subscription. A subscription's buffer is bounded; when a reader falls behind it is marked
overflowed (its buffer freed at once) and its feed goes back to reading the log, so a slow
reader costs the others nothing and loses nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from storage_events import sse
from storage_events.relay.feed.filters import Filter
from storage_events.relay.log.base import Record


class Mailbox:
    """A bounded queue of (id, SSE bytes) for one connected reader. Past ``max_bytes`` it is
    marked overflowed and emptied: the reader then catches up from durable storage."""

    __slots__ = ("_items", "_ready", "_size", "closed", "farewell", "max_bytes", "overflowed")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: list[tuple[int, bytes]] = []
        self._size = 0
        self._ready = asyncio.Event()
        self.overflowed = False
        self.closed = False
        self.farewell = b""  # the last thing the reader is sent, saying why the stream ends

    def push(self, items: list[tuple[int, bytes]], size: int) -> bool:
        """Queue ``items``; True if this push overflowed the subscription."""
        if self.overflowed:
            return False
        self._ready.set()
        if self._size + size > self.max_bytes:
            self.overflowed = True
            self._items, self._size = [], 0
            return True
        self._items.extend(items)
        self._size += size
        return False

    def take(self) -> list[tuple[int, bytes]]:
        items, self._items, self._size = self._items, [], 0
        self._ready.clear()
        return items

    def reset(self) -> None:
        """Start over after an overflow (the caller catches up from the log)."""
        self.overflowed = False
        self._items, self._size = [], 0
        self._ready.clear()

    async def wait(self, timeout: float) -> bool:
        """True when there is something to take (or the subscription overflowed or closed)."""
        if self._ready.is_set():
            return True
        try:
            async with asyncio.timeout(timeout):  # (no task per wait, unlike wait_for)
                await self._ready.wait()
        except TimeoutError:
            return False
        return True

    def close(self, farewell: bytes = b"") -> None:
        if not self.closed:
            self.closed = True
            self.farewell = farewell
            self._ready.set()


class Subscription(Mailbox):
    __slots__ = ("filter",)

    def __init__(self, filter: Filter, max_bytes: int) -> None:
        super().__init__(max_bytes)
        self.filter = filter


class Hub:
    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self.overflows = 0  # times a subscriber fell a buffer behind (it then reads the log)
        # Called with every batch of stored records, in id order (the dCache channels).
        self.listeners: list[Callable[[list[Record]], None]] = []

    def __len__(self) -> int:
        return len(self._subs)

    def subscribe(self, filter: Filter, max_bytes: int) -> Subscription:
        sub = Subscription(filter, max_bytes)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def publish(self, records: list[Record]) -> None:
        for listener in self.listeners:
            listener(records)
        if not records or not self._subs:
            return
        everything: list[tuple[int, bytes]] | None = None
        everything_size = 0
        for sub in self._subs:
            if sub.filter.matches_all:
                if everything is None:
                    everything = [(r.id, r.sse) for r in records]
                    everything_size = sum(len(r.sse) for r in records)
                self.overflows += sub.push(everything, everything_size)
            else:
                f = sub.filter
                wanted = [(r.id, f.render(r)) for r in records if f.matches(r)]
                if wanted:
                    self.overflows += sub.push(wanted, sum(len(b) for _, b in wanted))

    def close(self) -> None:
        for sub in self._subs:
            sub.close(sse.render(b"{}", event="shutdown"))
