"""The agent's durable state under ``--spool DIR``: unacknowledged events and the tree snapshot.

Events are written in batches every flush interval (so a SIGKILL loses at most that interval,
and the restart's rescan reports what changed), and deleted once the relay acknowledges them.
The space they take is bounded by a quota; past it, new events are refused, which the agent
announces and recovers from with a rescan once the relay has caught up.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

import msgspec

from storage_events.wire import Event

log = logging.getLogger("storage_events.agent")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    stream TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    data   BLOB NOT NULL,
    PRIMARY KEY (stream, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Event).decode


class SpoolError(Exception):
    pass


class Spool:
    def __init__(self, directory: Path, *, quota: int) -> None:
        self.directory = directory
        self.quota = quota
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._lock = open(directory / "lock", "a+")  # noqa: SIM115 - held while running
        except OSError as e:
            raise SpoolError(f"cannot use spool directory {directory}: {e.strerror}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpoolError(f"spool directory {directory} is in use by another agent; give "
                             "each agent its own --spool") from None
        # Written from one thread at a time (the agent's flush task), possibly not the opener.
        self._db = sqlite3.connect(directory / "outbox.sqlite3", isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._page = self._db.execute("PRAGMA page_size").fetchone()[0]
        self._buffer: list[tuple[str, int, bytes]] = []
        self._buffered = 0
        self._stored = self._measure()
        running = self._db.execute("SELECT value FROM meta WHERE key='running'").fetchone()
        self.unclean = running is not None and running[0] == "1"
        self._set("running", "1")

    # -- events ----------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._stored + self._buffered

    @property
    def full(self) -> bool:
        return self.size >= self.quota

    def add(self, event: Event) -> bool:
        """Queue ``event`` for the next flush; False (and nothing stored) past the quota."""
        if self.full:
            return False
        data = _encode(event)
        self._buffer.append((event.stream, event.seq, data))
        self._buffered += len(data) + 64
        return True

    def take(self) -> list[tuple[str, int, bytes]]:
        """What was added since the last call, for :meth:`write` (which may run on a thread)."""
        rows, self._buffer = self._buffer, []
        return rows

    def write(self, rows: list[tuple[str, int, bytes]], acked: dict[str, int]) -> None:
        """Store ``rows`` and drop what the relay acknowledged (``stream → seq``)."""
        db = self._db
        db.execute("BEGIN")
        db.executemany("INSERT OR IGNORE INTO events VALUES (?, ?, ?)", rows)
        db.executemany("DELETE FROM events WHERE stream = ? AND seq <= ?", acked.items())
        db.execute("COMMIT")
        self._buffered = sum(len(r[2]) + 64 for r in self._buffer)
        self._stored = self._measure()

    def flush(self, acked: dict[str, int]) -> None:
        self.write(self.take(), acked)

    def streams(self) -> list[tuple[str, int, int]]:
        """(stream, first seq, last seq) of every stream with events still stored."""
        return self._db.execute(
            "SELECT stream, min(seq), max(seq) FROM events GROUP BY stream").fetchall()

    def load(self, stream: str, first: int, limit: int) -> list[Event]:
        if self._buffer:
            self.flush({})
        rows = self._db.execute(
            "SELECT data FROM events WHERE stream = ? AND seq >= ? ORDER BY seq LIMIT ?",
            (stream, first, limit),
        ).fetchall()
        return [_decode(row[0]) for row in rows]

    def _measure(self) -> int:
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * self._page

    # -- snapshot and lifecycle --------------------------------------------------------------------

    def read_snapshot(self) -> dict[str, Any] | None:
        path = self.directory / "snapshot.msgpack"
        try:
            data = msgspec.msgpack.decode(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError) as e:
            log.error("snapshot %s is unreadable (%s): starting without it", path, e)
            return None
        return data.get("roots") if isinstance(data, dict) else None

    def write_snapshot(self, roots: dict[str, Any]) -> None:
        path = self.directory / "snapshot.msgpack"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(msgspec.msgpack.encode({"version": 1, "roots": roots}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def close(self, *, clean: bool) -> None:
        if clean:
            self._set("running", "0")
        self._db.close()
        with contextlib.suppress(OSError):
            self._lock.close()

    def _set(self, key: str, value: str) -> None:
        self._db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
                         "SET value = excluded.value", (key, value))
