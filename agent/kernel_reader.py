"""Empties the inotify fd on a thread of its own.

The kernel queue is small (``fs.inotify.max_queued_events``, 16,384 by default: about 0.1 s of a
busy burst). Reading it from the event loop would leave it unread while the loop encodes and
sends, and it would overflow. This thread does nothing but move raw event bytes from the kernel
into memory; the event loop parses them when it gets to them.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable

log = logging.getLogger("storage_events.agent")

_READ_SIZE = 1 << 20
# A read this much short of the buffer emptied the kernel queue (events are never split).
_QUIET_READ = _READ_SIZE - 4096


def read_available(fd: int) -> list[bytes | int]:
    """What the kernel queue holds now, then the time (ns) at which it was seen empty: a later
    overflow can only lose what changed after that moment."""
    chunks: list[bytes | int] = []
    while True:
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            chunks.append(time.time_ns())
            break
        chunks.append(data)
        if len(data) < _QUIET_READ:
            chunks.append(time.time_ns())
            break
    return chunks


class KernelReader:
    def __init__(
        self, fd: int, notify: Callable[[], None], *, max_buffered: int = 256 * 1024 * 1024
    ) -> None:
        self.fd = fd
        self.notify = notify  # called (from this thread) when data arrives in an empty buffer
        self.max_buffered = max_buffered
        # Raw event bytes, and the times (int, ns) at which the kernel queue was seen empty.
        self._chunks: list[bytes | int] = []
        self._buffered = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._go = threading.Event()  # cleared while paused
        self._go.set()
        self._thread = threading.Thread(target=self._run, name="inotify-reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def pause(self) -> None:
        """Leave events in the kernel queue (which overflows if this lasts)."""
        self._go.clear()

    def resume(self) -> None:
        self._go.set()

    def take(self) -> list[bytes | int]:
        with self._lock:
            chunks, self._chunks, self._buffered = self._chunks, [], 0
        return chunks

    def drain(self) -> list[bytes | int]:
        """What was read but not taken, then what the kernel holds right now, in order (the
        watcher checks a new watch against everything queued up to that moment)."""
        with self._lock:
            chunks, self._chunks, self._buffered = self._chunks, [], 0
            chunks += read_available(self.fd)
        return chunks

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        full_reported = False
        while not self._stop.is_set():
            if not self._go.wait(0.1):
                continue
            if self._buffered >= self.max_buffered:
                # The agent is far behind; let the kernel queue take the strain (an overflow
                # there is announced and recovered by a rescan) rather than grow without bound.
                if not full_reported:
                    log.warning(
                        "%d MiB of kernel events waiting to be processed", self._buffered >> 20
                    )
                    full_reported = True
                time.sleep(0.01)
                continue
            full_reported = False
            if not poller.poll(100):
                # The kernel queue is empty now: a later overflow can only lose what changes
                # after this moment. Kept in order with the chunks, as the time in ns.
                with self._lock:
                    if self._chunks and type(self._chunks[-1]) is int:
                        self._chunks[-1] = time.time_ns()
                    else:
                        self._chunks.append(time.time_ns())
                continue
            # Read and append under the lock: drain() reads the same fd, and the order of the
            # chunks is the order of the events.
            with self._lock:
                try:
                    data = os.read(self.fd, _READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError as e:  # the fd was closed under us: the agent is stopping
                    log.debug("inotify reader stops: %s", e)
                    return
                was_empty = not self._buffered
                self._chunks.append(data)
                if len(data) < _QUIET_READ:
                    self._chunks.append(time.time_ns())  # the queue was empty as it returned
                self._buffered += len(data)
            if was_empty:
                self.notify()
