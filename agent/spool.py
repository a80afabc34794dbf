"""The agent's durable state under ``--spool DIR``: its events and the tree snapshot.

Events are written in batches every flush interval (so a SIGKILL loses at most that interval,
and the restart announces possible loss). The spool never refuses an event: once its quota of
unacknowledged events is reached, or the disk is full, :attr:`Spool.full` says so and the agent
stops processing kernel events until there is room again; rows that could not be written stay
in memory and are written at a later flush.

Acknowledged events are not deleted at once: together with the unacknowledged ones they are the
*journal*, every event published since the last snapshot. After an unclean stop, the snapshot
with the journal applied (:mod:`.journal`) is what subscribers were told, which is what the
restart must compare the tree on disk with. Writing a snapshot records, per stream, the last
seq it covers; acknowledged events up to that point are then deleted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from storage_events.errors import StorageError
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
-- per stream: the last seq the relay acknowledged, and the last seq the snapshot covers
CREATE TABLE IF NOT EXISTS acked (stream TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS covered (stream TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
"""
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Event).decode
ROW_OVERHEAD = 64  # bytes a row costs besides its data (key, b-tree), roughly
# A journal longer than this makes the agent write a snapshot early, so that it stays bounded
# (on disk, and in what an unclean start has to read back).
JOURNAL_EVENTS = 200_000
JOURNAL_BYTES = 64 << 20
# A full disk must not wedge the spool: SQLite needs room to checkpoint its write-ahead log and
# to record the deletions that make room. So the WAL is kept small (checkpointed every
# _WAL_PAGES pages, events inserted _CHUNK rows per transaction), and a reserve file at least
# that large is kept beside the database, given up when the disk is full.
_WAL_PAGES = 32
_CHUNK = 256
_RESERVE = 256 * 1024

Row = tuple[str, int, bytes]


class SpoolError(StorageError):
    pass


