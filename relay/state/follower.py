"""The namespace view of a relay whose log is shared (``--store nats://``): each replica keeps
its own, in a database under its ``--data``, from the records the log hands every listener in
id order. Each commit of the view records the id it is as of (in the same transaction), so a
snapshot of it and the shared log's events after that id meet without a gap or a duplicate,
as with the SQLite store."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path

from storage_events.relay.log.base import EventLog, Record, StoreError
from storage_events.relay.state.tables import Tables

log = logging.getLogger("storage_events.relay")

PAGE = 5000


class Follower:
    def __init__(self, directory: Path, events: EventLog) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "namespace.sqlite3"
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self.tables = Tables(self._conn)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the namespace view {self.path}: {e}") from None
        self._log = events
        self._early: list[Record] = []  # handed over before start() caught up
        self._started = False
        events.follow(self._stored)

    async def start(self) -> None:
        """Catch up with the log (the view may be far behind it: new, or the relay was down);
        a view of another log (the stream was made anew) is started again from this one."""
        conn = self._conn
        conn.execute(
            "CREATE TABLE IF NOT EXISTS ns_log (one INTEGER PRIMARY KEY CHECK (one = 1), "
            "epoch INTEGER NOT NULL)"
        )
        row = conn.execute("SELECT epoch FROM ns_log").fetchone()
        epoch = self._log.epoch
        if row is not None and (row[0] != epoch or self.tables.applied > self._log.head):
            log.warning(
                "namespace view %s was kept from another event log (the stream was made "
                "anew): building it again from this one",
                self.path,
            )
            conn.execute("BEGIN IMMEDIATE")
            for table in ("ns_nodes", "ns_halves", "ns_applied"):
                conn.execute(f"DELETE FROM {table}")
            conn.execute("COMMIT")
            self.tables.rolled_back(conn)
        conn.execute("INSERT OR REPLACE INTO ns_log VALUES (1, ?)", (epoch,))
        applied = self.tables.applied
        if applied < self._log.head:
            log.info(
                "namespace view %s: applying events %d-%d of the shared log",
                self.path,
                applied + 1,
                self._log.head,
            )
        if applied + 1 < self._log.first:
            log.warning(
                "namespace view %s: events %d-%d were dropped by the log's retention before "
                "this view saw them; what they created is missing from it until agents rescan",
                self.path,
                applied + 1,
                self._log.first - 1,
            )
        while self.tables.applied < self._log.head and not self.tables.stalled:
            records = await self._log.read(self.tables.applied, PAGE)
            if not records:
                break
            self._apply(records)
        early, self._early = self._early, []
        self._started = True
        self._apply(early)

    def _stored(self, records: list[Record]) -> None:
        if self.tables.stalled:
            return
        if self._started:
            self._apply(records)
        else:
            self._early.extend(records)

    def _apply(self, records: list[Record]) -> None:
        fresh = [r.event() for r in records if r.id > self.tables.applied]
        if not fresh:
            return
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            self.tables.apply_or_stall(conn, fresh)
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            with contextlib.suppress(sqlite3.Error):
                self.tables.rolled_back(conn)
            # Applying later records would leave these out: the view stays as it was. A
            # snapshot of it is still exact as of its id (the events after it come from the
            # log), only older and older; a restart catches it up.
            self.tables.stalled = True
            log.error(
                "namespace view %s could not store events %d-%d: %s; it stays as of event %d "
                "(free space there, then restart the relay: it catches up from the log)",
                self.path,
                fresh[0].id,
                fresh[-1].id,
                e,
                self.tables.applied,
            )

    def close(self) -> None:
        self._conn.close()
