"""``storage-events exec``: run a command for every event of a feed, at least once, with a
durable checkpoint, retries and a dead letter.

The command is an argument vector with placeholders (``{path}``, ``{old_path}``, ``{site}``,
``{node}``, ``{flags}``, ``{id}``, ``{size}``), run without a shell: a file name is one argument,
whatever it holds. Up to ``jobs`` commands run at once, so events finish out of order; the
state directory keeps the highest id below which every event is finished (the feed resumes
after it) and the ids finished above it (skipped when they come again). A command that fails
is run again after a growing pause, ``retries`` times, then its event is written to the dead
letter (``dead-letter.jsonl``) and counts as finished. What was running when the runner was
killed runs again at the next start: at least once, and only that twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from .client import FeedError, asubscribe
from .errors import StorageEventsError
from .wire import Event, event_json

log = logging.getLogger("storage_events.exec")

PLACEHOLDERS = ("{path}", "{old_path}", "{site}", "{node}", "{flags}", "{id}", "{size}")
OUTPUT_KEPT = 4096  # bytes of a command's output written to the log
FIRST_PAUSE = 0.5  # seconds before the first retry; doubled each time, up to MAX_PAUSE
MAX_PAUSE = 30.0


def argv_for(template: list[str], ev: Event) -> list[str]:
    """The command for ``ev``: each placeholder replaced inside each argument (paths in their
    exact bytes, as the file system has them)."""
    values = {
        "{path}": os.fsdecode(ev.raw_path) if ev.raw_path is not None else ev.path,
        "{old_path}": (
            os.fsdecode(ev.raw_old_path)
            if ev.raw_old_path is not None
            else (ev.old_path if ev.old_path is not None else "")
        ),
        "{site}": ev.site,
        "{node}": ev.node,
        "{flags}": ",".join(ev.flags),
        "{id}": str(ev.id),
        "{size}": "" if ev.size is None else str(ev.size),
    }
    out = []
    for arg in template:
        if "{" in arg:
            for name, value in values.items():
                arg = arg.replace(name, value)
        out.append(arg)
    return out


@dataclass
class Progress:
    """Which events are finished, without I/O: the highest id below which all are
    (:attr:`mark`), and those finished above it."""

    mark: int = 0
    done: set[int] = field(default_factory=set)
    started: set[int] = field(default_factory=set)  # taken from the feed, not finished

    def wanted(self, id: int) -> bool:
        return id > self.mark and id not in self.done and id not in self.started

    def start(self, id: int) -> None:
        self.started.add(id)

    def finish(self, id: int) -> int | None:
        """``id`` is finished; the new mark if it moved. (Ids come in order: one below the
        oldest still running was either finished or not wanted.)"""
        self.started.discard(id)
        self.done.add(id)
        mark = min(self.started) - 1 if self.started else max(self.done)
        if mark <= self.mark:
            return None
        self.mark = mark
        self.done = {d for d in self.done if d > mark}
        return mark


class State:
    """The state directory: the mark and what is finished above it (SQLite), the dead letter
    (JSON lines, for people and scripts)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        try:
            self._db = sqlite3.connect(directory / "state.sqlite3", isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(
                "CREATE TABLE IF NOT EXISTS mark (one INTEGER PRIMARY KEY CHECK (one = 1), "
                "id INTEGER NOT NULL, feed TEXT NOT NULL);"
                "CREATE TABLE IF NOT EXISTS done (id INTEGER PRIMARY KEY);"
            )
        except sqlite3.Error as e:
            raise ExecError(f"cannot use the state directory {directory}: {e}") from None
        self.dead = directory / "dead-letter.jsonl"

    def load(self, feed: str) -> Progress:
        row = self._db.execute("SELECT id, feed FROM mark").fetchone()
        if row is not None and row[1] != feed:
            raise ExecError(
                f"the state directory {self.directory} holds the checkpoint of another feed "
                f"({row[1]}): give each feed its own --state"
            )
        mark = row[0] if row else 0
        done = {r[0] for r in self._db.execute("SELECT id FROM done WHERE id > ?", (mark,))}
        return Progress(mark, done)

    def finished(self, feed: str, id: int, mark: int | None) -> None:
        """Durably: ``id`` is finished (and the mark moved to ``mark``)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        if mark is None:
            db.execute("INSERT OR IGNORE INTO done VALUES (?)", (id,))
        else:
            db.execute("INSERT OR REPLACE INTO mark VALUES (1, ?, ?)", (mark, feed))
            db.execute("DELETE FROM done WHERE id <= ?", (mark,))
            if id > mark:
                db.execute("INSERT OR IGNORE INTO done VALUES (?)", (id,))
        db.execute("COMMIT")

    def bury(self, ev: Event, argv: list[str], attempts: int, why: str) -> None:
        record = {
            "id": ev.id,
            "event": json.loads(event_json(ev)),
            "argv": argv,
            "attempts": attempts,
            "error": why,
            "at": time.time(),
        }
        with self.dead.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        self._db.close()


class ExecError(StorageEventsError):
    """The runner cannot go on (its state directory, the relay's refusal); the message says why
    and what to do."""


@dataclass
class Runner:
    url: str
    template: list[str]
    state: State
    jobs: int = 1
    retries: int = 3
    paths: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    since: str | None = None
    token: str | None = None
    grace: float = 10.0
    ran: int = 0
    failed: int = 0
    buried: int = 0

    async def run(self) -> None:
        feed = self.url.rstrip("/")
        progress = self.state.load(feed)
        since = str(progress.mark) if progress.mark else self.since
        log.info(
            "running %s for the events of %s after %s, %d at a time",
            self.template[0],
            feed,
            since or "now",
            self.jobs,
        )
        slots = asyncio.Semaphore(self.jobs)
        running: set[asyncio.Task[None]] = set()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        reader = asyncio.create_task(self._read(feed, since, progress, slots, running))
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({reader, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done():
                reader.result()  # (a FeedError: the relay refused)
        finally:
            reader.cancel()
            stopping.cancel()
            if running:
                log.info("waiting up to %g s for %d running commands", self.grace, len(running))
                _, late = await asyncio.wait(running, timeout=self.grace)
                for task in late:  # they run again at the next start
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def _read(
        self,
        feed: str,
        since: str | None,
        progress: Progress,
        slots: asyncio.Semaphore,
        running: set[asyncio.Task[None]],
    ) -> None:
        async for item in asubscribe(
            feed,
            paths=self.paths,
            sites=self.sites,
            types=self.types,
            since=since,
            token=self.token,
        ):
            if item.type in ("overflow", "gap"):
                log.warning(
                    "the feed reports lost events (%s): %s; no command runs for them",
                    item.type,
                    item.data,
                )
                continue
            if item.type != "inotify":
                continue
            ev = item.event
            if not progress.wanted(ev.id):
                continue
            await slots.acquire()  # (reading waits while every slot is busy)
            progress.start(ev.id)
            task = asyncio.create_task(self._handle(feed, ev, progress, slots))
            running.add(task)
            task.add_done_callback(running.discard)

    async def _handle(
        self, feed: str, ev: Event, progress: Progress, slots: asyncio.Semaphore
    ) -> None:
        try:
            argv = argv_for(self.template, ev)
            why = ""
            pause = FIRST_PAUSE
            for attempt in range(1, self.retries + 2):
                why = await self._once(ev, argv, attempt)
                if not why:
                    break
                self.failed += 1
                if attempt <= self.retries:
                    log.warning(
                        "event %d %s: %s; trying again in %.1f s", ev.id, ev.path, why, pause
                    )
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, MAX_PAUSE)
            else:
                self.buried += 1
                self.state.bury(ev, argv, self.retries + 1, why)
                log.error(
                    "event %d %s: %s, %d times: written to %s",
                    ev.id,
                    ev.path,
                    why,
                    self.retries + 1,
                    self.state.dead,
                )
            self.state.finished(feed, ev.id, progress.finish(ev.id))
        finally:
            slots.release()

    async def _once(self, ev: Event, argv: list[str], attempt: int) -> str:
        """Run the command once; '' if it succeeded, else what went wrong."""
        started = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as e:
            return f"cannot run {argv[0]!r}: {e.strerror or e}"
        try:
            output, _ = await proc.communicate()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        self.ran += 1
        took = time.monotonic() - started
        tail = output[-OUTPUT_KEPT:].decode(errors="replace").rstrip()
        log.info(
            "event %d %s: exit %d after %.2f s (attempt %d)%s",
            ev.id,
            ev.path,
            proc.returncode,
            took,
            attempt,
            (":\n" + tail) if tail else "",
        )
        return "" if proc.returncode == 0 else f"exit status {proc.returncode}"


def run(runner: Runner) -> None:
    try:
        asyncio.run(runner.run())
    except FeedError as e:
        raise ExecError(str(e)) from None
    finally:
        runner.state.close()
