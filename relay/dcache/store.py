"""Where dCache-style channels live between restarts: one SQLite file beside the event log.

It keeps each channel, its watches, its backlog of rendered events (each with where it came
from, so that a replay shows only what the owner may see then), and the id of the last log
record routed to channels, all written in one transaction per routed batch, so after a crash
routing resumes exactly where the stored backlog ends. Watches are written as they change, not
with their channel: one channel may hold 10,000 of them.

The rows are also what :mod:`.nats_store` keeps, so both stores restore channels the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import msgspec

from storage_events.relay.dcache.channels import Channel, Origin, Registry, Selector, Watch
from storage_events.relay.feed.filters import Scope

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS held_loss (  -- loss notices routed past but not yet announced
    site TEXT NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (site, path)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS channels (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    sites TEXT,                 -- JSON list, or NULL for every site
    prefixes TEXT,              -- JSON list, or NULL for every path
    client_id TEXT,
    url TEXT NOT NULL,
    timeout INTEGER NOT NULL,
    next_id INTEGER NOT NULL,
    first_id INTEGER NOT NULL,
    connected INTEGER NOT NULL,
    disconnected_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS watches (
    channel TEXT NOT NULL,
    sid TEXT NOT NULL,
    site TEXT,
    path TEXT NOT NULL,
    mask INTEGER NOT NULL,
    oneshot INTEGER NOT NULL,
    selector BLOB NOT NULL,
    moved TEXT,                 -- JSON {site: path} of a site-less watch moved on some sites
    PRIMARY KEY (channel, sid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS backlog (
    channel TEXT NOT NULL,
    id INTEGER NOT NULL,
    data BLOB NOT NULL,         -- the event's JSON envelope, as the channel's stream sends it
    -- Where it came from (channels.Origin), checked against the owner's rights when it is
    -- replayed. site NULL: a row stored before this was kept, which no check can clear.
    site TEXT,
    path TEXT,
    overflow INTEGER,
    old_path TEXT,
    PRIMARY KEY (channel, id)
) WITHOUT ROWID;
"""
# Columns added after the first release: databases it wrote get them when opened, NULL in old
# rows.
_ADDED = {
    "watches": ("moved TEXT",),
    "backlog": ("site TEXT", "path TEXT", "overflow INTEGER", "old_path TEXT"),
}
# Columns named: in a database that was migrated, the added ones come last whatever _SCHEMA says.
_WATCH = (
    "INSERT OR REPLACE INTO watches (channel, sid, site, path, mask, oneshot, selector, "
    "moved) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_BACKLOG = (
    "INSERT OR REPLACE INTO backlog (channel, id, data, site, path, overflow, old_path) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)

_json = msgspec.json.Encoder()
_order = itertools.count()  # snapshots, numbered in the order they are taken


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A channel's rows as of one moment, taken on the event loop: the writer thread must not
    read channels the loop keeps changing. Only the watches changed since they were last saved
    are in it; all of them, so that a newer snapshot holds everything an older one does."""

    id: str
    row: tuple
    watches: list[tuple]  # rows of the watches added or changed
    removed: list[tuple[str, str]]  # (channel, sid) of the watches gone
    versions: list[tuple[str, int]]  # sid → the change these rows are as of
    order: int  # when it was taken: a write never replaces the rows of a newer one
    first_id: int


def snapshot(ch: Channel) -> Snapshot:
    scope = ch.scope
    row = (
        ch.id,
        ch.owner,
        _json.encode(sorted(scope.sites)) if scope.sites is not None else None,
        _json.encode(list(scope.prefixes)) if scope.prefixes is not None else None,
        ch.client_id,
        ch.url,
        ch.timeout,
        ch.next_id,
        ch.first_id,
        int(ch.connected),
        ch.disconnected_at,
    )
    watches, removed = [], []
    for sid in ch.unsaved:
        w = ch.watches.get(sid)
        if w is None:
            removed.append((ch.id, sid))
        else:
            watches.append(
                (
                    ch.id,
                    sid,
                    w.site,
                    w.path,
                    w.mask,
                    int(w.oneshot),
                    _json.encode(w.selector),
                    _json.encode(w.moved) if w.moved else None,
                )
            )
    return Snapshot(
        ch.id, row, watches, removed, list(ch.unsaved.items()), next(_order), ch.first_id
    )


def saved(ch: Channel, snap: Snapshot) -> None:
    """``snap`` is written: its watches are saved, unless they changed again since."""
    for sid, version in snap.versions:
        if ch.unsaved.get(sid) == version:
            del ch.unsaved[sid]


_selector = msgspec.json.Decoder(Selector)
_names = msgspec.json.Decoder(list[str] | None)
_moved = msgspec.json.Decoder(dict[str, str])

BacklogRow = tuple[str, int, bytes, Origin]  # channel, id, JSON envelope, where it came from
Stored = tuple[int, bytes, Origin | None]  # a backlog row read back (None: origin not recorded)


def restore(
    registry: Registry, channels: Iterable[tuple], watches: Iterable[tuple], now: float
) -> None:
    """Put channels and watches back into ``registry`` from their rows (as :func:`snapshot`
    makes them); watches of a channel not among them are skipped."""
    loaded = {}
    for (
        cid,
        owner,
        sites,
        prefixes,
        client_id,
        url,
        timeout,
        next_id,
        first_id,
        connected,
        disconnected_at,
    ) in channels:
        site_list, prefix_list = (
            _names.decode(sites or "null"),
            _names.decode(prefixes or "null"),
        )
        scope = Scope(
            frozenset(site_list) if site_list is not None else None,
            tuple(prefix_list) if prefix_list is not None else None,
        )
        # A client connected when the relay stopped has only now been disconnected.
        loaded[cid] = Channel(
            cid,
            owner,
            scope,
            client_id,
            url,
            timeout,
            next_id,
            first_id,
            False,
            now if connected else disconnected_at,
        )
    for cid, sid, site, path, mask, oneshot, selector, moved in watches:
        ch = loaded.get(cid)
        if ch is not None:
            ch.watches[sid] = Watch(
                sid,
                ch,
                site,
                path,
                mask,
                bool(oneshot),
                _selector.decode(selector),
                _moved.decode(moved) if moved else {},
            )
    for ch in loaded.values():
        registry.add(ch)


class ChannelStorage(Protocol):
    """What the channel service needs of a store, from the event loop."""

    async def write(
        self,
        channels: list[Snapshot],
        cursor: int | None,
        backlog: list[BacklogRow] | None = None,
        deleted: list[str] | None = None,
        held: list[tuple[str, str]] | None = None,
    ) -> None:
        """As :meth:`ChannelStore.save`."""

    async def fetch(self, cid: str, after: int, limit: int) -> list[Stored]:
        """As :meth:`ChannelStore.read`."""

    def close(self) -> None: ...


class ChannelStore:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "channels.sqlite3"
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        for table, columns in _ADDED.items():
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for column in columns:
                if column.split()[0] not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
        # Calls come from the event loop (small updates) and a worker thread (batches, reads).
        self._lock = threading.Lock()
        self._written: dict[str, int] = {}  # channel → the order of the newest snapshot written

    def load(self, registry: Registry, now: float) -> int:
        """Fill ``registry``; returns the id of the last log record already routed."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM channels").fetchall()
            watches = self._db.execute(
                "SELECT channel, sid, site, path, mask, oneshot, selector, moved FROM watches"
            ).fetchall()
            cursor = self._db.execute("SELECT value FROM meta WHERE key = 'cursor'").fetchone()
            registry.deferred.update(self._db.execute("SELECT site, path FROM held_loss"))
        restore(registry, rows, watches, now)
        return cursor[0] if cursor else 0

    async def write(
        self,
        channels: list[Snapshot],
        cursor: int | None,
        backlog: list[BacklogRow] | None = None,
        deleted: list[str] | None = None,
        held: list[tuple[str, str]] | None = None,
    ) -> None:
        await asyncio.to_thread(self.save, channels, cursor, backlog, deleted, held)

    async def fetch(self, cid: str, after: int, limit: int) -> list[Stored]:
        return await asyncio.to_thread(self.read, cid, after, limit)

    def save(
        self,
        channels: list[Snapshot],
        cursor: int | None,
        backlog: list[BacklogRow] | None = None,
        deleted: list[str] | None = None,
        held: list[tuple[str, str]] | None = None,
    ) -> None:
        """Write channels (with their changed watches), new backlog rows, removals and (unless
        None) the routing cursor and the loss notices held back, in one transaction: a cursor
        past a held notice is never stored without it. A channel's rows older than its
        ``first_id`` go."""
        with self._lock:
            db = self._db
            written = {}
            db.execute("BEGIN IMMEDIATE")
            try:
                for snap in channels:
                    # Snapshots are taken in order but may be written out of it (the stream's
                    # synchronous save on disconnect can overtake a batch on the worker thread).
                    # A newer one already written holds all this one would.
                    if snap.order < self._written.get(snap.id, -1):
                        continue
                    written[snap.id] = snap.order
                    db.execute(
                        "INSERT OR REPLACE INTO channels VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        snap.row,
                    )
                    db.executemany(_WATCH, snap.watches)
                    db.executemany(
                        "DELETE FROM watches WHERE channel = ? AND sid = ?", snap.removed
                    )
                    db.execute(
                        "DELETE FROM backlog WHERE channel = ? AND id < ?", (snap.id, snap.first_id)
                    )
                if backlog:
                    db.executemany(
                        _BACKLOG,
                        [
                            (cid, i, data, o.site, o.path, int(o.overflow), o.old_path)
                            for cid, i, data, o in backlog
                        ],
                    )
                for cid in deleted or ():
                    for table, key in (
                        ("channels", "id"),
                        ("watches", "channel"),
                        ("backlog", "channel"),
                    ):
                        db.execute(f"DELETE FROM {table} WHERE {key} = ?", (cid,))
                if cursor is not None:
                    db.execute("INSERT OR REPLACE INTO meta VALUES ('cursor', ?)", (cursor,))
                if held is not None:
                    db.execute("DELETE FROM held_loss")
                    db.executemany("INSERT INTO held_loss VALUES (?, ?)", held)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._written.update(written)
            for cid in deleted or ():
                self._written.pop(cid, None)

    def read(self, cid: str, after: int, limit: int) -> list[Stored]:
        """Backlog rows after ``after``, each with where it came from (None: not recorded)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, data, site, path, overflow, old_path FROM backlog "
                "WHERE channel = ? AND id > ? ORDER BY id LIMIT ?",
                (cid, after, limit),
            ).fetchall()
        return [
            (i, data, None if site is None else Origin(site, path, bool(overflow), old))
            for i, data, site, path, overflow, old in rows
        ]

    def close(self) -> None:
        with self._lock:
            self._db.close()
