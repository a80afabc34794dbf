"""The agent's outbox: numbered events waiting to be sent and acknowledged, with no I/O.

Events get consecutive ``seq`` numbers in the agent's stream. The relay acknowledges
cumulatively; on every (re)connection it says which ``seq`` it already holds, and the outbox
resends exactly what follows. Nothing acknowledged is ever resent; nothing unacknowledged is
ever dropped.
"""

from __future__ import annotations

from collections import deque

from storage_events.wire import Event


class Outbox:
    """``window``: most events sent and not yet acknowledged. ``memory_limit``: most events held
    in memory; later ones are only in the spool until there is room (see :meth:`refill_wanted`).
    """

    def __init__(self, stream: str, *, window: int = 50_000, memory_limit: int = 1_000_000) -> None:
        self.stream = stream
        self.window = window
        self.memory_limit = memory_limit
        self._inflight: deque[Event] = deque()  # sent on this connection, not acknowledged
        self._unsent: deque[Event] = deque()
        self._next_seq = 1
        self._acked = 0
        self._spilled: int | None = None  # first seq that is in the spool only

    @classmethod
    def restored(cls, stream: str, first_seq: int, last_seq: int, **kw: int) -> Outbox:
        """The outbox of an earlier run's stream whose events ``first_seq..last_seq`` are still
        in the spool, unacknowledged."""
        box = cls(stream, **kw)
        box._acked, box._next_seq, box._spilled = first_seq - 1, last_seq + 1, first_seq
        return box

    def __len__(self) -> int:
        """Events held in memory."""
        return len(self._inflight) + len(self._unsent)

    @property
    def unacked(self) -> int:
        return self.last_seq - self._acked

    @property
    def acked(self) -> int:
        return self._acked

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    @property
    def ready(self) -> int:
        """Events in memory waiting to be sent."""
        return len(self._unsent)

    @property
    def has_unsent(self) -> bool:
        return bool(self._unsent) or self._spilled is not None

    def add(self, event: Event) -> Event:
        event.stream = self.stream
        event.seq = self._next_seq
        self._next_seq += 1
        if self._spilled is None and len(self._unsent) + len(self._inflight) < self.memory_limit:
            self._unsent.append(event)
        elif self._spilled is None:
            self._spilled = event.seq
        return event

    def refill_wanted(self) -> tuple[int, int] | None:
        """(first seq, count) to load back from the spool, when some are only there and memory
        has room for them."""
        if self._spilled is None:
            return None
        room = self.memory_limit - len(self)
        if room <= 0:
            return None
        return self._spilled, min(room, self._next_seq - self._spilled)

    def refill(self, events: list[Event]) -> None:
        for ev in events:
            if ev.seq != self._spilled:
                raise ValueError(
                    f"spool returned seq {ev.seq} of {self.stream}, expected {self._spilled}"
                )
            self._unsent.append(ev)
            self._spilled += 1
            if self._spilled == self._next_seq:
                self._spilled = None
                return

    def connected(self, relay_acked: int) -> None:
        """A new connection: the relay holds everything up to ``relay_acked``; what it lacks is
        sent again, in order."""
        if relay_acked > self.last_seq:
            raise ValueError(
                f"relay claims seq {relay_acked} of stream {self.stream}, "
                f"but this agent only numbered up to {self.last_seq}"
            )
        self._unsent.extendleft(reversed(self._inflight))
        self._inflight.clear()
        self.ack(relay_acked)

    def next_batch(self, max_events: int) -> list[Event]:
        """The next events to send, within the window; they count as sent."""
        count = min(max_events, self.window - len(self._inflight), len(self._unsent))
        batch = [self._unsent.popleft() for _ in range(max(count, 0))]
        self._inflight.extend(batch)
        return batch

    def unsend(self, events: list[Event]) -> None:
        """``events``, the tail of the last :meth:`next_batch`, were not sent after all (the
        frame would have been too large): they go first next time."""
        for _ in events:
            self._inflight.pop()
        self._unsent.extendleft(reversed(events))

    def held(self, seq: int) -> Event | None:
        """The event numbered ``seq``, if it is in memory."""
        for queue in (self._inflight, self._unsent):
            for event in queue:
                if event.seq == seq:
                    return event
                if event.seq > seq:
                    break
        return None

    def replace(self, event: Event) -> bool:
        """Put ``event`` in the place of the held event with its seq (one the relay refuses
        for good), so the stream moves on without a gap. False if no such event is held."""
        for queue in (self._inflight, self._unsent):
            for i, held in enumerate(queue):
                if held.seq == event.seq:
                    queue[i] = event
                    return True
                if held.seq > event.seq:
                    break
        return False

    def ack(self, seq: int) -> None:
        seq = min(seq, self.last_seq)
        if seq <= self._acked:
            return
        self._acked = seq
        for queue in (self._inflight, self._unsent):
            while queue and queue[0].seq <= seq:
                queue.popleft()
        if self._spilled is not None and self._spilled <= seq:
            self._spilled = seq + 1 if seq + 1 < self._next_seq else None
