"""The relay's namespace view as SQLite tables: changed in the transaction that stores the
events changing it, so a reader's transaction sees the view exactly as of one event id.

What each event does is :func:`storage_events.namespace.effect`'s; this module only carries it
out in SQL (and :class:`~storage_events.namespace.Mirror` in memory, for clients and tests).
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import time
from collections.abc import Iterator

import msgspec

from storage_events.namespace import (
    Entry,
    Op,
    Put,
    PutBack,
    Remove,
    SetAside,
    Waiting,
    arrived,
    below,
    effect,
    parent_of,
    rebased,
)
from storage_events.wire import Event

log = logging.getLogger("storage_events.relay")

SCHEMA = """
CREATE TABLE IF NOT EXISTS ns_entries (
    site   TEXT NOT NULL,
    key    BLOB NOT NULL,        -- the path's exact bytes
    parent BLOB NOT NULL,        -- its directory's: listings of one directory
    entry  BLOB NOT NULL,        -- storage_events.namespace.Entry, msgpack
    PRIMARY KEY (site, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ns_children ON ns_entries (site, parent);
CREATE TABLE IF NOT EXISTS ns_moving (  -- set aside by a rename's first half
    stream TEXT NOT NULL,
    cookie INTEGER NOT NULL,
    site   TEXT NOT NULL,
    key    BLOB NOT NULL,        -- where it was
    entry  BLOB NOT NULL,
    PRIMARY KEY (stream, cookie, site, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ns_halves (  -- those first halves, waiting for their second
    stream TEXT NOT NULL,
    cookie INTEGER NOT NULL,
    half   BLOB NOT NULL,        -- the IN_MOVED_FROM, as an Entry
    at     INTEGER NOT NULL,     -- when this relay set it aside (ns since the epoch)
    PRIMARY KEY (stream, cookie)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ns_applied (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    id  INTEGER NOT NULL         -- the view is of the log up to and including this id
);
"""

_encode = msgspec.msgpack.Encoder().encode
_entry = msgspec.msgpack.Decoder(Entry).decode

_UPSERT = (
    "INSERT INTO ns_entries VALUES (?, ?, ?, ?) "
    "ON CONFLICT(site, key) DO UPDATE SET entry = excluded.entry"
)
_DELETE = "DELETE FROM ns_entries WHERE site = ? AND key = ?"
_DELETE_BELOW = "DELETE FROM ns_entries WHERE site = ? AND key >= ? AND key < ?"
_SUBTREE = (
    "SELECT key, entry FROM ns_entries WHERE site = ?1 AND key = ?2 "
    "UNION ALL SELECT key, entry FROM ns_entries WHERE site = ?1 AND key >= ?3 AND key < ?4"
)


def decode_entry(blob: bytes) -> Entry:
    return _entry(blob)


class Tables:
    """The view's tables in one database; :meth:`apply` runs inside the caller's transaction.
    Keeps in memory only which renames wait for their second half (loaded at start)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        conn.executescript(SCHEMA)
        self._waiting = Waiting()
        self._load_waiting(conn)
        row = conn.execute("SELECT id FROM ns_applied").fetchone()
        self.applied = row[0] if row else 0

    def _load_waiting(self, conn: sqlite3.Connection) -> None:
        self._waiting = Waiting()
        for stream, cookie, half, at in conn.execute(
            "SELECT stream, cookie, half, at FROM ns_halves"
        ):
            self._waiting.add(stream, cookie, _entry(half).ts, at)

    def rolled_back(self, conn: sqlite3.Connection) -> None:
        """The transaction :meth:`apply` ran in did not commit: forget what it changed here."""
        self._load_waiting(conn)
        row = conn.execute("SELECT id FROM ns_applied").fetchone()
        self.applied = row[0] if row else 0

    def apply(self, conn: sqlite3.Connection, events: list[Event], now: int | None = None) -> None:
        """Carry out ``events`` (stored, with their ids, in id order) on the view."""
        if not events:
            return
        now = time.time_ns() if now is None else now
        puts: list[tuple[str, bytes, bytes, bytes]] = []
        removes: list[tuple[str, bytes]] = []
        waiting = self._waiting
        for ev in events:
            for stream, cookie in waiting.expired(ev.stream, ev.ts, now):
                self._flush(conn, puts, removes)
                self._forget(conn, stream, cookie)
            op = effect(ev)
            if op is None:
                continue
            if isinstance(op, Put):
                if removes:
                    self._flush(conn, puts, removes)
                puts.append((op.site, op.key, parent_of(op.key), _encode(op.entry)))
            elif isinstance(op, Remove):
                if puts:
                    self._flush(conn, puts, removes)
                removes.append((op.site, op.key))
            else:
                self._flush(conn, puts, removes)
                self._move(conn, op, now)
        self._flush(conn, puts, removes)
        self.applied = events[-1].id
        conn.execute("INSERT OR REPLACE INTO ns_applied VALUES (1, ?)", (self.applied,))

    @staticmethod
    def _flush(
        conn: sqlite3.Connection,
        puts: list[tuple[str, bytes, bytes, bytes]],
        removes: list[tuple[str, bytes]],
    ) -> None:
        # A run of puts, or of removes, is applied together: within a run order only matters
        # for one key, and executemany keeps it.
        if puts:
            conn.executemany(_UPSERT, puts)
            puts.clear()
        if removes:
            conn.executemany(_DELETE, removes)
            conn.executemany(_DELETE_BELOW, [(site, *below(key)) for site, key in removes])
            removes.clear()

    def _move(self, conn: sqlite3.Connection, op: Op, now: int) -> None:
        if isinstance(op, SetAside):
            rows = conn.execute(_SUBTREE, (op.site, op.key, *below(op.key))).fetchall()
            if not rows:
                return  # never in the view: nothing to put back later
            conn.executemany(
                "INSERT OR REPLACE INTO ns_moving VALUES (?, ?, ?, ?, ?)",
                [(op.stream, op.cookie, op.site, key, entry) for key, entry in rows],
            )
            self._drop(conn, op.site, op.key)
            conn.execute(
                "INSERT OR REPLACE INTO ns_halves VALUES (?, ?, ?, ?)",
                (op.stream, op.cookie, _encode(op.half), now),
            )
            self._waiting.add(op.stream, op.cookie, op.half.ts, now)
            return
        assert isinstance(op, PutBack)
        self._drop(conn, op.site, op.key)  # a rename onto an existing name replaces it
        rows: list[tuple[str, bytes, bytes]] = []
        if self._waiting.take(op.stream, op.cookie):
            rows = conn.execute(
                "SELECT site, key, entry FROM ns_moving WHERE stream = ? AND cookie = ?",
                (op.stream, op.cookie),
            ).fetchall()
            self._forget(conn, op.stream, op.cookie)
        top = op.entry
        moved = []
        for site, key, blob in rows:
            if key == op.old:
                top = arrived(_entry(blob), op.entry)
            else:
                new = rebased(key, op.old, op.key)
                moved.append((site, new, parent_of(new), blob))
        moved.append((op.site, op.key, parent_of(op.key), _encode(top)))
        conn.executemany(_UPSERT, moved)

    @staticmethod
    def _drop(conn: sqlite3.Connection, site: str, key: bytes) -> None:
        conn.execute(_DELETE, (site, key))
        conn.execute(_DELETE_BELOW, (site, *below(key)))

    def _forget(self, conn: sqlite3.Connection, stream: str, cookie: int) -> None:
        conn.execute("DELETE FROM ns_moving WHERE stream = ? AND cookie = ?", (stream, cookie))
        conn.execute("DELETE FROM ns_halves WHERE stream = ? AND cookie = ?", (stream, cookie))
        self._waiting.take(stream, cookie)


# -- reading: each in a read transaction of its own connection -------------------------------


def applied(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT id FROM ns_applied").fetchone()
    return row[0] if row else 0


def sites(conn: sqlite3.Connection) -> list[str]:
    """The sites with entries, found by seeking from one to the next (a few sites, a million
    entries: DISTINCT would read them all)."""
    return [
        row[0]
        for row in conn.execute(
            "WITH RECURSIVE s(site) AS (SELECT min(site) FROM ns_entries UNION ALL "
            "SELECT (SELECT min(site) FROM ns_entries WHERE site > s.site) FROM s "
            "WHERE s.site IS NOT NULL) SELECT site FROM s WHERE site IS NOT NULL"
        )
    ]


def subtree(conn: sqlite3.Connection, site: str, key: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(key, entry) of ``key`` and all below it, in key order (a directory before its
    contents)."""
    yield from conn.execute(_SUBTREE, (site, key, *below(key)))


def moving(conn: sqlite3.Connection) -> Iterator[tuple[str, int, bytes, str, bytes, bytes]]:
    """(stream, cookie, half, site, key, entry) of everything set aside by a rename's first
    half."""
    yield from conn.execute(
        "SELECT m.stream, m.cookie, h.half, m.site, m.key, m.entry FROM ns_moving m "
        "JOIN ns_halves h USING (stream, cookie) ORDER BY m.stream, m.cookie, m.site, m.key"
    )


def subtree_after(
    conn: sqlite3.Connection, site: str, key: bytes, after: bytes | None, limit: int
) -> list[tuple[bytes, bytes]]:
    """Up to ``limit`` of :func:`subtree`'s rows, from the first key after ``after``."""
    lo, hi = below(key)
    if after is None:
        return list(itertools.islice(subtree(conn, site, key), limit))
    return conn.execute(
        "SELECT key, entry FROM ns_entries WHERE site = ? AND key > ? AND key >= ? AND key < ? "
        "ORDER BY key LIMIT ?",
        (site, after, lo, hi, limit),
    ).fetchall()


def children(conn: sqlite3.Connection, site: str, key: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(key, entry) of the entries directly in directory ``key``, in key order."""
    yield from conn.execute(
        "SELECT key, entry FROM ns_entries WHERE site = ? AND parent = ? ORDER BY key",
        (site, key),
    )


def names_below(conn: sqlite3.Connection, site: str, key: bytes) -> Iterator[bytes]:
    """The keys directly below ``key`` that have an entry or entries below them: the
    directories above the agents' roots hold no entry of their own. One seek per name, or past
    one name's subtree (keys sort by bytes, not by component: ``b``, ``b-x``, ``b-x/d``,
    ``b/c``)."""
    lo, hi = below(key)
    seek = "SELECT key FROM ns_entries WHERE site = ? AND key >= ? AND key < ? ORDER BY key LIMIT 1"
    seen: set[bytes] = set()
    start = lo
    while (row := conn.execute(seek, (site, start, hi)).fetchone()) is not None:
        found: bytes = row[0]
        child = lo + found[len(lo) :].split(b"/", 1)[0]
        if child not in seen:
            seen.add(child)
            yield child
        # Past the entry itself, or past all of the subtree it is in.
        start = found + b"\0" if found == child else child + b"0"


def entry(conn: sqlite3.Connection, site: str, key: bytes) -> Entry | None:
    row = conn.execute(
        "SELECT entry FROM ns_entries WHERE site = ? AND key = ?", (site, key)
    ).fetchone()
    return _entry(row[0]) if row else None
