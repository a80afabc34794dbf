"""Reading the whole log onward from an id, as a pushing relay and the Kafka sink do: records
just stored come from memory (handed over by the hub, which saves reading them back); the rest,
and anything after a jump, from the log. Where retention took ids before they were read, the
reader is told which, so it can announce the loss instead of skipping it silently."""

from __future__ import annotations

from storage_events.relay.log.base import EventLog, Record

PENDING = 50_000  # records kept from notify(); beyond, the log has them


class Tail:
    def __init__(self, log: EventLog) -> None:
        self.log = log
        self._pending: list[Record] = []

    def notify(self, records: list[Record]) -> None:
        """Records just stored (a hub listener's argument)."""
        pending = self._pending
        if pending and (records[0].id != pending[-1].id + 1 or len(pending) > PENDING):
            pending.clear()  # not contiguous, or too many: the log has them
        pending.extend(records)

    def clear(self) -> None:
        self._pending.clear()

    async def next(self, after: int, limit: int) -> tuple[int, list[Record]]:
        """``(lost_to, records)``: ids ``after+1 .. lost_to`` were dropped by retention before
        they were read (``lost_to == after``: none were), then up to ``limit`` records."""
        lost_to = max(after, self.log.first - 1)
        pending = self._pending
        if pending and pending[0].id <= lost_to:  # (rare: read from the log meanwhile)
            pending[:] = [r for r in pending if r.id > lost_to]
        if pending and pending[0].id == lost_to + 1:
            records = pending[:limit]
            del pending[:limit]
            return lost_to, records
        pending.clear()
        records = await self.log.read(lost_to, limit)
        if records and records[0].id > lost_to + 1:  # retention ran between first and read
            lost_to = records[0].id - 1
        return lost_to, records
