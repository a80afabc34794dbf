"""The relay's namespace view as SQLite tables: changed in the transaction that stores the
events changing it, so a reader's transaction sees the view exactly as of one event id.

What each event does is :func:`storage_events.namespace.effect`'s; this module only carries it
out in SQL (and :class:`~storage_events.namespace.Mirror` in memory, for clients and tests).

The tree is stored as nodes under their parent node, one name each, so that renaming a
directory changes one row whatever it holds: a writer renaming a directory of a million files
back and forth costs the relay two row updates per rename, not two million. A directory known
only as the way to entries (above an agent's root) is a node without an entry; it goes when
nothing is left below it.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator

import msgspec

from storage_events.namespace import (
    Entry,
    Put,
    PutBack,
    Remove,
    SetAside,
    Waiting,
    arrived,
    effect,
)
from storage_events.wire import Event

log = logging.getLogger("storage_events.relay")

SCHEMA = """
CREATE TABLE IF NOT EXISTS ns_nodes (
    id     INTEGER PRIMARY KEY,
    parent INTEGER NOT NULL,     -- its directory's node; 0: in "/"; -N: set aside (ns_halves N)
    site   TEXT NOT NULL,
    name   BLOB NOT NULL,        -- one component of the path, its exact bytes
    entry  BLOB                  -- storage_events.namespace.Entry, msgpack; NULL: a directory
                                 -- known only from what is below it
);
CREATE UNIQUE INDEX IF NOT EXISTS ns_names ON ns_nodes (parent, site, name);
CREATE TABLE IF NOT EXISTS ns_halves (  -- first halves of renames, waiting for their second
    id     INTEGER PRIMARY KEY,
    stream TEXT NOT NULL,
    cookie INTEGER NOT NULL,
    site   TEXT NOT NULL,
    key    BLOB NOT NULL,        -- the path it left
    node   INTEGER NOT NULL,     -- what it took out of the tree (parent = -id)
    half   BLOB NOT NULL,        -- the IN_MOVED_FROM, as an Entry
    at     INTEGER NOT NULL,     -- when this relay set it aside (ns since the epoch)
    UNIQUE (stream, cookie)
);
CREATE TABLE IF NOT EXISTS ns_applied (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    id  INTEGER NOT NULL         -- the view is of the log up to and including this id
);
"""

_encode = msgspec.msgpack.Encoder().encode
_entry = msgspec.msgpack.Decoder(Entry).decode

_UPSERT = (
    "INSERT INTO ns_nodes (parent, site, name, entry) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (parent, site, name) DO UPDATE SET entry = excluded.entry"
)
_FIND = "SELECT id, entry FROM ns_nodes WHERE parent = ? AND site = ? AND name = ?"
_SUBTREE_IDS = (
    "WITH RECURSIVE sub(id) AS (VALUES (?) UNION ALL "
    "SELECT n.id FROM ns_nodes n JOIN sub ON n.parent = sub.id) "
)
_REMEMBERED = 4096  # directory node ids kept by key, at most
_CHILDREN = (
    "SELECT id, name, entry FROM ns_nodes WHERE parent = ? AND site = ? AND name > ? "
    "ORDER BY name LIMIT ?"
)


def decode_entry(blob: bytes) -> Entry:
    return _entry(blob)


def split(key: bytes) -> list[bytes]:
    """``b"/data/run1"`` → ``[b"data", b"run1"]`` (``b"/"`` → ``[]``)."""
    return [part for part in key.split(b"/") if part]


def chain(conn: sqlite3.Connection, site: str, key: bytes) -> list[tuple[int, bytes | None]]:
    """(node id, entry blob) of each directory on the way to ``key`` and of ``key`` itself,
    as far as they exist (``/``, node 0, not included)."""
    out: list[tuple[int, bytes | None]] = []
    node = 0
    for name in split(key):
        row = conn.execute(_FIND, (node, site, name)).fetchone()
        if row is None:
            break
        out.append(row)
        node = row[0]
    return out


def find(conn: sqlite3.Connection, site: str, key: bytes) -> tuple[int, bytes | None] | None:
    """(node id, its entry blob) at ``key``, or None; ``/`` is node 0 (no entry)."""
    parts = split(key)
    if not parts:
        return 0, None
    found = chain(conn, site, key)
    return found[-1] if len(found) == len(parts) else None


class Tables:
    """The view's tables in one database; :meth:`apply` runs inside the caller's transaction.
    Keeps in memory which renames wait for their second half (loaded at start), and the node
    ids of directories lately used (any directory leaving its place empties it)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        conn.executescript(SCHEMA)
        self.stalled = False  # applying failed once: the view stays as of self.applied
        self._dirs: dict[tuple[str, bytes], int] = {}
        self._waiting = Waiting()
        self.rolled_back(conn)

    def rolled_back(self, conn: sqlite3.Connection) -> None:
        """(Re)load what is kept in memory: at start, and when the transaction :meth:`apply`
        ran in did not commit."""
        self._dirs.clear()
        self._waiting = Waiting()
        # The relay's clock starts again now for what waits: it may have been down for longer
        # than a half is kept for, with the second half still on its way.
        now = time.time_ns()
        for stream, cookie, half in conn.execute(
            "SELECT stream, cookie, half FROM ns_halves ORDER BY id"
        ):
            self._waiting.add(stream, cookie, _entry(half).ts, now)
        row = conn.execute("SELECT id FROM ns_applied").fetchone()
        self.applied = row[0] if row else 0

    def apply_or_stall(
        self, conn: sqlite3.Connection, events: list[Event], now: int | None = None
    ) -> None:
        """:meth:`apply` inside the caller's transaction, which must commit whatever becomes of
        the view: should applying fail (a bug, an event no agent should send), the view's part
        is undone and the view stays as of its last id from then on. A snapshot of it is still
        exact as of that id (the events after it come from the log); it only grows older."""
        if self.stalled or not events:
            return
        conn.execute("SAVEPOINT ns_view")
        try:
            self.apply(conn, events, now)
        except Exception as e:
            try:
                conn.execute("ROLLBACK TO ns_view")
            except sqlite3.Error:
                raise e from None  # the whole transaction is gone: the caller's to handle
            self.rolled_back(conn)
            self.stalled = True
            log.error(
                "the namespace view stops at event %d: applying events %d-%d failed (%s: %s); "
                "snapshots and listings stay as of event %d until the relay is restarted "
                "(it then tries again from there)",
                self.applied,
                events[0].id,
                events[-1].id,
                type(e).__name__,
                e,
                self.applied,
            )
        finally:
            conn.execute("RELEASE ns_view")

    def apply(self, conn: sqlite3.Connection, events: list[Event], now: int | None = None) -> None:
        """Carry out ``events`` (stored, with their ids, in id order) on the view."""
        if not events:
            return
        now = time.time_ns() if now is None else now
        puts: list[tuple[int, str, bytes, bytes]] = []
        waiting = self._waiting
        for ev in events:
            for stream, cookie in waiting.expired(ev.stream, ev.ts, now):
                self._flush(conn, puts)
                self._expire(conn, stream, cookie)
            op = effect(ev)
            if op is None:
                continue
            if isinstance(op, Put):
                parts = split(op.key)
                if parts:  # ("/" itself holds no entry)
                    parent = self._directory(conn, op.site, op.key.rpartition(b"/")[0], parts)
                    # A run of puts goes in together: within it only the order of the puts to
                    # one name matters, and executemany keeps it.
                    puts.append((parent, op.site, parts[-1], _encode(op.entry)))
                continue
            self._flush(conn, puts)
            if isinstance(op, Remove):
                node = find(conn, op.site, op.key)
                if node is not None:
                    self._delete(conn, op.site, op.key, node[0])
            elif isinstance(op, SetAside):
                self._set_aside(conn, op, now)
            elif isinstance(op, PutBack):
                self._put_back(conn, op)
        self._flush(conn, puts)
        self.applied = events[-1].id
        conn.execute("INSERT OR REPLACE INTO ns_applied VALUES (1, ?)", (self.applied,))

    @staticmethod
    def _flush(conn: sqlite3.Connection, puts: list[tuple[int, str, bytes, bytes]]) -> None:
        if puts:
            conn.executemany(_UPSERT, puts)
            puts.clear()

    def _directory(
        self, conn: sqlite3.Connection, site: str, key: bytes, parts: list[bytes] | None = None
    ) -> int:
        """The node id of directory ``key`` (made, without an entry, if missing, with those
        above it). Directories lately used are remembered by key, a few thousand at most."""
        if not key or key == b"/":
            return 0
        cached = self._dirs.get((site, key))
        if cached is not None:
            return cached
        node = 0
        for name in split(key) if parts is None else parts[:-1]:
            row = conn.execute(_FIND, (node, site, name)).fetchone()
            if row is None:
                cur = conn.execute(
                    "INSERT INTO ns_nodes (parent, site, name, entry) VALUES (?, ?, ?, NULL)",
                    (node, site, name),
                )
                assert cur.lastrowid is not None
                node = cur.lastrowid
            else:
                node = row[0]
        if len(self._dirs) >= _REMEMBERED:
            self._dirs.clear()
        self._dirs[site, key] = node
        return node

    def _delete(self, conn: sqlite3.Connection, site: str, key: bytes, node: int) -> None:
        """Node ``node`` at ``key`` and all below it go; so do directories above it that were
        there only for it."""
        if node == 0:  # "/" of this site: what is in it (node 0 is every site's "/")
            tops = conn.execute(
                "SELECT id FROM ns_nodes WHERE parent = 0 AND site = ?", (site,)
            ).fetchall()
            for (top,) in tops:
                self._delete(conn, site, b"/", top)
            return
        conn.execute(
            _SUBTREE_IDS + "DELETE FROM ns_nodes WHERE id IN (SELECT id FROM sub)", (node,)
        )
        self._dirs.clear()  # (paths of cached directories may have run through it)
        self._prune(conn, site, key)

    def _prune(self, conn: sqlite3.Connection, site: str, key: bytes) -> None:
        """Remove the entry-less directories above ``key`` that nothing is below any more,
        from the nearest up."""
        above = chain(conn, site, key.rpartition(b"/")[0])
        below = "SELECT 1 FROM ns_nodes WHERE parent = ? LIMIT 1"
        for node, entry in reversed(above):
            if entry is not None or conn.execute(below, (node,)).fetchone():
                return
            conn.execute("DELETE FROM ns_nodes WHERE id = ?", (node,))
            self._dirs.clear()

    def _set_aside(self, conn: sqlite3.Connection, op: SetAside, now: int) -> None:
        node = find(conn, op.site, op.key)
        if node is None or not split(op.key):
            return  # never in the view: nothing to put back later
        self._expire(conn, op.stream, op.cookie)  # (a cookie used again: the old one is gone)
        cur = conn.execute(
            "INSERT INTO ns_halves (stream, cookie, site, key, node, half, at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (op.stream, op.cookie, op.site, op.key, node[0], _encode(op.half), now),
        )
        conn.execute(
            "UPDATE ns_nodes SET parent = ? WHERE id = ?", (-(cur.lastrowid or 0), node[0])
        )
        self._dirs.clear()
        self._prune(conn, op.site, op.key)
        self._waiting.add(op.stream, op.cookie, op.half.ts, now)

    def _put_back(self, conn: sqlite3.Connection, op: PutBack) -> None:
        parts = split(op.key)
        if not parts:
            return
        there = find(conn, op.site, op.key)
        if there is not None:  # a rename onto an existing name replaces it
            self._delete(conn, op.site, op.key, there[0])
        parent = self._directory(conn, op.site, op.key.rpartition(b"/")[0], parts)
        row = None
        if self._waiting.take(op.stream, op.cookie):
            row = conn.execute(
                "SELECT ns_halves.id, node, entry FROM ns_halves JOIN ns_nodes "
                "ON ns_nodes.id = ns_halves.node WHERE stream = ? AND cookie = ?",
                (op.stream, op.cookie),
            ).fetchone()
        if row is None:
            conn.execute(_UPSERT, (parent, op.site, parts[-1], _encode(op.entry)))
            return
        half, node, moved = row
        top = arrived(_entry(moved), op.entry) if moved is not None else op.entry
        conn.execute(
            "UPDATE ns_nodes SET parent = ?, site = ?, name = ?, entry = ? WHERE id = ?",
            (parent, op.site, parts[-1], _encode(top), node),
        )
        conn.execute("DELETE FROM ns_halves WHERE id = ?", (half,))

    def _expire(self, conn: sqlite3.Connection, stream: str, cookie: int) -> None:
        """The first half (``stream``, ``cookie``) will get no second: what it set aside goes."""
        row = conn.execute(
            "SELECT id, node FROM ns_halves WHERE stream = ? AND cookie = ?", (stream, cookie)
        ).fetchone()
        self._waiting.take(stream, cookie)
        if row is None:
            return
        conn.execute(
            _SUBTREE_IDS + "DELETE FROM ns_nodes WHERE id IN (SELECT id FROM sub)", (row[1],)
        )
        conn.execute("DELETE FROM ns_halves WHERE id = ?", (row[0],))


