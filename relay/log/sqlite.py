"""The default, embedded event log: one SQLite database in WAL mode under ``--data DIR``.

Appends are group-committed: every batch that arrives, from any connection, while a commit is
being made waits for the next one, and all of them go in one transaction, are handed to the
listeners once, and are answered together. Nothing waits on purpose for company, so an idle
relay commits a lone batch at once.

With ``durability = "normal"`` a commit only writes to the WAL in the page cache, which costs
less than handing it to a thread and back, so it runs on the event loop; the checkpoints (the
part that syncs) run on a thread of their own. With ``"full"`` every commit syncs, so commits
run on the writer thread and the event loop never waits on the disk. Retention runs on the
writer thread too; readers have a connection per thread, and WAL lets catch-up reads run while
events are being written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import sqlite3
import threading
import time
from collections import ChainMap
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from storage_events.relay.log.admission import Owner, Reporter, admit
from storage_events.relay.log.base import (
    KEEP_ALL,
    LogState,
    Record,
    Retention,
    StoreError,
    make_record,
)
from storage_events.relay.state.tables import Tables
from storage_events.wire import Event, event_from_json, event_json, flags_mask

log = logging.getLogger("storage_events.relay")

T = TypeVar("T")

EPOCH = "@epoch"
# Bytes of events committed between two checkpoints, about what SQLite's own default (1,000
# pages) lets the WAL grow to before it checkpoints from the committing connection.
CHECKPOINT_BYTES = 4 * 1024 * 1024

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
    site   TEXT,                 -- the site the stream belongs to (NULL for peers' checkpoints)
    node   TEXT,                 -- and its node
    direct INTEGER               -- 1: published here by its agent; 0: through federation
);
"""


def _owner_row(owner: Owner | None) -> tuple[str | None, str | None, int | None]:
    if owner is None:
        return None, None, None
    return owner.site, owner.node, None if owner.direct is None else int(owner.direct)


@dataclass(slots=True)
class _Append:
    """One caller's batch, waiting for the commit that stores it."""

    events: list[Event]
    checkpoint: tuple[str, int] | None
    done: asyncio.Future[list[Record]]


