"""The event log interface every backend implements, and the record it hands out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import msgspec

from storage_events import sse
from storage_events.errors import StorageError
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


@dataclass(frozen=True, slots=True)
class Retention:
    """How much of the log is kept: the oldest events beyond any limit go (0: no limit)."""

    max_age: float = 0.0  # seconds since the relay stored it
    max_events: int = 0
    max_bytes: int = 0


KEEP_ALL = Retention()

Listener = Callable[[list[Record]], None]


class LogState:
    """What every log keeps in memory and hands out without I/O, and its listeners."""

    _head: int
    _first: int
    _bytes: int
    _owners: dict[str, Owner]
    _listeners: list[Listener]

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

    def follow(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _publish(self, records: list[Record]) -> None:
        for listener in self._listeners:
            listener(records)


class StoreError(StorageError):
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
    """Durable, totally ordered store of events with global ids 1, 2, 3, … (a shared store may
    leave ids unused), read and written from the event loop.

    Every backend keeps the same promises, checked by ``tests/test_log_conformance.py``:
    an event whose (stream, seq) it holds is dropped, so a batch sent twice, or through two
    relays of one shared store, is stored once; :mod:`.admission` decides what a batch may
    store; every stored record reaches every :meth:`follow` listener once, in id order, whoever
    stored it.
    """

    name: str  # this relay's name, added to the ``via`` of every event it stores
    stored: int  # events this relay stored since it started
    commits: int  # how many writes they took (several batches may share one)

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

    @property
    def epoch(self) -> int:
        """A random number fixed when the log was created: a new log is a new epoch."""

    def stream_owner(self, stream: str) -> Owner | None:
        """Who a stream belongs to (see :mod:`.admission`), as far as :meth:`position` or
        :meth:`append` have learnt: events of that stream from anyone else are dropped."""

    def follow(self, listener: Listener) -> None:
        """Hand ``listener`` every record stored from now on (on the event loop)."""

    async def start(self) -> None:
        """Open the store; raises :class:`StoreError` saying what is wrong with it."""

    async def position(self, key: str) -> int:
        """The highest ``seq`` stored of stream ``key`` (0 if none), or the value of checkpoint
        ``key`` (keys starting with ``@``): what may be acknowledged to its sender."""

    def held(self, key: str) -> int:
        """What this relay knows to be stored of ``key``, without I/O: at least what its own
        appends stored (:meth:`position` may know more, from the other relays of a store)."""

    async def append(
        self, events: list[Event], checkpoint: tuple[str, int] | None = None
    ) -> list[Record]:
        """Store new events, giving each its id, adding this relay to its ``via`` and setting
        ``origin_id`` where it first enters a relay; returns what this call stored, in id order
        (nothing of what was held already). ``checkpoint`` (key, value): how far a peer's feed
        was taken in, readable with :meth:`position` once the events are stored. The events
        given are not changed: on :class:`StoreError` the caller passes them again."""

    async def trim(self) -> int:
        """Apply the log's :class:`Retention`; returns how many events went since last time."""

    async def read(self, after: int, limit: int) -> list[Record]:
        """Up to ``limit`` records with ids greater than ``after``, in id order."""

    async def close(self) -> None: ...
