"""The default, embedded event log: one SQLite database in WAL mode under ``--data DIR``.

One writer (the caller serializes :meth:`SQLiteLog.append`), any number of readers, each on its
own connection per thread; WAL lets catch-up reads run while events are being written.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import threading
import time
from pathlib import Path

from storage_events.wire import Event, event_json, flags_mask

from .log import LogCounters, Record, make_record

log = logging.getLogger("storage_events.relay")

EPOCH = "@epoch"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id    INTEGER PRIMARY KEY,
    site  TEXT NOT NULL,
    node  TEXT NOT NULL,
    path  TEXT NOT NULL,
    flags INTEGER NOT NULL,
    data  BLOB NOT NULL,         -- the event's JSON, id included, exactly as subscribers get it
    received INTEGER NOT NULL    -- when the relay stored it (ns since the epoch): for retention
);
CREATE TABLE IF NOT EXISTS streams (
    stream TEXT PRIMARY KEY,
    seq    INTEGER NOT NULL,     -- highest seq stored: what the relay acknowledges; for a
                                 -- federation peer ("@upstream:…", "@relay:…") its last id taken
    site   TEXT                  -- the site the stream belongs to (NULL for peers' checkpoints)
);
"""


class SQLiteLog(LogCounters):
    def __init__(self, directory: Path, *, synchronous: str = "NORMAL",
                 name: str = "relay") -> None:
        self.name = name  # this relay's name, stamped on every event it stores
        self.stored = 0
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "events.sqlite3"
        self._synchronous = synchronous
        self._local = threading.local()
        self._writer = self._connect()
        self._writer.executescript(_SCHEMA)
        columns = {row[1] for row in self._writer.execute("PRAGMA table_info(events)")}
        if "received" not in columns:  # a log written by version 0.1.0
            self._writer.execute(
                "ALTER TABLE events ADD COLUMN received INTEGER NOT NULL DEFAULT 0")
        self._head, first, self._bytes = self._writer.execute(
            "SELECT coalesce(max(id), 0), min(id), coalesce(sum(length(data)), 0) FROM events"
        ).fetchone()
        self._first = first if first is not None else self._head + 1
        columns = {row[1] for row in self._writer.execute("PRAGMA table_info(streams)")}
        if "site" not in columns:  # a log written before streams were tied to their site
            self._writer.execute("ALTER TABLE streams ADD COLUMN site TEXT")
        rows = self._writer.execute("SELECT stream, seq, site FROM streams").fetchall()
        self._positions: dict[str, int] = {stream: seq for stream, seq, _ in rows}
        self._sites: dict[str, str] = {stream: site for stream, _, site in rows if site}
        self._refused: set[tuple[str, str]] = set()  # (stream, site) claims already logged
        if EPOCH not in self._positions:
            # Identifies this log: peers keep checkpoints per epoch, so a log that was deleted
            # and started again is read from its beginning, not from where the old one was.
            self._writer.execute("INSERT INTO streams (stream, seq) VALUES (?, ?)",
                                 (EPOCH, secrets.randbits(53)))
            self._positions[EPOCH] = self._writer.execute(
                "SELECT seq FROM streams WHERE stream = ?", (EPOCH,)).fetchone()[0]

    @property
    def epoch(self) -> int:
        return self._positions[EPOCH]

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives the relay process being killed; FULL also survives power
        # loss, at one fsync per batch.
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    def position(self, stream: str) -> int:
        return self._positions.get(stream, 0)

    def append(self, events: list[Event],
               checkpoint: tuple[str, int] | None = None) -> list[Record]:
        positions: dict[str, int] = {}
        new_sites: dict[str, str] = {}
        rows, records = [], []
        now = time.time_ns()
        head = self._head
        name = self.name
        sites = self._sites
        for ev in events:
            owner = sites.get(ev.stream) or new_sites.get(ev.stream)
            if owner is None:
                new_sites[ev.stream] = ev.site
            elif owner != ev.site:
                self._refuse(ev, owner)
                continue
            last = positions.get(ev.stream, self._positions.get(ev.stream, 0))
            if ev.seq <= last:
                continue  # already stored: a resend after a lost ack
            if ev.seq != last + 1:
                log.warning("stream %s jumps from seq %d to %d: events %d-%d never arrived",
                            ev.stream, last, ev.seq, last + 1, ev.seq - 1)
            positions[ev.stream] = ev.seq
            head += 1
            ev.id = head
            if not ev.via:
                ev.origin_id = head
            ev.via = [*ev.via, name]
            flags = flags_mask(ev.flags)
            data = event_json(ev)
            rows.append((head, ev.site, ev.node, ev.path, flags, data, now))
            records.append(make_record(head, ev.site, ev.node, ev.path, flags, data, ev))
        marks = dict(positions)
        if checkpoint is not None:  # how far a federation peer's feed has been taken in
            marks[checkpoint[0]] = checkpoint[1]
        if not marks:
            return []
        w = self._writer
        w.execute("BEGIN IMMEDIATE")
        try:
            w.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            w.executemany(
                "INSERT INTO streams (stream, seq, site) VALUES (?, ?, ?) "
                "ON CONFLICT(stream) DO UPDATE SET seq = excluded.seq, "
                "site = coalesce(streams.site, excluded.site)",
                [(key, seq, new_sites.get(key)) for key, seq in marks.items()],
            )
            w.execute("COMMIT")
        except BaseException:
            w.execute("ROLLBACK")
            raise
        self._positions.update(marks)
        self._sites.update((k, v) for k, v in new_sites.items() if k in positions)
        if not rows:
            return []
        if self._first > self._head:  # was empty
            self._first = self._head + 1
        self._head = head
        self.stored += len(rows)
        self._bytes += sum(len(r[5]) for r in rows)
        return records

    def _refuse(self, ev: Event, owner: str) -> None:
        if (ev.stream, ev.site) not in self._refused:
            self._refused.add((ev.stream, ev.site))
            log.error("dropped events of stream %s claiming site %r: that stream belongs to site "
                      "%r (a forged or misconfigured sender)", ev.stream, ev.site, owner)

    def trim(self, *, max_age: float, max_events: int, max_bytes: int) -> int:
        """Drop the oldest events beyond any limit (0: none); returns how many went."""
        w = self._writer
        cut = self._first - 1
        if max_events and self._head - cut > max_events:
            cut = self._head - max_events
        if max_age:
            oldest_kept = time.time_ns() - int(max_age * 1e9)
            (aged,) = w.execute("SELECT max(id) FROM events WHERE received < ?",
                                (oldest_kept,)).fetchone()
            cut = max(cut, aged or 0)
        excess = self._bytes - self._sum_through(cut) - max_bytes if max_bytes else 0
        while excess > 0:  # walk forward from the cut until enough bytes would go
            rows = w.execute("SELECT id, length(data) FROM events WHERE id > ? ORDER BY id "
                             "LIMIT 10000", (cut,)).fetchall()
            if not rows:
                break
            for id, size in rows:
                cut, excess = id, excess - size
                if excess <= 0:
                    break
        if cut < self._first:
            return 0
        freed = self._sum_through(cut)
        w.execute("BEGIN IMMEDIATE")
        w.execute("DELETE FROM events WHERE id <= ?", (cut,))
        w.execute("COMMIT")
        gone = cut - self._first + 1
        self._first, self._bytes = cut + 1, self._bytes - freed
        log.info("retention: dropped events %d-%d (%d bytes)", cut - gone + 1, cut, freed)
        return gone

    def _sum_through(self, id: int) -> int:
        (total,) = self._writer.execute(
            "SELECT coalesce(sum(length(data)), 0) FROM events WHERE id <= ?", (id,)).fetchone()
        return total

    def read(self, after: int, limit: int) -> list[Record]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        rows = conn.execute(
            "SELECT id, site, node, path, flags, data FROM events WHERE id > ? ORDER BY id LIMIT ?",
            (after, limit),
        ).fetchall()
        return [make_record(*row) for row in rows]

    def close(self) -> None:
        self._writer.close()
