"""How far the log is safely on the topic, from what the producer reports, with no I/O.

The sink hands the producer batches of events in id order. Delivery is not reported message by
message (a Python callback per message costs as much as producing it): the producer reports,
whenever it has nothing left outstanding, the last id of what it was given, and it makes such a
moment at least every fraction of a second. The checkpoint is that id: it and everything
handed over before it are on the topic, so a restart may skip them. A failed delivery rewinds
to the checkpoint, so what follows is sent again, in order (at least once: some of it may be on
the topic already); reports still arriving for what was handed over before the rewind are
ignored.
"""

from __future__ import annotations

from collections import deque


class Progress:
    def __init__(self, checkpoint: int) -> None:
        self.checkpoint = checkpoint
        self.dispatched = checkpoint  # the last id handed to the producer
        self.generation = 0  # reports name the generation they belong to
        self.in_flight = 0  # events handed over after the checkpoint
        self._batches: deque[tuple[int, int]] = deque()  # (last id, events), after it

    def sent(self, ids: list[int]) -> None:
        """``ids`` (increasing, after :attr:`dispatched`) were handed to the producer."""
        if ids:
            if ids[0] <= self.dispatched:
                raise ValueError(f"id {ids[0]} handed over again after {self.dispatched}")
            self._batches.append((ids[-1], len(ids)))
            self.in_flight += len(ids)
            self.dispatched = ids[-1]

    def delivered(self, generation: int, through: int) -> int:
        """Everything handed over up to id ``through`` is delivered; returns how many events
        that newly covers."""
        if generation != self.generation or through <= self.checkpoint:
            return 0
        if through > self.dispatched:
            raise ValueError(f"id {through} reported delivered, but only {self.dispatched} sent")
        covered = 0
        while self._batches and self._batches[0][0] <= through:
            covered += self._batches.popleft()[1]
        self.in_flight -= covered
        self.checkpoint = through
        return covered

    def rewind(self) -> None:
        """A delivery failed: send everything after the checkpoint again."""
        self.generation += 1
        self._batches.clear()
        self.in_flight = 0
        self.dispatched = self.checkpoint
