"""The event log interface every backend implements, and the record it hands out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import msgspec

from storage_events import sse
from storage_events.relay.log.admission import Owner
from storage_events.wire import Event, Flag, event_from_json, event_json


@dataclass(slots=True)
class Record:
    """A stored event, with what filters need and its SSE bytes, rendered once."""

    id: int
    site: str
    node: str
    path: str
    flags: int
    sse: bytes
    data: bytes  # the JSON in ``sse``
    _event: Event | None = None  # decoded on demand, once, for moves shown to scoped readers
    _redacted: bytes | None = None

    def event(self) -> Event:
        if self._event is None:
            self._event = event_from_json(self.data)
        return self._event

    def old_path(self) -> str | None:
        return self.event().old_path

    def redacted(self) -> bytes:
        """The SSE bytes without where a move came from (for readers not allowed there)."""
        if self._redacted is None:
            ev = msgspec.structs.replace(
                self.event(), old_path=None, raw_old_path=None, cookie=None
            )
            self._redacted = sse.render(event_json(ev), event=sse_type(self.flags), id=self.id)
        return self._redacted


class LogCounters:
    """What both logs keep in memory and hand out without I/O."""

    # Whether position() may wait on I/O (a shared store asking its servers): callers on the
    # event loop then run it in a thread, and only then (a thread hop for each of thousands of
    # connections is what a flood of hellos would cost otherwise).
    position_io = False

    _head: int
    _first: int
    _bytes: int
    _owners: dict[str, Owner]

    @property
    def head(self) -> int:
        return self._head

    @property
    def first(self) -> int:
        return self._first

    @property
    def size(self) -> int:
        return self._bytes

    def stream_owner(self, stream: str) -> Owner | None:
        return self._owners.get(stream)


class StoreError(Exception):
    """The event log's storage cannot be used; the message says why and what to do."""


_OVERFLOW = int(Flag.Q_OVERFLOW)


def sse_type(flags: int) -> str:
    """The SSE ``event:`` name: loss is announced under its own type, never as a change."""
    return "overflow" if flags & _OVERFLOW else "inotify"


def make_record(
    id: int, site: str, node: str, path: str, flags: int, data: bytes, event: Event | None = None
) -> Record:
    """``event``: the decoded form, when the caller has it (saves decoding ``data`` later)."""
    return Record(
        id, site, node, path, flags, sse.render(data, event=sse_type(flags), id=id), data, event
    )


class EventLog(Protocol):
    """Durable, totally ordered store of events with global ids 1, 2, 3, …

    Implementations drop an event whose (stream, seq) they already hold, so a batch sent twice
    is stored once.
    """

    @property
    def head(self) -> int:
        """The newest id (0 when empty)."""

    @property
    def first(self) -> int:
        """The oldest id still held (``head + 1`` when empty): older ones were dropped by
        retention, and a client resuming before it is told so with a ``gap`` event."""

    @property
    def size(self) -> int:
        """Bytes of event data held."""

    stored: int  # events this relay stored since it started
    position_io: bool  # position() may wait on I/O (see LogCounters)

    @property
    def epoch(self) -> int:
        """A random number fixed when the log was created: a new log is a new epoch."""

    def stream_owner(self, stream: str) -> Owner | None:
        """Who a stream belongs to (see :mod:`.admission`): events of that stream from anyone
        else are dropped, so no sender can take over another's positions."""

    def position(self, stream: str) -> int:
        """The highest ``seq`` held for ``stream`` (0 if none)."""

    def append(
        self, events: list[Event], checkpoint: tuple[str, int] | None = None
    ) -> list[Record]:
        """Store new events, giving each its id and adding this relay to its ``via``; returns
        what was stored, in id order. ``checkpoint`` (key, value) is stored in the same
        transaction, readable with :meth:`position`: how far a peer's feed was taken in."""

    def trim(self, *, max_age: float, max_events: int, max_bytes: int) -> int:
        """Drop the oldest events beyond any of the limits (0: no limit)."""

    def read(self, after: int, limit: int) -> list[Record]:
        """Up to ``limit`` records with ids greater than ``after``, in id order."""

    def close(self) -> None: ...
