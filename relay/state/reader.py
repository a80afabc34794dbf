"""Reading the namespace view: snapshots and listings, each in one read transaction of a
connection of its own, on a thread (WAL: commits go on meanwhile, and the reader keeps seeing
the view as of the id it started at)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from storage_events import sse
from storage_events.namespace import (
    Entry,
    as_event,
    as_moving,
    key_of,
    path_of,
)
from storage_events.relay.feed.filters import Filter
from storage_events.relay.state import tables
from storage_events.relay.state.tables import decode_entry
from storage_events.wire import event_json

PAGE = 2000  # rows read per step
MAX_SECONDS = 600  # a snapshot must be read within this (1,000,000 entries take seconds)

log = logging.getLogger("storage_events.relay")


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


@dataclass(slots=True)
class Listed:
    """One page of a listing: (site, key, entry) in order, and where the next page starts."""

    id: int  # the view is as of this event id
    entries: list[tuple[str, bytes, Entry]]
    next: tuple[str, bytes] | None  # (site, key) of the last entry, when there may be more


@dataclass(slots=True)
class Directory:
    """A path as the view has it: its entry (site, entry) if any, and what is directly in it
    (key → (site, its entry, or None for a directory known only from what is below it))."""

    id: int
    entry: tuple[str, Entry] | None
    implied: bool  # a directory: "/", or something is below it
    children: dict[bytes, tuple[str, Entry | None]]
    site: str = ""  # the first site where the path is, entry or not


class Snapshot:
    """The view under a filter as of event :attr:`id`: ``state`` SSE messages, page by page,
    then the ``snapshot`` message. Opened with :meth:`View.snapshot`; closed when read through
    (or with :meth:`close`)."""

    def __init__(self, conn: sqlite3.Connection, filter: Filter) -> None:
        self._conn = conn
        self._filter = filter
        conn.execute("BEGIN")
        self.id = tables.applied(conn)  # (the read transaction's view starts here)
        self.entries = 0

    async def pages(self) -> AsyncIterator[bytes]:
        steps = self._steps()
        started = time.monotonic()
        try:
            while True:
                if time.monotonic() - started > MAX_SECONDS:
                    # Its read transaction holds back the log's checkpoints (the WAL grows):
                    # a reader this slow is cut off, and asks again (without the snapshot's
                    # own message, it knows it has no whole one).
                    log.warning(
                        "a snapshot (as of event %d) was not read within %d s: ended after "
                        "%d entries",
                        self.id,
                        MAX_SECONDS,
                        self.entries,
                    )
                    return
                chunk = await asyncio.to_thread(next, steps, None)
                if chunk is None:
                    break
                yield chunk
            done = json.dumps({"id": self.id, "entries": self.entries}).encode()
            yield sse.render(done, event="snapshot", id=self.id)
        finally:
            await asyncio.to_thread(self.close)

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("COMMIT")
        self._conn.close()

    def _steps(self) -> Iterator[bytes]:
        """SSE bytes of about :data:`PAGE` entries at a time (on a thread)."""
        f = self._filter
        out: list[bytes] = []
        for site, key, e, half, cookie in self._rows():
            path = path_of(key)[0]
            if f.nodes and e.node not in f.nodes:
                continue
            if f.scope is not None and not f.scope.allows(site, path):
                continue
            ev = as_event(site, key, e) if half is None else as_moving(site, key, e, half, cookie)
            out.append(sse.render(event_json(ev), event="state"))
            if len(out) >= PAGE:
                self.entries += len(out)
                yield b"".join(out)
                out = []
        if out:
            self.entries += len(out)
            yield b"".join(out)

    def _rows(self) -> Iterator[tuple[str, bytes, Entry, Entry | None, int]]:
        f = self._filter
        wanted = sorted(f.sites) if f.sites else tables.sites(self._conn)
        if f.scope is not None and f.scope.sites is not None:
            wanted = [s for s in wanted if s in f.scope.sites]
        roots = [key_of(p, None) for p in f.prefixes] or [b"/"]
        for site in wanted:
            for root in roots:
                for key, blob in tables.walk(self._conn, site, root):
                    if blob is not None:  # (a directory known only from what is below it)
                        yield site, key, decode_entry(blob), None, 0
        prefixes = f.prefixes
        for cookie, half, site, key, blob in tables.moving(self._conn):
            if blob is None or (f.sites and site not in f.sites):
                continue
            if prefixes and not any(_under(key, key_of(p, None)) for p in prefixes):
                continue
            yield site, key, decode_entry(blob), decode_entry(half), cookie


def _under(key: bytes, root: bytes) -> bool:
    return root == b"/" or key == root or key.startswith(root + b"/")


class View:
    """The namespace view of one relay, read from the database its tables are in."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def snapshot(self, filter: Filter) -> Snapshot:
        conn = await asyncio.to_thread(_connect, self.path)
        return await asyncio.to_thread(Snapshot, conn, filter)

    async def directory(self, sites: list[str] | None, key: bytes) -> Directory:
        """What the view holds at ``key`` and directly in it, of ``sites`` (None: every site)
        merged: a name in several sites is listed once, from the first site by name."""
        return await asyncio.to_thread(self._directory, sites, key)

    def _directory(self, sites: list[str] | None, key: bytes) -> Directory:
        conn = _connect(self.path)
        try:
            conn.execute("BEGIN")
            found = Directory(tables.applied(conn), None, key == b"/", {})
            base = key.rstrip(b"/")
            for site in sorted(sites) if sites is not None else tables.sites(conn):
                node = tables.find(conn, site, key)
                if node is None:
                    continue
                here = decode_entry(node[1]) if node[1] is not None else None
                found.site = found.site or site
                if here is None:  # a directory known from what is below it
                    found.implied = True
                else:
                    found.entry = found.entry or (site, here)
                    if not here.is_dir:
                        continue
                for name, blob in tables.children(conn, site, node[0]):
                    child = decode_entry(blob) if blob is not None else None
                    found.children.setdefault(base + b"/" + name, (site, child))
            conn.execute("COMMIT")
        finally:
            conn.close()
        return found

    async def listing(
        self, sites: list[str] | None, key: bytes, after: tuple[str, bytes] | None, limit: int
    ) -> Listed:
        """The entry at ``key`` and all below it, of ``sites`` (None: every site), by site then
        depth first (see :func:`tables.walk`), from after ``after``; the caller checks each
        against the reader's scope."""
        return await asyncio.to_thread(self._listing, sites, key, after, limit)

    def _listing(
        self, sites: list[str] | None, key: bytes, after: tuple[str, bytes] | None, limit: int
    ) -> Listed:
        conn = _connect(self.path)
        try:
            conn.execute("BEGIN")
            at = tables.applied(conn)
            out: list[tuple[str, bytes, Entry]] = []
            for site in sorted(sites) if sites is not None else tables.sites(conn):
                if after is not None and site < after[0]:
                    continue
                start = after[1] if after is not None and site == after[0] else None
                for k, blob in tables.walk(conn, site, key, start):
                    if blob is None:
                        continue
                    out.append((site, k, decode_entry(blob)))
                    if len(out) >= limit:
                        return Listed(at, out, (site, k))
            conn.execute("COMMIT")
        finally:
            conn.close()
        return Listed(at, out, None)