# -- reading: each in a read transaction of its own connection -------------------------------


def applied(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT id FROM ns_applied").fetchone()
    return row[0] if row else 0


def sites(conn: sqlite3.Connection) -> list[str]:
    """The sites with entries: those of the top-level names (a few rows)."""
    return [
        row[0]
        for row in conn.execute("SELECT DISTINCT site FROM ns_nodes WHERE parent = 0 ORDER BY site")
    ]


def walk(
    conn: sqlite3.Connection,
    site: str,
    key: bytes,
    after: bytes | None = None,
    node: tuple[int, bytes | None] | None = None,
) -> Iterator[tuple[bytes, bytes | None]]:
    """(key, entry blob or None) of ``key`` and everything below it, depth first, each
    directory's names in byte order, so a directory comes before what it holds; from after
    key ``after`` (a page's last) when given. ``node``: where ``key`` is, if not in the tree
    (a subtree set aside)."""
    top = node if node is not None else find(conn, site, key)
    if top is None:
        return
    base = key.rstrip(b"/")
    # The stack: (directory node, its key, the last name taken in it, names fetched, not taken)
    stack: list[tuple[int, bytes, bytes, list[tuple[int, bytes, bytes | None]]]] = []
    if after is None or not after.startswith(base + b"/"):
        if after is not None and after != key:
            return
        if after is None:
            yield key, top[1]
        stack.append((top[0], base, b"", []))
    else:
        # Rebuild where the page ended: in each directory on the way to ``after``, its names
        # after the one on the way; then, if ``after`` is still there, what is below it.
        at, where = top[0], base
        for name in split(after[len(base) :]):
            stack.append((at, where, name, []))
            row = conn.execute(_FIND, (at, site, name)).fetchone()
            if row is None:
                break
            at, where = row[0], where + b"/" + name
            if row[1] is not None and not _entry(row[1]).is_dir:
                break  # (a walk goes into directories only, resumed or not)
        else:
            stack.append((at, where, b"", []))
    while stack:
        parent, where, last, fetched = stack[-1]
        if not fetched:
            fetched = [tuple(r) for r in conn.execute(_CHILDREN, (parent, site, last, 256))]  # type: ignore[misc]
            if not fetched:
                stack.pop()
                continue
            fetched.reverse()
        child, name, blob = fetched.pop()
        stack[-1] = (parent, where, name, fetched)
        child_key = where + b"/" + name
        yield child_key, blob
        if blob is None or _entry(blob).is_dir:
            stack.append((child, child_key, b"", []))


def moving(conn: sqlite3.Connection) -> Iterator[tuple[int, bytes, str, bytes, bytes | None]]:
    """(cookie, half, site, key, entry) of everything set aside by a rename's first half."""
    halves = conn.execute(
        "SELECT cookie, half, site, key, node FROM ns_halves ORDER BY stream, cookie"
    ).fetchall()
    for cookie, half, site, key, node in halves:
        row = conn.execute("SELECT id, entry FROM ns_nodes WHERE id = ?", (node,)).fetchone()
        if row is None:
            continue
        for k, blob in walk(conn, site, key, node=(row[0], row[1])):
            yield cookie, half, site, k, blob


def children(
    conn: sqlite3.Connection, site: str, node: int
) -> Iterator[tuple[bytes, bytes | None]]:
    """(name, entry blob or None) of what is directly in directory ``node``, by name."""
    yield from conn.execute(
        "SELECT name, entry FROM ns_nodes WHERE parent = ? AND site = ? ORDER BY name",
        (node, site),
    )
