"""Where dCache-style channels live between restarts: one SQLite file beside the event log.

It keeps each channel, its watches, its backlog of rendered events, and the id of the last log
record routed to channels, all written in one transaction per routed batch, so after a crash
routing resumes exactly where the stored backlog ends.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import msgspec

from .channels import Channel, Registry, Selector, Watch
from .filters import Scope

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
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
    PRIMARY KEY (channel, sid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS backlog (
    channel TEXT NOT NULL,
    id INTEGER NOT NULL,
    data BLOB NOT NULL,         -- the event's JSON envelope, as the channel's stream sends it
    PRIMARY KEY (channel, id)
) WITHOUT ROWID;
"""

_json = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A channel's rows as of one moment, taken on the event loop: the writer thread must not
    read channels the loop keeps changing."""

    id: str
    row: tuple
    watches: list[tuple] | None  # None: unchanged since they were last saved
    watch_version: int
    first_id: int


def snapshot(ch: Channel) -> Snapshot:
    scope = ch.scope
    row = (ch.id, ch.owner,
           _json.encode(sorted(scope.sites)) if scope.sites is not None else None,
           _json.encode(list(scope.prefixes)) if scope.prefixes is not None else None,
           ch.client_id, ch.url, ch.timeout, ch.next_id, ch.first_id, int(ch.connected),
           ch.disconnected_at)
    watches = None
    if ch.watch_version != ch.saved_watch_version:
        watches = [(ch.id, w.sid, w.site, w.path, w.mask, int(w.oneshot),
                    _json.encode(w.selector)) for w in ch.watches.values()]
    return Snapshot(ch.id, row, watches, ch.watch_version, ch.first_id)
_selector = msgspec.json.Decoder(Selector)
_names = msgspec.json.Decoder(list[str] | None)


class ChannelStore:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "channels.sqlite3"
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        # Calls come from the event loop (small updates) and a worker thread (batches, reads).
        self._lock = threading.Lock()

    def load(self, registry: Registry, now: float) -> int:
        """Fill ``registry``; returns the id of the last log record already routed."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM channels").fetchall()
            watches = self._db.execute("SELECT * FROM watches").fetchall()
            cursor = self._db.execute("SELECT value FROM meta WHERE key = 'cursor'").fetchone()
        channels = {}
        for (cid, owner, sites, prefixes, client_id, url, timeout, next_id, first_id,
             connected, disconnected_at) in rows:
            site_list, prefix_list = _names.decode(sites or "null"), _names.decode(
                prefixes or "null")
            scope = Scope(frozenset(site_list) if site_list is not None else None,
                          tuple(prefix_list) if prefix_list is not None else None)
            # A client connected when the relay stopped has only now been disconnected.
            channels[cid] = Channel(cid, owner, scope, client_id, url, timeout, next_id,
                                    first_id, False, now if connected else disconnected_at)
        for cid, sid, site, path, mask, oneshot, selector in watches:
            ch = channels.get(cid)
            if ch is not None:
                ch.watches[sid] = Watch(sid, ch, site, path, mask, bool(oneshot),
                                        _selector.decode(selector))
        for ch in channels.values():
            registry.add(ch)
        return cursor[0] if cursor else 0

    def save(self, channels: list[Snapshot], cursor: int | None,
             backlog: list[tuple[str, int, bytes]] | None = None,
             deleted: list[str] | None = None) -> None:
        """Write channels (with their watches), new backlog rows, removals and (unless None)
        the routing cursor in one transaction. A channel's rows older than its ``first_id``
        go."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                for snap in channels:
                    db.execute("INSERT OR REPLACE INTO channels VALUES "
                               "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", snap.row)
                    if snap.watches is not None:
                        db.execute("DELETE FROM watches WHERE channel = ?", (snap.id,))
                        db.executemany("INSERT INTO watches VALUES (?, ?, ?, ?, ?, ?, ?)",
                                       snap.watches)
                    db.execute("DELETE FROM backlog WHERE channel = ? AND id < ?",
                               (snap.id, snap.first_id))
                if backlog:
                    db.executemany("INSERT OR REPLACE INTO backlog VALUES (?, ?, ?)", backlog)
                for cid in deleted or ():
                    for table, key in (("channels", "id"), ("watches", "channel"),
                                       ("backlog", "channel")):
                        db.execute(f"DELETE FROM {table} WHERE {key} = ?", (cid,))
                if cursor is not None:
                    db.execute("INSERT OR REPLACE INTO meta VALUES ('cursor', ?)", (cursor,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def read(self, cid: str, after: int, limit: int) -> list[tuple[int, bytes]]:
        with self._lock:
            return self._db.execute(
                "SELECT id, data FROM backlog WHERE channel = ? AND id > ? ORDER BY id LIMIT ?",
                (cid, after, limit)).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