class SQLiteLog(LogState):
    def __init__(
        self,
        directory: Path,
        *,
        synchronous: str = "NORMAL",
        name: str = "relay",
        retention: Retention = KEEP_ALL,
        namespace: bool = True,
    ) -> None:
        self.name = name  # this relay's name, stamped on every event it stores
        self.retention = retention
        self.stored = 0
        self.commits = 0  # transactions that stored events
        self._listeners = []
        self._writing = ThreadPoolExecutor(1, thread_name_prefix="log-writer")
        self._lock = asyncio.Lock()  # commits, retention and closing, one at a time
        self._waiting: list[_Append] = []  # for the next commit, in arrival order
        self._scheduled = False  # a commit is due or being made: new batches join the next
        self._later: asyncio.Future[None] | None = None  # the commit task, when not inline
        # "normal" commits on the loop (see the module's docstring).
        self._inline = synchronous.upper() != "FULL"
        self._checkpointing = ThreadPoolExecutor(1, thread_name_prefix="log-checkpoint")
        self._checkpoint: asyncio.Future[None] | None = None
        self._unchecked = 0  # bytes committed since the last checkpoint began
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "events.sqlite3"
        self._synchronous = synchronous
        self._local = threading.local()
        self._writer = self._connect()
        if self._inline:  # the checkpoint thread does it (a checkpoint syncs the database)
            self._writer.execute("PRAGMA wal_autocheckpoint=0")
        self._writer.executescript(_SCHEMA)
        columns = {row[1] for row in self._writer.execute("PRAGMA table_info(events)")}
        if "received" not in columns:  # a log written by version 0.1.0
            self._writer.execute(
                "ALTER TABLE events ADD COLUMN received INTEGER NOT NULL DEFAULT 0"
            )
        self._head, first, self._bytes = self._writer.execute(
            "SELECT coalesce(max(id), 0), min(id), coalesce(sum(length(data)), 0) FROM events"
        ).fetchone()
        self._first = first if first is not None else self._head + 1
        columns = {row[1] for row in self._writer.execute("PRAGMA table_info(streams)")}
        # Logs written before streams were tied to their site, then to their node and route.
        for column, kind in (("site", "TEXT"), ("node", "TEXT"), ("direct", "INTEGER")):
            if column not in columns:
                self._writer.execute(f"ALTER TABLE streams ADD COLUMN {column} {kind}")
        rows = self._writer.execute(
            "SELECT stream, seq, site, node, direct FROM streams"
        ).fetchall()
        self._positions: dict[str, int] = {row[0]: row[1] for row in rows}
        self._owners: dict[str, Owner] = {
            stream: Owner(site, node, None if direct is None else bool(direct))
            for stream, _, site, node, direct in rows
            if site
        }
        self._report = Reporter()
        # The namespace view, changed in each commit's transaction (see relay/state).
        self.namespace = Tables(self._writer) if namespace else None
        if self.namespace is not None and self.namespace.applied < self._head:
            self._build_namespace(self.namespace)
        if EPOCH not in self._positions:
            # Identifies this log: peers keep checkpoints per epoch, so a log that was deleted
            # and started again is read from its beginning, not from where the old one was.
            self._writer.execute(
                "INSERT INTO streams (stream, seq) VALUES (?, ?)", (EPOCH, secrets.randbits(53))
            )
            self._positions[EPOCH] = self._writer.execute(
                "SELECT seq FROM streams WHERE stream = ?", (EPOCH,)
            ).fetchone()[0]

    def _build_namespace(self, view: Tables) -> None:
        """Bring the view up to the log's head from the events it holds (a log written before
        the view existed, or by a relay that kept none)."""
        (first,) = self._writer.execute(
            "SELECT min(id) FROM events WHERE id > ?", (view.applied,)
        ).fetchone()
        if first is not None and first > view.applied + 1:
            log.warning(
                "namespace view of %s: events %d-%d were dropped by retention before the view "
                "saw them; what they created is missing from it until the agents rescan",
                self.path,
                view.applied + 1,
                first - 1,
            )
        log.info("namespace view of %s: applying events %d-%d", self.path, first, self._head)
        after = view.applied
        while True:
            rows = self._writer.execute(
                "SELECT data FROM events WHERE id > ? ORDER BY id LIMIT 10000", (after,)
            ).fetchall()
            if not rows:
                break
            events = [event_from_json(row[0]) for row in rows]
            self._writer.execute("BEGIN IMMEDIATE")
            view.apply_or_stall(self._writer, events)
            self._writer.execute("COMMIT")
            if view.stalled:
                break
            after = events[-1].id

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

    async def start(self) -> None:
        pass  # opened by the constructor: a bad --data is an error before anything listens

    async def position(self, key: str) -> int:
        return self._positions.get(key, 0)

    def held(self, key: str) -> int:
        return self._positions.get(key, 0)

    async def append(
        self, events: list[Event], checkpoint: tuple[str, int] | None = None
    ) -> list[Record]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[Record]] = loop.create_future()
        self._waiting.append(_Append(events, checkpoint, done))
        if not self._scheduled:
            self._scheduled = True
            # Behind whatever the loop has ready: the other connections' frames that arrived
            # with this one join the same commit, and no one waits longer.
            loop.call_soon(self._commit_soon)
        return await done

    def _commit_soon(self) -> None:
        if self._inline and not self._lock.locked():
            self._scheduled = False
            group, self._waiting = self._waiting, []
            self._commit_inline(group)
        else:  # on the writer thread, or after retention
            self._later = asyncio.ensure_future(self._commit_later())

    async def _commit_later(self) -> None:
        try:
            while self._waiting:
                group, self._waiting = self._waiting, []
                async with self._lock:
                    if self._inline:
                        self._commit_inline(group)
                        continue
                    try:
                        stored = await self._on_writer(self._commit, group)
                    except StoreError as e:
                        self._fail(group, e)
                        continue
                self._deliver(group, stored)
        finally:
            self._scheduled = False

    def _commit_inline(self, group: list[_Append]) -> None:
        try:
            stored = self._commit(group)
        except StoreError as e:
            self._fail(group, e)
            return
        self._deliver(group, stored)

    def _deliver(self, group: list[_Append], stored: list[list[Record]]) -> None:
        records = [r for part in stored for r in part] if len(stored) > 1 else stored[0]
        if records:
            self._publish(records)  # (once per commit: listeners see it whole)
            self._checkpoint_soon(records)
        for each, part in zip(group, stored, strict=True):
            if not each.done.done():  # (a caller gone meanwhile: its sender resends)
                each.done.set_result(part)

    @staticmethod
    def _fail(group: list[_Append], error: StoreError) -> None:
        for each in group:
            if not each.done.done():
                each.done.set_exception(error)

    async def _on_writer(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._writing, fn, *args)

    def _commit(self, group: list[_Append]) -> list[list[Record]]:
        """Store every batch of ``group`` in one transaction; what each stored, in order."""
        marks: dict[str, int] = {}
        owners: dict[str, Owner] = {}
        # Each batch is admitted after those before it in the group, as if stored already.
        several = len(group) > 1
        positions = ChainMap(marks, self._positions) if several else self._positions
        known = ChainMap(owners, self._owners) if several else self._owners
        rows: list[tuple[int, str, str, str, int, bytes, int]] = []
        stored: list[list[Record]] = []
        numbered: list[Event] = []
        now = time.time_ns()
        head = self._head
        name = self.name
        for each in group:
            taken = admit(each.events, positions, known, relayed=each.checkpoint is not None)
            self._report(taken)
            records = []
            for ev in taken.events:
                head += 1
                ev = msgspec.structs.replace(
                    ev, id=head, via=[*ev.via, name], origin_id=ev.origin_id if ev.via else head
                )
                flags = flags_mask(ev.flags)
                data = event_json(ev)
                rows.append((head, ev.site, ev.node, ev.path, flags, data, now))
                numbered.append(ev)
                records.append(make_record(head, ev.site, ev.node, ev.path, flags, data, ev))
            stored.append(records)
            marks.update(taken.positions)
            owners.update(taken.owners)
            if each.checkpoint is not None:  # how far a federation peer's feed was taken in
                marks[each.checkpoint[0]] = each.checkpoint[1]
        if not marks and not owners:
            return stored
        streams = [
            (key, marks.get(key, self._positions.get(key, 0)), *_owner_row(owners.get(key)))
            for key in marks.keys() | owners.keys()
        ]
        w = self._writer
        try:
            w.execute("BEGIN IMMEDIATE")
            w.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            w.executemany(
                "INSERT INTO streams (stream, seq, site, node, direct) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(stream) DO UPDATE SET seq = excluded.seq, "
                "site = coalesce(excluded.site, streams.site), "
                "node = coalesce(excluded.node, streams.node), "
                "direct = coalesce(excluded.direct, streams.direct)",
                streams,
            )
            if self.namespace is not None:
                self.namespace.apply_or_stall(w, numbered, now)
            w.execute("COMMIT")
        except sqlite3.Error as e:
            if w.in_transaction:  # (SQLite may have rolled back by itself: disk full, I/O)
                with contextlib.suppress(sqlite3.Error):
                    w.execute("ROLLBACK")
            if self.namespace is not None:
                with contextlib.suppress(sqlite3.Error):
                    self.namespace.rolled_back(w)
            raise StoreError(self._cannot_write(e)) from None
        self._positions.update(marks)
        self._owners.update(owners)
        if rows:
            if self._first > self._head:  # was empty
                self._first = self._head + 1
            self._head = head
            self.stored += len(rows)
            self.commits += 1
            self._bytes += sum(len(r[5]) for r in rows)
        return stored

    def _checkpoint_soon(self, records: list[Record]) -> None:
        """Copy the WAL into the database on the checkpoint thread once enough was committed
        (only needed when commits run on the loop, with SQLite's own checkpoints off)."""
        if not self._inline:
            return
        self._unchecked += sum(len(r.data) for r in records)
        if self._unchecked < CHECKPOINT_BYTES or self._checkpoint is not None:
            return
        self._unchecked = 0
        self._checkpoint = asyncio.get_running_loop().run_in_executor(
            self._checkpointing, self._run_checkpoint
        )
        self._checkpoint.add_done_callback(self._checkpoint_done)

    def _run_checkpoint(self) -> None:
        # PASSIVE: never waits for a reader or a writer; what it cannot copy now, a later one
        # does. (A connection of its own: the writer's is used on the loop meanwhile.)
        self._local_connection().execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _checkpoint_done(self, done: asyncio.Future[None]) -> None:
        self._checkpoint = None
        if not done.cancelled() and done.exception() is not None:
            log.warning("event log checkpoint of %s failed: %s", self.path, done.exception())

    def _cannot_write(self, e: sqlite3.Error) -> str:
        try:
            free = f"{shutil.disk_usage(self.path.parent).free / 2**20:,.1f} MiB free there"
        except OSError as stat_error:
            free = f"its free space is unknown ({stat_error.strerror})"
        return (
            f"cannot write the event log {self.path} ({e}; {free}): free space on that "
            "file system or give the relay another --data; it retries by itself, and "
            "senders keep their events until they are stored"
        )

    async def trim(self) -> int:
        async with self._lock:
            try:
                return await self._on_writer(self._trim, self.retention)
            except sqlite3.Error as e:
                raise StoreError(f"retention: {self._cannot_write(e)}") from None

    def _trim(self, retention: Retention) -> int:
        max_age, max_events, max_bytes = (
            retention.max_age,
            retention.max_events,
            retention.max_bytes,
        )
        w = self._writer
        cut = self._first - 1
        if max_events and self._head - cut > max_events:
            cut = self._head - max_events
        if max_age:
            oldest_kept = time.time_ns() - int(max_age * 1e9)
            (aged,) = w.execute(
                "SELECT max(id) FROM events WHERE received < ?", (oldest_kept,)
            ).fetchone()
            cut = max(cut, aged or 0)
        excess = self._bytes - self._sum_through(cut) - max_bytes if max_bytes else 0
        while excess > 0:  # walk forward from the cut until enough bytes would go
            rows = w.execute(
                "SELECT id, length(data) FROM events WHERE id > ? ORDER BY id LIMIT 10000", (cut,)
            ).fetchall()
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
            "SELECT coalesce(sum(length(data)), 0) FROM events WHERE id <= ?", (id,)
        ).fetchone()
        return total

    async def read(self, after: int, limit: int) -> list[Record]:
        if after >= self._head:
            return []
        return await asyncio.to_thread(self._read, after, limit)

    def _local_connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def _read(self, after: int, limit: int) -> list[Record]:
        rows = self._local_connection().execute(
            "SELECT id, site, node, path, flags, data FROM events WHERE id > ? ORDER BY id LIMIT ?",
            (after, limit),
        )
        return [make_record(*row) for row in rows.fetchall()]

    async def close(self) -> None:
        async with self._lock:
            if self._checkpoint is not None:
                await asyncio.wait({self._checkpoint})
            self._checkpointing.shutdown(wait=True)
            self._writing.shutdown(wait=True)
            self._writer.close()
