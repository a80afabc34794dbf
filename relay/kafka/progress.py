"""How far the log is safely on the topic, from the producer's delivery reports, with no I/O.

The sink hands the producer events in id order; reports come back in order within a partition
but not across partitions. The checkpoint is the last id such that it and every id handed over
before it were delivered: what a restart may skip. A failed delivery rewinds to the checkpoint,
so what follows is sent again, in order (at least once: some of it may be on the topic already);
reports still arriving for what was handed over before the rewind are ignored.
"""

from __future__ import annotations

from collections import deque


class Progress:
    def __init__(self, checkpoint: int) -> None:
        self.checkpoint = checkpoint
        self.dispatched = checkpoint  # the last id handed to the producer
        self.generation = 0  # reports name the generation they belong to
        self._out: deque[int] = deque()  # handed over, not known delivered, in order
        self._done: set[int] = set()  # delivered ahead of something handed over before them

    @property
    def in_flight(self) -> int:
        return len(self._out)

    def sent(self, ids: list[int]) -> None:
        """``ids`` (increasing, after :attr:`dispatched`) were handed to the producer."""
        if ids:
            if ids[0] <= self.dispatched:
                raise ValueError(f"id {ids[0]} handed over again after {self.dispatched}")
            self._out.extend(ids)
            self.dispatched = ids[-1]

    def delivered(self, generation: int, ids: list[int]) -> bool:
        """Reports of delivery; whether the checkpoint moved."""
        if generation != self.generation or not ids:
            return False
        out, done = self._out, self._done
        done.update(ids)
        before = self.checkpoint
        while out and out[0] in done:
            done.discard(out[0])
            self.checkpoint = out.popleft()
        return self.checkpoint != before

    def rewind(self) -> None:
        """A delivery failed: send everything after the checkpoint again."""
        self.generation += 1
        self._out.clear()
        self._done.clear()
        self.dispatched = self.checkpoint
