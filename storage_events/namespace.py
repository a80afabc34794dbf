"""What a feed's events do to the tree they describe, defined once: for the relay's namespace
view and for clients that keep a copy of the tree (:class:`Mirror`).

An entry is keyed by its site and its path's exact bytes (a name need not be UTF-8: two names
shown alike stay two entries). A rename arrives in two halves: ``IN_MOVED_FROM`` takes the
entry and all below it out of the tree and sets it aside under its (stream, cookie); the
``IN_MOVED_TO`` with that cookie puts it back at its new place. A half whose other half never
comes (the entry left the watched tree) is dropped once its stream has moved on by
:data:`MOVE_WAIT_NS` of event time, or after :data:`MOVE_WAIT_MAX_NS` of the holder's clock.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NamedTuple

import msgspec

from storage_events.wire import Event, Flag, display_path, flag_names, flags_mask

# The agent pairs the halves of a rename within its move window (half a second by default);
# a minute of the stream's own time is far beyond it, on the slowest machine.
MOVE_WAIT_NS = 60 * 10**9
# For a stream that sends nothing more (its agent restarted as a new stream).
MOVE_WAIT_MAX_NS = 3600 * 10**9

_CREATE, _MOVED_TO, _MOVED_FROM = int(Flag.CREATE), int(Flag.MOVED_TO), int(Flag.MOVED_FROM)
_GONE = int(Flag.DELETE | Flag.DELETE_SELF | Flag.MOVE_SELF)
_CHANGED = int(Flag.CLOSE_WRITE | Flag.MODIFY | Flag.ATTRIB)
_OVERFLOW = int(Flag.Q_OVERFLOW)


class Entry(msgspec.Struct, array_like=True, frozen=True):
    """What the view holds of one path: the last event that made it what it is."""

    id: int
    node: str
    flags: int
    is_dir: bool
    ts: int
    stream: str
    seq: int
    size: int | None = None
    mtime: int | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    ino: int | None = None


def entry_of(ev: Event) -> Entry:
    return Entry(
        ev.id,
        ev.node,
        flags_mask(ev.flags),
        ev.is_dir,
        ev.ts,
        ev.stream,
        ev.seq,
        ev.size,
        ev.mtime,
        ev.mode,
        ev.uid,
        ev.gid,
        ev.ino,
    )


def key_of(path: str, raw: bytes | None) -> bytes:
    return raw if raw is not None else path.encode()


def path_of(key: bytes) -> tuple[str, bytes | None]:
    """The display path and, for a name that is not UTF-8, its bytes (as events carry them)."""
    return display_path(os.fsdecode(key))


def below(key: bytes) -> tuple[bytes, bytes]:
    """The range of keys strictly below ``key`` (``lo <= k < hi``): ``/`` sorts just before
    ``0``, so these are exactly the keys that start with ``key/``."""
    if key == b"/":
        return b"/", b"0"
    return key + b"/", key + b"0"


def parent_of(key: bytes) -> bytes:
    return key.rpartition(b"/")[0] or b"/"


def as_event(site: str, key: bytes, e: Entry) -> Event:
    """An entry as subscribers see it: the fields of an event, naming where it is now."""
    path, raw = path_of(key)
    return Event(
        id=e.id,
        site=site,
        node=e.node,
        path=path,
        raw_path=raw,
        flags=flag_names(e.flags),
        is_dir=e.is_dir,
        ts=e.ts,
        stream=e.stream,
        seq=e.seq,
        size=e.size,
        mtime=e.mtime,
        mode=e.mode,
        uid=e.uid,
        gid=e.gid,
        ino=e.ino,
    )


def as_moving(site: str, key: bytes, e: Entry, half: Entry, cookie: int) -> Event:
    """An entry set aside by the ``IN_MOVED_FROM`` ``half``: shown as that half, at its path."""
    return msgspec.structs.replace(
        as_event(site, key, e),
        id=half.id,
        node=half.node,
        flags=["IN_MOVED_FROM"],
        cookie=cookie,
        ts=half.ts,
        stream=half.stream,
        seq=half.seq,
    )


# -- what one event does -------------------------------------------------------------------


class Put(NamedTuple):
    """The entry at ``key`` is now ``entry``. (What was below an older entry of that name went
    with its own events: the agent reports the contents of what it replaces.)"""

    site: str
    key: bytes
    entry: Entry


class Remove(NamedTuple):
    """``key`` and everything below it are gone."""

    site: str
    key: bytes


class SetAside(NamedTuple):
    """``key`` and everything below it leave the tree until the other half of ``half``'s
    rename (``stream``, ``cookie``) comes."""

    site: str
    key: bytes
    stream: str
    cookie: int
    half: Entry


class PutBack(NamedTuple):
    """What ``SetAside`` took under (``stream``, ``cookie``) from ``old`` is now at ``key``
    (replacing whatever was there); ``entry``: the ``IN_MOVED_TO`` half. When nothing was set
    aside, it is a :class:`Put`."""

    site: str
    key: bytes
    old: bytes
    stream: str
    cookie: int
    entry: Entry


Op = Put | Remove | SetAside | PutBack


def effect(ev: Event) -> Op | None:
    """What ``ev`` does to the tree; None for what changes nothing there (an open, a read, a
    loss notice: the agent's rescan after a loss sends what changed as events of their own)."""
    mask = flags_mask(ev.flags)
    if mask & _OVERFLOW:
        return None
    key = key_of(ev.path, ev.raw_path)
    if mask & _GONE:
        return Remove(ev.site, key)
    if mask & _MOVED_FROM:
        if ev.cookie is None:
            return Remove(ev.site, key)
        return SetAside(ev.site, key, ev.stream, ev.cookie, entry_of(ev))
    if mask & _MOVED_TO:
        if ev.cookie is not None and ev.old_path is not None:
            old = key_of(ev.old_path, ev.raw_old_path)
            return PutBack(ev.site, key, old, ev.stream, ev.cookie, entry_of(ev))
        return Put(ev.site, key, entry_of(ev))
    if mask & (_CREATE | _CHANGED):
        return Put(ev.site, key, entry_of(ev))
    return None


def arrived(moved: Entry, half: Entry) -> Entry:
    """The entry a rename put back: the ``IN_MOVED_TO`` half, with what it does not say (no
    ``fstatat`` of its own) kept from before."""
    if half.size is not None or half.mtime is not None or half.ino is not None:
        return half
    return msgspec.structs.replace(
        half,
        size=moved.size,
        mtime=moved.mtime,
        mode=moved.mode,
        uid=moved.uid,
        gid=moved.gid,
        ino=moved.ino,
    )


def rebased(key: bytes, old: bytes, new: bytes) -> bytes:
    return new + key[len(old) :]


class Waiting:
    """The halves of renames set aside and not yet put back, and which have waited too long.
    Both kinds of expiry look at the oldest first and stop at the first one still in time, so
    an event costs nothing here however many halves wait (``mv dir/* /elsewhere`` leaves one
    per file)."""

    def __init__(self) -> None:
        # stream → cookie → the half's event time, in the order they were set aside (a
        # stream's events come in order: oldest first)
        self._by_stream: dict[str, dict[int, int]] = {}
        # (stream, cookie) → the holder's clock when it was set aside, oldest first
        self._by_clock: dict[tuple[str, int], int] = {}

    def __len__(self) -> int:
        return len(self._by_clock)

    def add(self, stream: str, cookie: int, ts: int, now: int) -> None:
        self.take(stream, cookie)  # (a cookie used again goes to the end)
        self._by_stream.setdefault(stream, {})[cookie] = ts
        self._by_clock[stream, cookie] = now

    def take(self, stream: str, cookie: int) -> bool:
        cookies = self._by_stream.get(stream)
        if cookies is None or cookies.pop(cookie, None) is None:
            return False
        if not cookies:
            del self._by_stream[stream]
        del self._by_clock[stream, cookie]
        return True

    def expired(self, stream: str, ts: int, now: int) -> Iterator[tuple[str, int]]:
        """What an event of ``stream`` at ``ts``, seen at ``now``, shows will never be put
        back; each is forgotten as it is yielded. By the holder's clock only other streams'
        halves: this event may be the second half of one of its own stream's."""
        gone = []
        cookies = self._by_stream.get(stream)
        if cookies:
            for cookie, half_ts in cookies.items():
                if ts - half_ts <= MOVE_WAIT_NS:
                    break
                gone.append((stream, cookie))
        for (other, cookie), at in self._by_clock.items():
            if now - at <= MOVE_WAIT_MAX_NS:
                break
            if other != stream:
                gone.append((other, cookie))
        for key in gone:
            if self.take(*key):
                yield key


class Mirror:
    """A tree in memory, kept from a feed: what a client holds that applies a snapshot's
    ``state`` entries (:meth:`apply_state`) and every event after it (:meth:`apply`). The same
    rules as the relay's view: ``/`` itself holds no entry (its removal empties the site), and
    a directory known only from what is below it holds none either."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, bytes], Entry] = {}
        # (site, directory key) → the keys directly in it, entries or the way to entries
        self._children: dict[tuple[str, bytes], set[bytes]] = {}
        # (stream, cookie) → (the key it left, [(site, key, entry) set aside])
        self._aside: dict[tuple[str, int], tuple[bytes, list[tuple[str, bytes, Entry]]]] = {}
        self._waiting = Waiting()

    def paths(self, site: str | None = None) -> dict[str, bool]:
        """Display path → is a directory, of every entry (of ``site``)."""
        return {
            path_of(key)[0]: e.is_dir
            for (s, key), e in self.entries.items()
            if site is None or s == site
        }

    def apply(self, ev: Event, now: int = 0) -> None:
        for stream, cookie in self._waiting.expired(ev.stream, ev.ts, now):
            self._aside.pop((stream, cookie), None)
        op = effect(ev)
        if op is None or (op.key == b"/" and not isinstance(op, Remove)):
            return
        if isinstance(op, Put):
            self._put(op.site, op.key, op.entry)
        elif isinstance(op, Remove):
            self._take(op.site, op.key)
        elif isinstance(op, SetAside):
            taken = self._take(op.site, op.key)
            if taken:
                self._waiting.add(op.stream, op.cookie, op.half.ts, now)
                self._aside[op.stream, op.cookie] = (op.key, taken)
        elif isinstance(op, PutBack):
            self._take(op.site, op.key)
            top = op.entry
            if self._waiting.take(op.stream, op.cookie):
                old, taken = self._aside.pop((op.stream, op.cookie))
                for site, key, e in taken:
                    if key == old:
                        top = arrived(e, op.entry)
                    else:
                        self._put(site, rebased(key, old, op.key), e)
            self._put(op.site, op.key, top)

    def apply_state(self, ev: Event, now: int = 0) -> None:
        """One ``state`` entry of a snapshot: an entry, or one set aside by a rename's first
        half (``IN_MOVED_FROM`` with its cookie, the first of them at the path it left) whose
        second half is among the live events."""
        key = key_of(ev.path, ev.raw_path)
        if ev.cookie is not None and "IN_MOVED_FROM" in ev.flags:
            aside = self._aside.get((ev.stream, ev.cookie))
            if aside is None:
                aside = self._aside[ev.stream, ev.cookie] = (key, [])
                self._waiting.add(ev.stream, ev.cookie, ev.ts, now)
            aside[1].append((ev.site, key, entry_of(ev)))
        elif key != b"/":
            self._put(ev.site, key, entry_of(ev))

    def _put(self, site: str, key: bytes, e: Entry) -> None:
        self.entries[site, key] = e
        # Linked into each directory above it, up to one that has it already.
        while key != b"/":
            parent = parent_of(key)
            siblings = self._children.setdefault((site, parent), set())
            if key in siblings:
                break
            siblings.add(key)
            key = parent

    def _take(self, site: str, key: bytes) -> list[tuple[str, bytes, Entry]]:
        """Remove ``key`` and all below it; what had an entry, parents first."""
        out: list[tuple[str, bytes, Entry]] = []
        stack = [key]
        while stack:
            k = stack.pop()
            e = self.entries.pop((site, k), None)
            if e is not None:
                out.append((site, k, e))
            stack.extend(sorted(self._children.pop((site, k), ()), reverse=True))
        # Directories above it that were there only for it go too, as in the relay's view.
        while key != b"/":
            parent = parent_of(key)
            siblings = self._children.get((site, parent))
            if siblings is None:
                break
            siblings.discard(key)
            if siblings or (site, parent) in self.entries:
                break
            del self._children[site, parent]
            key = parent
        return out
