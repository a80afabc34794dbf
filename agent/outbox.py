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
    def __init__(self, stream: str, *, window: int = 50_000) -> None:
        self.stream = stream
        self.window = window  # events sent but not yet acknowledged, at most
        self._inflight: deque[Event] = deque()  # sent on this connection, not acknowledged
        self._unsent: deque[Event] = deque()
        self._next_seq = 1
        self._acked = 0

    def __len__(self) -> int:
        return len(self._inflight) + len(self._unsent)

    @property
    def acked(self) -> int:
        return self._acked

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    @property
    def has_unsent(self) -> bool:
        return bool(self._unsent)

    def add(self, event: Event) -> Event:
        event.stream = self.stream
        event.seq = self._next_seq
        self._next_seq += 1
        self._unsent.append(event)
        return event

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
        self._drop_through(self._unsent, relay_acked)
        self._acked = max(self._acked, relay_acked)

    def next_batch(self, max_events: int) -> list[Event]:
        """The next events to send, within the window; they count as sent."""
        count = min(max_events, self.window - len(self._inflight), len(self._unsent))
        batch = [self._unsent.popleft() for _ in range(max(count, 0))]
        self._inflight.extend(batch)
        return batch

    def ack(self, seq: int) -> None:
        self._drop_through(self._inflight, seq)
        self._acked = max(self._acked, min(seq, self.last_seq))

    @staticmethod
    def _drop_through(queue: deque[Event], seq: int) -> None:
        while queue and queue[0].seq <= seq:
            queue.popleft()