def _disk_full(e: sqlite3.Error) -> bool:
    return getattr(
        e, "sqlite_errorcode", None
    ) == sqlite3.SQLITE_FULL or "database or disk is full" in str(e)


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
            raise SpoolError(
                f"spool directory {directory} is in use by another agent; give "
                "each agent its own --spool"
            ) from None
        # Written from one thread at a time (the agent's flush task), possibly not the opener;
        # the lock keeps a flush at shutdown from meeting one still running on its thread.
        self._mutex = threading.Lock()
        try:
            self._db = sqlite3.connect(
                directory / "outbox.sqlite3", isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(f"PRAGMA wal_autocheckpoint={_WAL_PAGES}")
            self._db.execute(f"PRAGMA journal_size_limit={_RESERVE}")
            self._db.executescript(_SCHEMA)
            self._acked: dict[str, int] = dict(self._db.execute("SELECT * FROM acked"))
            # The snapshot's points as last recorded here (never ahead of the snapshot file).
            self._covered: dict[str, int] = dict(self._db.execute("SELECT * FROM covered"))
            self._points = dict(self._covered)
            self._gone: dict[str, int] = {}  # deleted up to, per stream, by this run
            stored = self._db.execute("SELECT value FROM meta WHERE key='unacked_bytes'").fetchone()
            self._stored = int(stored[0]) if stored else self._measure()
            lost = self._db.execute("SELECT value FROM meta WHERE key='journal_lost'").fetchone()
            # Acknowledged events had to be deleted before a snapshot covered them (full disk):
            # the journal cannot say what was published since the snapshot.
            self.journal_lost = lost is not None and lost[0] == "1"
            self._lost_over = False  # a snapshot was written since: record it at the next write
            running = self._db.execute("SELECT value FROM meta WHERE key='running'").fetchone()
            self.unclean = running is not None and running[0] == "1"
            self._set("running", "1")
        except sqlite3.Error as e:
            raise SpoolError(
                f"cannot open the spool database in {directory}: {e}. If it is "
                "damaged, move the directory away (its unacknowledged events are "
                "then lost) and start again"
            ) from None
        self._buffer: list[Row] = []  # added since the last take()
        self._buffered = 0  # their bytes
        self._unwritten: list[Row] = []  # taken, but the disk was full: written next time
        self._pending = 0  # bytes of rows taken and not yet stored
        self._committed = 0  # rows of the current write stored so far
        self._reserve_size = _RESERVE
        self.disk_full = False
        self.snapshot_points: dict[str, int] = {}  # of the snapshot read_snapshot returned
        self.journal_events = 0  # added since the last snapshot
        self.journal_bytes = 0
        self._reserve_path = directory / "reserve"
        with contextlib.suppress(OSError):
            fs = os.statvfs(directory)
            self._reserve_size = min(_RESERVE, fs.f_blocks * fs.f_frsize // 8)
        self._make_reserve()  # (if it cannot be made, writes are careful from the start)

    # -- events ----------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes of unacknowledged events, stored or waiting to be."""
        return self._stored + self._pending + self._buffered

    @property
    def full(self) -> bool:
        return self.disk_full or self.size >= self.quota

    def add(self, event: Event) -> None:
        """Queue ``event`` for the next flush. Never refuses: the quota is the agent's to keep
        (it stops taking kernel events while :attr:`full`)."""
        data = _encode(event)
        self._buffer.append((event.stream, event.seq, data))
        size = len(data) + ROW_OVERHEAD
        self._buffered += size
        self.journal_events += 1
        self.journal_bytes += size

    def replace(self, event: Event) -> None:
        """Store ``event`` in the place of the one with its stream and seq (written with the
        next flush, after the original if that is still waiting)."""
        self.add(event)

    def take(self) -> tuple[list[Row], dict[str, int]]:
        """What to pass to :meth:`write` (which may run on a thread): the rows waiting."""
        rows, self._unwritten, self._buffer = self._unwritten + self._buffer, [], []
        self._pending += self._buffered
        self._buffered = 0
        return rows, dict(self._points)

    def write(self, taken: tuple[list[Row], dict[str, int]], acked: dict[str, int]) -> None:
        """Store what :meth:`take` returned and record what the relay acknowledged (``stream
        → seq``). On a full disk the rows are kept for the next call and :attr:`full` is set."""
        rows, points = taken
        with self._mutex:
            self._committed = 0
            # Without its reserve the disk is (nearly) full: then the log is checkpointed at
            # every step and new rows go only into pages the database has free, so that the
            # room left stays for the log (without which nothing, not even a deletion, could
            # be written again).
            tight = not self._make_reserve()
            try:
                # First on their own: acknowledgements free room, even on a full disk.
                self._record(acked, points, tight)
                if tight:
                    # Acknowledged while waiting: no longer needed (the journal is incomplete
                    # anyway), and the disk has little room.
                    rows = [r for r in rows if r[1] > self._acked.get(r[0], 0)]
                self._insert(rows[: self._fitting(rows)] if tight else rows, tight)
            except sqlite3.Error as e:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                if not _disk_full(e):
                    raise
                self._make_room()
            self._unwritten = rows[self._committed :]  # (take() emptied it)
            self._pending = sum(len(r[2]) + ROW_OVERHEAD for r in self._unwritten)
            if self._unwritten and not self.disk_full:
                log.error(
                    "spool %s: the disk is full: %d events wait in memory, processing "
                    "of kernel events is paused and the write is retried at every flush."
                    " Free space on the file system of %s, or give the spool more room.",
                    self.directory,
                    len(self._unwritten),
                    self.directory,
                )
                self.disk_full = True
            elif not self._unwritten and self.disk_full:
                log.warning("spool %s can be written again", self.directory)
                self.disk_full = False

    def _make_room(self) -> None:
        """Give SQLite the room to checkpoint its log and record deletions (the reserve)."""
        with contextlib.suppress(OSError):
            self._reserve_path.unlink()
        self._checkpoint()

    def _checkpoint(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _make_reserve(self) -> bool:
        """Keep the reserve file; False when it is missing (no room to make it)."""
        try:
            if self._reserve_path.stat().st_size >= self._reserve_size:
                return True
        except OSError:
            pass
        try:
            fs = os.statvfs(self.directory)
            if fs.f_bavail * fs.f_frsize < 4 * self._reserve_size:
                return False  # not while the disk is nearly full: made when there is room
            with open(self._reserve_path, "wb") as f:
                f.write(bytes(self._reserve_size))
            return True
        except OSError:
            with contextlib.suppress(OSError):
                self._reserve_path.unlink()
            return False

    def _fitting(self, rows: list[Row]) -> int:
        """How many of ``rows`` fit in the database's free pages and the disk's free space,
        with a wide margin (pages are not filled; the log needs room too)."""
        db = self._db
        free = (
            db.execute("PRAGMA freelist_count").fetchone()[0]
            * db.execute("PRAGMA page_size").fetchone()[0]
        )
        fs = os.statvfs(self.directory)
        room = free // 2 + max(0, fs.f_bavail * fs.f_frsize - 2 * self._reserve_size) // 4
        count = 0
        for _, _, data in rows:
            room -= len(data) + ROW_OVERHEAD
            if room < 0:
                break
            count += 1
        return count

    def _record(self, acked: dict[str, int], points: dict[str, int], tight: bool) -> None:
        newly = {s: q for s, q in acked.items() if q > self._acked.get(s, 0)}
        gone = {}  # stream → rows up to this seq are acknowledged and covered by the snapshot
        for stream in {*points, *acked} if tight else points:
            last = max(newly.get(stream, 0), self._acked.get(stream, 0))
            if not tight:
                last = min(points[stream], last)
            if last > self._gone.get(stream, 0):
                gone[stream] = last
        # On a full disk, room for new events comes first: acknowledged ones go even if no
        # snapshot covers them yet (the journal is then incomplete until the next snapshot).
        lost = tight and any(q > points.get(s, 0) for s, q in gone.items())
        covered = {s: q for s, q in points.items() if self._covered.get(s) != q}
        db = self._db
        if newly or covered or lost or (self._lost_over and not tight):
            db.execute("BEGIN")
            freed = 0
            for stream, seq in newly.items():
                freed += db.execute(
                    "SELECT coalesce(sum(length(data)), 0) + count(*) * ? FROM events "
                    "WHERE stream = ? AND seq > ? AND seq <= ?",
                    (ROW_OVERHEAD, stream, self._acked.get(stream, 0), seq),
                ).fetchone()[0]
            db.executemany(
                "INSERT INTO acked VALUES (?, ?) ON CONFLICT(stream) DO UPDATE "
                "SET seq = excluded.seq",
                newly.items(),
            )
            db.executemany(
                "INSERT INTO covered VALUES (?, ?) ON CONFLICT(stream) DO UPDATE "
                "SET seq = excluded.seq",
                covered.items(),
            )
            stored = max(0, self._stored - freed)
            self._set("unacked_bytes", str(stored))
            over = self._lost_over and not lost and not tight
            if lost or over:
                self._set("journal_lost", "1" if lost else "0")
            db.execute("COMMIT")
            if lost:
                self.journal_lost = True
            elif over:
                self._lost_over = False
            self._acked.update(newly)
            self._covered.update(covered)
            self._stored = stored
        # No longer needed for anything: neither to resend nor to replay after a crash.
        for stream, last in gone.items():
            low = self._gone.get(stream, 0)
            while low < last:
                high = min(last, low + _CHUNK) if tight else last
                db.execute(
                    "DELETE FROM events WHERE stream = ? AND seq > ? AND seq <= ?",
                    (stream, low, high),
                )  # (autocommit: one small transaction)
                self._gone[stream] = low = high
                if tight:
                    self._checkpoint()

    def _insert(self, rows: list[Row], tight: bool) -> None:
        db = self._db
        # In chunks: each commit is small (see _WAL_PAGES), and a full disk keeps only the
        # rows that did not fit.
        step = _CHUNK // 4 if tight else _CHUNK
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            added = sum(len(r[2]) + ROW_OVERHEAD for r in chunk if r[1] > self._acked.get(r[0], 0))
            db.execute("BEGIN")
            # REPLACE: a later row of the same seq is a loss notice taking the place of an
            # event the relay refused.
            db.executemany("INSERT OR REPLACE INTO events VALUES (?, ?, ?)", chunk)
            self._set("unacked_bytes", str(self._stored + added))
            db.execute("COMMIT")
            self._stored += added
            self._committed = start + len(chunk)
            if tight:
                self._checkpoint()

    def flush(self, acked: dict[str, int]) -> None:
        self.write(self.take(), acked)

    def streams(self) -> list[tuple[str, int, int]]:
        """(stream, first unacknowledged seq, last seq) of every stream with events the relay
        has not acknowledged."""
        return self._db.execute(
            "SELECT e.stream, coalesce(a.seq, 0) + 1, max(e.seq) FROM events e "
            "LEFT JOIN acked a USING (stream) GROUP BY e.stream "
            "HAVING max(e.seq) > coalesce(a.seq, 0)"
        ).fetchall()

    def load(self, stream: str, first: int, limit: int) -> list[Event]:
        """Events ``first``… of ``stream`` (at most ``limit``), from disk or, if they could not
        be written yet, from memory."""
        with self._mutex:
            found = dict(
                self._db.execute(
                    "SELECT seq, data FROM events WHERE stream = ? AND seq >= ? ORDER BY seq "
                    "LIMIT ?",
                    (stream, first, limit),
                ).fetchall()
            )
            for s, seq, data in (*self._unwritten, *self._buffer):
                if s == stream and seq >= first:
                    found[seq] = data  # (the newer row: a loss notice in place of an event)
        return [_decode(found[seq]) for seq in sorted(found)[:limit]]

    def journal(self) -> Iterator[Event]:
        """The events published after the snapshot :meth:`read_snapshot` returned, in the order
        they were published (streams of earlier runs first)."""
        points = self.snapshot_points
        firsts = []
        for (stream,) in self._db.execute("SELECT DISTINCT stream FROM events").fetchall():
            row = self._db.execute(
                "SELECT data FROM events WHERE stream = ? AND seq > ? ORDER BY seq LIMIT 1",
                (stream, points.get(stream, 0)),
            ).fetchone()
            if row is not None:
                firsts.append((_decode(row[0]).ts, stream))
        for _, stream in sorted(firsts):
            cursor = self._db.execute(
                "SELECT data FROM events WHERE stream = ? AND seq > ? ORDER BY seq",
                (stream, points.get(stream, 0)),
            )
            for (data,) in cursor:
                yield _decode(data)

    def _measure(self) -> int:
        """Bytes of unacknowledged rows, counted (a spool of an earlier version)."""
        return self._db.execute(
            "SELECT coalesce(sum(length(e.data)), 0) + count(*) * ? FROM events e "
            "LEFT JOIN acked a USING (stream) WHERE e.seq > coalesce(a.seq, 0)",
            (ROW_OVERHEAD,),
        ).fetchone()[0]

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
        if not isinstance(data, dict):
            return None
        points = data.get("points")
        self.snapshot_points = points if isinstance(points, dict) else {}
        return data.get("roots")

    def write_snapshot(self, roots: dict[str, Any], points: dict[str, int]) -> bool:
        """Save the tree model, which reflects every event up to ``points`` (stream → last seq);
        False (logged) when it cannot be written, e.g. on a full disk."""
        path = self.directory / "snapshot.msgpack"
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(msgspec.msgpack.encode({"version": 1, "roots": roots, "points": points}))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            what = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror
            log.error(
                "cannot write the tree snapshot %s: %s. The events since the last one are "
                "kept instead (an unclean restart replays them); free space there.",
                path,
                what,
            )
            return False
        # Only now: rows up to these points may go once acknowledged, as the file covers them.
        self._points = dict(points)
        if self.journal_lost:
            self.journal_lost, self._lost_over = False, True
        self.journal_events = self.journal_bytes = 0
        return True

    def close(self, *, clean: bool) -> None:
        with self._mutex:
            if clean:
                self._set("running", "0")
            self._db.close()
        with contextlib.suppress(OSError):
            self._lock.close()

    def _set(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )
